"""Native C codec (native.py, csrc/codec.c) against the eager reference and the torch path.

Streams are compared bit for bit with the layout's definition (``stream_as_int``) and with
:mod:`bitpack_cpu`; levels with :func:`reference.quantize` and weights with
:func:`reference.dequantize` (``torch.equal``). Every output buffer is poisoned first.
Cases run on one piece and on pieces of a few entries spread over threads, whose shared
bytes are OR-ed from two threads.
"""

from __future__ import annotations

import subprocess
import warnings
import zlib

import pytest
import torch

import diffq_triton as dq
from diffq_triton import serialization
from diffq_triton.codec import bitpack_cpu, native, native_build
from diffq_triton.ops import bitpack, reference
from tests.conftest import POISON_INT, poison, poisoned_empty
from tests.models import TiedLM, conv_net, mlp
from tests.test_bitpack import random_case, stream_as_int

GROUP_SIZES = [0, 1, 3, 5, 8, 16, 24, 1000]
NUMELS = [1, 7, 8, 9, 1151, 4099]
WIDTHS = ["1-15", "equal", "9-15"]


@pytest.fixture
def lib(native_lib):
    """The compiled codec (tests/conftest.py)."""
    return native_lib


@pytest.fixture(params=[None, 64, 40], ids=lambda p: "whole" if p is None else f"piece{p}")
def pieces(request, monkeypatch):
    """Tensors in one call, or in pieces of ``PIECE`` entries run on 4 threads at once.

    Small pieces put piece borders inside bytes, groups and rows of 8, and make two
    threads write the bytes they share; 40 and 64 are multiples of 8 as single-group
    pieces must be.
    """
    if request.param is None:
        yield None
        return
    monkeypatch.setattr(native, "PIECE", request.param)
    threads = torch.get_num_threads()
    torch.set_num_threads(4)  # the codec runs as many threads as torch has (up to 8)
    try:
        yield request.param
    finally:
        torch.set_num_threads(threads)


def make_bits(mix: str, numel: int, group_size: int, gen: torch.Generator) -> torch.Tensor:
    """``[n_groups]`` uint8 widths: uniform in 1..15, all one random width, or 9..15."""
    n = reference.num_groups(numel, group_size)
    if mix == "equal":
        return torch.full((n,), int(torch.randint(1, 16, (1,), generator=gen)),
                          dtype=torch.uint8)
    low = 1 if mix == "1-15" else 9
    return torch.randint(low, 16, (n,), generator=gen).to(torch.uint8)


def entry_units(bits: torch.Tensor, numel: int, group_size: int) -> torch.Tensor:
    """``u(b)`` per entry in float32, computed as the reference computes it."""
    return 1 / reference._levels_per_entry(bits, numel, group_size)


def half_step_weights(bits: torch.Tensor, numel: int, group_size: int,
                      gen: torch.Generator) -> torch.Tensor:
    """float32 weights in [0, 1] whose scaled value ``(w - 0)/1/u(b)`` is exactly k + 1/2.

    Entries 0 and 1 are 0 and 1 (so ``mn = 0``, ``safe = 1``). For the others, the float32
    nearest ``(k + 1/2)·u`` and its neighbours a few ulps away are tried until one divides
    back to k + 1/2 exactly; rounding half to even then decides the level.
    """
    if numel < 2:
        return torch.zeros(numel)
    unit = entry_units(bits, numel, group_size)
    top = reference._levels_per_entry(bits, numel, group_size)
    k = (torch.rand(numel, generator=gen, dtype=torch.float64) * top).floor().clamp(max=top - 1)
    target = (k + 0.5).float()
    w0 = target * unit
    w = w0.clone()
    hit = (w0 / unit) == target
    up, down = w0, w0
    for _ in range(4):
        up, down = torch.nextafter(up, torch.tensor(2.0)), torch.nextafter(down, torch.tensor(-1.0))
        for cand in (up, down):
            take = ~hit & ((cand / unit) == target)
            w[take] = cand[take]
            hit |= take
    w[0], w[1] = 0.0, 1.0
    return w


def make_weights(kind: str, bits: torch.Tensor, numel: int, group_size: int,
                 gen: torch.Generator) -> torch.Tensor:
    """Signed normal weights, a constant (empty range: ``safe = 1``), or half steps."""
    if kind == "randn":
        return torch.randn(numel, generator=gen) * 3 - 0.5
    if kind == "constant":
        return torch.full((numel,), -0.375)
    return half_step_weights(bits, numel, group_size, gen)


def minmax_args(w: torch.Tensor) -> tuple[float, float]:
    """``(mn, safe)`` as :func:`state.quantize_minmax` passes them to the codec."""
    mn, mx = torch.aminmax(w)
    scale = float(mx - mn)
    return float(mn), scale if scale > 0 else 1.0


def as_bytes(t: torch.Tensor) -> bytes:
    """A uint8 stream as ``bytes``."""
    assert t.dtype == torch.uint8 and t.dim() == 1
    return t.numpy().tobytes()


class WritesNothing:
    """A codec whose loops write nothing: what forgetting every entry looks like."""

    def __init__(self, lib):
        self.dq_sum_u8 = lib.dq_sum_u8

    dq_pack_i16 = dq_pack_u8 = dq_quantize_pack = staticmethod(lambda *args: 0)
    dq_unpack_i16 = dq_unpack_dequantize = staticmethod(lambda *args: None)


def test_poison_reaches_every_output(lib):
    # The comparisons below only mean something if the buffers the codec fills start
    # poisoned, wherever native.py allocates them (torch or numpy).
    stub = WritesNothing(lib)
    bits = torch.tensor([5, 3, 7], dtype=torch.uint8)
    w = torch.randn(100)
    stream = native.quantize_pack(lib, w, bits, 40, *minmax_args(w))
    with poisoned_empty():
        outputs = [native.quantize_pack(stub, w, bits, 40, 0.0, 1.0),
                   native.pack(stub, torch.zeros(100, dtype=torch.int16), bits, 40)]
        levels = native.unpack(stub, stream, bits, 40, 100)
        weights = native.unpack_dequantize(stub, stream, bits, 40, 100, 0.0, 1.0)
    for out in outputs:  # all but the last byte, which pieces may share and is zeroed
        assert out.numel() == stream.numel() and bool((out[:-1] == 0xA5).all())
    assert bool((levels == POISON_INT).all()) and bool(weights.isnan().all())


# ----------------------------------------------------------------------------- quantize
@pytest.mark.parametrize("kind", ["randn", "constant", "half"])
@pytest.mark.parametrize("mix", WIDTHS)
@pytest.mark.parametrize("numel", NUMELS, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
def test_quantize_pack_matches_reference(lib, pieces, group_size, numel, mix, kind):
    gen = torch.Generator().manual_seed(numel * 131 + group_size * 7 + WIDTHS.index(mix))
    bits = make_bits(mix, numel, group_size, gen)
    w = make_weights(kind, bits, numel, group_size, gen)
    levels, _, _ = reference.quantize(w, bits, group_size)
    mn, safe = minmax_args(w)
    with poisoned_empty():
        stream = native.quantize_pack(lib, w, bits, group_size, mn, safe)
    assert as_bytes(stream) == stream_as_int(levels, bits, group_size)


def test_half_steps_round_to_even(lib):
    # The half-step weights do land on k + 1/2, and half up would give other levels: the
    # previous test does check the rounding mode.
    gen = torch.Generator().manual_seed(0)
    bits = make_bits("1-15", 4099, 5, gen)
    w = half_step_weights(bits, 4099, 5, gen)
    t = w / entry_units(bits, 4099, 5)
    exact = t == t.floor() + 0.5
    assert exact[2:].float().mean() > 0.9
    levels, _, _ = reference.quantize(w, bits, 5)
    assert not torch.equal(levels, (t + 0.5).floor().to(torch.int16))
    stream = native.quantize_pack(lib, w, bits, 5, *minmax_args(w))
    assert torch.equal(native.unpack(lib, stream, bits, 5, 4099), levels)


@pytest.mark.parametrize("width", range(1, 16), ids=lambda b: f"b{b}")
def test_quantize_pack_every_width(lib, pieces, width):
    gen = torch.Generator().manual_seed(width)
    w = torch.randn(33, 31, generator=gen).t()  # not contiguous: read in row-major order
    bits = torch.tensor([width], dtype=torch.uint8)
    levels, _, _ = reference.quantize(w, bits, 0)
    with poisoned_empty():
        stream = native.quantize_pack(lib, w, bits, 0, *minmax_args(w))
    assert as_bytes(stream) == stream_as_int(levels, bits, 0)
    assert as_bytes(stream) == as_bytes(bitpack_cpu.pack_cpu(levels, bits, 0))


# ----------------------------------------------------------------------------- dequantize
@pytest.mark.parametrize("kind", ["randn", "constant"])
@pytest.mark.parametrize("mix", WIDTHS)
@pytest.mark.parametrize("numel", NUMELS, ids=lambda n: f"n{n}")
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
def test_unpack_dequantize_matches_reference(lib, pieces, group_size, numel, mix, kind):
    gen = torch.Generator().manual_seed(numel * 17 + group_size + WIDTHS.index(mix))
    bits = make_bits(mix, numel, group_size, gen)
    w = make_weights(kind, bits, numel, group_size, gen)
    levels, mn, mx = reference.quantize(w, bits, group_size)
    expected = reference.dequantize(levels, bits, group_size, mn, mx)
    stream = torch.frombuffer(bytearray(stream_as_int(levels, bits, group_size)),
                              dtype=torch.uint8)
    args = (stream, bits, group_size, numel, float(mn), float(mx - mn))
    out = poison(torch.empty(numel))
    got = native.unpack_dequantize(lib, *args, out=out)
    assert got.data_ptr() == out.data_ptr()
    assert torch.equal(got, expected)
    with poisoned_empty():
        assert torch.equal(native.unpack_dequantize(lib, *args), expected)
        assert torch.equal(native.unpack(lib, stream, bits, group_size, numel), levels)


def test_unpack_dequantize_into_parameter_shape(lib):
    # A 2-D parameter is written in place, through its flat view.
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(12, 37, generator=gen)
    bits = make_bits("1-15", w.numel(), 8, gen)
    levels, mn, mx = reference.quantize(w, bits, 8)
    stream = native.quantize_pack(lib, w, bits, 8, *minmax_args(w))
    param = poison(torch.empty(12, 37))
    got = native.unpack_dequantize(lib, stream, bits, 8, w.numel(), float(mn), float(mx - mn),
                                   out=param)
    assert got.data_ptr() == param.data_ptr()
    assert torch.equal(param.reshape(-1), reference.dequantize(levels, bits, 8, mn, mx))


# ----------------------------------------------------------------------------- pack / unpack
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32], ids=str)
@pytest.mark.parametrize("numel", [1, 9, 1151, 4099], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("group_size", GROUP_SIZES, ids=lambda g: f"g{g}")
def test_pack_unpack_round_trip(lib, pieces, group_size, numel, dtype):
    high = 8 if dtype == torch.uint8 else 15
    levels, bits = random_case(numel, group_size, 1, high, seed=numel + 3 * group_size)
    with poisoned_empty():
        packed = native.pack(lib, levels.to(dtype), bits, group_size)
    expected = stream_as_int(levels, bits, group_size)
    assert as_bytes(packed) == expected
    assert as_bytes(packed) == as_bytes(bitpack_cpu.pack_cpu(levels, bits, group_size))
    with poisoned_empty():
        back = native.unpack(lib, packed, bits, group_size, numel)
    assert back.dtype == torch.int16 and torch.equal(back, levels)
    assert torch.equal(back, bitpack_cpu.unpack_cpu(packed, bits, group_size, numel))


@pytest.mark.parametrize("dtype", [torch.int16, torch.int32], ids=str)
@pytest.mark.parametrize("width", [1, 2, 3, 4, 7, 8, 9, 13, 15], ids=lambda b: f"b{b}")
def test_pack_signed_levels_with_offset(lib, pieces, width, dtype):
    # LSQ stores signed levels q in [-2^(b-1), 2^(b-1)) as q + 2^(b-1).
    half = 1 << (width - 1)
    gen = torch.Generator().manual_seed(width)
    signed = torch.randint(-half, half, (1001,), generator=gen, dtype=torch.int64)
    signed[:2] = torch.tensor([-half, half - 1])
    bits = torch.tensor([width], dtype=torch.uint8)
    with poisoned_empty():
        packed = native.pack(lib, signed.to(dtype), bits, 0, offset=half)
    assert as_bytes(packed) == stream_as_int(signed + half, bits, 0)
    with poisoned_empty():
        back = native.unpack(lib, packed, bits, 0, 1001, offset=half)
    assert torch.equal(back, signed.to(torch.int16))


@pytest.mark.parametrize("min_bits", [1, 2, 3, 8])
def test_pack_widths_style_negative_offset(lib, pieces, min_bits):
    # pack_widths stores b - min_bits in fields of width_field_bits bits.
    gen = torch.Generator().manual_seed(min_bits)
    widths = torch.randint(min_bits, 16, (1001,), generator=gen).to(torch.uint8)
    field = bitpack.width_field_bits(widths, min_bits)
    spec = torch.tensor([field], dtype=torch.uint8)
    with poisoned_empty():
        packed = native.pack(lib, widths, spec, 0, offset=-min_bits)
    excess = widths.to(torch.int16) - min_bits
    assert as_bytes(packed) == stream_as_int(excess, spec, 0)
    assert as_bytes(packed) == as_bytes(bitpack_cpu.pack_fixed(excess, field))
    back = native.unpack(lib, packed, spec, 0, 1001, offset=-min_bits)
    assert torch.equal(back, widths.to(torch.int16))


def test_empty_tensors(lib):
    bits = torch.tensor([5], dtype=torch.uint8)
    assert native.quantize_pack(lib, torch.zeros(0), bits, 0, 0.0, 1.0).numel() == 0
    packed = native.pack(lib, torch.zeros(0, dtype=torch.int16), bits, 0)
    assert packed.numel() == 0
    assert native.unpack(lib, packed, bits, 0, 0).numel() == 0
    assert native.unpack_dequantize(lib, packed, bits, 0, 0, 0.0, 1.0).numel() == 0


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "levels, dtype, bits, group_size, offset",
    [
        ([0, 4], torch.int16, [2], 0, 0),
        ([-1, 0], torch.int16, [2], 0, 0),
        ([1, 2, 3], torch.int16, [2], 0, 1),  # fits alone, not once offset
        ([0, 0], torch.int16, [2], 0, -1),
        ([255, 0], torch.uint8, [7], 0, 0),
        ([1, 9, 1], torch.int16, [3, 3, 3], 1, 0),
        ([3] * 16, torch.int16, [9, 1], 8, 0),  # the row fast path of group 2
        ([1 << 15, 0], torch.int32, [15], 0, 0),
        ([70000, 0], torch.int32, [15], 0, 0),  # would wrap to 4464 in int16
        ([-65536, 0], torch.int64, [15], 0, 0),  # would wrap to 0 in int16
    ],
)
def test_pack_rejects_levels_out_of_range(lib, levels, dtype, bits, group_size, offset):
    with pytest.raises(ValueError, match="does not fit"):
        native.pack(lib, torch.tensor(levels, dtype=dtype), torch.tensor(bits, dtype=torch.uint8),
                    group_size, offset=offset)


def test_rejects_bad_widths(lib):
    w, levels = torch.zeros(6), torch.zeros(6, dtype=torch.int16)
    packed = torch.zeros(3, dtype=torch.uint8)
    for bad in ([0], [16], [4, 0, 4], [4, 16, 4]):
        bits = torch.tensor(bad)
        gs = 0 if len(bad) == 1 else 2
        with pytest.raises(ValueError, match="widths must lie"):
            native.quantize_pack(lib, w, bits, gs, 0.0, 1.0)
        with pytest.raises(ValueError, match="widths must lie"):
            native.pack(lib, levels, bits, gs)
        with pytest.raises(ValueError, match="widths must lie"):
            native.unpack(lib, packed, bits, gs, 6)
        with pytest.raises(ValueError, match="widths must lie"):
            native.unpack_dequantize(lib, packed, bits, gs, 6, 0.0, 1.0)
    for count, gs in (([4, 4], 0), ([4, 4, 4], 4), ([4, 4, 4, 4], 2)):
        bits = torch.tensor(count, dtype=torch.uint8)
        with pytest.raises(ValueError, match=f"holds {len(count)} widths"):
            native.quantize_pack(lib, w, bits, gs, 0.0, 1.0)
        with pytest.raises(ValueError, match=f"holds {len(count)} widths"):
            native.pack(lib, levels, bits, gs)
        with pytest.raises(ValueError, match=f"holds {len(count)} widths"):
            native.unpack(lib, packed, bits, gs, 6)
        with pytest.raises(ValueError, match=f"holds {len(count)} widths"):
            native.unpack_dequantize(lib, packed, bits, gs, 6, 0.0, 1.0)


@pytest.mark.parametrize("bad", [257, 1.9], ids=str)
def test_rejects_widths_that_wrap_in_uint8(lib, bad):
    # bitpack checks widths before calling native, so only direct callers can reach this.
    with pytest.raises(ValueError, match="widths"):
        native.pack(lib, torch.tensor([1, 0, 1, 1], dtype=torch.int16), torch.tensor([bad]), 0)


@pytest.mark.parametrize("nbytes", [0, 2, 4, 100])
def test_rejects_wrong_stream_length(lib, nbytes):
    bits = torch.tensor([4, 3], dtype=torch.uint8)  # 4·4 + 2·3 bits: 3 bytes
    stream = torch.zeros(nbytes, dtype=torch.uint8)
    with pytest.raises(ValueError, match="expected 3"):
        native.unpack(lib, stream, bits, 4, 6)
    with pytest.raises(ValueError, match="expected 3"):
        native.unpack_dequantize(lib, stream, bits, 4, 6, 0.0, 1.0)


def test_rejects_bad_stream_and_out_types(lib):
    bits = torch.tensor([8], dtype=torch.uint8)
    with pytest.raises(ValueError, match="1-D uint8 CPU tensor, got torch.int8"):
        native.unpack(lib, torch.zeros(4, dtype=torch.int8), bits, 0, 4)
    with pytest.raises(ValueError, match=r"1-D uint8 CPU tensor, got torch.uint8 \(2, 2\)"):
        native.unpack(lib, torch.zeros(2, 2, dtype=torch.uint8), bits, 0, 4)
    with pytest.raises(ValueError, match="on meta"):  # a pointer the codec must never see
        native.unpack(lib, torch.zeros(4, dtype=torch.uint8, device="meta"), bits, 0, 4)
    stream = torch.zeros(4, dtype=torch.uint8)
    for out in (torch.zeros(4, dtype=torch.float64), torch.zeros(5), torch.zeros(4, 2)[:, 0],
                torch.zeros(4, device="meta")):
        with pytest.raises(ValueError, match="out must be"):
            native.unpack_dequantize(lib, stream, bits, 0, 4, 0.0, 1.0, out=out)


def test_rejects_offsets_outside_16_bits(lib):
    levels = torch.zeros(4, dtype=torch.int16)
    bits = torch.tensor([4], dtype=torch.uint8)
    with pytest.raises(ValueError, match="offset"):
        native.pack(lib, levels, bits, 0, offset=2**32)  # would wrap to 0 as a C int32
    with pytest.raises(ValueError, match="offset"):
        native.unpack(lib, torch.zeros(2, dtype=torch.uint8), bits, 0, 4, offset=-(2**20))


def test_crc32_rejects_what_it_cannot_read_as_bytes(lib):
    data = torch.arange(256, dtype=torch.int64).to(torch.uint8)
    assert native.crc32(lib, data[::2]) == zlib.crc32(bytes(data[::2].tolist()))  # made dense
    for bad in (data.float(), data.view(16, 16)):
        with pytest.raises(ValueError, match="1-D uint8 CPU"):
            native.crc32(lib, bad)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16, torch.int32],
                         ids=str)
def test_quantize_pack_rejects_non_float32(lib, dtype):
    with pytest.raises(ValueError, match="float32"):
        native.quantize_pack(lib, torch.zeros(8, dtype=dtype), torch.tensor([4]), 0, 0.0, 1.0)


# ----------------------------------------------------------------------------- availability
def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DIFFQ_TRITON_NATIVE", "0")
    assert native.library() is None
    assert "DIFFQ_TRITON_NATIVE=0" in native.unavailable_reason()


def test_loaded_library_has_no_reason(lib):
    assert native.unavailable_reason() is None


def model_cases():
    """``(factory, quantizer)`` of small models: mixed widths in groups of 8 and of 5, and a
    uniform quantizer (one group per tensor); ``factory`` builds a fresh model to load into."""
    torch.manual_seed(0)
    lm, conv = TiedLM(), conv_net()
    cases = [(TiedLM, dq.DiffQuantizer(lm, min_size=0.001, group_size=8)),
             (conv_net, dq.DiffQuantizer(conv, min_size=0.0001, group_size=5))]
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random logits: groups round to many different widths
        for model in (lm, conv):
            for name, p in model.named_parameters():
                if name.endswith("_diffq"):
                    p.copy_(torch.randn(p.shape, generator=gen) * 3)
    make_mlp = lambda: mlp(32, 300, 10)
    return cases + [(make_mlp, dq.UniformQuantizer(make_mlp(), bits=3, min_size=0.001))]


def test_files_identical_with_and_without_native(lib, monkeypatch):
    # The codec changes speed, never bytes: files written either way are identical, and
    # loading with or without it gives the same weights.
    for make, quantizer in model_cases():
        monkeypatch.setenv("DIFFQ_TRITON_NATIVE", "1")
        with_native = serialization.file_bytes(quantizer)
        monkeypatch.setenv("DIFFQ_TRITON_NATIVE", "0")
        assert native.library() is None
        assert serialization.file_bytes(quantizer) == with_native
        loaded = {}
        for flag in ("1", "0"):
            monkeypatch.setenv("DIFFQ_TRITON_NATIVE", flag)
            fresh = make()
            with poisoned_empty():
                serialization.load_quantized(fresh, with_native)
            loaded[flag] = {n: p.detach().clone() for n, p in fresh.named_parameters()}
        for name, value in loaded["1"].items():
            assert torch.equal(value, loaded["0"][name]), name


def test_bitpack_identical_with_and_without_native(lib, monkeypatch):
    levels, bits = random_case(4099, 5, 1, 15, seed=11)
    widths = torch.randint(2, 16, (999,), generator=torch.Generator().manual_seed(1))
    results = {}
    for flag in ("1", "0"):
        monkeypatch.setenv("DIFFQ_TRITON_NATIVE", flag)
        packed = bitpack.pack_levels(levels, bits, 5)
        field_packed, field = bitpack.pack_widths(widths.to(torch.uint8), 2)
        results[flag] = (as_bytes(packed), as_bytes(field_packed), field)
        assert torch.equal(bitpack.unpack_levels(packed, bits, 5, 4099), levels)
        assert torch.equal(bitpack.unpack_widths(field_packed, field, 999, 2),
                           widths.to(torch.uint8))
    assert results["1"] == results["0"]


@pytest.fixture
def real_compiler():
    """Skip unless a C compiler is found (tests that build the codec for real)."""
    try:
        native_build._compiler()
    except RuntimeError as exc:
        pytest.skip(str(exc))


@pytest.fixture
def fresh_build(monkeypatch, tmp_path):
    """Native enabled, nothing loaded yet, and an empty cache dir (returned)."""
    monkeypatch.setenv("DIFFQ_TRITON_NATIVE", "1")
    monkeypatch.setattr(native_build, "_STATE", {})
    cache = tmp_path / "cache"
    monkeypatch.setenv("DIFFQ_TRITON_CACHE_DIR", str(cache))
    return cache


def library_warns(match: str):
    """:func:`native.library` result, checking it warns exactly once, then never again."""
    with pytest.warns(RuntimeWarning, match=match) as record:
        result = native.library()
    assert len(record) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is result
    return result


def test_no_compiler_falls_back(fresh_build, monkeypatch, tmp_path):
    empty = tmp_path / "empty_path"
    empty.mkdir()
    monkeypatch.setenv("CC", "no-such-compiler-diffq")
    monkeypatch.setenv("PATH", str(empty))
    assert library_warns("no C compiler") is None
    assert "no C compiler" in native.unavailable_reason()
    # Callers take the torch path and still write the layout's bytes.
    levels, bits = random_case(1151, 3, 1, 15, seed=5)
    packed = bitpack.pack_levels(levels, bits, 3)
    assert as_bytes(packed) == stream_as_int(levels, bits, 3)
    assert torch.equal(bitpack.unpack_levels(packed, bits, 3, 1151), levels)


def test_failing_compiler_falls_back(fresh_build, monkeypatch, tmp_path):
    fake = tmp_path / "fake-cc"
    fake.write_text("#!/bin/sh\necho 'fake-cc: cannot compile today' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    assert library_warns("cannot compile today") is None
    assert "cannot compile today" in native.unavailable_reason()
    # No half-written library is left behind for a later process to load.
    assert not fresh_build.exists() or not any(fresh_build.iterdir())


def test_build_cached_and_reused(real_compiler, fresh_build, monkeypatch):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        first = native.library()
    assert first is not None and native.unavailable_reason() is None
    built = list(fresh_build.iterdir())
    assert len(built) == 1 and built[0].name.startswith("codec-") and built[0].suffix == ".so"
    stamp = built[0].stat().st_mtime_ns

    def no_compile(*args, **kwargs):
        raise AssertionError("the cached build should have been reused")

    # A new process (fresh state) loads the cached file without compiling.
    monkeypatch.setattr(native_build, "_STATE", {})
    monkeypatch.setattr(subprocess, "run", no_compile)
    second = native.library()
    assert second is not None
    assert list(fresh_build.iterdir()) == built and built[0].stat().st_mtime_ns == stamp
    w = torch.randn(100)
    bits = torch.tensor([5], dtype=torch.uint8)
    levels, _, _ = reference.quantize(w, bits, 0)
    stream = native.quantize_pack(second, w, bits, 0, *minmax_args(w))
    assert as_bytes(stream) == stream_as_int(levels, bits, 0)


def test_unwritable_cache_dir_builds_in_temp(real_compiler, fresh_build, monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("DIFFQ_TRITON_CACHE_DIR", str(blocker / "cache"))
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(temp))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.library() is not None
    assert [p.suffix for p in temp.glob("diffq_triton-*/*")] == [".so"]


# Builds that break the codec in ways its self-test must catch: -ffast-math (which may fold
# the round-half-to-even trick (t + 2^23) - 2^23 into t, truncating), the rows-of-8 fast
# path placing its upper half one bit off, and rounding half up instead of half to even.
BROKEN = {
    "fast-math": (None, ("-ffast-math",)),
    "rows": (("hi << (4 * (b & 1))", "hi << (4 * (b & 1) + 1)"), ()),
    "half-up": (("t = (t + 8388608.0f) - 8388608.0f;", "t = t + 0.5f;"), ()),
}


@pytest.mark.parametrize("edit", [
    "fast-math",
    "rows",
    "half-up",
])
def test_self_test_refuses_broken_build(real_compiler, fresh_build, monkeypatch, tmp_path,
                                       edit):
    replace, flags = BROKEN[edit]
    if replace is not None:
        old, new = replace
        source = native_build.SOURCE.read_text()
        assert old in source, f"codec.c changed: update BROKEN[{edit!r}]"
        broken = tmp_path / "codec.c"
        broken.write_text(source.replace(old, new))
        monkeypatch.setattr(native_build, "SOURCE", broken)
    monkeypatch.setattr(native_build, "CFLAGS", native_build.CFLAGS + flags)
    assert library_warns("self-test") is None
    assert "self-test" in native.unavailable_reason()


def test_default_cache_dir(monkeypatch, tmp_path):
    # Without DIFFQ_TRITON_CACHE_DIR (which conftest sets for the tests) builds go under the
    # user's cache home.
    monkeypatch.delenv("DIFFQ_TRITON_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert native_build._cache_dir() == tmp_path / "diffq_triton"


@pytest.mark.parametrize("offset", [0, 1, 7, 15])
def test_crc32_matches_zlib_at_every_length_and_alignment(lib, offset):
    """The folded CRC (bulk of 16-byte blocks) plus zlib's tail equals zlib's CRC-32."""
    gen = torch.Generator().manual_seed(offset)
    data = torch.randint(0, 256, (70_000,), generator=gen, dtype=torch.uint8)
    for n in [*range(0, 300), 1023, 4096, 4111, 65_536, 69_999 - offset]:
        view = data[offset : offset + n]
        for start in (0, 1, 0xFFFFFFFF):
            assert native.crc32(lib, view, start) == zlib.crc32(view.numpy(), start), (n, start)


def test_crc32_without_codec_is_zlib():
    data = torch.arange(1000, dtype=torch.int64).mul_(7919).to(torch.uint8)
    assert native.crc32(None, data, 5) == zlib.crc32(bytes(data.tolist()), 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64, torch.float32],
                         ids=str)
@pytest.mark.parametrize("group_size", [0, 5, 8])
def test_quantize_minmax_any_float_dtype_matches_reference(lib, dtype, group_size):
    """Non-float32 weights take the codec after the reference's own upcast: same levels."""
    from diffq_triton.serialization.tensor_record import quantize_minmax

    gen = torch.Generator().manual_seed(group_size)
    w = (torch.randn(10_007, generator=gen) * 3).to(dtype)
    bits = torch.randint(1, 16, (reference.num_groups(w.numel(), group_size),), generator=gen,
                         dtype=torch.uint8)
    record = quantize_minmax("w", w, bits, group_size)
    levels, mn, mx = reference.quantize(w, bits, group_size)
    assert record.dtype == dtype
    assert (record.mn, record.mx) == (float(mn), float(mx))
    assert torch.equal(record.levels, levels)
