"""Pseudo-quantization noise for all weights of a model at once: a constant launch count.

The math is :mod:`.noise`'s; each program reads which tensor and which piece of it to work
on from the tensor table (:mod:`.tensor_table`), so one launch covers every tensor whatever
their number. Launches per training step, for all tensors of one dtype together: forward 2
(range partials, noise), backward 2 (group sums, finalize). The host builds the table once
while parameters stay in place; per call it only allocates and passes ``[T]`` pointer
tables for the outputs and the incoming gradients.

Noise: ``ξ`` of entry ``i`` of tensor ``t`` is Philox keyed by the step's seed at counter
``t·2^40 + i``, so every tensor draws its own stream from one seed and the backward
regenerates it; nothing of the weights' size is kept.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INTERPRET,
    cast_out,
    draw_xi,
    load_block,
    log_units,
    store_block,
    tl_dtype,
    unit_and_slope,
)
from .noise import BLOCK_CHUNK, BLOCK_FIN, BLOCK_FWD, MAX_TILE_G, TILE_BWD
from .range import (
    BLOCK as RANGE_BLOCK,
)
from .range import (
    MAX_PARTIALS,
    range_many_partials,
    reduce_range_many,
    reduce_range_many_values,
)
from .tensor_table import (
    C_B_NUM,
    C_B_OFF,
    C_GROUP_LEN,
    C_L_OFF,
    C_L_PTR,
    C_N,
    C_N_GROUPS,
    C_NCOLS,
    C_P_NUM,
    C_P_OFF,
    C_W_OFF,
    C_W_PTR,
    C_XI_ID,
    Blocks,
    TensorTable,
    pointer_table,
    program_piece,
    table_for,
)

BLOCKS = Blocks(fwd=BLOCK_FWD, range_block=RANGE_BLOCK, max_partials=MAX_PARTIALS,
                tile=TILE_BWD, chunk=BLOCK_CHUNK, max_tile_g=MAX_TILE_G)
# Fixed launch options instead of autotuning: a first step compiles each kernel once (the
# tiles hold 2048-4096 entries; with 4 warps ptxas spills on sm_80/sm_90, 8 do not).
_WARPS = 4 if INTERPRET else 8



@triton.jit
def _xi_offsets(row, o_w):
    # Each tensor's own Philox counter range: 2^40 entries apart.
    return o_w + (tl.load(row + C_XI_ID) << 40)


@triton.jit
def _copy_gradient(p_g, p_dw, o_w, m_w, full):
    """``∂L/∂w = g`` on the block (the range terms come in the finalize); returns ``g`` in
    its dtype. Whole blocks unmasked, as :func:`load_block`."""
    if full:
        b_g = tl.load(p_g + o_w)
        tl.store(p_dw + o_w, b_g)
    else:
        b_g = tl.load(p_g + o_w, mask=m_w, other=0.0)
        tl.store(p_dw + o_w, b_g, mask=m_w)
    return b_g


@triton.jit
def noise_many_fwd_kernel(
    p_rows, p_map, p_optr, p_seed, p_part_v, p_part_i, p_stats, p_xi,
    total_p, min_bits, max_bits, log_u_lo, log_u_hi,
    G: tl.constexpr, MAX_P: tl.constexpr, BLOCK: tl.constexpr,
    PARAM_NOISE: tl.constexpr, GAUSSIAN: tl.constexpr, IS_BF16: tl.constexpr,
    W_DTYPE: tl.constexpr, L_DTYPE: tl.constexpr, WRITE_XI: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """``ŵ = w + (mx - mn)·u(b_s)·ξ`` for block ``j`` of tensor ``t`` (map ``t<<32 | j``).

    Block 0 of each tensor stores its ``stats[t] = (mn, mx, argmin, argmax)`` (float64).
    Bytes per entry (fp32): reads ``w`` 4 and one logit per group, writes ``ŵ`` 4.
    """
    t, j, row = program_piece(p_map, p_rows)
    p_w = tl.load(row + C_W_PTR).to(tl.pointer_type(W_DTYPE))
    p_l = tl.load(row + C_L_PTR).to(tl.pointer_type(L_DTYPE))
    p_out = tl.load(p_optr + t).to(tl.pointer_type(W_DTYPE))
    n = tl.load(row + C_N)
    p_off = tl.load(row + C_P_OFF)
    p_num = tl.load(row + C_P_NUM)
    mn, mx = reduce_range_many_values(p_part_v, total_p, p_off, p_num, MAX_P)
    if j == 0:
        mn, mx, imn, imx = reduce_range_many(p_part_v, p_part_i, total_p, p_off, p_num, MAX_P)
        tl.store(p_stats + t * 4, mn.to(tl.float64))
        tl.store(p_stats + t * 4 + 1, mx.to(tl.float64))
        tl.store(p_stats + t * 4 + 2, imn.to(tl.float64))
        tl.store(p_stats + t * 4 + 3, imx.to(tl.float64))
    r = mx - mn
    seed = tl.load(p_seed)
    o_w = j * BLOCK + tl.arange(0, BLOCK)
    m_w = o_w < n
    if ALIGNED:  # 16-byte aligned tensors: whole blocks load and store 128 bits at a time
        p_w = tl.multiple_of(p_w, 16)
        p_out = tl.multiple_of(p_out, 16)
    full = (j + 1) * BLOCK <= n
    if G == 0:
        b_l = tl.load(p_l).to(tl.float32)
    else:
        # A tensor of at most G entries is one group: o_w // G is 0 throughout.
        b_l = tl.load(p_l + o_w // G, mask=m_w, other=0.0).to(tl.float32)
    b_u, _ = unit_and_slope(b_l, min_bits, max_bits, log_u_lo, log_u_hi, PARAM_NOISE)
    b_xi = draw_xi(seed, _xi_offsets(row, o_w), GAUSSIAN)
    b_w = load_block(p_w, o_w, m_w, full)
    store_block(p_out, o_w, cast_out(b_w + r * b_u * b_xi, IS_BF16, W_DTYPE), m_w, full)
    if WRITE_XI:
        tl.store(p_xi + tl.load(row + C_W_OFF) + o_w, b_xi, mask=m_w)


@triton.jit
def noise_many_bwd_kernel(
    p_rows, p_map, p_gptr, p_dwptr, p_dlptr, p_seed, p_stats, p_part, p_extra,
    min_bits, max_bits, log_u_lo, log_u_hi,
    G: tl.constexpr, G_PAD: tl.constexpr, TILE: tl.constexpr,
    PARAM_NOISE: tl.constexpr, GAUSSIAN: tl.constexpr,
    W_DTYPE: tl.constexpr, L_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
):
    """Group sums of tile ``j`` of tensor ``t`` (``1 ≤ G ≤ MAX_TILE_G``): rows are groups.

    ``S_s = Σ g·ξ``; writes ``∂L/∂l_s = r·S_s·du_s`` (plus ``extra[l_off_t + s]``, the size
    penalty's gradient, with ``HAS_EXTRA``), the tile's ``Σ_s u_s·S_s`` to
    ``part[b_off_t + j]`` and ``∂L/∂w = g`` (the finalize adds the range terms).
    Bytes per entry (fp32): reads ``g`` 4, writes ``∂L/∂w`` 4.
    """
    BLOCK_G: tl.constexpr = TILE // G_PAD
    t, j, row = program_piece(p_map, p_rows)
    p_l = tl.load(row + C_L_PTR).to(tl.pointer_type(L_DTYPE))
    p_g = tl.load(p_gptr + t).to(tl.pointer_type(W_DTYPE))
    p_dw = tl.load(p_dwptr + t).to(tl.pointer_type(W_DTYPE))
    p_dl = tl.load(p_dlptr + t).to(tl.pointer_type(L_DTYPE))
    n = tl.load(row + C_N)
    n_groups = tl.load(row + C_N_GROUPS)
    seed = tl.load(p_seed)
    r = (tl.load(p_stats + t * 4 + 1) - tl.load(p_stats + t * 4)).to(tl.float32)
    o_s = j * BLOCK_G + tl.arange(0, BLOCK_G)
    m_s = o_s < n_groups
    o_c = tl.arange(0, G_PAD)
    o_w = o_s[:, None] * G + o_c[None, :]
    m_w = m_s[:, None] & (o_c[None, :] < G) & (o_w < n)
    if ALIGNED:  # G a power of two: the tile is one contiguous, aligned run of entries
        p_g = tl.multiple_of(p_g, 16)
        p_dw = tl.multiple_of(p_dw, 16)
    b_g = _copy_gradient(p_g, p_dw, o_w, m_w, ALIGNED and (j + 1) * BLOCK_G * G <= n)
    b_xi = draw_xi(seed, _xi_offsets(row, o_w), GAUSSIAN)
    b_sum = tl.sum(tl.where(m_w, b_g.to(tl.float32) * b_xi, 0.0), axis=1)
    b_l = tl.load(p_l + o_s, mask=m_s, other=0.0).to(tl.float32)
    b_u, b_du = unit_and_slope(b_l, min_bits, max_bits, log_u_lo, log_u_hi, PARAM_NOISE)
    b_dl = r * b_sum * b_du
    if HAS_EXTRA:
        b_dl += tl.load(p_extra + tl.load(row + C_L_OFF) + o_s, mask=m_s, other=0.0)
    tl.store(p_dl + o_s, b_dl.to(L_DTYPE), mask=m_s)
    tl.store(p_part + tl.load(row + C_B_OFF) + j, tl.sum(tl.where(m_s, b_u * b_sum, 0.0), axis=0))


@triton.jit
def noise_many_chunk_bwd_kernel(
    p_rows, p_map, p_gptr, p_dwptr, p_seed, p_part,
    BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr, W_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,
):
    """Group sums by chunks (groups over ``MAX_TILE_G`` entries, or one group per tensor).

    Piece ``j = s·chunks + c`` of tensor ``t`` sums ``g·ξ`` over chunk ``c`` of group ``s``
    into ``part[b_off_t + j]`` and copies ``g`` to ``∂L/∂w``.
    Bytes per entry (fp32): reads ``g`` 4, writes ``∂L/∂w`` 4.
    """
    t, j, row = program_piece(p_map, p_rows)
    p_g = tl.load(p_gptr + t).to(tl.pointer_type(W_DTYPE))
    p_dw = tl.load(p_dwptr + t).to(tl.pointer_type(W_DTYPE))
    n = tl.load(row + C_N)
    group_len = tl.load(row + C_GROUP_LEN)
    chunks = tl.load(row + C_B_NUM)
    i_s = j // chunks
    i_c = j % chunks
    seed = tl.load(p_seed)
    o_in = i_c * BLOCK + tl.arange(0, BLOCK)
    o_start = i_s * group_len
    if ALIGNED:  # groups start on multiples of 16 entries (one group, or G % 16 == 0)
        p_g = tl.multiple_of(p_g, 16)
        p_dw = tl.multiple_of(p_dw, 16)
        o_start = tl.multiple_of(o_start, 16)
    o_w = o_start + o_in
    m_w = (o_in < group_len) & (o_w < n)
    full = ALIGNED and (i_c + 1) * BLOCK <= group_len and o_start + (i_c + 1) * BLOCK <= n
    b_g = _copy_gradient(p_g, p_dw, o_w, m_w, full)
    b_xi = draw_xi(seed, _xi_offsets(row, o_w), GAUSSIAN)
    tl.store(p_part + tl.load(row + C_B_OFF) + j,
             tl.sum(tl.where(m_w, b_g.to(tl.float32) * b_xi, 0.0), axis=0))


@triton.jit
def noise_many_finalize_kernel(
    p_rows, p_stats, p_part, p_dwptr, p_dlptr, p_dr, p_extra,
    min_bits, max_bits, log_u_lo, log_u_hi,
    CHUNKED: tl.constexpr, PARAM_NOISE: tl.constexpr, IS_BF16: tl.constexpr,
    W_DTYPE: tl.constexpr, L_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    HAS_EXTRA: tl.constexpr,
):
    """Program ``t``: tensor ``t``'s ``∂L/∂r`` in a fixed order (deterministic), then its
    range terms ``∂L/∂w[argmax] += ∂L/∂r``, ``∂L/∂w[argmin] -= ∂L/∂r`` (none when they
    coincide). Chunked groups: ``S_s`` from the chunk sums, then ``∂L/∂l_s``.
    Bytes moved: O(groups or tiles) per tensor, none per entry.
    """
    t = tl.program_id(0).to(tl.int64)
    row = p_rows + t * C_NCOLS
    p_dw = tl.load(p_dwptr + t).to(tl.pointer_type(W_DTYPE))
    b_off = tl.load(row + C_B_OFF)
    b_num = tl.load(row + C_B_NUM)
    o_b = tl.arange(0, BLOCK)
    b_acc = tl.zeros([BLOCK], tl.float32)
    if CHUNKED:
        p_l = tl.load(row + C_L_PTR).to(tl.pointer_type(L_DTYPE))
        p_dl = tl.load(p_dlptr + t).to(tl.pointer_type(L_DTYPE))
        r = (tl.load(p_stats + t * 4 + 1) - tl.load(p_stats + t * 4)).to(tl.float32)
        for i_s in range(0, tl.load(row + C_N_GROUPS)):
            b_sum = tl.zeros([BLOCK], tl.float32)
            for i_c in range(0, b_num, BLOCK):
                m_c = (i_c + o_b) < b_num
                b_sum += tl.load(p_part + b_off + i_s * b_num + i_c + o_b, mask=m_c, other=0.0)
            s_sum = tl.sum(b_sum, axis=0)
            l_s = tl.load(p_l + i_s).to(tl.float32)
            u_s, du_s = unit_and_slope(l_s, min_bits, max_bits, log_u_lo, log_u_hi,
                                       PARAM_NOISE)
            dl_s = r * s_sum * du_s
            if HAS_EXTRA:
                dl_s += tl.load(p_extra + tl.load(row + C_L_OFF) + i_s)
            tl.store(p_dl + i_s, dl_s.to(L_DTYPE))
            b_acc += tl.where(o_b == 0, u_s * s_sum, 0.0)
    else:
        for i_c in range(0, b_num, BLOCK):
            m_c = (i_c + o_b) < b_num
            b_acc += tl.load(p_part + b_off + i_c + o_b, mask=m_c, other=0.0)
    dr = tl.sum(b_acc, axis=0)
    tl.store(p_dr + t, dr)
    imn = tl.load(p_stats + t * 4 + 2).to(tl.int64)
    imx = tl.load(p_stats + t * 4 + 3).to(tl.int64)
    g_mx = tl.load(p_dw + imx).to(tl.float32)
    g_mn = tl.load(p_dw + imn).to(tl.float32)
    same = imn == imx
    tl.store(p_dw + imx, cast_out(tl.where(same, g_mx, g_mx + dr), IS_BF16, W_DTYPE))
    tl.store(p_dw + imn, cast_out(tl.where(same, g_mn, g_mn - dr), IS_BF16, W_DTYPE))


def noise_forward_many(
    weights: list[torch.Tensor],
    logits: list[torch.Tensor],
    outputs: list[torch.Tensor],
    seed: torch.Tensor,
    group_size: int,
    min_bits: float,
    max_bits: float,
    param: str,
    noise: str,
    stream_ids: list[int] | None = None,
    xi_out: torch.Tensor | None = None,
    table: TensorTable | None = None,
) -> torch.Tensor:
    """Write ``ŵ`` of every weight into ``outputs`` (2 launches: range partials, noise).

    Args:
        weights: ``T`` contiguous non-empty tensors of one dtype (float32/bfloat16/float16)
            on one device.
        logits: ``[n_groups_t]`` contiguous bit logits per weight, all of one dtype.
        outputs: ``T`` contiguous tensors like ``weights`` (written).
        seed: ``[1]`` int64 Philox seed on the weights' device.
        group_size, min_bits, max_bits, param, noise: as in :class:`DiffQuantizer`.
        stream_ids: per weight, the index keying its noise (default: its position).
        xi_out: optional float32 ``[Σ d_t]`` receiving every ``ξ``, tensor after tensor
            (tests).
        table: :func:`table_for` of these arguments, when the caller already has it.

    Returns:
        float64 ``[T, 4]``: ``(min, max, argmin, argmax)`` of each weight, for the backward.
    """
    if table is None:
        table = table_for(weights, logits, group_size, BLOCKS, stream_ids)
    device = weights[0].device
    w_dtype, l_dtype = tl_dtype(weights[0].dtype), tl_dtype(logits[0].dtype)
    part_v, part_i = range_many_partials(table, w_dtype)
    stats = torch.empty((len(table), 4), dtype=torch.float64, device=device)
    lo, hi = log_units(min_bits, max_bits)
    optr, out_aligned = pointer_table(outputs, device)
    noise_many_fwd_kernel[(table.fwd_map.numel(),)](
        table.rows, table.fwd_map, optr, seed, part_v, part_i,
        stats, xi_out if xi_out is not None else part_v,
        table.partials, float(min_bits), float(max_bits), lo, hi,
        G=table.G, MAX_P=table.max_partials, BLOCK=BLOCKS.fwd,
        PARAM_NOISE=param == "noise", GAUSSIAN=noise == "gaussian",
        IS_BF16=weights[0].dtype == torch.bfloat16, W_DTYPE=w_dtype, L_DTYPE=l_dtype,
        WRITE_XI=xi_out is not None, ALIGNED=table.aligned and out_aligned, num_warps=_WARPS,
    )
    return stats


def noise_backward_many(
    table: TensorTable,
    grads: list[torch.Tensor],
    grad_weights: list[torch.Tensor],
    grad_logits: list[torch.Tensor] | torch.Tensor,
    logits_dtype: torch.dtype,
    seed: torch.Tensor,
    stats: torch.Tensor,
    min_bits: float,
    max_bits: float,
    param: str,
    noise: str,
    dr_out: torch.Tensor | None = None,
    extra: torch.Tensor | None = None,
) -> None:
    """Write ``∂L/∂w`` and ``∂L/∂l`` of every tensor of ``table`` (2 launches: group sums,
    finalize).

    Args:
        table: the forward's table (:func:`table_for` with the same arguments).
        grads: ``T`` contiguous ``∂L/∂ŵ``, each of its weight's shape and dtype.
        grad_weights, grad_logits: ``T`` contiguous outputs like the weights and the logits;
            or ``grad_logits`` one contiguous ``[Σ n_groups]`` tensor of the logits' dtype,
            every tensor's groups at its offset in the table's group order (it may be
            ``extra`` itself: each entry is read, then written, by one program).
        logits_dtype: the logits' dtype.
        seed, stats: the forward's seed and statistics.
        min_bits, max_bits, param, noise: as in the forward.
        dr_out: optional float32 ``[T]`` receiving each ``∂L/∂r`` (tests).
        extra: optional float32 ``[Σ n_groups]`` added to ``∂L/∂l`` (the size penalty's
            gradient, :func:`.size_many.sizes_backward`, in the table's group order).
    """
    device = grads[0].device
    w_dtype, l_dtype = tl_dtype(grads[0].dtype), tl_dtype(logits_dtype)
    lo, hi = log_units(min_bits, max_bits)
    param_noise, gaussian = param == "noise", noise == "gaussian"
    gptr, g_aligned = pointer_table(grads, device)
    dwptr, dw_aligned = pointer_table(grad_weights, device)
    if isinstance(grad_logits, torch.Tensor):
        dlptr = table.group_pointers(grad_logits)
    else:
        dlptr, _ = pointer_table(grad_logits, device)
    aligned = g_aligned and dw_aligned
    part = torch.empty(max(table.bwd_parts, 1), dtype=torch.float32, device=device)
    grid = (table.bwd_map.numel(),)
    if table.tiled:
        noise_many_bwd_kernel[grid](
            table.rows, table.bwd_map, gptr, dwptr, dlptr, seed, stats, part,
            extra if extra is not None else part, float(min_bits), float(max_bits), lo, hi,
            G=table.G, G_PAD=table.g_pad, TILE=max(BLOCKS.tile, table.g_pad),
            PARAM_NOISE=param_noise, GAUSSIAN=gaussian, W_DTYPE=w_dtype, L_DTYPE=l_dtype,
            ALIGNED=aligned and table.G == table.g_pad, HAS_EXTRA=extra is not None,
            num_warps=_WARPS,
        )
    else:
        noise_many_chunk_bwd_kernel[grid](
            table.rows, table.bwd_map, gptr, dwptr, seed, part,
            BLOCK=BLOCKS.chunk, GAUSSIAN=gaussian, W_DTYPE=w_dtype,
            ALIGNED=aligned and table.G % 16 == 0, num_warps=_WARPS,
        )
    dr = dr_out if dr_out is not None else torch.empty(len(table), dtype=torch.float32,
                                                       device=device)
    noise_many_finalize_kernel[(len(table),)](
        table.rows, stats, part, dwptr, dlptr, dr, extra if extra is not None else part,
        float(min_bits), float(max_bits), lo, hi,
        CHUNKED=not table.tiled, PARAM_NOISE=param_noise,
        IS_BF16=grads[0].dtype == torch.bfloat16, W_DTYPE=w_dtype, L_DTYPE=l_dtype,
        BLOCK=BLOCK_FIN, HAS_EXTRA=extra is not None and not table.tiled,
    )


__all__ = ["BLOCKS", "noise_backward_many", "noise_forward_many", "table_for"]
