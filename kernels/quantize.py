"""Eval-time quantize → dequantize with per-group integer widths (spec §1), fused.

Bit-exact with :func:`diffq_triton.ops.reference.fake_quantize` in float32: the same sequence of
correctly rounded float32 operations (IEEE division, no fused multiply-add, round half to
even), and a constant tensor maps to itself instead of NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import tensor_table
from .common import (
    INTERPRET,
    RNE_MAGIC,
    cast_out,
    load_block,
    size_bucket,
    store_block,
    tl_dtype,
)
from .range import BLOCK as RANGE_BLOCK
from .range import (
    MAX_PARTIALS,
    range_many_partials,
    range_partials,
    reduce_range_many_values,
    reduce_range_values,
)
from .tensor_table import C_N, C_P_NUM, C_P_OFF, C_W_PTR, program_piece

BLOCK = 8192 if INTERPRET else 2048

if INTERPRET:
    _CONFIGS = [triton.Config({}, num_warps=4)]
else:
    _CONFIGS = [triton.Config({}, num_warps=w) for w in (4, 8)]


@triton.autotune(configs=_CONFIGS, key=["SIZE_BUCKET", "G"])
@triton.jit
def fake_quant_fwd_kernel(
    p_w, p_bits, p_part_v, p_part_i, p_out, n,
    SIZE_BUCKET, G: tl.constexpr, P: tl.constexpr, BLOCK: tl.constexpr,
    IS_BF16: tl.constexpr,
):
    """``out = mn + round((w - mn)/(mx - mn)/u)·u·(mx - mn)``, ``u = 1/(2^b_s - 1)``.

    ``(mx - mn)`` is replaced by 1 when zero (constant tensor: level 0, output ``mn``).
    Bytes per entry (fp32): reads ``w`` 4 and one uint8 width per group, writes 4.
    """
    i_p = tl.program_id(0).to(tl.int64)
    mn, mx = reduce_range_values(p_part_v, P)
    scale = mx - mn
    safe = tl.where(scale > 0, scale, 1.0)
    o_w = i_p * BLOCK + tl.arange(0, BLOCK)
    m_w = o_w < n
    if G == 0:
        b_bits = tl.load(p_bits).to(tl.int32)  # one group: one width for the whole block
    else:
        b_bits = tl.load(p_bits + o_w // G, mask=m_w, other=1).to(tl.int32)
    b_unit = tl.div_rn(tl.full([BLOCK], 1.0, tl.float32), ((1 << b_bits) - 1).to(tl.float32))
    b_w = tl.load(p_w + o_w, mask=m_w, other=0.0).to(tl.float32)
    b_x = tl.div_rn(tl.div_rn(b_w - mn, safe), b_unit)
    b_q = (b_x + RNE_MAGIC) - RNE_MAGIC
    b_out = b_q * b_unit * scale + mn
    tl.store(p_out + o_w, cast_out(b_out, IS_BF16, p_out.dtype.element_ty), mask=m_w)


def fake_quantize(w: torch.Tensor, bits_int: torch.Tensor, group_size: int) -> torch.Tensor:
    """Launch the fused eval quantizer (2 launches: range partials, quantize).

    Args:
        w: contiguous weight, float32/bfloat16/float16, ``d > 0`` entries.
        bits_int: ``[n_groups]`` integer widths in ``[1, 15]`` (any integer dtype).
        group_size: entries per group (0: one group).

    Returns:
        Tensor of ``w``'s shape and dtype.
    """
    n = w.numel()
    G = 0 if group_size == 0 or group_size >= n else group_size
    part_v, part_i, P = range_partials(w)
    out = torch.empty_like(w)
    # Multiply then add stay two roundings on the GPU too, as in the eager reference.
    options = {} if INTERPRET else {"enable_fp_fusion": False}
    fake_quant_fwd_kernel[(triton.cdiv(n, BLOCK),)](
        w, bits_int, part_v, part_i, out, n,
        size_bucket(n), G=G, P=P, BLOCK=BLOCK, IS_BF16=w.dtype == torch.bfloat16, **options,
    )
    return out


# ----------------------------------------------------------------------------- many tensors

BLOCKS = tensor_table.Blocks(fwd=BLOCK, range_block=RANGE_BLOCK, max_partials=MAX_PARTIALS,
                             tile=BLOCK, chunk=BLOCK, max_tile_g=0)


@triton.jit
def fake_quant_many_kernel(
    p_rows, p_map, p_bptr, p_optr, p_part_v, total_p,
    G: tl.constexpr, MAX_P: tl.constexpr, BLOCK: tl.constexpr, IS_BF16: tl.constexpr,
    W_DTYPE: tl.constexpr, ALIGNED: tl.constexpr,
):
    """:func:`fake_quant_fwd_kernel` for block ``j`` of tensor ``t`` (map ``t<<32 | j``).

    Bytes per entry (fp32): reads ``w`` 4 and one uint8 width per group, writes 4.
    """
    t, j, row = program_piece(p_map, p_rows)
    p_w = tl.load(row + C_W_PTR).to(tl.pointer_type(W_DTYPE))
    p_bits = tl.load(p_bptr + t).to(tl.pointer_type(tl.uint8))
    p_out = tl.load(p_optr + t).to(tl.pointer_type(W_DTYPE))
    n = tl.load(row + C_N)
    mn, mx = reduce_range_many_values(p_part_v, total_p, tl.load(row + C_P_OFF),
                                      tl.load(row + C_P_NUM), MAX_P)
    scale = mx - mn
    safe = tl.where(scale > 0, scale, 1.0)
    o_w = j * BLOCK + tl.arange(0, BLOCK)
    m_w = o_w < n
    if ALIGNED:
        p_w = tl.multiple_of(p_w, 16)
        p_out = tl.multiple_of(p_out, 16)
    full = (j + 1) * BLOCK <= n
    if G == 0:
        b_bits = tl.load(p_bits).to(tl.int32)
    else:
        b_bits = tl.load(p_bits + o_w // G, mask=m_w, other=1).to(tl.int32)
    b_unit = tl.div_rn(tl.full([BLOCK], 1.0, tl.float32), ((1 << b_bits) - 1).to(tl.float32))
    b_w = load_block(p_w, o_w, m_w, full)
    b_x = tl.div_rn(tl.div_rn(b_w - mn, safe), b_unit)
    b_q = (b_x + RNE_MAGIC) - RNE_MAGIC
    store_block(p_out, o_w, cast_out(b_q * b_unit * scale + mn, IS_BF16, W_DTYPE), m_w, full)


def fake_quantize_many(weights: list[torch.Tensor], bits: list[torch.Tensor],
                       outputs: list[torch.Tensor], group_size: int) -> None:
    """Eval quantize → dequantize of every weight into ``outputs`` (2 launches in all:
    range partials, quantize).

    Args:
        weights: ``T`` contiguous non-empty tensors of one dtype and device.
        bits: ``[n_groups_t]`` contiguous uint8 widths in ``[1, 15]`` per weight.
        outputs: ``T`` contiguous tensors like ``weights`` (written).
        group_size: entries per group, shared (0: one group per tensor).
    """
    table = tensor_table.table_for(weights, None, group_size, BLOCKS)
    device = weights[0].device
    w_dtype = tl_dtype(weights[0].dtype)
    part_v, _ = range_many_partials(table, w_dtype)
    bptr, _ = tensor_table.pointer_table(bits, device)
    optr, out_aligned = tensor_table.pointer_table(outputs, device)
    options = {} if INTERPRET else {"enable_fp_fusion": False}
    fake_quant_many_kernel[(table.fwd_map.numel(),)](
        table.rows, table.fwd_map, bptr, optr, part_v, table.partials,
        G=group_size, MAX_P=table.max_partials, BLOCK=BLOCK,
        IS_BF16=weights[0].dtype == torch.bfloat16, W_DTYPE=w_dtype,
        ALIGNED=table.aligned and out_aligned, **options,
    )
