"""The DiffQ model size of every quantized tensor at once (spec §3, paper eq. 8 and 12).

``size_t = Σ_s len(s)·b_s + 64 + 8 + n_groups·field_t`` with ``b_s = extra_bits + bits(l_s)``
and ``field_t = ceil(log2(1 + round(max b) - min(round(min b), min_bits)))``, summed over the
tensors of a :class:`~.tensor_table.TensorTable`. Forward 2 launches (per-block partial sums
and extremes, then one program adding them up tensor by tensor in a fixed order), backward 1
(``∂size/∂l_s = len(s)·db_s/dl_s``, times the incoming gradient). Bytes moved: one read of
the logits forward, one read and one write backward.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, RNE_MAGIC, log_units, tl_dtype
from .tensor_table import (
    C_GROUP_LEN,
    C_L_OFF,
    C_L_PTR,
    C_N,
    C_N_GROUPS,
    C_NCOLS,
    TensorTable,
    cdiv,
    program_piece,
)

# Groups per program; partial results per iteration of the finalize.
BLOCK = 8192 if INTERPRET else 1024
BLOCK_FIN = 1024
# A constexpr: a jitted function may read a global only as one (the interpreter lets a
# plain float through, the compiler does not).
LN2 = tl.constexpr(0.6931471805599453)
# Bits to MB (1 MB = 2^23 bits, spec §3): a power of two, so scaling by it is exact.
PER_MB = tl.constexpr(2.0**-23)



@triton.jit
def _widths_and_slopes(b_l, min_bits, max_bits, log_u_lo, log_u_hi, PARAM_NOISE: tl.constexpr):
    """``b(l)`` and ``db/dl`` as the reference computes them (float32)."""
    t = tl.sigmoid(b_l)
    dt = t * (1.0 - t)
    if PARAM_NOISE:
        u = tl.exp(t * log_u_lo + (1.0 - t) * log_u_hi)
        b = tl.log2(1.0 + 1.0 / u)
        db = -(log_u_lo - log_u_hi) * dt / (LN2 * (u + 1.0))
    else:
        b = max_bits * t + (1.0 - t) * min_bits
        db = (max_bits - min_bits) * dt
    return b, db


@triton.jit
def _groups_block(row, j, L_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    """Groups ``[j·BLOCK, (j+1)·BLOCK)`` of a tensor: their indices, mask, logits (float32)
    and lengths (every group holds GROUP_LEN entries but the last, which holds the rest)."""
    p_l = tl.load(row + C_L_PTR).to(tl.pointer_type(L_DTYPE))
    n_groups = tl.load(row + C_N_GROUPS)
    group_len = tl.load(row + C_GROUP_LEN)
    o_s = j * BLOCK + tl.arange(0, BLOCK)
    m_s = o_s < n_groups
    b_l = tl.load(p_l + o_s, mask=m_s, other=0.0).to(tl.float32)
    b_len = tl.where(o_s == n_groups - 1, tl.load(row + C_N) - group_len * (n_groups - 1),
                     group_len).to(tl.float32)
    return o_s, m_s, b_l, b_len


@triton.jit
def size_many_fwd_kernel(
    p_rows, p_map, p_part, extra_bits, min_bits, max_bits, log_u_lo, log_u_hi,
    EXACT: tl.constexpr, PARAM_NOISE: tl.constexpr, L_DTYPE: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """Block ``j`` of tensor ``t``'s groups: ``part[p] = (Σ len·b, max round(b), min
    round(b))``; ``EXACT`` rounds the widths first (``round(b).clamp(1, 15)``)."""
    i_p = tl.program_id(0)
    t, j, row = program_piece(p_map, p_rows)
    o_s, m_s, b_l, b_len = _groups_block(row, j, L_DTYPE, BLOCK)
    b_b, _ = _widths_and_slopes(b_l, min_bits, max_bits, log_u_lo, log_u_hi, PARAM_NOISE)
    b_b = extra_bits + b_b
    b_r = (b_b + RNE_MAGIC) - RNE_MAGIC  # round half to even, as torch.round
    if EXACT:
        b_r = tl.minimum(tl.maximum(b_r, 1.0), 15.0)
        b_b = b_r
    tl.store(p_part + i_p * 3, tl.sum(tl.where(m_s, b_len * b_b, 0.0), axis=0))
    tl.store(p_part + i_p * 3 + 1, tl.max(tl.where(m_s, b_r, float("-inf")), axis=0))
    tl.store(p_part + i_p * 3 + 2, tl.min(tl.where(m_s, b_r, float("inf")), axis=0))


@triton.jit
def size_many_finalize_kernel(
    p_rows, p_spans, p_part, p_out, n_tensors, min_bits, mb_plus,
    IN_MB: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program: tensor by tensor (``spans[t] = (first partial, count)``), the payload
    in float64, the width field, then the total in bits to ``out[0]`` (float32); with
    ``IN_MB``, in MB plus ``mb_plus``: ``bits·2^-23 + mb_plus`` in float32, the operations of
    ``bits / 2^23 + mb_plus`` in torch (the product is exact: fused or not, one rounding)."""
    o_b = tl.arange(0, BLOCK)
    total = tl.zeros([1], tl.float64)
    for t in range(0, n_tensors):
        first = tl.load(p_spans + 2 * t)
        count = tl.load(p_spans + 2 * t + 1)
        b_pay = tl.zeros([BLOCK], tl.float64)
        b_mx = tl.full([BLOCK], float("-inf"), tl.float32)
        b_mn = tl.full([BLOCK], float("inf"), tl.float32)
        for i_c in range(0, count, BLOCK):
            m_c = (i_c + o_b) < count
            o_p = (first + i_c + o_b) * 3
            b_pay += tl.load(p_part + o_p, mask=m_c, other=0.0).to(tl.float64)
            b_mx = tl.maximum(b_mx, tl.load(p_part + o_p + 1, mask=m_c, other=float("-inf")))
            b_mn = tl.minimum(b_mn, tl.load(p_part + o_p + 2, mask=m_c, other=float("inf")))
        span = tl.maximum(tl.max(b_mx, axis=0) - tl.minimum(tl.min(b_mn, axis=0), min_bits), 0.0)
        field = tl.ceil(tl.log2(1.0 + span))
        n_groups = tl.load(p_rows + t * C_NCOLS + C_N_GROUPS).to(tl.float64)
        total += tl.sum(b_pay, axis=0) + 72.0 + field.to(tl.float64) * n_groups
    size = total.to(tl.float32)
    if IN_MB:
        size = size * PER_MB + mb_plus
    tl.store(p_out + tl.arange(0, 1), size)


@triton.jit
def size_many_bwd_kernel(
    p_rows, p_map, p_grad, p_dl, min_bits, max_bits, log_u_lo, log_u_hi,
    PARAM_NOISE: tl.constexpr, L_DTYPE: tl.constexpr, BLOCK: tl.constexpr,
    IN_MB: tl.constexpr,
):
    """``∂L/∂l_s = grad·len(s)·db_s/dl_s`` for block ``j`` of tensor ``t``'s groups, into the
    flat ``dl`` at the tensor's group offset; with ``IN_MB``, ``grad`` is ``∂L/∂MB`` and
    becomes ``∂L/∂bits = grad·2^-23`` first (exact, as ``grad / 2^23``)."""
    t, j, row = program_piece(p_map, p_rows)
    o_s, m_s, b_l, b_len = _groups_block(row, j, L_DTYPE, BLOCK)
    _, b_db = _widths_and_slopes(b_l, min_bits, max_bits, log_u_lo, log_u_hi, PARAM_NOISE)
    grad = tl.load(p_grad).to(tl.float32)
    if IN_MB:
        grad = grad * PER_MB
    tl.store(p_dl + tl.load(row + C_L_OFF) + o_s, (grad * b_len * b_db).to(p_dl.dtype.element_ty),
             mask=m_s)


def _group_blocks(table: TensorTable) -> tuple[torch.Tensor, torch.Tensor]:
    """Program map over blocks of groups, and each tensor's (first block, count)."""
    cached = getattr(table, "_size_blocks", None)
    if cached is None:
        entries, spans = [], []
        for t, n_groups in enumerate(table.n_groups):
            count = cdiv(n_groups, BLOCK)
            spans += [len(entries), count]
            entries += [(t << 32) | j for j in range(count)]
        device = table.rows.device
        cached = (torch.tensor(entries, dtype=torch.int64).to(device),
                  torch.tensor(spans, dtype=torch.int64).to(device))
        table._size_blocks = cached
    return cached


def sizes_forward(table: TensorTable, logits_dtype: torch.dtype, extra_bits: float,
                  min_bits: float, max_bits: float, param: str, exact: bool,
                  mb_plus: float | None = None) -> torch.Tensor:
    """Total size in bits of the tensors of ``table`` (its logits), float32 ``[1]``
    (2 launches); with ``mb_plus``, in MB plus ``mb_plus``, 0-dim: the figure of
    ``bits.reshape(()) / 2**23 + mb_plus``, bit for bit, without those 3 torch ops."""
    gmap, spans = _group_blocks(table)
    device = table.rows.device
    part = torch.empty((gmap.numel(), 3), dtype=torch.float32, device=device)
    out = torch.empty(1 if mb_plus is None else (), dtype=torch.float32, device=device)
    lo, hi = log_units(min_bits, max_bits)
    size_many_fwd_kernel[(gmap.numel(),)](
        table.rows, gmap, part, float(extra_bits), float(min_bits), float(max_bits), lo, hi,
        EXACT=exact, PARAM_NOISE=param == "noise", L_DTYPE=tl_dtype(logits_dtype), BLOCK=BLOCK,
    )
    size_many_finalize_kernel[(1,)](table.rows, spans, part, out, len(table), float(min_bits),
                                    float(mb_plus or 0.0), IN_MB=mb_plus is not None,
                                    BLOCK=BLOCK_FIN)
    return out


def sizes_backward(table: TensorTable, grad: torch.Tensor, logits_dtype: torch.dtype,
                   min_bits: float, max_bits: float, param: str, in_mb: bool = False
                   ) -> torch.Tensor:
    """``∂L/∂l`` of every group of every tensor, flat ``[Σ n_groups]`` (1 launch), from
    ``grad = ∂L/∂size`` (a one-entry tensor; ``in_mb``: of the size in MB)."""
    gmap, _ = _group_blocks(table)
    dl = torch.empty(table.total_groups, dtype=logits_dtype, device=grad.device)
    lo, hi = log_units(min_bits, max_bits)
    size_many_bwd_kernel[(gmap.numel(),)](
        table.rows, gmap, grad, dl, float(min_bits), float(max_bits), lo, hi,
        PARAM_NOISE=param == "noise", L_DTYPE=tl_dtype(logits_dtype), BLOCK=BLOCK,
        IN_MB=in_mb,
    )
    return dl
