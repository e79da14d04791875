"""save_quantized / load_quantized: exact round trips, ties, sizes, safetensors interop."""

from __future__ import annotations

import io

import pytest
import torch

import diffq_triton as dq
from diffq_triton import serialization
from diffq_triton.serialization.tensor_record import QuantizedTensor
from tests.models import TiedLM, conv_net, mlp

# Every test runs on the native codec and on the torch path: both must write the same bytes.
pytestmark = pytest.mark.usefixtures("cpu_codec")


def quantized_weights(model, quantizer):
    """The weights the quantized model uses in eval: what a loaded file must reproduce."""
    quantizer.quantize()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantizer.unquantize()
    return weights


CASES = {
    "diffq-g8-tied": (TiedLM, dq.DiffQuantizer, dict(min_size=0.001, group_size=8)),
    "diffq-g1-f16": (TiedLM, dq.DiffQuantizer, dict(min_size=0.001, group_size=1,
                                                    float16=True)),
    "diffq-g5-conv": (conv_net, dq.DiffQuantizer, dict(min_size=0.0001, group_size=5)),
    "diffq-g0": (conv_net, dq.DiffQuantizer, dict(min_size=0.0001, group_size=0)),
    "uniform-3": (lambda: mlp(32, 300, 10), dq.UniformQuantizer, dict(bits=3, min_size=0.001)),
    "lsq-4": (lambda: mlp(32, 300, 10), dq.LSQ, dict(bits=4, min_size=0.001)),
}


def spread_logits(model):
    # Mixed widths: random logits so that groups round to many different widths.
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_diffq"):
                p.copy_(torch.randn(p.shape, generator=gen) * 3)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_round_trip_matches_eval_weights(case, tmp_path):
    make, quantizer_cls, kwargs = CASES[case]
    torch.manual_seed(0)
    model = make()
    quantizer = quantizer_cls(model, **kwargs)
    spread_logits(model)
    path = tmp_path / "model.safetensors"
    serialization.save_quantized(quantizer, path)
    expected = quantized_weights(model, quantizer)
    size = quantizer.true_model_size() * 2**20
    assert path.stat().st_size <= size * 1.01 + 16384
    fresh = make()
    serialization.load_quantized(fresh, path)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, expected[name]), name
    if isinstance(fresh, TiedLM):
        assert fresh.out.weight is fresh.emb.weight


# 0.35506120324134827 is a step whose straight-through form ``(s - s·g) + s·g`` is an ulp off
# ``s`` (numel 3072, 5 bits): eval must still use the plain step, as files decode.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=str)
def test_lsq_eval_weights_are_the_file_weights(dtype):
    torch.manual_seed(0)
    model = torch.nn.Linear(64, 48, bias=False)
    with torch.no_grad():
        model.weight.mul_(40)
    model = model.to(dtype)
    quantizer = dq.LSQ(model, bits=5, min_size=0)
    with torch.no_grad():
        model.weight_lsq.fill_(0.35506120324134827)
    expected = quantized_weights(model, quantizer)
    fresh = torch.nn.Linear(64, 48, bias=False).to(dtype)
    serialization.load_quantized(fresh, serialization.file_bytes(quantizer))
    assert torch.equal(fresh.weight, expected["weight"])


def test_file_object_and_bytes_agree():
    torch.manual_seed(0)
    model = mlp()
    quantizer = dq.UniformQuantizer(model, bits=5, min_size=0)
    buffer = io.BytesIO()
    serialization.save_quantized(quantizer, buffer)
    data = buffer.getvalue()
    a, b = mlp(), mlp()
    serialization.load_quantized(a, io.BytesIO(data))
    serialization.load_quantized(b, data)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_untied_target_gets_every_use():
    torch.manual_seed(0)
    model = TiedLM()
    quantizer = dq.DiffQuantizer(model, min_size=0.001, group_size=8)
    data = serialization.file_bytes(quantizer)
    expected = quantized_weights(model, quantizer)
    untied = TiedLM()
    untied.out.weight = torch.nn.Parameter(untied.emb.weight.detach().clone())
    serialization.load_quantized(untied, data)
    assert torch.equal(untied.out.weight, expected["emb.weight"])
    assert torch.equal(untied.emb.weight, expected["emb.weight"])


def test_float_parameters_readable_with_safetensors():
    safetensors_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(0)
    model = mlp(32, 300, 10)
    quantizer = dq.UniformQuantizer(model, bits=4, min_size=0.001)
    tensors = safetensors_torch.load(serialization.file_bytes(quantizer))
    assert torch.equal(tensors["2.bias"], model[2].bias.detach())
    # Every stream in one U8 payload: the 4-bit levels of both weights and the first bias.
    assert tensors["__streams__"].dtype == torch.uint8
    assert tensors["__streams__"].numel() == (32 * 300 + 300 + 300 * 10) * 4 // 8


class HandMade:
    """A quantizer stand-in exporting hand-built records (LSQ signed levels, constant)."""

    def __init__(self, records, floats):
        self.records, self.floats = records, floats

    def export_quantized(self):
        return self.records

    def export_float(self):
        return self.floats


def test_hand_built_records():
    model = torch.nn.Linear(7, 3)
    lsq = QuantizedTensor("weight", (3, 7), torch.float32, "lsq", 0,
                          torch.arange(-8, 13, dtype=torch.int16).clamp(max=7),
                          torch.tensor([4], dtype=torch.uint8), 0.25, 0.0)
    quantizer = HandMade([lsq], [("bias", torch.tensor([1.0, -2.0, 3.5]), True)])
    serialization.load_quantized(model, serialization.file_bytes(quantizer))
    assert torch.equal(model.weight.detach().reshape(-1), lsq.levels.float() * 0.25)
    assert model.bias.tolist() == [1.0, -2.0, 3.5]


def test_constant_tensor_round_trips():
    model = torch.nn.Linear(4, 4, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.375)
    quantizer = dq.UniformQuantizer(model, bits=4, min_size=0)
    data = serialization.file_bytes(quantizer)
    fresh = torch.nn.Linear(4, 4, bias=False)
    serialization.load_quantized(fresh, data)
    assert torch.equal(fresh.weight, model.weight)


def test_packed_model_size_agrees_with_file():
    torch.manual_seed(0)
    model = TiedLM()
    quantizer = dq.DiffQuantizer(model, min_size=0.001, group_size=8)
    assert quantizer.packed_model_size() == len(serialization.file_bytes(quantizer)) / 2**20


@pytest.mark.parametrize("numel, group_size", [(1000, 8), (1003, 8), (999, 0), (1001, 3)],
                         ids=lambda v: str(v))
def test_chunked_codec_matches_reference(monkeypatch, numel, group_size):
    from diffq_triton.codec import bitpack_fixed, cpu_codec
    from diffq_triton.ops import reference

    monkeypatch.setattr(bitpack_fixed, "CHUNK", 40)  # many chunks, some ending inside a group
    gen = torch.Generator().manual_seed(numel)
    w = torch.randn(numel, generator=gen)
    n_groups = reference.num_groups(numel, group_size)
    bits = torch.randint(1, 16, (n_groups,), generator=gen).to(torch.uint8)
    expected, mn, mx = reference.quantize(w, bits, group_size)
    levels, mn2, mx2 = cpu_codec.quantize_cpu(w, bits, group_size)
    assert torch.equal(levels, expected) and torch.equal(mn, mn2) and torch.equal(mx, mx2)
    qt = QuantizedTensor("w", (numel,), torch.float32, "minmax", group_size, levels, bits,
                         float(mn), float(mx))
    assert torch.equal(cpu_codec.dequantize_cpu(levels, bits, qt), qt.dequantize())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_low_precision_parameters(dtype):
    model = torch.nn.Linear(16, 4).to(dtype)
    levels = torch.arange(64, dtype=torch.int16) % 8
    bits = torch.full((8,), 3, dtype=torch.uint8)
    record = QuantizedTensor("weight", (4, 16), dtype, "minmax", 8, levels, bits, -1.0, 1.0)
    quantizer = HandMade([record], [("bias", torch.ones(4, dtype=dtype), False)])
    serialization.load_quantized(model, serialization.file_bytes(quantizer))
    assert model.weight.dtype == dtype
    assert torch.equal(model.weight, record.dequantize())
    assert torch.equal(model.bias, torch.ones(4, dtype=dtype))


def untied_lm() -> TiedLM:
    model = TiedLM()
    model.out.weight = torch.nn.Parameter(model.emb.weight.detach().clone())
    return model


def test_float64_parameters_stay_float64():
    torch.manual_seed(0)
    model = mlp().double()
    quantizer = dq.DiffQuantizer(model, min_size=0.001, group_size=8)
    expected = quantized_weights(model, quantizer)
    fresh = mlp().double()
    serialization.load_quantized(fresh, serialization.file_bytes(quantizer))
    for name, p in fresh.named_parameters():
        assert torch.equal(p, expected[name]), name
    assert torch.equal(fresh[0].bias, model[0].bias)  # kept float: not narrowed to float32


def test_tied_float_parameter_reaches_every_use_of_an_untied_model():
    torch.manual_seed(0)
    model = TiedLM()
    quantizer = dq.UniformQuantizer(model, bits=4, min_size=1.0)  # nothing quantized
    untied = untied_lm()
    serialization.load_quantized(untied, serialization.file_bytes(quantizer))
    assert torch.equal(untied.emb.weight, model.emb.weight)
    assert torch.equal(untied.out.weight, model.emb.weight)


def test_exclude_on_the_first_name_keeps_a_tied_parameter_float():
    torch.manual_seed(0)
    model = TiedLM()
    quantizer = dq.DiffQuantizer(model, min_size=0.001, group_size=8, exclude=["emb.weight"])
    assert all(r.full_name != "out.weight" for r in quantizer._qparams)
    expected = quantized_weights(model, quantizer)
    assert torch.equal(expected["emb.weight"], model.emb.weight)  # kept float in eval
    fresh = TiedLM()
    serialization.load_quantized(fresh, serialization.file_bytes(quantizer))
    assert fresh.out.weight is fresh.emb.weight
    assert torch.equal(fresh.emb.weight, model.emb.weight)


def test_bf16_record_into_untied_float32_model_gives_every_use_the_same_value():
    torch.manual_seed(0)
    model = TiedLM().to(torch.bfloat16)
    quantizer = dq.DiffQuantizer(model, min_size=0.001, group_size=8)
    spread_logits(model)
    expected = quantized_weights(model, quantizer)["emb.weight"]
    untied = untied_lm()
    serialization.load_quantized(untied, serialization.file_bytes(quantizer))
    assert torch.equal(untied.emb.weight, expected.float())
    assert torch.equal(untied.out.weight, expected.float())


def within_size_budget(quantizer) -> bool:
    size = len(serialization.file_bytes(quantizer))
    return size <= quantizer.true_model_size() * 2**20 * 1.01 + 16384


def test_size_budget_with_widths_below_min_bits():
    # A negative extra_bits puts widths below min_bits: the counted width field covers them.
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    quantizer = dq.DiffQuantizer(model, group_size=1, min_bits=2, max_bits=3, init_bits=2.5,
                                 extra_bits=-1)
    with torch.no_grad():
        model.weight_diffq.copy_(torch.randn(model.weight_diffq.shape) * 3)
    assert within_size_budget(quantizer)


@pytest.mark.parametrize("quantizer_cls, kwargs", [
    (dq.UniformQuantizer, dict(bits=4)), (dq.DiffQuantizer, dict(group_size=8))],
    ids=["uniform-4", "diffq-g8"])
def test_size_budget_with_many_small_tensors(quantizer_cls, kwargs):
    # 144 tensors of a few KB: the metadata per tensor must stay small.
    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(64, 4, 256, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, 12, enable_nested_tensor=False)
    assert within_size_budget(quantizer_cls(model, **kwargs))


def bn_net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3), torch.nn.BatchNorm2d(16),
                               torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(576, 10))


def test_buffers_round_trip():
    # BatchNorm statistics (float32, and an int64 step count) come back with the weights.
    torch.manual_seed(0)
    model = bn_net()
    for _ in range(3):
        model(torch.randn(8, 3, 8, 8))
    quantizer = dq.DiffQuantizer(model, min_size=0.0001, group_size=8)
    model.eval()
    x = torch.randn(4, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    fresh = bn_net().eval()
    serialization.load_quantized(fresh, serialization.file_bytes(quantizer))
    for name, buf in model.named_buffers():
        assert torch.equal(dict(fresh.named_buffers())[name], buf), name
    assert fresh[1].num_batches_tracked.dtype == torch.int64
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_tied_parameter_excluded_at_a_later_use_stays_quantized():
    # The first use decides: quantized there, every use sees (and loads) the quantized value.
    torch.manual_seed(0)
    model = TiedLM()
    quantizer = dq.DiffQuantizer(model, min_size=0.001, group_size=8, exclude=["out.*"])
    spread_logits(model)
    x = torch.randint(0, 300, (2, 7))
    model.eval()
    with torch.no_grad():
        expected = model(x)
    fresh = TiedLM().eval()
    serialization.load_quantized(fresh, serialization.file_bytes(quantizer))
    with torch.no_grad():
        assert torch.equal(fresh(x), expected)


def test_lsq_zero_step_quantizes_to_zero():
    model = torch.nn.Linear(8, 8)
    with torch.no_grad():
        model.bias.zero_()
    quantizer = dq.LSQ(model, bits=4, min_size=0)
    expected = quantized_weights(model, quantizer)
    assert torch.equal(expected["bias"], torch.zeros(8))
    fresh = torch.nn.Linear(8, 8)
    serialization.load_quantized(fresh, serialization.file_bytes(quantizer))
    assert torch.equal(fresh.bias, expected["bias"])


def test_module_registered_twice_gets_every_name():
    # One module under two names: both names of its weight are in the file.
    shared = torch.nn.Linear(64, 64)
    model = torch.nn.Module()
    model.a, model.b = shared, shared
    quantizer = dq.UniformQuantizer(model, bits=4, min_size=0.001)
    expected = quantized_weights(model, quantizer)
    untied = torch.nn.Module()
    untied.a, untied.b = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)
    serialization.load_quantized(untied, serialization.file_bytes(quantizer))
    assert torch.equal(untied.b.weight, expected["a.weight"])
    assert torch.equal(untied.b.bias, expected["a.bias"])


def test_buffer_dtypes_the_format_lacks_are_left_out_with_a_warning():
    model = torch.nn.Linear(8, 8)
    model.register_buffer("phase", torch.ones(3, dtype=torch.complex128))
    model.register_buffer("spin", torch.full((2,), 1j, dtype=torch.complex64))
    model.register_buffer("count", torch.tensor(7, dtype=torch.uint16))
    model.register_buffer("scratch", torch.ones(2, dtype=torch.complex128), persistent=False)
    quantizer = dq.UniformQuantizer(model, bits=4, min_size=0)
    with pytest.warns(RuntimeWarning, match=r"not saved: \['phase'\]"):
        data = serialization.file_bytes(quantizer)
    fresh = torch.nn.Linear(8, 8)
    fresh.register_buffer("phase", torch.zeros(3, dtype=torch.complex128))
    fresh.register_buffer("spin", torch.zeros(2, dtype=torch.complex64))
    fresh.register_buffer("count", torch.tensor(0, dtype=torch.uint16))
    serialization.load_quantized(fresh, data)
    assert int(fresh.count) == 7 and torch.equal(fresh.spin, model.spin)
    assert torch.equal(fresh.phase, torch.zeros(3, dtype=torch.complex128))


@pytest.mark.parametrize("exclude", [[], ["out.*"]], ids=["all", "exclude-out"])
def test_detect_bound_false_file_loads_into_an_untied_model(exclude):
    # Each use of the tied weight is stored under its own name, and nowhere else.
    torch.manual_seed(0)
    model = TiedLM()
    quantizer = dq.DiffQuantizer(model, min_size=0.001, group_size=8, detect_bound=False,
                                 exclude=exclude)
    data = serialization.file_bytes(quantizer)
    untied = untied_lm()
    serialization.load_quantized(untied, data)
    with pytest.raises(ValueError, match="detect_bound=False"):
        serialization.load_quantized(TiedLM(), data)
