"""Packed inference (docs/packed.md): layout, reference decoder, packed layers, loader, memory.

The float-loaded model (``load_quantized(model, path)``) is the oracle throughout: the packed
layers must compute exactly its outputs (same dequantized weights, same ``F.*`` call), so
every comparison is ``torch.equal``, with no tolerance.
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffq_triton as dq
from diffq_triton.packed import (
    TILE_GROUPS,
    PackedConv1D,
    PackedEmbedding,
    PackedLinear,
    PackedTensor,
    resident_bytes,
)
from diffq_triton.packed import reference as packed_ref
from diffq_triton.packed.layout import PAD_BYTES, tile_bit_offsets
from diffq_triton.serialization.tensor_record import QuantizedTensor

from .models import TiedLM

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- helpers
def spread_widths(quantizer: dq.DiffQuantizer, seed: int = 0) -> None:
    """Logits whose rounded widths cycle over every width 1..15 (min_bits=1, max_bits=15),
    in a shuffled order so that neighbouring groups differ."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for record in quantizer._first_uses():
            n = record.logit.numel()
            target = (torch.arange(n) % 15 + 1)[torch.randperm(n, generator=gen)].float()
            frac = ((target - 1 + 0.25) / 14).clamp(max=(14 - 0.25) / 14)
            record.logit.copy_(torch.log(frac / (1 - frac)).view_as(record.logit))


def file_of(quantizer) -> bytes:
    buf = io.BytesIO()
    dq.save_quantized(quantizer, buf)
    return buf.getvalue()


def float_and_packed(make, data: bytes) -> tuple[nn.Module, nn.Module, dq.PackReport]:
    """The float-loaded model and the packed one (built on the meta device)."""
    ref = make()
    dq.load_quantized(ref, data)
    with torch.device("meta"):
        packed = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = dq.load_quantized(packed, data, packed=True)
    return ref.eval(), packed.eval(), report


class Conv1D(nn.Module):
    """transformers' GPT-2 ``Conv1D`` as that library writes it (weight ``[nx, nf]``)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.randn(nf) * 0.02)

    def forward(self, x):
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight)
        return x.view(size_out)


class Zoo(nn.Module):
    """One of each packed layer at odd sizes, a tied head, an LSTM (kept float)."""

    def __init__(self, vocab: int = 301, dim: int = 37):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=3)
        self.lin = nn.Linear(dim, 53)
        self.gpt = Conv1D(41, 53)
        self.conv1 = nn.Conv1d(41, 29, 3, padding=2, padding_mode="reflect")
        self.conv2 = nn.Conv2d(29, 18, (3, 2), stride=(1, 2), groups=1, bias=False)
        self.rnn = nn.LSTM(18, 23, batch_first=True)
        self.head = nn.Linear(dim, vocab)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        x = self.emb(ids)                                    # (B, T, dim)
        y = self.gpt(F.gelu(self.lin(x)))                    # (B, T, 41)
        y = self.conv1(y.transpose(1, 2))                    # (B, 29, T + 2)
        y = self.conv2(y[:, :, None, :].expand(-1, -1, 3, -1))  # (B, 18, 1, (T+1)//2)
        y, _ = self.rnn(y.squeeze(2).transpose(1, 2))
        return self.head(x), y


def zoo_file(group_size: int, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    model = Zoo()
    q = dq.DiffQuantizer(model, group_size=group_size, min_size=0.001, min_bits=1)
    spread_widths(q, seed)
    return file_of(q)


# ----------------------------------------------------------------------------- layout
def test_layout_bytes_are_the_file_streams_padded():
    # docs/format.md's example: levels 1, 2, 3, 0, 5 at widths 2, 3, 3 (group size 2).
    qt = QuantizedTensor("w", (5,), torch.float32, "minmax", 2,
                         torch.tensor([1, 2, 3, 0, 5], dtype=torch.int16),
                         torch.tensor([2, 3, 3], dtype=torch.uint8), -1.0, 1.0)
    pt = PackedTensor.from_record(qt)
    assert pt.levels.tolist() == [0b00111001, 0b00010100] + [0] * PAD_BYTES
    # Widths 2, 3, 3 as base 2 + 1-bit fields 0, 1, 1: 0b110.
    assert (pt.base, pt.field_bits) == (2, 1)
    assert pt.widths.tolist() == [0b110] + [0] * PAD_BYTES
    assert pt.tile_offsets.tolist() == [0]
    assert pt.scale.dtype == torch.float32 and pt.scale.tolist() == [-1.0, 1.0]


def test_uniform_widths_store_no_width_stream():
    qt = QuantizedTensor("w", (3, 5), torch.float32, "minmax", 0,
                         torch.arange(15, dtype=torch.int16) % 8,
                         torch.tensor([3], dtype=torch.uint8), 0.0, 1.0)
    pt = PackedTensor.from_record(qt)
    assert "widths" not in dict(pt.named_buffers()) and pt.field_bits == 0
    assert pt.levels.numel() == math.ceil(15 * 3 / 8) + PAD_BYTES


@pytest.mark.parametrize("group_size", [1, 3, 8])
def test_tile_offsets_are_prefix_sums_of_tile_bits(group_size):
    gen = torch.Generator().manual_seed(group_size)
    n_groups = 5 * TILE_GROUPS + 17
    numel = (n_groups - 1) * group_size + 1  # a short last group
    bits = torch.randint(1, 16, (n_groups,), generator=gen, dtype=torch.uint8)
    expected = [group_size * int(bits[: t * TILE_GROUPS].sum()) for t in range(6)]
    assert tile_bit_offsets(bits, group_size, numel).tolist() == expected


# ----------------------------------------------------------------------------- reference
def random_record(numel: int, group_size: int, scheme: str, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n_groups = 1 if group_size == 0 or scheme == "lsq" else -(-numel // group_size)
    bits = torch.randint(1, 16, (n_groups,), generator=gen, dtype=torch.uint8)
    bits[: min(15, n_groups)] = torch.arange(1, 16, dtype=torch.uint8)[: min(15, n_groups)]
    top = (1 << bits.to(torch.int64)) - 1
    per_entry = top.repeat_interleave(group_size)[:numel] if n_groups > 1 else top.expand(numel)
    levels = (torch.rand(numel, generator=gen) * (per_entry + 1)).floor().to(torch.int16)
    if scheme == "lsq":
        levels -= 1 << (int(bits[0]) - 1)
        return QuantizedTensor("w", (numel,), dtype, "lsq", 0, levels, bits, 0.0123, 0.0)
    return QuantizedTensor("w", (numel,), dtype, "minmax", group_size, levels, bits,
                           -0.731, 1.377)


CASES = [(1, 0, "minmax"), (1000, 0, "minmax"), (1001, 1, "minmax"), (5003, 7, "minmax"),
         (4099, 8, "minmax"), (70001, 64, "minmax"), (70001, 256, "minmax"),
         (777, 0, "lsq")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-g{c[1]}-{c[2]}")
def test_reference_equals_the_file_decode(case, cpu_codec):
    numel, group_size, scheme = case
    qt = random_record(numel, group_size, scheme)
    expected = qt.dequantize("cpu")  # the library's decode (native codec or torch)
    pt = PackedTensor.from_record(qt)
    assert torch.equal(packed_ref.dequantize_packed(pt), expected)
    out = torch.full((numel,), float("nan"))
    assert torch.equal(pt.decode_into(out), expected)
    # Tile ranges, each starting from its stored offset, cover the tensor piece by piece.
    n_tiles = pt.tile_offsets.numel()
    pieces = [packed_ref.dequantize_tiles(pt, t, min(t + 2, n_tiles))
              for t in range(0, n_tiles, 2)]
    assert torch.equal(torch.cat(pieces), expected.view(-1))


def test_reference_refuses_a_tile_range_outside():
    pt = PackedTensor.from_record(random_record(100, 8, "minmax"))
    with pytest.raises(ValueError, match="tile range"):
        packed_ref.dequantize_tiles(pt, 0, 2)


# ----------------------------------------------------------------------------- layers
@pytest.mark.parametrize("group_size", [0, 1, 8, 16, 64])
def test_zoo_outputs_equal_the_float_model(group_size):
    ref, packed, report = float_and_packed(Zoo, zoo_file(group_size))
    assert report.packed == {"emb": "PackedEmbedding", "lin": "PackedLinear",
                             "gpt": "PackedConv1D", "conv1": "PackedConv1d",
                             "conv2": "PackedConv2d", "head": "PackedLinear"}
    assert packed.head.weight_packed is packed.emb.weight_packed  # tied: one buffer set
    ids = torch.randint(0, 301, (3, 11))
    ids[0, 0] = 3
    with torch.no_grad():
        for a, b in zip(ref(ids), packed(ids), strict=True):
            assert torch.equal(a, b)
    for name in ("emb", "lin", "gpt", "conv1", "conv2"):
        assert torch.equal(getattr(packed, name).weight, getattr(ref, name).weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_activation_dtypes_equal_the_float_model(dtype):
    ref, packed, _ = float_and_packed(Zoo, zoo_file(8, seed=1))
    ref, packed = ref.to(dtype), packed.to(dtype)
    assert packed.lin.weight_packed.scale.dtype == torch.float32  # the range is never cast
    ids = torch.randint(0, 301, (2, 9))
    with torch.inference_mode():
        for a, b in zip(ref(ids), packed(ids), strict=True):
            assert a.dtype == dtype and torch.equal(a, b)


def test_low_precision_record_and_model():
    # A bf16 model: the record is bf16, the decode rounds to it as load_quantized does.
    def make():
        torch.manual_seed(5)
        return nn.Sequential(nn.Linear(33, 65), nn.ReLU(), nn.Linear(65, 7)).to(torch.bfloat16)

    model = make()
    q = dq.DiffQuantizer(model, group_size=8, min_size=0, min_bits=1)
    spread_widths(q)
    ref, packed, _ = float_and_packed(make, file_of(q))
    assert packed[0].weight_packed.record_dtype == torch.bfloat16
    x = torch.randn(4, 33, dtype=torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ref(x), packed(x))


@pytest.mark.parametrize("quantizer", ["uniform", "lsq"])
def test_uniform_and_lsq_models(quantizer):
    def make():
        return nn.Sequential(nn.Linear(47, 130), nn.Tanh(), nn.Linear(130, 9))

    torch.manual_seed(2)
    model = make()
    q = (dq.UniformQuantizer(model, bits=3, min_size=0) if quantizer == "uniform"
         else dq.LSQ(model, bits=4, min_size=0))
    ref, packed, _ = float_and_packed(make, file_of(q))
    x = torch.randn(5, 47)
    with torch.no_grad():
        assert torch.equal(ref(x), packed(x))


def test_autograd_through_a_packed_layer():
    # With grad recorded the weight is decoded afresh (autograd keeps it): gradients to the
    # input and the bias are the float model's.
    ref, packed, _ = float_and_packed(Zoo, zoo_file(8))
    x = torch.randn(4, 37, requires_grad=True)
    y = x.detach().clone().requires_grad_()
    ref.lin(x).square().sum().backward()
    packed.lin(y).square().sum().backward()
    assert torch.equal(x.grad, y.grad) and torch.equal(ref.lin.bias.grad, packed.lin.bias.grad)


def test_scratch_is_reused_without_grad():
    _, packed, _ = float_and_packed(Zoo, zoo_file(8))
    from diffq_triton.packed import modules

    with torch.no_grad():
        packed.lin(torch.randn(2, 37))
        first = modules._SCRATCH.buffers[("float32", torch.float32, torch.device("cpu"))]
        packed.head(torch.randn(2, 37))
        packed.lin(torch.randn(2, 37))
        again = modules._SCRATCH.buffers[("float32", torch.float32, torch.device("cpu"))]
    assert again.numel() >= 301 * 37 and again.numel() < 2 * 301 * 37
    assert first.numel() < again.numel() or first.data_ptr() == again.data_ptr()


def test_rnn_and_unknown_layers_load_as_float_with_a_report():
    torch.manual_seed(0)
    model = TiedLM(vocab=304)
    q = dq.DiffQuantizer(model, group_size=8, min_size=0.001, min_bits=1)
    spread_widths(q)
    data = file_of(q)
    ref = TiedLM(vocab=304)
    dq.load_quantized(ref, data)
    with torch.device("meta"):
        packed = TiedLM(vocab=304)
    with pytest.warns(UserWarning, match="loaded as float"):
        report = dq.load_quantized(packed, data, packed=True)
    assert set(report.packed) == {"emb", "out"}
    assert set(report.float_params) == {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "out.bias"}
    assert "LSTM" in report.float_params["lstm.weight_ih_l0"]
    x = torch.randint(0, 304, (2, 7))
    with torch.no_grad():
        assert torch.equal(ref(x), packed(x))


def test_subclasses_and_max_norm_stay_float():
    class MyLinear(nn.Linear):
        pass

    def make():
        torch.manual_seed(0)
        return nn.ModuleDict({"a": MyLinear(64, 64), "b": nn.Embedding(64, 64, max_norm=1.0),
                              "c": nn.Linear(64, 64)})

    q = dq.UniformQuantizer(make(), bits=4, min_size=0.001)
    _, packed, report = float_and_packed(make, file_of(q))
    assert set(report.packed) == {"c"}
    assert set(report.float_params) == {"a.weight", "b.weight"}
    assert isinstance(packed["a"], MyLinear) and isinstance(packed["b"].weight, nn.Parameter)


# ----------------------------------------------------------------------------- loader
def test_packed_false_is_the_float_loader():
    data = zoo_file(8)
    model = Zoo()
    assert dq.load_quantized(model, data) is None
    assert dq.load_quantized(model, data, packed=False) is None
    assert isinstance(model.lin, nn.Linear)
    with pytest.raises(TypeError, match="packed"):
        dq.load_quantized(model, data, packed="yes")


def test_a_materialised_model_is_packed_in_place():
    data = zoo_file(16)
    ref, _, _ = float_and_packed(Zoo, data)
    model = Zoo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dq.load_quantized(model, data, packed=True)
    assert isinstance(model.lin, PackedLinear) and isinstance(model.emb, PackedEmbedding)
    assert isinstance(model.gpt, PackedConv1D)
    ids = torch.randint(0, 301, (2, 5))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ref(ids), model(ids), strict=True))


def test_pack_model_from_a_live_quantizer():
    torch.manual_seed(0)
    model = Zoo()
    q = dq.DiffQuantizer(model, group_size=8, min_size=0.001, min_bits=1)
    spread_widths(q)
    ref, _, _ = float_and_packed(Zoo, file_of(q))
    with torch.device("meta"):
        packed = Zoo()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = dq.pack_model(q, packed)
    assert report.packed["head"] == "PackedLinear"
    ids = torch.randint(0, 301, (2, 5))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ref(ids), packed.eval()(ids), strict=True))
    with pytest.raises(ValueError, match="not the quantizer's own"):
        dq.pack_model(q, model)


def test_a_bad_file_leaves_the_model_unchanged():
    data = bytearray(zoo_file(8))
    data[-3] ^= 0xFF
    model = Zoo()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError):
        dq.load_quantized(model, bytes(data), packed=True)
    assert isinstance(model.lin, nn.Linear)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_meta_model_with_non_persistent_buffers_is_refused():
    def make():
        m = nn.Sequential(nn.Linear(64, 64))
        m.register_buffer("table", torch.ones(3), persistent=False)
        return m

    q = dq.UniformQuantizer(make(), bits=4, min_size=0.001)
    with torch.device("meta"):
        model = make()
    with pytest.raises(ValueError, match="non-persistent|not persistent"):
        dq.load_quantized(model, file_of(q), packed=True)


def test_state_dict_round_trip_and_device_moves():
    data = zoo_file(8)
    ref, packed, _ = float_and_packed(Zoo, data)
    state = packed.state_dict()
    assert "lin.weight_packed.levels" in state and "lin.weight_packed._extra_state" in state
    _, other, _ = float_and_packed(Zoo, zoo_file(8, seed=3))  # same layout? not in general
    _, same, _ = float_and_packed(Zoo, data)
    same.load_state_dict(state)
    packed = packed.to("cpu")
    half = float_and_packed(Zoo, data)[1].half()  # a dtype move sets the decode dtype only
    pt = half.lin.weight_packed
    assert pt.dtype == torch.float16 and pt.scale.dtype == torch.float32
    assert pt.levels.dtype == torch.uint8 and pt.tile_offsets.dtype == torch.int64
    ids = torch.randint(0, 301, (2, 5))
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(ref(ids), packed(ids), strict=True))
        assert all(torch.equal(a, b) for a, b in zip(ref(ids), same(ids), strict=True))
    with pytest.raises((ValueError, RuntimeError)):
        other.load_state_dict(state)


# ----------------------------------------------------------------------------- memory
def mlp_of_widths_spread():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(301, 517), nn.ReLU(), nn.Linear(517, 263), nn.ReLU(),
                         nn.Linear(263, 10))


@pytest.mark.parametrize("kind", ["diffq-g8", "diffq-g16", "uniform-3"])
def test_resident_bytes_within_the_file_size(kind):
    model = mlp_of_widths_spread()
    if kind.startswith("diffq"):
        q = dq.DiffQuantizer(model, group_size=int(kind[7:]), min_bits=1, min_size=0.001)
        spread_widths(q)
    else:
        q = dq.UniformQuantizer(model, bits=3, min_size=0.001)
    data = file_of(q)
    _, packed, report = float_and_packed(mlp_of_widths_spread, data)
    resident = resident_bytes(packed)
    assert report.packed_bytes < resident <= 1.1 * len(data) + 64 * 1024
    assert resident < resident_bytes(mlp_of_widths_spread()) / 3


_PEAK_SCRIPT = textwrap.dedent("""
    import resource, sys, torch
    from torch import nn
    import diffq_triton as dq
    def make():
        return nn.Sequential(*[nn.Linear(2048, 1024) for _ in range(LAYERS)])
    torch.set_num_threads(1)
    x = torch.randn(2, 2048)
    with torch.device("meta"):
        model = make()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    dq.load_quantized(model, sys.argv[1], packed=True)
    with torch.no_grad():
        model[0](x)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print((after - before) * 1024, dq.resident_bytes(model))
""")


def test_loading_never_materialises_the_float_model(tmp_path):
    # 16 layers of 2048x1024: 128 MiB of float32 weights, 8 MiB each, 16 MiB at 4 bits. The
    # subprocess's peak resident memory (ru_maxrss, which sees torch's allocations) may grow
    # by the file read whole, the packed buffers and one layer's scratch, not by the model.
    layers = 16
    model = nn.Sequential(*[nn.Linear(2048, 1024) for _ in range(layers)])
    path = tmp_path / "big.safetensors"
    dq.save_quantized(dq.UniformQuantizer(model, bits=4), path)
    float_bytes = resident_bytes(model)
    del model
    script = tmp_path / "peak.py"
    script.write_text(_PEAK_SCRIPT.replace("LAYERS", str(layers)))
    out = subprocess.run([sys.executable, str(script), str(path)], capture_output=True,
                         text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr[-2000:]
    peak, resident = (int(v) for v in out.stdout.split())
    file_size = path.stat().st_size
    layer = 2048 * 1024 * 4
    assert resident <= 1.1 * file_size + 64 * 1024
    assert peak <= 2 * file_size + layer + (16 << 20), (peak, file_size)
    assert peak < float_bytes / 2
