"""Triton kernels reading the packed layout of docs/packed.md §3: dequantize, Linear, gather.

A packed weight is the dense level stream (``levels``), the width stream (``widths``, absent
when every group has width ``base``), the bit offset of each tile of ``T`` groups
(``tile_offsets``) and the float32 range (``scale``). A program finds a group's first bit
from its tile's offset plus an exclusive ``tl.cumsum`` of ``width·length`` over the groups
before it, then reads each level from the 3 bytes holding its bits (the streams carry 8
zero bytes of padding, so the window never leaves the buffer).

- :func:`dequantize`: the weight, or a range of tiles, as a dense tensor. Groups of at most
  :data:`MAX_TILE_G` entries: one program per tile (:func:`packed_dequant_tile_kernel`);
  larger groups and one group per tensor: one program per chunk of entries
  (:func:`packed_dequant_chunk_kernel`).
- :func:`linear`: ``y = x Wᵀ + b``, every weight decoded in registers, never written: the
  GEMV (:func:`gemv`) for at most :data:`MAX_GEMV_ROWS` rows of ``x``, the tiled GEMM
  (:func:`gemm`) above (both in :mod:`.packed_matmul`).
- :func:`embedding`: rows of a packed table, each decoded from its bits
  (:func:`packed_embedding_kernel`).

In-kernel steps shared by these kernels are in :mod:`.packed_steps`.

The float math is :func:`diffq_triton.ops.reference.dequantize`'s, operation for operation
(IEEE division, no fused multiply-add: the kernels compile with ``enable_fp_fusion=False``),
so the dequantized weight equals the file loader's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.testing import do_bench as _do_bench

from .common import INTERPRET, cast_out, next_pow2
from .packed_matmul import MAX_GEMV_ROWS, gemm, gemv, rows_of
from .packed_steps import (
    _ROUND,
    _layout,
    _levels,
    _log_g,
    _options,
    _row_starts,
    _row_step,
    _value,
    _widths,
)

# Groups of up to this many entries take the per-tile kernel (a [TG, G_PAD] block per
# step); larger ones the chunked kernel, where a program's entries span at most 2 groups.
MAX_TILE_G = 1024
# Entries per step of a tile program / per program of the chunked kernel (one group).
BLOCK = 8192 if INTERPRET else 2048
# Chunk of the chunked kernel when there are several groups: at most the group size
# (> MAX_TILE_G), so that a chunk touches at most two groups.
CHUNK = 1024


# ----------------------------------------------------------------------------- dequantize
@triton.jit
def packed_dequant_tile_kernel(
    p_levels, p_widths, p_toff, p_scale, p_out, first_tile, e_first, n_groups, numel, g,
    base, F: tl.constexpr, T: tl.constexpr, TG: tl.constexpr, G_PAD: tl.constexpr,
    LSQ: tl.constexpr, R1: tl.constexpr, IS_BF16: tl.constexpr,
):
    """Tile ``first_tile + program_id`` (groups ``[t·T, t·T + T)``), ``TG`` groups per step
    as a ``[TG, G_PAD]`` block, the running bit offset carried from step to step.

    Bytes per weight: ``b/8`` of levels, ``(F + 64/T)/(8·g)`` of widths and tile offset,
    and one output entry written (4 bytes float32, 2 bytes 16-bit).
    """
    i_t = first_tile + tl.program_id(0).to(tl.int64)
    lo = tl.load(p_scale)
    span = tl.load(p_scale + 1) - lo  # max - min in float32, as the reference
    last_len = (numel - (n_groups - 1) * g).to(tl.int32)
    o_run = tl.load(p_toff + i_t)  # e_first = first_tile·T·g (host int: no int32 overflow)
    o_j = tl.arange(0, G_PAD)
    for c in range(0, T // TG):
        o_s = i_t * T + c * TG + tl.arange(0, TG)
        m_s = o_s < n_groups
        b_w = _widths(p_widths, o_s, m_s, base, F)
        # Entries per group: g, the tensor's last group may be shorter; 0 past the end.
        b_n = tl.where(m_s, tl.where(o_s == n_groups - 1, last_len, g), 0)
        b_sz = b_w * b_n  # < 2^24 bits per tile (T·g·15, g ≤ MAX_TILE_G): int32 is exact
        o_first = o_run + (tl.cumsum(b_sz, 0) - b_sz).to(tl.int64)  # exclusive prefix sum
        m = o_j[None, :] < b_n[:, None]
        o_bit = o_first[:, None] + o_j[None, :] * b_w[:, None]
        q = _levels(p_levels, o_bit, b_w[:, None], m)
        v = _value(q, b_w[:, None], lo, span, LSQ, R1, 0)
        o_e = o_s[:, None] * g + o_j[None, :] - e_first
        tl.store(p_out + o_e, cast_out(v, IS_BF16, p_out.dtype.element_ty), mask=m)
        o_run += tl.sum(b_sz, 0).to(tl.int64)


@triton.jit
def packed_dequant_chunk_kernel(
    p_levels, p_widths, p_toff, p_scale, p_out, e_first, n_out, n_groups, g, base,
    F: tl.constexpr, T: tl.constexpr, CHUNK: tl.constexpr,
    LSQ: tl.constexpr, R1: tl.constexpr, IS_BF16: tl.constexpr,
):
    """Entries ``[e_first + i·CHUNK, +CHUNK)`` for groups of ``g ≥ CHUNK`` entries (or one
    group, ``g = numel``): they span groups ``s_a`` and ``s_a + 1`` at most. ``s_a`` starts at
    its tile's offset plus the sizes of the tile's groups before it (all full groups).

    Bytes per weight: ``b/8`` of levels, one output entry written, and per program the
    ``T`` width fields and the offset of one tile (``(T·F/8 + 8)/CHUNK``, cached).
    """
    i_c = tl.program_id(0).to(tl.int64)
    lo = tl.load(p_scale)
    span = tl.load(p_scale + 1) - lo
    e_0 = e_first + i_c * CHUNK
    o_e = e_0 + tl.arange(0, CHUNK)
    m_e = o_e - e_first < n_out
    s_a = e_0 // g
    i_t = s_a // T
    o_s = i_t * T + tl.arange(0, T)
    b_t = _widths(p_widths, o_s, o_s <= s_a, base, F)
    start_a = tl.load(p_toff + i_t) + tl.sum(tl.where(o_s < s_a, b_t, 0).to(tl.int64), 0) * g
    b_a = tl.sum(tl.where(o_s == s_a, b_t, 0), 0).to(tl.int64)
    o_g = o_e // g
    b_w = _widths(p_widths, o_g, m_e, base, F)
    o_bit = start_a + (o_g - s_a) * b_a * g + (o_e - o_g * g) * b_w
    q = _levels(p_levels, o_bit, b_w, m_e)
    v = _value(q, b_w, lo, span, LSQ, R1, 0)
    tl.store(p_out + (o_e - e_first), cast_out(v, IS_BF16, p_out.dtype.element_ty), mask=m_e)


def dequantize(pt, first_tile: int = 0, stop_tile: int | None = None,
               dtype: torch.dtype | None = None, round_record: bool = True,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """Dequantize tiles ``[first_tile, stop_tile)`` of a packed weight (1 launch).

    Args:
        pt: a ``diffq_triton.packed.PackedTensor`` (any object with its buffers ``levels``,
            ``widths`` when ``field_bits > 0``, ``tile_offsets``, ``scale`` and its
            attributes ``numel``, ``group_size``, ``n_groups``, ``base``, ``field_bits``,
            ``scheme``, ``tile_groups``, ``record_dtype``, ``dtype``), on the kernels' device.
        first_tile, stop_tile: the tile range (default: every tile).
        dtype: the output dtype, float32/bfloat16/float16 (default ``pt.dtype``).
        round_record: round to ``pt.record_dtype`` first, as the float model's parameter is
            (:meth:`PackedTensor.cast`); False gives the float32 decode itself, rounded once
            to ``dtype``.
        out: optional contiguous output of ``dtype`` with as many entries (written).

    Returns:
        ``[e1 - e0]`` tensor of ``dtype``: entries ``e0 = first_tile·T·g`` to
        ``e1 = min(stop_tile·T·g, numel)`` of the row-major flattened weight.

    Bytes moved per weight: ``b̄/8`` of levels + ``(f + 0.5)/(8·g)`` of widths and tile
    offsets (``T = 128``) read, 4 (float32) or 2 (16-bit) written.
    """
    n_tiles = pt.tile_offsets.numel()
    stop_tile = n_tiles if stop_tile is None else stop_tile
    if not 0 <= first_tile <= stop_tile <= n_tiles:
        raise ValueError(f"tile range [{first_tile}, {stop_tile}) outside [0, {n_tiles}]")
    dtype = dtype or pt.dtype
    if dtype not in _ROUND:
        raise TypeError(f"dtype must be float32, bfloat16 or float16, got {dtype}")
    widths, g, f = _layout(pt)
    T = pt.tile_groups
    e0 = first_tile * T * g
    e1 = min(stop_tile * T * g, pt.numel)
    n_out = max(e1 - e0, 0)
    if out is None:
        out = torch.empty(n_out, dtype=dtype, device=pt.levels.device)
    elif out.dtype != dtype or out.numel() != n_out or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {dtype} tensor of {n_out} entries")
    if n_out == 0:
        return out.view(-1)
    r1 = _ROUND.get(pt.record_dtype, 0) if round_record else 0
    common = dict(F=f, T=T, LSQ=pt.scheme == "lsq", R1=r1, IS_BF16=dtype == torch.bfloat16,
                  **_options())
    if pt.n_groups > 1 and g <= MAX_TILE_G:
        g_pad = next_pow2(g)
        tg = min(T, max(1, BLOCK // g_pad))
        packed_dequant_tile_kernel[(stop_tile - first_tile,)](
            pt.levels, widths, pt.tile_offsets, pt.scale, out, first_tile, e0, pt.n_groups,
            pt.numel, g, pt.base, TG=tg, G_PAD=g_pad, **common)
    else:
        chunk = CHUNK if pt.n_groups > 1 else BLOCK
        packed_dequant_chunk_kernel[(triton.cdiv(n_out, chunk),)](
            pt.levels, widths, pt.tile_offsets, pt.scale, out, e0, n_out, pt.n_groups, g,
            pt.base, CHUNK=chunk, **common)
    return out.view(-1)


# GEMV or GEMM for 2 to MAX_GEMV_ROWS rows, by (device, shape, dtype, rows, group size,
# field bits): timed once per key on a GPU, kept for the process.
_LINEAR_CHOICE: dict[tuple, str] = {}


def linear(x: torch.Tensor, pt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x Wᵀ + bias`` on a packed ``[N, K]`` weight, the kernel picked by the number of
    rows ``M`` of ``x`` (all of its leading dimensions): :func:`gemv` for one row (decode:
    one program per feature, each weight's bits read once), :func:`gemm` above
    :data:`MAX_GEMV_ROWS` (tiles; the weight decoded once per ``BM`` rows). In between, on
    a GPU, the first call of each (shape, dtype, rows, layout) times both kernels on its
    own inputs (``triton.testing.do_bench``, a few ms once) and keeps the faster; elsewhere,
    and while a CUDA graph is captured (timing would sync), the GEMV.

    Args and returns as :func:`gemv` / :func:`gemm` (same tolerance against ``F.linear``).
    """
    rows = rows_of(x)
    if rows > MAX_GEMV_ROWS:
        return gemm(x, pt, bias)
    if rows <= 1 or not _may_time(x):
        return gemv(x, pt, bias)
    key = (x.device, tuple(pt.shape), x.dtype, rows, pt.group_size, pt.field_bits)
    kernel = _LINEAR_CHOICE.get(key)
    if kernel is None:
        kernel = _LINEAR_CHOICE[key] = _faster(x, pt, bias)
    return gemv(x, pt, bias) if kernel == "gemv" else gemm(x, pt, bias)


def _may_time(x: torch.Tensor) -> bool:
    return x.is_cuda and not torch.cuda.is_current_stream_capturing()


def _faster(x: torch.Tensor, pt, bias: torch.Tensor | None) -> str:
    """``"gemv"`` or ``"gemm"``, whichever runs this call faster (median of a few runs)."""
    times = {name: _do_bench(lambda f=f: f(x, pt, bias), warmup=3, rep=15,
                             return_mode="median")
             for name, f in (("gemv", gemv), ("gemm", gemm))}
    return min(times, key=times.get)


# ----------------------------------------------------------------------------- Embedding
@triton.jit
def packed_embedding_kernel(
    p_ids, p_levels, p_widths, p_toff, p_scale, p_out, n_ids, D, g, base,
    F: tl.constexpr, T: tl.constexpr, LOG_G: tl.constexpr, LSQ: tl.constexpr,
    R1: tl.constexpr, R2: tl.constexpr, IS_BF16: tl.constexpr, BR: tl.constexpr,
    BD: tl.constexpr,
):
    """Rows ``ids[i]`` for ``BR`` ids of the block, each decoded from its packed bits
    (``D`` entries from entry ``ids[i]·D``), ``BD`` entries per step, and written as the
    float model's weights (rounded to the record's, then the layer's dtype).

    Bytes per looked-up row: ``D·b̄/8`` of levels, ``D·f/8`` of width fields at most, one
    tile offset and up to ``T`` width fields to find the row's first bit; ``D`` entries
    written (4 or 2 bytes each).
    """
    o_i = tl.program_id(0) * BR + tl.arange(0, BR)
    m_i = o_i < n_ids
    o_r = tl.load(p_ids + o_i, mask=m_i, other=0)
    lo = tl.load(p_scale)
    span = tl.load(p_scale + 1) - lo
    o_row, s_0, r_0 = _row_starts(p_widths, p_toff, o_r, m_i, D, g, base, F, T, 32)
    p_row = p_levels + (o_row >> 3)
    bit_row = (o_row & 7).to(tl.int32)
    for d in range(0, D, BD):
        w, b_sz = _row_step(p_levels, p_widths, p_row, bit_row, s_0, r_0, d, m_i, D, g,
                            base, lo, span, F, BD, LOG_G, LSQ, R1, R2)
        if F != 0:
            bit_row += b_sz
        o_d = d + tl.arange(0, BD)
        p_o = p_out + o_i[:, None].to(tl.int64) * D + o_d[None, :]
        tl.store(p_o, cast_out(w, IS_BF16, p_out.dtype.element_ty),
                 mask=m_i[:, None] & (o_d < D)[None, :])


def embedding(ids: torch.Tensor, pt) -> torch.Tensor:
    """Rows ``ids`` of a packed ``[num_embeddings, D]`` table (1 launch), as
    ``F.embedding(ids, W)`` on the float model's weight ``W``, bit for bit.

    Args:
        ids: integer tensor (int32/int64) of any shape, on ``pt``'s device, each in
            ``[0, num_embeddings)`` (checked: an ``IndexError`` names the smallest negative
            or the largest too-large id; the check reads ``ids``' extremes back to the host,
            one sync, and is skipped while a CUDA graph is being captured).
        pt: a packed 2-D weight ``[num_embeddings, D]``.

    Returns:
        ``[*ids.shape, D]`` of ``pt.dtype``.

    Bytes moved per looked-up row: ``D·(b̄ + f)/8`` read at most, one tile offset and up to
    ``T`` width fields, ``D`` entries written.
    """
    if len(pt.shape) != 2:
        raise ValueError(f"pt must hold a 2-D weight, got shape {tuple(pt.shape)}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must be int32 or int64, got {ids.dtype}")
    if ids.device != pt.device:
        raise ValueError(f"ids are on {ids.device}, the packed weight on {pt.device}")
    rows, dim = pt.shape
    out = torch.empty(*ids.shape, dim, dtype=pt.dtype, device=pt.device)
    flat = ids.reshape(-1).contiguous()
    if flat.numel() == 0 or dim == 0:
        return out
    # One sync reads both extremes back. Skipped while a CUDA graph is captured, where a
    # sync is forbidden: there the ids are trusted (documented in docs/packed.md §6).
    if not (flat.is_cuda and torch.cuda.is_current_stream_capturing()):
        lo, hi = torch.stack(torch.aminmax(flat)).tolist()
        if lo < 0 or hi >= rows:
            bad = lo if lo < 0 else hi
            raise IndexError(f"id {bad} is out of range for an embedding of {rows} rows")
    widths, g, f = _layout(pt)
    br = 16 if INTERPRET else 4
    bd = min(next_pow2(dim), 512 if INTERPRET else 256)
    packed_embedding_kernel[(triton.cdiv(flat.numel(), br),)](
        flat, pt.levels, widths, pt.tile_offsets, pt.scale, out, flat.numel(), dim, g,
        pt.base, F=f, T=pt.tile_groups, LOG_G=_log_g(g), LSQ=pt.scheme == "lsq",
        R1=_ROUND.get(pt.record_dtype, 0), R2=_ROUND[pt.dtype],
        IS_BF16=pt.dtype == torch.bfloat16, BR=br, BD=bd, **_options())
    return out
