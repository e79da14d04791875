"""Packed-layout kernels (docs/packed.md §3) on the test device: the dequantize kernels bit
for bit against the torch reference decoder, the GEMV and GEMM against ``F.linear`` on that
weight (within the float32 rounding of a sum in another order), the Embedding gather bit for
bit against ``F.embedding`` on it.

Under the interpreter on a CPU machine, compiled on a GPU (``DIFFQ_TRITON_TEST_DEVICE``).
Outputs are poisoned (NaN) before each run, so an entry no program writes shows.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from diffq_triton.ops.dispatch import use_backend
from diffq_triton.packed import PackedEmbedding, PackedLinear, PackedTensor
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


# ----------------------------------------------------------------------------- GEMM
# More than 16 rows; N, K and M past one block each (the interpreter's blocks are 32), K not
# a multiple of the group size, groups from 1 to beyond a step and one group, widths 1–15
# (field_bits 4) and one width (no width stream).
GEMM_CASES = [((37, 53), 8, 40, 1, 15), ((29, 61), 7, 17, 1, 15), ((13, 300), 1, 33, 1, 15),
              ((45, 70), 0, 20, 1, 15), ((11, 700), 256, 19, 2, 9), ((9, 999), 2000, 18, 1, 15),
              ((40, 33), 64, 70, 1, 15), ((33, 47), 8, 21, 4, 4), ((17, 90), 5, 35, 15, 15)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "case", GEMM_CASES, ids=lambda c: f"N{c[0][0]}-K{c[0][1]}-g{c[1]}-M{c[2]}-b{c[3]}_{c[4]}")
def test_gemm_equals_linear_on_the_reference_weight(case, dtype):
    shape, group_size, rows, low, high = case
    pt = packed_weight(shape, group_size, low=low, high=high, dtype=dtype, seed=rows)
    w = packed_ref.dequantize_packed(pt)
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(rows, shape[1], generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(shape[0], generator=gen).to(dtype).to(DEVICE)
    for b in (bias, None):
        with poisoned_empty():
            y = packed_k.gemm(x, pt, b)
        assert y.shape == (rows, shape[0]) and y.dtype == dtype
        y_ref = F.linear(x.double(), w.double(), None if b is None else b.double())
        err = (y.double() - y_ref).abs()
        assert bool((err <= _gemv_bound(x, w, y_ref, dtype)).all()), err.max()


@pytest.mark.parametrize("record", [torch.float16, torch.bfloat16], ids=lambda d: str(d)[6:])
def test_gemm_rounds_weights_as_the_float_model(record):
    # Saved in 16 bits, served in float32: each weight is the record's rounding of the
    # decode, as load_quantized gives; lsq too (one group).
    for scheme in ("minmax", "lsq"):
        pt = packed_weight((19, 41), 8, scheme, record_dtype=record, dtype=torch.float32)
        w = packed_ref.dequantize_packed(pt)
        x = torch.randn(3, 7, 41, generator=torch.Generator().manual_seed(5)).to(DEVICE)
        with poisoned_empty():
            y = packed_k.gemm(x, pt)
        y_ref = F.linear(x.double(), w.double())
        assert y.shape == (3, 7, 19)
        bound = _gemv_bound(x.view(21, 41), w, y_ref.view(21, 19), torch.float32)
        assert bool(((y.double() - y_ref).abs().view(21, 19) <= bound).all())


def test_gemm_does_not_use_tf32_for_float32():
    # Weights and inputs whose products need all 24 bits: TF32 (10-bit mantissas) would be
    # off by far more than the bound.
    pt = packed_weight((32, 64), 8, low=15, high=15)
    w = packed_ref.dequantize_packed(pt)
    x = (1 + torch.arange(64 * 20, dtype=torch.float32).view(20, 64) * 2.0**-20).to(DEVICE)
    y = packed_k.gemm(x, pt)
    y_ref = F.linear(x.double(), w.double())
    assert bool(((y.double() - y_ref).abs() <= _gemv_bound(x, w, y_ref, torch.float32)).all())


@pytest.mark.parametrize("rows, kernel", [(1, "gemv"), (16, "gemv"), (17, "gemm"),
                                          (64, "gemm")])
def test_linear_picks_gemv_or_gemm_by_rows(rows, kernel, monkeypatch):
    calls = []
    for name in ("gemv", "gemm"):
        launch = getattr(packed_k, name)
        monkeypatch.setattr(packed_k, name,
                            lambda *a, _n=name, _f=launch, **k: calls.append(_n) or _f(*a, **k))
    pt = packed_weight((7, 9), 4)
    x = torch.randn(rows, 9, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    y = packed_k.linear(x.view(1, rows, 9), pt)
    assert calls == [kernel] and y.shape == (1, rows, 7)
    y_ref = F.linear(x.double(), packed_ref.dequantize_packed(pt).double())
    bound = _gemv_bound(x, packed_ref.dequantize_packed(pt), y_ref, torch.float32)
    assert bool(((y[0].double() - y_ref).abs() <= bound).all())


def test_linear_times_gemv_against_gemm_once_per_shape_on_a_gpu(monkeypatch):
    # Between 2 and 16 rows on a GPU the dispatcher times both kernels once per key and
    # keeps the faster: here the timer says the GEMM is faster for 4 rows.
    calls = _counting(monkeypatch, "gemv", "gemm")
    monkeypatch.setattr(packed_k, "_may_time", lambda x: True)
    monkeypatch.setattr(packed_k, "_LINEAR_CHOICE", {})
    timed = []

    def bench(fn, **kwargs):
        fn()
        timed.append(calls[-1])
        return {"gemv": 2.0, "gemm": 1.0}[calls[-1]]

    monkeypatch.setattr(packed_k, "_do_bench", bench)
    pt = packed_weight((7, 9), 4)
    x = torch.randn(4, 9, generator=torch.Generator().manual_seed(10)).to(DEVICE)
    for _ in range(2):
        calls.clear()
        y = packed_k.linear(x, pt)
    assert timed == ["gemv", "gemm"]  # timed once, on the first call
    assert calls == ["gemm"]
    assert list(packed_k._LINEAR_CHOICE.values()) == ["gemm"]
    calls.clear()
    packed_k.linear(x[:1], pt)  # one row: the GEMV, untimed
    assert calls == ["gemv"] and len(timed) == 2
    y_ref = F.linear(x.double(), packed_ref.dequantize_packed(pt).double())
    bound = _gemv_bound(x, packed_ref.dequantize_packed(pt), y_ref, torch.float32)
    assert bool(((y.double() - y_ref).abs() <= bound).all())


@pytest.mark.parametrize("rows", [3, 20], ids=["gemv", "gemm"])
def test_linear_reads_a_strided_bias(rows):
    pt = packed_weight((7, 9), 4)
    bias = torch.randn(14, generator=torch.Generator().manual_seed(8)).to(DEVICE)[::2]
    x = torch.randn(rows, 9, generator=torch.Generator().manual_seed(9)).to(DEVICE)
    w = packed_ref.dequantize_packed(pt)
    y_ref = F.linear(x.double(), w.double(), bias.double())
    y = packed_k.linear(x, pt, bias)
    assert bool(((y.double() - y_ref).abs() <= _gemv_bound(x, w, y_ref, torch.float32)).all())


def test_gemm_refuses_bad_arguments():
    pt = packed_weight((7, 9), 4)
    with pytest.raises(ValueError, match="features"):
        packed_k.gemm(torch.zeros(20, 8, device=DEVICE), pt)
    with pytest.raises(TypeError, match="dtype"):
        packed_k.gemm(torch.zeros(20, 9, dtype=torch.float16, device=DEVICE), pt)
    with pytest.raises(ValueError, match="bias"):
        packed_k.gemm(torch.zeros(20, 9, device=DEVICE), pt, torch.zeros(6, device=DEVICE))
    with pytest.raises(ValueError, match="2-D"):
        packed_k.gemm(torch.zeros(20, 9, device=DEVICE), packed_weight((7, 3, 3), 4))


# ----------------------------------------------------------------------------- Embedding
# Rows of odd length (groups cross rows), every group layout, widths 1–15 and one width.
EMBEDDING_CASES = [((50, 37), 8, 1, 15), ((23, 300), 7, 1, 15), ((40, 13), 1, 1, 15),
                   ((11, 600), 7, 1, 15),  # D past the interpreter's 512-entry step
                   ((31, 29), 0, 3, 3), ((20, 45), 64, 2, 9), ((9, 999), 2000, 1, 15),
                   ((64, 24), 8, 5, 5)]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize(
    "case", EMBEDDING_CASES, ids=lambda c: f"V{c[0][0]}-D{c[0][1]}-g{c[1]}-b{c[2]}_{c[3]}")
def test_embedding_equals_the_float_model_gather(case, dtype):
    shape, group_size, low, high = case
    pt = packed_weight(shape, group_size, low=low, high=high, dtype=dtype, seed=shape[1])
    w = packed_ref.dequantize_packed(pt)
    gen = torch.Generator().manual_seed(7)
    # Every row, repeated ids, then a batch of random ones in a 2-D shape.
    for ids in (torch.arange(shape[0]), torch.tensor([3, 3, 0, shape[0] - 1]),
                torch.randint(0, shape[0], (3, 5), generator=gen, dtype=torch.int32)):
        ids = ids.to(DEVICE)
        with poisoned_empty():
            got = packed_k.embedding(ids, pt)
        assert got.dtype == dtype and got.shape == (*ids.shape, shape[1])
        assert torch.equal(got, F.embedding(ids.long(), w))


def test_embedding_lsq_and_record_dtype():
    for scheme, record in (("lsq", torch.float32), ("minmax", torch.bfloat16)):
        pt = packed_weight((17, 21), 8, scheme, record_dtype=record, dtype=torch.float16)
        ids = torch.tensor([[16, 0], [5, 5]], device=DEVICE)
        assert torch.equal(packed_k.embedding(ids, pt),
                           F.embedding(ids, packed_ref.dequantize_packed(pt)))


def test_embedding_refuses_bad_ids():
    pt = packed_weight((10, 7), 4)
    with pytest.raises(IndexError, match="id 10 .* 10 rows"):
        packed_k.embedding(torch.tensor([1, 10], device=DEVICE), pt)
    with pytest.raises(IndexError, match="id -1"):
        packed_k.embedding(torch.tensor([-1], device=DEVICE), pt)
    with pytest.raises(TypeError, match="int32 or int64"):
        packed_k.embedding(torch.tensor([1.0], device=DEVICE), pt)
    assert packed_k.embedding(torch.zeros(0, 2, dtype=torch.int64, device=DEVICE),
                              pt).shape == (0, 2, 7)


# ----------------------------------------------------------------------------- wiring
def _counting(monkeypatch, *names):
    calls = []
    for name in names:
        launch = getattr(packed_k, name)
        monkeypatch.setattr(packed_k, name,
                            lambda *a, _n=name, _f=launch, **k: calls.append(_n) or _f(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_packed_linear_runs_the_fused_kernels_on_the_triton_backend(dtype, monkeypatch):
    calls = _counting(monkeypatch, "dequantize", "gemv", "gemm")
    linear = nn.Linear(53, 37).to(dtype)
    layer = PackedLinear(linear, packed_weight((37, 53), 7, dtype=dtype)).to(DEVICE)
    w = packed_ref.dequantize_packed(layer.weight_packed)
    for rows, kernel in ((5, "gemv"), (40, "gemm")):
        x = torch.randn(rows, 53, generator=torch.Generator().manual_seed(3)).to(dtype)
        x = x.to(DEVICE)
        with torch.no_grad():
            with use_backend("eager"):
                expected = layer(x)  # the decode, then F.linear: the float model's output
            calls.clear()
            with use_backend("triton"):
                got = layer(x)
        assert calls == [kernel]
        y_ref = F.linear(x.double(), w.double(), layer.bias.double())
        assert bool(((got.double() - y_ref).abs() <= _gemv_bound(x, w, y_ref, dtype)).all())
        # With autograd recording: the decode kernel into a fresh weight, then F.linear,
        # bit for bit the float model's.
        calls.clear()
        with use_backend("triton"):
            assert torch.equal(layer(x.requires_grad_(True)), expected)
        assert calls == ["dequantize"]


def test_packed_linear_decodes_when_dtypes_differ_or_autocast(monkeypatch):
    calls = _counting(monkeypatch, "dequantize", "gemv", "gemm")
    layer = PackedLinear(nn.Linear(9, 7), packed_weight((7, 9), 4)).to(DEVICE)
    with torch.no_grad(), use_backend("triton"):
        layer(torch.randn(2, 9, device=DEVICE))
        assert calls == ["gemv"]
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            assert layer(torch.randn(2, 9, device=DEVICE)).dtype == torch.bfloat16
    assert calls == ["gemv", "dequantize"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
def test_packed_embedding_gathers_on_the_triton_backend(dtype, monkeypatch):
    calls = _counting(monkeypatch, "dequantize", "embedding")
    emb = nn.Embedding(31, 45, padding_idx=2).to(dtype)
    layer = PackedEmbedding(emb, packed_weight((31, 45), 8, dtype=dtype)).to(DEVICE)
    ids = torch.tensor([[0, 2, 30], [7, 7, 1]], device=DEVICE)
    with use_backend("eager"):
        expected = layer(ids)
    with use_backend("triton"):
        got = layer(ids)
    assert calls == ["embedding"] and torch.equal(got, expected)


def test_packed_model_on_the_triton_backend_matches_the_float_model():
    # A model loaded packed from a file runs its Linear layers on the fused kernels and its
    # Embedding on the gather: within float32 rounding of the float-loaded model's output.
    import io

    import diffq_triton as dq

    def make():
        torch.manual_seed(0)
        return nn.Sequential(nn.Embedding(50, 24), nn.Linear(24, 37), nn.ReLU(),
                             nn.Linear(37, 50))

    q = dq.DiffQuantizer(make(), group_size=8, min_size=0.0)
    with torch.no_grad():
        for name, p in q.model.named_parameters():
            if name.endswith("_diffq"):  # widths spread over 2..8 bits
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 2)
    buf = io.BytesIO()
    dq.save_quantized(q, buf)
    float_model, packed = make(), make()
    dq.load_quantized(float_model, buf.getvalue())
    report = dq.load_quantized(packed, buf.getvalue(), packed=True)
    assert set(report.packed) == {"0", "1", "3"}
    float_model.to(DEVICE), packed.to(DEVICE)
    ids = torch.randint(0, 50, (3, 11), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    with torch.no_grad(), use_backend("triton"):
        got = packed(ids)
        expected = float_model(ids)
    assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6), (got - expected).abs().max()
