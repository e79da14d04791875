"""Triton kernels reading the packed layout of docs/packed.md §3: dequantize, and GEMV.

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
- :func:`gemv`: ``y = x Wᵀ + b`` for at most :data:`MAX_GEMV_ROWS` rows of ``x``, every
  weight decoded once, in registers (:func:`packed_gemv_kernel`), never written.

The float math is :func:`diffq_triton.ops.reference.dequantize`'s, operation for operation
(IEEE division, no fused multiply-add: the kernels compile with ``enable_fp_fusion=False``),
so the dequantized weight equals the file loader's bit for bit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, cast_out, next_pow2, size_bucket

# Groups of up to this many entries take the per-tile kernel (a [TG, G_PAD] block per
# step); larger ones the chunked kernel, where a program's entries span at most 2 groups.
MAX_TILE_G = 1024
# Entries per step of a tile program / per program of the chunked kernel (one group).
BLOCK = 8192 if INTERPRET else 2048
# Chunk of the chunked kernel when there are several groups: at most the group size
# (> MAX_TILE_G), so that a chunk touches at most two groups.
CHUNK = 1024
# The GEMV's row count bound (the decode regime); more rows go to a dequantize + matmul.
MAX_GEMV_ROWS = 16
# GEMV: entries decoded per step, rows of x × entries per step (the product block), and
# the longest piece of a group decoded as one unit (longer groups are cut into pieces).
# Past 1024 entries per step (8 per thread at 4 warps) the decode's int64 bit offsets and
# byte windows spill on sm_80/sm_90 (the GPU report: 2048 and 4096 did at one row).
GEMV_DECODE = 1024
GEMV_PRODUCT = 4096
GEMV_MAX_PIECE = 256
# Rounding to a narrower float after the float32 decode (the record's, the layer's dtype).
_ROUND = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


# ----------------------------------------------------------------------------- in-kernel steps
@triton.jit
def _widths(p_widths, o_s, m_s, base, F: tl.constexpr):
    """Widths of groups ``o_s`` (int32): ``base`` + field ``s`` (``F`` bits at bit ``s·F``)."""
    if F == 0:
        b_w = tl.zeros(o_s.shape, tl.int32) + base
    else:
        o_k = o_s * F
        b_lo = tl.load(p_widths + (o_k >> 3), mask=m_s, other=0).to(tl.int32)
        b_hi = tl.load(p_widths + (o_k >> 3) + 1, mask=m_s, other=0).to(tl.int32)
        b_w = base + (((b_lo | (b_hi << 8)) >> (o_k & 7).to(tl.int32)) & ((1 << F) - 1))
    return b_w


@triton.jit
def _levels(p_levels, o_bit, b_w, m):
    """The ``b_w``-bit levels at stream bits ``o_bit``: ≤ 15 bits from bit ``o_bit & 7`` of
    a byte lie within 3 bytes (LSB first)."""
    o_byte = o_bit >> 3
    b_0 = tl.load(p_levels + o_byte, mask=m, other=0).to(tl.int32)
    b_1 = tl.load(p_levels + o_byte + 1, mask=m, other=0).to(tl.int32)
    b_2 = tl.load(p_levels + o_byte + 2, mask=m, other=0).to(tl.int32)
    return ((b_0 | (b_1 << 8) | (b_2 << 16)) >> (o_bit & 7).to(tl.int32)) & ((1 << b_w) - 1)


@triton.jit
def _round_to(v, R: tl.constexpr):
    """float32 ``v`` rounded (to nearest even) to float16 (R=1) or bfloat16 (R=2), kept as
    float32; by bit arithmetic for bfloat16 (the interpreter's conversion truncates)."""
    if R == 1:
        v = v.to(tl.float16).to(tl.float32)
    elif R == 2:
        b_u = v.to(tl.uint32, bitcast=True)
        b_u = (b_u + 0x7FFF + ((b_u >> 16) & 1)) & 0xFFFF0000
        v = b_u.to(tl.float32, bitcast=True)
    return v


@triton.jit
def _value(q, b_w, lo, span, LSQ: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr):
    """The weight of level ``q`` as the reference computes it, then rounded as the float
    model's parameter (record dtype ``R1``, then layer dtype ``R2``).

    minmax: ``(q·(1/(2^b - 1)))·(max - min) + min``; lsq: ``(q - 2^(b-1))·step``.
    """
    if LSQ:
        v = (q - (1 << (b_w - 1))).to(tl.float32) * lo
    else:
        unit = tl.div_rn(tl.full(q.shape, 1.0, tl.float32), ((1 << b_w) - 1).to(tl.float32))
        v = q.to(tl.float32) * unit * span + lo
    return _round_to(_round_to(v, R1), R2)


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


def _layout(pt) -> tuple:
    """``(widths buffer, effective group size, field bits)`` of a packed tensor."""
    g = pt.group_size if pt.group_size and pt.n_groups > 1 else pt.numel
    widths = pt.widths if pt.field_bits else pt.levels  # never read when field_bits == 0
    return widths, g, pt.field_bits


def _options() -> dict:
    # Multiply then add stay two roundings on the GPU too, as in the eager reference.
    return {} if INTERPRET else {"enable_fp_fusion": False}


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


# ----------------------------------------------------------------------------- GEMV
@triton.jit
def packed_gemv_kernel(
    p_x, p_levels, p_widths, p_toff, p_scale, p_bias, p_y,
    M, K, n_groups, numel, g, base, stride_xm, stride_ym,
    F: tl.constexpr, T: tl.constexpr, TG: tl.constexpr, PIECE: tl.constexpr,
    M_PAD: tl.constexpr, LSQ: tl.constexpr, R1: tl.constexpr, R2: tl.constexpr,
    HAS_BIAS: tl.constexpr, IS_BF16: tl.constexpr,
):
    """``y[:, n] = x · W[n, :] (+ b[n])`` for output row ``n = program_id``: the weights of
    row ``n`` (entries ``[n·K, n·K + K)``, whose first and last groups may be shared with
    the rows before and after) decoded once, multiplied in float32 and summed.

    A group is cut into pieces of ``PIECE`` entries (one piece when ``g ≤ PIECE``), walked
    ``TG`` pieces per step as a ``[TG, PIECE]`` block: piece ``v`` is piece ``v mod J`` of
    group ``v div J`` (``J = ⌈g / PIECE⌉``), and an exclusive ``tl.cumsum`` of
    ``width·length`` over the pieces gives their first bits, carried from step to step.
    The first piece of the row starts at its tile's offset plus the tile's groups before it.

    Bytes per weight: ``b/8`` of levels (entries of other rows are masked, never read);
    per row ``T`` width fields and one tile offset; ``x`` read per row (from cache).
    """
    i_n = tl.program_id(0).to(tl.int64)
    lo = tl.load(p_scale)
    span = tl.load(p_scale + 1) - lo
    J = tl.cdiv(g, PIECE)
    last_len = numel - (n_groups - 1) * g
    e_lo = i_n * K
    e_hi = e_lo + K
    s_0 = e_lo // g
    i_t = s_0 // T
    o_t = i_t * T + tl.arange(0, T)  # the groups of the tile of s_0
    b_t = _widths(p_widths, o_t, o_t <= s_0, base, F)
    b_0 = tl.sum(tl.where(o_t == s_0, b_t, 0), 0).to(tl.int64)
    j_0 = (e_lo - s_0 * g) // PIECE
    o_run = (tl.load(p_toff + i_t) + tl.sum(tl.where(o_t < s_0, b_t, 0).to(tl.int64), 0) * g
             + j_0 * PIECE * b_0)
    v_0 = s_0 * J + j_0
    s_1 = (e_hi - 1) // g
    v_1 = s_1 * J + (e_hi - 1 - s_1 * g) // PIECE
    o_m = tl.arange(0, M_PAD)
    m_m = o_m < M
    o_j = tl.arange(0, PIECE)
    acc = tl.zeros([M_PAD, TG, PIECE], tl.float32)
    for c in range(0, tl.cdiv(v_1 - v_0 + 1, TG)):
        o_v = v_0 + c * TG + tl.arange(0, TG)
        m_v = o_v <= v_1
        o_g = o_v // J
        o_p = o_v - o_g * J
        b_w = _widths(p_widths, o_g, m_v, base, F)
        b_len = tl.where(o_g == n_groups - 1, last_len, g) - o_p * PIECE
        b_n = tl.where(m_v, tl.minimum(b_len, PIECE), 0).to(tl.int32)
        b_sz = b_w * b_n  # ≤ TG·PIECE·15 bits per step: int32 is exact
        o_first = o_run + (tl.cumsum(b_sz, 0) - b_sz).to(tl.int64)
        o_e = (o_g * g + o_p * PIECE)[:, None] + o_j[None, :]
        m_w = (o_j[None, :] < b_n[:, None]) & (o_e >= e_lo) & (o_e < e_hi)
        q = _levels(p_levels, o_first[:, None] + o_j[None, :] * b_w[:, None], b_w[:, None], m_w)
        b_v = tl.where(m_w, _value(q, b_w[:, None], lo, span, LSQ, R1, R2), 0.0)
        p_xs = p_x + o_m[:, None, None] * stride_xm + (o_e - e_lo)[None, :, :]
        b_x = tl.load(p_xs, mask=m_m[:, None, None] & m_w[None, :, :], other=0.0)
        acc += b_x.to(tl.float32) * b_v[None, :, :]
        o_run += tl.sum(b_sz, 0).to(tl.int64)
    b_y = tl.sum(tl.sum(acc, 2), 1)
    if HAS_BIAS:
        b_y += tl.load(p_bias + i_n).to(tl.float32)
    tl.store(p_y + o_m * stride_ym + i_n, cast_out(b_y, IS_BF16, p_y.dtype.element_ty),
             mask=m_m)


def gemv(x: torch.Tensor, pt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x Wᵀ + bias`` with ``W`` the packed ``[N, K]`` weight decoded in registers
    (1 launch, one program per output feature).

    Args:
        x: ``[..., K]`` of ``pt.dtype`` (float32/bfloat16/float16), at most
            :data:`MAX_GEMV_ROWS` rows in all (the decode regime).
        pt: a packed 2-D weight ``[N, K]`` (see :func:`dequantize`), on ``x``'s device.
        bias: ``[N]`` of ``x``'s dtype, or None.

    Returns:
        ``[..., N]`` of ``x``'s dtype. Each weight is the float model's (decoded, rounded
        to the record's then the layer's dtype); products and the sum are float32, the bias
        added last, then one rounding to ``x``'s dtype. Against ``F.linear(x, W, bias)``
        only the order of the float32 sum differs (and fma on a GPU): ``|Δy| ≤ 2·K·2⁻²⁴·
        Σ_k |x_k·W_nk|`` plus one unit in the last place of ``x``'s dtype at ``|y|`` (the
        two sums may round to neighbouring values).

    Bytes moved per weight: ``b̄/8`` of levels read once, ``(f + 0.5)/(8·g)`` of metadata,
    plus per output feature one tile offset and ``T`` width fields (``(T·f/8 + 8)/K``);
    ``x`` (``M·K`` entries) read by every program, from cache; ``M`` outputs written.
    """
    if len(pt.shape) != 2:
        raise ValueError(f"pt must hold a 2-D weight, got shape {tuple(pt.shape)}")
    n, k = pt.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must end in {k} features, got shape {tuple(x.shape)}")
    if x.dtype != pt.dtype or x.dtype not in _ROUND:
        raise TypeError(f"x must be of the weight's dtype {pt.dtype}, got {x.dtype}")
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    if m > MAX_GEMV_ROWS:
        raise ValueError(f"x has {m} rows, more than the GEMV's {MAX_GEMV_ROWS}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{n}] of {x.dtype}")
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.view(*x.shape[:-1], n)
    if k == 0:
        return y.zero_().add_(bias if bias is not None else 0).view(*x.shape[:-1], n)
    x2 = x2.contiguous()
    widths, g, f = _layout(pt)
    piece = min(next_pow2(g), GEMV_MAX_PIECE)
    m_pad = next_pow2(m)
    tg = max(1, min(GEMV_DECODE, GEMV_PRODUCT // m_pad) // piece)
    packed_gemv_kernel[(n,)](
        x2, pt.levels, widths, pt.tile_offsets, pt.scale, bias if bias is not None else x2,
        y, m, k, pt.n_groups, pt.numel, g, pt.base, x2.stride(0), y.stride(0),
        F=f, T=pt.tile_groups, TG=tg, PIECE=piece, M_PAD=m_pad, LSQ=pt.scheme == "lsq",
        R1=_ROUND.get(pt.record_dtype, 0), R2=_ROUND[pt.dtype], HAS_BIAS=bias is not None,
        IS_BF16=x.dtype == torch.bfloat16, **_options())
    return y.view(*x.shape[:-1], n)


# ----------------------------------------------------------------------------- row walker
# Shared by the GEMM (rows of W: output features) and the Embedding gather (rows of the
# table: looked-up ids): a program holds R rows of K entries each (row r is entries
# [r·K, r·K + K) of the flattened weight) and walks them C entries per step. Each row's
# first bit is found once (its tile's offset plus the tile's groups before it); in the loop
# every entry's width is read from the width stream and an exclusive tl.cumsum of the widths
# along the row gives each entry's bit: no per-group bookkeeping, so groups may cross rows
# and steps freely (any K, any g). In-loop offsets are int32 relative to the row's first
# byte: K·15 bits per row stay below 2^31 for K < 143M.
@triton.jit
def _row_starts(p_widths, p_toff, o_r, m_r, K, g, base, F: tl.constexpr, T: tl.constexpr,
                TC: tl.constexpr):
    """Bit offset (int64, ``[R]``) of entry ``r·K`` of each row ``r`` in ``o_r``, and the
    group index (int64) and rank in it (int32) of that entry."""
    e_lo = o_r.to(tl.int64) * K
    s_0 = e_lo // g
    r_0 = (e_lo - s_0 * g).to(tl.int32)
    if F == 0:
        o_row = e_lo * base
    else:
        i_t = s_0 // T
        before = tl.zeros(o_r.shape, tl.int64)
        for c in range(0, T // TC):  # the tile's groups before s_0, TC at a time
            o_t = (i_t * T + c * TC)[:, None] + tl.arange(0, TC)[None, :]
            m_t = m_r[:, None] & (o_t < s_0[:, None])
            b_t = tl.where(m_t, _widths(p_widths, o_t, m_t, base, F), 0)
            before += tl.sum(b_t, 1).to(tl.int64)
        b_0 = _widths(p_widths, s_0, m_r, base, F).to(tl.int64)
        o_row = tl.load(p_toff + i_t, mask=m_r, other=0) + before * g + r_0.to(tl.int64) * b_0
    return o_row, s_0, r_0


@triton.jit
def _row_step(p_levels, p_widths, p_row, bit_row, s_0, r_0, k, m_r, K, g, base, lo, span,
              F: tl.constexpr, C: tl.constexpr, LOG_G: tl.constexpr, LSQ: tl.constexpr,
              R1: tl.constexpr, R2: tl.constexpr):
    """Entries ``[k, k + C)`` of each row (``[R, C]`` float32, 0 where masked) and the bits
    they take per row (``[R]`` int32, to advance ``bit_row``).

    ``p_row``: pointer to each row's first byte; ``bit_row``: int32 bit of the step's first
    entry from that byte (for ``F = 0`` it is recomputed from ``k``, nothing is carried).
    """
    o_k = k + tl.arange(0, C)
    m = m_r[:, None] & (o_k < K)[None, :]
    if F == 0:
        b_w = tl.zeros([1, C], tl.int32) + base
        o_bit = bit_row[:, None] + o_k[None, :] * base
        b_sz = tl.sum(tl.where(m, b_w, 0), 1)
        b_v = b_w
    else:
        if LOG_G >= 0:
            s_rel = (r_0[:, None] + o_k[None, :]) >> LOG_G
        else:
            s_rel = (r_0[:, None] + o_k[None, :]) // g
        b_w = tl.where(m, _widths(p_widths, s_0[:, None] + s_rel, m, base, F), 0)
        o_bit = bit_row[:, None] + tl.cumsum(b_w, 1) - b_w
        b_sz = tl.sum(b_w, 1)
        b_v = tl.where(m, b_w, 1)  # masked entries: a valid width, their value is dropped
    q = _levels(p_row[:, None], o_bit, b_v, m)
    w = tl.where(m, _value(q, b_v, lo, span, LSQ, R1, R2), 0.0)
    return w, b_sz


# ----------------------------------------------------------------------------- GEMM
if INTERPRET:
    _GEMM_CONFIGS = [triton.Config({"BM": 32, "BN": 32, "BK": 32}, num_warps=4)]
else:
    # Decoded entries per step (BN·BK) stay at ≤ 2048 with 8 warps, ≤ 1024 with 4: past
    # that the GEMV's decode spilled on sm_80/sm_90 (the GPU report).
    _GEMM_CONFIGS = [
        triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
        for bm, bn, bk, w in ((32, 32, 32, 4), (64, 32, 32, 4), (64, 64, 32, 8),
                              (128, 64, 32, 8))
        for s in (1, 2)]


def _prune_gemm_configs(configs, named_args, **kwargs):
    # A float32 dot holds twice the operand registers: its 128-row blocks spilled on sm_80
    # (the GPU report), so float32 inputs keep blocks of at most 64 rows.
    if kwargs.get("DOT_F32", named_args.get("DOT_F32")):
        configs = [c for c in configs if c.kwargs["BM"] <= 64] or configs[:1]
    return configs


@triton.autotune(configs=_GEMM_CONFIGS, key=["M_BUCKET", "N", "K", "F", "LSQ", "DOT_F32"],
                 prune_configs_by={"early_config_prune": _prune_gemm_configs})
@triton.jit
def packed_gemm_kernel(
    p_x, p_levels, p_widths, p_toff, p_scale, p_bias, p_y,
    M, N, K, g, base, stride_xm, stride_ym, M_BUCKET,
    F: tl.constexpr, T: tl.constexpr, LOG_G: tl.constexpr, LSQ: tl.constexpr,
    R1: tl.constexpr, R2: tl.constexpr, HAS_BIAS: tl.constexpr, DOT_F32: tl.constexpr,
    IS_BF16: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):
    """``y[m, n] = Σ_k x[m, k]·W[n, k] (+ b[n])`` for a ``[BM, BN]`` block of ``y``: the
    ``[BN, BK]`` blocks of ``W`` decoded in registers (rows walked by :func:`_row_step`),
    then ``tl.dot`` with float32 accumulation (IEEE products for float32 inputs, no TF32).
    The interpreter's bfloat16 arithmetic runs on raw bit patterns (docs of the project's
    CPU checks), so there a bfloat16 dot runs in float32: products of bfloat16 values are
    exact in float32 either way, only the GPU's tensor-core order of the sum differs.

    Bytes: each weight's bits once per block of ``BM`` rows of ``x``
    (``⌈M/BM⌉·(b̄/8 + (f+0.5)/(8g))`` per weight), ``x`` once per block of ``BN`` features,
    ``y`` written once.
    """
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    lo = tl.load(p_scale)
    span = tl.load(p_scale + 1) - lo
    o_m = pid_m * BM + tl.arange(0, BM)
    o_n = pid_n * BN + tl.arange(0, BN)
    m_m = o_m < M
    m_n = o_n < N
    o_row, s_0, r_0 = _row_starts(p_widths, p_toff, o_n, m_n, K, g, base, F, T, 32)
    p_row = p_levels + (o_row >> 3)
    bit_row = (o_row & 7).to(tl.int32)
    acc = tl.zeros([BM, BN], tl.float32)
    for k in range(0, K, BK):
        w, b_sz = _row_step(p_levels, p_widths, p_row, bit_row, s_0, r_0, k, m_n, K, g,
                            base, lo, span, F, BK, LOG_G, LSQ, R1, R2)
        if F != 0:
            bit_row += b_sz
        o_k = k + tl.arange(0, BK)
        b_x = tl.load(p_x + o_m[:, None].to(tl.int64) * stride_xm + o_k[None, :],
                      mask=m_m[:, None] & (o_k < K)[None, :], other=0.0)
        if DOT_F32:  # float32 inputs, or bfloat16 under the interpreter (see the launcher)
            acc = tl.dot(b_x.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:  # w is already rounded to x's dtype: the cast is exact
            acc = tl.dot(b_x, tl.trans(w.to(b_x.dtype)), acc)
    if HAS_BIAS:
        acc += tl.load(p_bias + o_n, mask=m_n, other=0.0).to(tl.float32)[None, :]
    p_ys = p_y + o_m[:, None].to(tl.int64) * stride_ym + o_n[None, :]
    tl.store(p_ys, cast_out(acc, IS_BF16, p_y.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


def _log_g(g: int) -> int:
    """``log2(g)`` when ``g`` is a power of two (the kernels shift), else -1 (they divide)."""
    return g.bit_length() - 1 if g > 0 and g & (g - 1) == 0 else -1


def _check_linear(x: torch.Tensor, pt, bias: torch.Tensor | None) -> tuple[int, int]:
    if len(pt.shape) != 2:
        raise ValueError(f"pt must hold a 2-D weight, got shape {tuple(pt.shape)}")
    n, k = pt.shape
    if x.shape[-1] != k:
        raise ValueError(f"x must end in {k} features, got shape {tuple(x.shape)}")
    if x.dtype != pt.dtype or x.dtype not in _ROUND:
        raise TypeError(f"x must be of the weight's dtype {pt.dtype}, got {x.dtype}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != x.dtype):
        raise ValueError(f"bias must be [{n}] of {x.dtype}")
    if x.device != pt.device:
        raise ValueError(f"x is on {x.device}, the packed weight on {pt.device}")
    return n, k


def gemm(x: torch.Tensor, pt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x Wᵀ + bias`` with ``W`` the packed ``[N, K]`` weight decoded in registers,
    tile by tile (1 launch; autotuned ``[BM, BN]`` blocks, ``BK`` entries per step).

    Args:
        x: ``[..., K]`` of ``pt.dtype`` (float32/bfloat16/float16), any number of rows.
        pt: a packed 2-D weight ``[N, K]`` (see :func:`dequantize`), on ``x``'s device.
        bias: ``[N]`` of ``x``'s dtype, or None.

    Returns:
        ``[..., N]`` of ``x``'s dtype. Each weight is the float model's (rounded to the
        record's then the layer's dtype); products are exact in float32 (16-bit inputs) or
        IEEE float32 (float32 inputs, no TF32), summed in float32 in ``BK``-blocks, the bias
        added last, one rounding to ``x``'s dtype: against ``F.linear(x, W, bias)`` only the
        order of the float32 sum differs, the tolerance of :func:`gemv`.

    Bytes moved per weight: ``⌈M/BM⌉·(b̄/8 + (f + 0.5)/(8·g))`` (the weight decoded once
    per block of ``BM`` rows), plus per ``BN`` features one row start (a tile offset and up
    to ``T`` width fields per feature); ``x`` read ``⌈N/BN⌉`` times, ``y`` written once.
    """
    n, k = _check_linear(x, pt, bias)
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.view(*x.shape[:-1], n)
    if k == 0:
        return y.zero_().add_(bias if bias is not None else 0).view(*x.shape[:-1], n)
    x2 = x2.contiguous()
    widths, g, f = _layout(pt)
    grid = lambda meta: (triton.cdiv(m, meta["BM"]), triton.cdiv(n, meta["BN"]))  # noqa: E731
    packed_gemm_kernel[grid](
        x2, pt.levels, widths, pt.tile_offsets, pt.scale, bias if bias is not None else x2,
        y, m, n, k, g, pt.base, x2.stride(0), y.stride(0), size_bucket(m),
        F=f, T=pt.tile_groups, LOG_G=_log_g(g), LSQ=pt.scheme == "lsq",
        R1=_ROUND.get(pt.record_dtype, 0), R2=_ROUND[pt.dtype], HAS_BIAS=bias is not None,
        DOT_F32=x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16),
        IS_BF16=x.dtype == torch.bfloat16, **_options())
    return y.view(*x.shape[:-1], n)


def linear(x: torch.Tensor, pt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``y = x Wᵀ + bias`` on a packed ``[N, K]`` weight, the kernel picked by the number of
    rows ``M`` of ``x`` (all of its leading dimensions): :func:`gemv` for ``M ≤``
    :data:`MAX_GEMV_ROWS` (decode: one program per feature, each weight's bits read once),
    :func:`gemm` above (tiles; the weight decoded once per ``BM`` rows).

    Args and returns as :func:`gemv` / :func:`gemm` (same tolerance against ``F.linear``).
    """
    rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
    return gemv(x, pt, bias) if rows <= MAX_GEMV_ROWS else gemm(x, pt, bias)


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
            ``[0, num_embeddings)`` (checked: an ``IndexError`` names the first bad id; the
            check reads ``ids``' extremes back to the host, one sync).
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
    lo, hi = torch.aminmax(flat)
    if int(lo) < 0 or int(hi) >= rows:
        bad = int(lo) if int(lo) < 0 else int(hi)
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
