"""Packed-layout kernels (docs/packed.md §3) on the test device: the dequantize kernels bit
for bit against the torch reference decoder, the GEMV against ``F.linear`` on that weight.

Under the interpreter on a CPU machine, compiled on a GPU (``DIFFQ_TRITON_TEST_DEVICE``).
Outputs are poisoned (NaN) before each run, so an entry no program writes shows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffq_triton.ops.dispatch import use_backend
from diffq_triton.packed import PackedLinear, PackedTensor
from diffq_triton.packed import reference as packed_ref
from diffq_triton.serialization.tensor_record import QuantizedTensor
from tests.conftest import DEVICE, poisoned_empty

pytest.importorskip("triton")
from diffq_triton.kernels import packed as packed_k  # noqa: E402

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def packed_weight(shape, group_size: int, scheme: str = "minmax", low: int = 1,
                  high: int = 15, record_dtype=torch.float32, dtype=None,
                  seed: int = 0) -> PackedTensor:
    """A packed weight of random levels; the first groups take every width of
    ``[low, high]`` in turn, the others random ones (widths spread: ``field_bits`` 4)."""
    gen = torch.Generator().manual_seed(seed)
    numel = 1
    for n in shape:
        numel *= n
    n_groups = 1 if group_size == 0 or scheme == "lsq" else -(-numel // group_size)
    bits = torch.randint(low, high + 1, (n_groups,), generator=gen, dtype=torch.uint8)
    every = torch.arange(low, high + 1, dtype=torch.uint8)[:n_groups]
    bits[: every.numel()] = every
    top = (1 << bits.to(torch.int64)) - 1
    per_entry = top.repeat_interleave(group_size)[:numel] if n_groups > 1 else top.expand(numel)
    levels = (torch.rand(numel, generator=gen) * (per_entry + 1)).floor().to(torch.int16)
    if scheme == "lsq":  # signed levels, one width per tensor (as files hold lsq weights)
        levels -= 1 << (int(bits[0]) - 1)
        qt = QuantizedTensor("w", shape, record_dtype, "lsq", 0, levels, bits, 0.0123, 0.0)
    else:
        qt = QuantizedTensor("w", shape, record_dtype, "minmax", group_size, levels, bits,
                             -0.731, 1.377)
    return PackedTensor.from_record(qt, dtype=dtype).to(DEVICE)


def _dequantize(pt, *args, **kwargs) -> torch.Tensor:
    with poisoned_empty():  # the launcher allocates its output with torch.empty
        return packed_k.dequantize(pt, *args, **kwargs)


# ----------------------------------------------------------------------------- dequantize
# Odd sizes; groups of 1, 7, 8, 64, 256 and 1024 (tile kernel), 2000 and one group of the
# whole tensor (chunked kernel); the lsq decode on one group and, through the tile kernel,
# on groups of 8 (a layout files do not produce, but the reference defines it).
CASES = [(1, 0, "minmax"), (1001, 0, "minmax"), (1001, 1, "minmax"), (5003, 7, "minmax"),
         (4099, 8, "minmax"), (7001, 64, "minmax"), (7001, 256, "minmax"),
         (3001, 1024, "minmax"), (9001, 2000, "minmax"), (777, 0, "lsq"), (4099, 8, "lsq8")]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{c[0]}-g{c[1]}-{c[2]}")
def test_dequantize_equals_the_reference_tiles(case):
    numel, group_size, scheme = case
    pt = packed_weight((numel,), group_size, "minmax" if scheme == "lsq8" else scheme)
    if scheme == "lsq8":
        pt.scheme = "lsq"
    n_tiles = pt.tile_offsets.numel()
    out = _dequantize(pt, dtype=torch.float32, round_record=False)
    assert torch.equal(out, packed_ref.dequantize_tiles(pt, 0, n_tiles))
    # Tile ranges, each from its stored offset, into a poisoned output of their own.
    for t0, t1 in {(0, 1), (n_tiles // 2, n_tiles), (n_tiles - 1, n_tiles), (1, 1)}:
        t1 = min(t1, n_tiles)
        expected = packed_ref.dequantize_tiles(pt, t0, t1)
        dest = torch.full_like(expected, float("nan"))
        got = packed_k.dequantize(pt, t0, t1, dtype=torch.float32, round_record=False,
                                  out=dest)
        assert got.data_ptr() == dest.data_ptr() or expected.numel() == 0
        assert torch.equal(got, expected), (t0, t1)


@pytest.mark.parametrize("width", [1, 2, 8, 15], ids=lambda b: f"b{b}")
@pytest.mark.parametrize("group_size", [0, 8, 2000], ids=lambda g: f"g{g}")
def test_one_width_reads_no_width_stream(group_size, width):
    pt = packed_weight((4133,), group_size, low=width, high=width, seed=width)
    assert pt.field_bits == 0
    out = _dequantize(pt, dtype=torch.float32, round_record=False)
    assert torch.equal(out, packed_ref.dequantize_tiles(pt, 0, pt.tile_offsets.numel()))


@pytest.mark.parametrize("record", DTYPES, ids=lambda d: f"rec-{str(d)[6:]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("group_size", [0, 8], ids=lambda g: f"g{g}")
def test_weight_of_every_dtype_equals_the_float_model(group_size, dtype, record):
    # Rounded to the record's dtype, then the layer's, as the float model's parameter.
    pt = packed_weight((37, 53), group_size, record_dtype=record, dtype=dtype)
    out = _dequantize(pt)
    assert out.dtype == dtype
    assert torch.equal(out.view(pt.shape), packed_ref.dequantize_packed(pt))


def test_dequantize_refuses_bad_arguments():
    pt = packed_weight((100,), 8)
    with pytest.raises(ValueError, match="tile range"):
        packed_k.dequantize(pt, 0, 2)
    with pytest.raises(TypeError, match="dtype"):
        packed_k.dequantize(pt, dtype=torch.float64)
    with pytest.raises(ValueError, match="out"):
        packed_k.dequantize(pt, out=torch.empty(99, device=DEVICE))


# ----------------------------------------------------------------------------- GEMV
def _gemv_bound(x, w, y_ref, dtype) -> torch.Tensor:
    """The GEMV's tolerance against F.linear (kernels.packed.gemv): the float32 sums of K
    products differ in order (and fma on a GPU), ``2·K·2⁻²⁴·Σ|x·w|``; then each result is
    rounded once to ``dtype``, which may land on the neighbouring value: ``eps·|y|``."""
    k = x.shape[-1]
    acc = 2 * k * 2.0**-24 * (x.double().abs() @ w.double().abs().T)
    return acc + torch.finfo(dtype).eps * y_ref.abs()


# (N, K) with K not a multiple of the group size (groups span rows), group sizes from 1 to
# beyond a piece (256) and one group, 1 to 16 rows.
GEMV_CASES = [((37, 53), 8, 3), ((29, 61), 7, 1), ((13, 300), 1, 16), ((17, 45), 0, 5),
              ((11, 700), 256, 2), ((9, 999), 2000, 4), ((7, 130), 64, 1), ((5, 1100), 300, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", GEMV_CASES, ids=lambda c: f"N{c[0][0]}-K{c[0][1]}-g{c[1]}-M{c[2]}")
def test_gemv_equals_linear_on_the_reference_weight(case, dtype):
    shape, group_size, rows = case
    pt = packed_weight(shape, group_size, dtype=dtype, seed=rows)
    w = packed_ref.dequantize_packed(pt)  # the float model's weight, of dtype
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(rows, shape[1], generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(shape[0], generator=gen).to(dtype).to(DEVICE)
    for b in (bias, None):
        with poisoned_empty():
            y = packed_k.gemv(x, pt, b)
        assert y.shape == (rows, shape[0]) and y.dtype == dtype
        # F.linear on that weight, in float64: the exact sum the GEMV rounds.
        y_ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        err = (y.double() - y_ref).abs()
        assert bool((err <= _gemv_bound(x, w, y_ref, dtype)).all()), err.max()


def test_gemv_lsq_and_leading_dims():
    pt = packed_weight((21, 33), 0, "lsq")
    x = torch.randn(2, 3, 33, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with poisoned_empty():
        y = packed_k.gemv(x, pt)
    y_ref = F.linear(x.double(), packed_ref.dequantize_packed(pt).double())
    assert y.shape == (2, 3, 21)
    bound = _gemv_bound(x.view(6, 33), packed_ref.dequantize_packed(pt), y_ref.view(6, 21),
                        torch.float32)
    assert bool(((y.double() - y_ref).abs().view(6, 21) <= bound).all())


def test_gemv_refuses_bad_arguments():
    pt = packed_weight((7, 9), 4)
    with pytest.raises(ValueError, match="rows"):
        packed_k.gemv(torch.zeros(17, 9, device=DEVICE), pt)
    with pytest.raises(ValueError, match="features"):
        packed_k.gemv(torch.zeros(1, 8, device=DEVICE), pt)
    with pytest.raises(TypeError, match="dtype"):
        packed_k.gemv(torch.zeros(1, 9, dtype=torch.float16, device=DEVICE), pt)
    with pytest.raises(ValueError, match="2-D"):
        packed_k.gemv(torch.zeros(1, 9, device=DEVICE), packed_weight((7, 3, 3), 4))


# ----------------------------------------------------------------------------- wiring
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_packed_layer_decodes_with_the_kernel_on_the_triton_backend(dtype, monkeypatch):
    calls = []
    launch = packed_k.dequantize

    def counted(*args, **kwargs):
        calls.append(1)
        return launch(*args, **kwargs)

    monkeypatch.setattr(packed_k, "dequantize", counted)
    linear = nn.Linear(53, 37).to(dtype)
    layer = PackedLinear(linear, packed_weight((37, 53), 7, dtype=dtype)).to(DEVICE)
    x = torch.randn(5, 53, generator=torch.Generator().manual_seed(3)).to(dtype).to(DEVICE)
    with torch.no_grad():
        with use_backend("eager"):
            expected = layer(x)
        with use_backend("triton"):
            got = layer(x)
    assert calls == [1]
    assert torch.equal(got, expected)
    # With autograd recording: a fresh weight, the same output.
    x.requires_grad_(True)
    with use_backend("triton"):
        assert torch.equal(layer(x), expected)
    assert calls == [1, 1]
