"""In-kernel steps of the packed layout (docs/packed.md §3), shared by its kernels.

Reading widths and levels from the padded streams, the value of a level as the reference
computes it (rounded as the float model's parameter), and the row walk of the GEMM and the
Embedding gather; plus the launchers' shared host helpers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET

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


def _layout(pt) -> tuple:
    """``(widths buffer, effective group size, field bits)`` of a packed tensor."""
    g = pt.group_size if pt.group_size and pt.n_groups > 1 else pt.numel
    widths = pt.widths if pt.field_bits else pt.levels  # never read when field_bits == 0
    return widths, g, pt.field_bits


def _options() -> dict:
    # Multiply then add stay two roundings on the GPU too, as in the eager reference.
    return {} if INTERPRET else {"enable_fp_fusion": False}


def _log_g(g: int) -> int:
    """``log2(g)`` when ``g`` is a power of two (the kernels shift), else -1 (they divide)."""
    return g.bit_length() - 1 if g > 0 and g & (g - 1) == 0 else -1


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
