"""Eval-time quantize → dequantize with per-group integer widths (spec §1), fused.

Bit-exact with :func:`diffq_triton.ops.reference.fake_quantize` in float32: the same sequence of
correctly rounded float32 operations (IEEE division, no fused multiply-add, round half to
even), and a constant tensor maps to itself instead of NaN.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, RNE_MAGIC, cast_out, size_bucket
from .range import range_partials, reduce_range_values

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
