"""Pseudo-quantization noise: fused forward and backward kernels (spec §2, §5).

Forward ``ŵ_i = w_i + r·u(b_s)·ξ_i``, ``r = max(w) - min(w)``, ``ξ`` regenerated from
(seed, entry index) by Philox, so nothing of the weight's size is kept for the backward.

Backward, with ``g = ∂L/∂ŵ`` and ``S_s = Σ_{i∈s} g_i·ξ_i``:
``∂L/∂l_s = r·S_s·du_s/dl_s``, ``∂L/∂r = Σ_s u_s·S_s``,
``∂L/∂w = g + ∂L/∂r·(e_argmax - e_argmin)``.

Launches per tensor: forward 2 (range partials, noise), backward 2 (group sums, finalize).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (
    INTERPRET,
    cast_out,
    draw_xi,
    log_units,
    next_pow2,
    size_bucket,
    unit_and_slope,
)
from .range import range_partials, reduce_range, reduce_range_values

# Groups up to this size are reduced as rows of a 2-D tile; larger groups (and g = 0, one
# group) are cut into chunks whose partial sums the finalize kernel adds.
MAX_TILE_G = 1024
# Entries per program. Under the interpreter every program costs ~1.4 ms: use few, large ones.
BLOCK_FWD = 8192 if INTERPRET else 4096
TILE_BWD = 8192 if INTERPRET else 2048
BLOCK_CHUNK = 8192 if INTERPRET else 4096
BLOCK_FIN = 1024

# Warps and stages only (block sizes fixed above, so grids and partial buffers are known
# before launch); tuned once per (size bucket, group size, dtypes). One config when
# interpreting: more than one fails there ("0 active drivers").
if INTERPRET:
    _CONFIGS = [triton.Config({}, num_warps=4)]
else:
    # The tiles hold 2048-4096 entries (and the forward also 4 × P range partials): with 4
    # warps ptxas spills on sm_80/sm_90 (see gpu_report); 8 and 16 warps do not.
    _CONFIGS = [triton.Config({}, num_warps=w, num_stages=s) for w in (8, 16) for s in (1, 2)]

@triton.autotune(configs=_CONFIGS, key=["SIZE_BUCKET", "G"])
@triton.jit
def noise_fwd_kernel(
    p_w, p_l, p_seed, p_part_v, p_part_i, p_out, p_stats, p_xi,
    n, min_bits, max_bits, log_u_lo, log_u_hi,
    SIZE_BUCKET, G: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr,
    PARAM_NOISE: tl.constexpr, GAUSSIAN: tl.constexpr, IS_BF16: tl.constexpr,
    WRITE_XI: tl.constexpr,
):
    """``ŵ = w + (mx - mn)·u(b_s)·ξ`` for one block of entries; group of entry i is ``i // G``.

    Reduces the range partials first; program 0 stores ``stats = (mn, mx, argmin, argmax)``
    (float64) for the backward. ``WRITE_XI`` (tests only) also stores ``ξ`` as float32.
    Bytes per entry (fp32): reads ``w`` 4 and one logit per group (L2-cached), writes ``ŵ`` 4.
    """
    i_p = tl.program_id(0).to(tl.int64)
    mn, mx = reduce_range_values(p_part_v, P)
    if i_p == 0:
        # Only program 0 needs the indices (for the backward): the others skip their loads.
        mn, mx, imn, imx = reduce_range(p_part_v, p_part_i, P)
        tl.store(p_stats, mn.to(tl.float64))
        tl.store(p_stats + 1, mx.to(tl.float64))
        tl.store(p_stats + 2, imn.to(tl.float64))
        tl.store(p_stats + 3, imx.to(tl.float64))
    r = mx - mn
    seed = tl.load(p_seed)
    o_w = i_p * BLOCK + tl.arange(0, BLOCK)
    m_w = o_w < n
    if G == 0:
        b_l = tl.load(p_l).to(tl.float32)  # one group: one step for the whole block
    else:
        b_l = tl.load(p_l + o_w // G, mask=m_w, other=0.0).to(tl.float32)
    b_u, _ = unit_and_slope(b_l, min_bits, max_bits, log_u_lo, log_u_hi, PARAM_NOISE)
    b_xi = draw_xi(seed, o_w, GAUSSIAN)
    b_w = tl.load(p_w + o_w, mask=m_w, other=0.0).to(tl.float32)
    b_out = b_w + r * b_u * b_xi
    tl.store(p_out + o_w, cast_out(b_out, IS_BF16, p_out.dtype.element_ty), mask=m_w)
    if WRITE_XI:
        tl.store(p_xi + o_w, b_xi, mask=m_w)


@triton.autotune(configs=_CONFIGS, key=["SIZE_BUCKET", "G"])
@triton.jit
def noise_bwd_kernel(
    p_g, p_l, p_seed, p_stats, p_dw, p_dl, p_part,
    n, n_groups, min_bits, max_bits, log_u_lo, log_u_hi,
    SIZE_BUCKET, G: tl.constexpr, G_PAD: tl.constexpr, TILE: tl.constexpr,
    PARAM_NOISE: tl.constexpr, GAUSSIAN: tl.constexpr,
):
    """Group sums for ``1 ≤ G ≤ MAX_TILE_G``: a tile of ``TILE // G_PAD`` whole groups.

    Rows are groups, reduced in registers: ``S_s = Σ g·ξ``; writes ``∂L/∂l_s = r·S_s·du_s``,
    the partial ``Σ_s u_s·S_s`` of this program to ``part``, and ``∂L/∂w = g`` (copied in
    ``g``'s dtype; the finalize kernel adds the range terms at two entries). For a power of
    two ``G`` the tile is one contiguous run of entries; otherwise rows are padded to
    ``G_PAD``. Bytes per entry (fp32): reads ``g`` 4, writes ``∂L/∂w`` 4, plus a logit read
    and a logit-gradient write per group.
    """
    BLOCK_G: tl.constexpr = TILE // G_PAD
    i_p = tl.program_id(0).to(tl.int64)
    seed = tl.load(p_seed)
    r = (tl.load(p_stats + 1) - tl.load(p_stats)).to(tl.float32)
    o_s = i_p * BLOCK_G + tl.arange(0, BLOCK_G)
    m_s = o_s < n_groups
    o_c = tl.arange(0, G_PAD)
    o_w = o_s[:, None] * G + o_c[None, :]
    m_w = m_s[:, None] & (o_c[None, :] < G) & (o_w < n)
    b_g = tl.load(p_g + o_w, mask=m_w, other=0.0)
    tl.store(p_dw + o_w, b_g, mask=m_w)
    b_xi = draw_xi(seed, o_w, GAUSSIAN)
    b_sum = tl.sum(tl.where(m_w, b_g.to(tl.float32) * b_xi, 0.0), axis=1)
    b_l = tl.load(p_l + o_s, mask=m_s, other=0.0).to(tl.float32)
    b_u, b_du = unit_and_slope(b_l, min_bits, max_bits, log_u_lo, log_u_hi, PARAM_NOISE)
    tl.store(p_dl + o_s, (r * b_sum * b_du).to(p_dl.dtype.element_ty), mask=m_s)
    tl.store(p_part + i_p, tl.sum(tl.where(m_s, b_u * b_sum, 0.0), axis=0))


@triton.autotune(configs=_CONFIGS, key=["SIZE_BUCKET", "G"])
@triton.jit
def noise_chunk_bwd_kernel(
    p_g, p_seed, p_dw, p_part,
    n, group_len, n_chunks,
    SIZE_BUCKET, G: tl.constexpr, BLOCK: tl.constexpr, GAUSSIAN: tl.constexpr,
):
    """Group sums for large groups (``G > MAX_TILE_G``, or ``G = 0``: one group of ``n``).

    Program ``s·n_chunks + c`` sums ``g·ξ`` over chunk ``c`` of group ``s`` into
    ``part[s, c]`` and copies ``g`` to ``∂L/∂w`` (a 1-D grid: CUDA limits the second grid
    dimension to 65535). Bytes per entry (fp32): reads ``g`` 4, writes ``∂L/∂w`` 4.
    """
    i_p = tl.program_id(0).to(tl.int64)
    i_s = i_p // n_chunks
    i_c = i_p % n_chunks
    seed = tl.load(p_seed)
    o_in = i_c * BLOCK + tl.arange(0, BLOCK)
    o_w = i_s * group_len + o_in
    m_w = (o_in < group_len) & (o_w < n)
    b_g = tl.load(p_g + o_w, mask=m_w, other=0.0)
    tl.store(p_dw + o_w, b_g, mask=m_w)
    b_xi = draw_xi(seed, o_w, GAUSSIAN)
    tl.store(p_part + i_s * n_chunks + i_c,
             tl.sum(tl.where(m_w, b_g.to(tl.float32) * b_xi, 0.0), axis=0))


@triton.jit
def noise_bwd_finalize_kernel(
    p_l, p_stats, p_part, p_dw, p_dl, p_dr,
    n_groups, n_parts, min_bits, max_bits, log_u_lo, log_u_hi,
    CHUNKED: tl.constexpr, PARAM_NOISE: tl.constexpr, IS_BF16: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program: ``∂L/∂r`` in a fixed order (deterministic), then the range terms.

    Tiled groups: ``∂L/∂r = Σ part`` over the ``n_parts`` programs. Chunked groups:
    ``S_s = Σ_c part[s, c]`` (``n_parts`` chunks per group), then ``∂L/∂l_s`` and
    ``∂L/∂r = Σ_s u_s·S_s``. Finally ``∂L/∂w[argmax] += ∂L/∂r``, ``∂L/∂w[argmin] -= ∂L/∂r``
    (nothing when they coincide: a constant tensor). Stores ``∂L/∂r`` to ``dr``.
    Bytes moved: O(number of groups or programs), none per entry.
    """
    o_b = tl.arange(0, BLOCK)
    b_acc = tl.zeros([BLOCK], tl.float32)
    if CHUNKED:
        r = (tl.load(p_stats + 1) - tl.load(p_stats)).to(tl.float32)
        for i_s in range(0, n_groups):
            b_sum = tl.zeros([BLOCK], tl.float32)
            for i_c in range(0, n_parts, BLOCK):
                m_c = (i_c + o_b) < n_parts
                b_sum += tl.load(p_part + i_s * n_parts + i_c + o_b, mask=m_c, other=0.0)
            s_sum = tl.sum(b_sum, axis=0)
            l_s = tl.load(p_l + i_s).to(tl.float32)
            u_s, du_s = unit_and_slope(l_s, min_bits, max_bits, log_u_lo, log_u_hi,
                                       PARAM_NOISE)
            tl.store(p_dl + i_s, (r * s_sum * du_s).to(p_dl.dtype.element_ty))
            b_acc += tl.where(o_b == 0, u_s * s_sum, 0.0)
    else:
        for i_c in range(0, n_parts, BLOCK):
            m_c = (i_c + o_b) < n_parts
            b_acc += tl.load(p_part + i_c + o_b, mask=m_c, other=0.0)
    dr = tl.sum(b_acc, axis=0)
    tl.store(p_dr, dr)
    imn = tl.load(p_stats + 2).to(tl.int64)
    imx = tl.load(p_stats + 3).to(tl.int64)
    g_mx = tl.load(p_dw + imx).to(tl.float32)
    g_mn = tl.load(p_dw + imn).to(tl.float32)
    same = imn == imx
    v_mx = tl.where(same, g_mx, g_mx + dr)
    v_mn = tl.where(same, g_mn, g_mn - dr)
    tl.store(p_dw + imx, cast_out(v_mx, IS_BF16, p_dw.dtype.element_ty))
    tl.store(p_dw + imn, cast_out(v_mn, IS_BF16, p_dw.dtype.element_ty))


def _group_args(n: int, group_size: int) -> tuple[int, int]:
    """``(G, n_groups)`` with ``G = 0`` for one group (also when ``group_size ≥ n``)."""
    if group_size == 0 or group_size >= n:
        return 0, 1
    return group_size, triton.cdiv(n, group_size)


def noise_forward(
    w: torch.Tensor,
    logits: torch.Tensor,
    seed: torch.Tensor,
    group_size: int,
    min_bits: float,
    max_bits: float,
    param: str,
    noise: str,
    xi_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused noise forward (2 launches: range partials, noise).

    Args:
        w: contiguous weight, float32/bfloat16/float16, ``d > 0`` entries.
        logits: ``[n_groups]`` contiguous bit logits.
        seed: ``[1]`` int64 Philox seed on ``w``'s device.
        group_size, min_bits, max_bits, param, noise: as in :class:`DiffQuantizer`.
        xi_out: optional ``[d]`` float32 buffer receiving ``ξ`` (tests).

    Returns:
        ``(w_hat, stats)``: ``w_hat`` of ``w``'s shape and dtype; ``stats`` float64 ``[4]``
        ``(min, max, argmin, argmax)`` of ``w`` for the backward.
    """
    n = w.numel()
    G, _ = _group_args(n, group_size)
    part_v, part_i, P = range_partials(w)
    out = torch.empty_like(w)
    stats = torch.empty(4, dtype=torch.float64, device=w.device)
    lo, hi = log_units(min_bits, max_bits)
    noise_fwd_kernel[(triton.cdiv(n, BLOCK_FWD),)](
        w, logits, seed, part_v, part_i, out, stats, xi_out if xi_out is not None else out,
        n, float(min_bits), float(max_bits), lo, hi,
        size_bucket(n), G=G, P=P, BLOCK=BLOCK_FWD,
        PARAM_NOISE=param == "noise", GAUSSIAN=noise == "gaussian",
        IS_BF16=w.dtype == torch.bfloat16, WRITE_XI=xi_out is not None,
    )
    return out, stats


def noise_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    seed: torch.Tensor,
    stats: torch.Tensor,
    group_size: int,
    min_bits: float,
    max_bits: float,
    param: str,
    noise: str,
    dr_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused noise backward (2 launches: group sums, finalize).

    Args:
        grad: contiguous ``∂L/∂ŵ`` of the weight's shape and dtype.
        logits, seed, group_size, min_bits, max_bits, param, noise: as in the forward.
        stats: the forward's float64 ``[4]`` range statistics.
        dr_out: optional float32 ``[1]`` receiving ``∂L/∂r`` (tests).

    Returns:
        ``(grad_w, grad_logits)`` of the weight's and the logits' shape and dtype.
    """
    n = grad.numel()
    G, n_groups = _group_args(n, group_size)
    grad_w = torch.empty_like(grad)
    grad_l = torch.empty_like(logits)
    dr = dr_out if dr_out is not None else torch.empty(1, dtype=torch.float32,
                                                       device=grad.device)
    lo, hi = log_units(min_bits, max_bits)
    param_noise, gaussian = param == "noise", noise == "gaussian"
    if 1 <= G <= MAX_TILE_G:
        g_pad = next_pow2(G)
        tile = max(TILE_BWD, g_pad)
        n_parts = triton.cdiv(n_groups, tile // g_pad)
        part = torch.empty(n_parts, dtype=torch.float32, device=grad.device)
        noise_bwd_kernel[(n_parts,)](
            grad, logits, seed, stats, grad_w, grad_l, part,
            n, n_groups, float(min_bits), float(max_bits), lo, hi,
            size_bucket(n), G=G, G_PAD=g_pad, TILE=tile,
            PARAM_NOISE=param_noise, GAUSSIAN=gaussian,
        )
        chunked = False
    else:
        group_len = n if G == 0 else G
        n_parts = triton.cdiv(group_len, BLOCK_CHUNK)
        part = torch.empty((n_groups, n_parts), dtype=torch.float32, device=grad.device)
        noise_chunk_bwd_kernel[(n_groups * n_parts,)](
            grad, seed, grad_w, part, n, group_len, n_parts,
            size_bucket(n), G=G, BLOCK=BLOCK_CHUNK, GAUSSIAN=gaussian,
        )
        chunked = True
    noise_bwd_finalize_kernel[(1,)](
        logits, stats, part, grad_w, grad_l, dr,
        n_groups, n_parts, float(min_bits), float(max_bits), lo, hi,
        CHUNKED=chunked, PARAM_NOISE=param_noise, IS_BF16=grad.dtype == torch.bfloat16,
        BLOCK=BLOCK_FIN,
    )
    return grad_w, grad_l


__all__ = ["noise_backward", "noise_forward"]
