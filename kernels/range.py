"""Per-tensor range: min, max and their first indices, in two deterministic stages.

Stage one (:func:`range_partial_kernel`) writes one (min, max, argmin, argmax) per program;
stage two (:func:`reduce_range`, or :func:`reduce_range_values` when only the range is
needed) is a ``@triton.jit`` helper that the consuming kernel (noise
forward, eval quantize) runs at its start, so the range costs one launch of its own.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tensor_table
from .common import INTERPRET, load_block, next_pow2
from .tensor_table import C_N, C_P_OFF, C_SPAN, C_W_PTR, program_piece

# At most this many partial results. Every program of a consumer kernel loads them all
# (8 bytes each), so fewer is cheaper there; 256 programs looping over their span still
# fill a GPU for the range pass itself.
MAX_PARTIALS = 256
BLOCK = 8192 if INTERPRET else 2048
NUM_WARPS = 4 if INTERPRET else 8


@triton.jit
def range_partial_kernel(
    p_w, p_part_v, p_part_i, n, span, P: tl.constexpr, BLOCK: tl.constexpr
):
    """Min, max, argmin, argmax of entries ``[pid·span, (pid+1)·span)`` of ``w``.

    ``span`` is a multiple of ``BLOCK``. Ties keep the smallest index (as torch.argmax).
    Writes ``part_v[0, pid] = min``, ``part_v[1, pid] = max`` (float32) and the indices in
    ``part_i`` (int64). Bytes per entry: reads ``w`` once (4 fp32, 2 bf16/fp16), writes none.
    """
    i_p = tl.program_id(0).to(tl.int64)
    o_start = i_p * span
    o_b = tl.arange(0, BLOCK)
    b_mn, b_mx, b_imn, b_imx = _empty_extremes(BLOCK)
    for i_s in range(0, span, BLOCK):
        o_w = o_start + i_s + o_b
        m_w = o_w < n
        b_w = tl.load(p_w + o_w, mask=m_w, other=0.0).to(tl.float32)
        b_mn, b_mx, b_imn, b_imx = _fold_extremes(b_w, m_w, o_w, b_mn, b_mx, b_imn, b_imx)
    _store_extremes(p_part_v, p_part_i, i_p, P, b_mn, b_mx, b_imn, b_imx)


@triton.jit
def _empty_extremes(BLOCK: tl.constexpr):
    """Lane-wise running (min, max, argmin, argmax) before the first entry."""
    return (tl.full([BLOCK], float("inf"), tl.float32),
            tl.full([BLOCK], float("-inf"), tl.float32),
            tl.zeros([BLOCK], tl.int64), tl.zeros([BLOCK], tl.int64))


@triton.jit
def _fold_extremes(b_w, m_w, o_w, b_mn, b_mx, b_imn, b_imx):
    """The running extremes after one block; strict comparisons keep, in each lane, the
    earliest index of a value."""
    m_lt = m_w & (b_w < b_mn)
    m_gt = m_w & (b_w > b_mx)
    return (tl.where(m_lt, b_w, b_mn), tl.where(m_gt, b_w, b_mx),
            tl.where(m_lt, o_w, b_imn), tl.where(m_gt, o_w, b_imx))


@triton.jit
def _store_extremes(p_part_v, p_part_i, slot, stride, b_mn, b_mx, b_imn, b_imx):
    """Reduce the lanes (first index on ties) and store the partial result at ``slot``: min
    and argmin in the first row, max and argmax ``stride`` entries further."""
    mn = tl.min(b_mn, axis=0)
    mx = tl.max(b_mx, axis=0)
    big = 0x7FFFFFFFFFFFFFFF
    tl.store(p_part_v + slot, mn)
    tl.store(p_part_v + stride + slot, mx)
    tl.store(p_part_i + slot, tl.min(tl.where(b_mn == mn, b_imn, big), axis=0))
    tl.store(p_part_i + stride + slot, tl.min(tl.where(b_mx == mx, b_imx, big), axis=0))


@triton.jit
def reduce_range_values(p_part_v, P: tl.constexpr):
    """Combine the ``P`` partial results: ``(mn, mx)`` (reads 8·P bytes)."""
    o_p = tl.arange(0, P)
    mn = tl.min(tl.load(p_part_v + o_p), axis=0)
    mx = tl.max(tl.load(p_part_v + P + o_p), axis=0)
    return mn, mx


@triton.jit
def reduce_range(p_part_v, p_part_i, P: tl.constexpr):
    """Combine the ``P`` partial results: ``(mn, mx, imn, imx)``, first index on ties."""
    o_p = tl.arange(0, P)
    b_mn = tl.load(p_part_v + o_p)
    b_mx = tl.load(p_part_v + P + o_p)
    b_imn = tl.load(p_part_i + o_p)
    b_imx = tl.load(p_part_i + P + o_p)
    mn = tl.min(b_mn, axis=0)
    mx = tl.max(b_mx, axis=0)
    big = 0x7FFFFFFFFFFFFFFF
    imn = tl.min(tl.where(b_mn == mn, b_imn, big), axis=0)
    imx = tl.min(tl.where(b_mx == mx, b_imx, big), axis=0)
    return mn, mx, imn, imx


def range_partials(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Launch stage one of the range of ``w`` (contiguous, non-empty).

    Returns:
        ``(part_v, part_i, P)``: float32 ``[2, P]`` (mins, maxes), int64 ``[2, P]``
        (argmins, argmaxes as flat indices), ``P`` a power of two ≤ :data:`MAX_PARTIALS`
        (programs past the end write (+inf, -inf), neutral for the reduction).
    """
    n = w.numel()
    blocks = triton.cdiv(n, BLOCK)
    P = min(next_pow2(blocks), MAX_PARTIALS)
    span = triton.cdiv(blocks, P) * BLOCK
    part_v = torch.empty((2, P), dtype=torch.float32, device=w.device)
    part_i = torch.empty((2, P), dtype=torch.int64, device=w.device)
    range_partial_kernel[(P,)](w, part_v, part_i, n, span, P=P, BLOCK=BLOCK,
                               num_warps=NUM_WARPS)
    return part_v, part_i, P


# ----------------------------------------------------------------------------- many tensors
# Columns of the tensor table (kernels/tensor_table.py) read here.


@triton.jit
def range_many_partial_kernel(
    p_rows, p_map, p_part_v, p_part_i, total_p,
    BLOCK: tl.constexpr, W_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
):
    """:func:`range_partial_kernel` for span ``j`` of tensor ``t`` (map entry ``t<<32 | j``).

    Tensor ``t``'s partials sit at ``[p_off_t, p_off_t + p_num_t)`` of ``part_v[0]``
    (mins), ``part_v[1]`` (maxes) and ``part_i`` (their indices), rows ``total_p`` apart.
    Bytes per entry: reads the weight once (4 fp32, 2 bf16/fp16), writes none.
    """
    t, j, row = program_piece(p_map, p_rows)
    p_w = tl.load(row + C_W_PTR).to(tl.pointer_type(W_DTYPE))
    n = tl.load(row + C_N)
    slot = tl.load(row + C_P_OFF) + j
    span = tl.load(row + C_SPAN)
    o_start = tl.multiple_of(j * span, BLOCK)  # spans are whole blocks
    if ALIGNED:
        p_w = tl.multiple_of(p_w, 16)
    o_b = tl.arange(0, BLOCK)
    b_mn, b_mx, b_imn, b_imx = _empty_extremes(BLOCK)
    for i_s in range(0, span, BLOCK):
        o_w = o_start + i_s + o_b
        m_w = o_w < n
        b_w = load_block(p_w, o_w, m_w, o_start + i_s + BLOCK <= n)
        b_mn, b_mx, b_imn, b_imx = _fold_extremes(b_w, m_w, o_w, b_mn, b_mx, b_imn, b_imx)
    _store_extremes(p_part_v, p_part_i, slot, total_p, b_mn, b_mx, b_imn, b_imx)


@triton.jit
def reduce_range_many_values(p_part_v, total_p, p_off, p_num, MAX_P: tl.constexpr):
    """``(mn, mx)`` of one tensor from its ``p_num`` partials (reads 8·p_num bytes)."""
    o_p = tl.arange(0, MAX_P)
    m_p = o_p < p_num
    mn = tl.min(tl.load(p_part_v + p_off + o_p, mask=m_p, other=float("inf")), axis=0)
    mx = tl.max(tl.load(p_part_v + total_p + p_off + o_p, mask=m_p, other=float("-inf")),
                axis=0)
    return mn, mx


@triton.jit
def reduce_range_many(p_part_v, p_part_i, total_p, p_off, p_num, MAX_P: tl.constexpr):
    """``(mn, mx, imn, imx)`` of one tensor from its partials, first index on ties."""
    o_p = tl.arange(0, MAX_P)
    m_p = o_p < p_num
    b_mn = tl.load(p_part_v + p_off + o_p, mask=m_p, other=float("inf"))
    b_mx = tl.load(p_part_v + total_p + p_off + o_p, mask=m_p, other=float("-inf"))
    big = 0x7FFFFFFFFFFFFFFF
    b_imn = tl.load(p_part_i + p_off + o_p, mask=m_p, other=big)
    b_imx = tl.load(p_part_i + total_p + p_off + o_p, mask=m_p, other=big)
    mn = tl.min(b_mn, axis=0)
    mx = tl.max(b_mx, axis=0)
    imn = tl.min(tl.where(b_mn == mn, b_imn, big), axis=0)
    imx = tl.min(tl.where(b_mx == mx, b_imx, big), axis=0)
    return mn, mx, imn, imx


def range_many_partials(table: tensor_table.TensorTable, w_dtype) -> tuple[torch.Tensor,
                                                                           torch.Tensor]:
    """Launch stage one of the range of every tensor of ``table`` (1 launch).

    Returns:
        ``(part_v, part_i)``: float32 ``[2, partials]`` and int64 ``[2, partials]``.
    """
    device = table.rows.device
    part_v = torch.empty((2, table.partials), dtype=torch.float32, device=device)
    part_i = torch.empty((2, table.partials), dtype=torch.int64, device=device)
    range_many_partial_kernel[(table.range_map.numel(),)](
        table.rows, table.range_map, part_v, part_i, table.partials,
        BLOCK=table.blocks.range_block, W_DTYPE=w_dtype, ALIGNED=table.aligned,
        num_warps=NUM_WARPS,
    )
    return part_v, part_i
