"""Packed ``Linear`` kernels (docs/packed.md §6): the GEMV for a few rows, the tiled GEMM.

Both decode the weight in registers from the packed layout (the weight is never written
out) and sum float32 products: ``F.linear``'s values within the float32 rounding of a sum in
another order. :func:`diffq_triton.kernels.packed.linear` picks one by the number of rows.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import INTERPRET, cast_out, next_pow2, size_bucket
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

# The GEMV's row count bound (the decode regime); more rows go to a dequantize + matmul.
MAX_GEMV_ROWS = 16
# GEMV: entries decoded per step, rows of x × entries per step (the product block), and
# the longest piece of a group decoded as one unit (longer groups are cut into pieces).
# Past 1024 entries per step (8 per thread at 4 warps) the decode's int64 bit offsets and
# byte windows spill on sm_80/sm_90 (the GPU report: 2048 and 4096 did at one row).
GEMV_DECODE = 1024
GEMV_PRODUCT = 4096
GEMV_MAX_PIECE = 256
# CUDA's limit on the second grid dimension (the GEMM's row blocks).
GRID_Y_MAX = 65535


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
    n, k, m, bias = _check_linear(x, pt, bias)
    if m > MAX_GEMV_ROWS:
        raise ValueError(f"x has {m} rows, more than the GEMV's {MAX_GEMV_ROWS}")
    x2, y, done = _start(x, bias, n, k, m)
    if done:
        return y.view(*x.shape[:-1], n)
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
    # A float32 dot holds twice the operand registers: 128-row blocks spilled on sm_80, and
    # 64-row blocks with 4 warps on sm_80/sm_90 at g = 1 and one group (the GPU report).
    if kwargs.get("DOT_F32", named_args.get("DOT_F32")):
        configs = [c for c in configs
                   if c.kwargs["BM"] <= 32 or (c.kwargs["BM"] <= 64 and c.num_warps >= 8)]
        configs = configs or _GEMM_CONFIGS[:1]
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
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
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



def rows_of(x: torch.Tensor) -> int:
    """Rows of ``x`` as a ``[rows, features]`` matrix: the product of its leading dims."""
    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    return rows


def _check_linear(x: torch.Tensor, pt, bias: torch.Tensor | None) -> tuple:
    """``(N, K, rows, bias)`` after the launchers' checks; a strided bias is made contiguous
    (the kernels read it with stride 1)."""
    if len(pt.shape) != 2:
        raise ValueError(f"pt must hold a 2-D weight, got shape {tuple(pt.shape)}")
    n, k = pt.shape
    if x.dim() == 0 or x.shape[-1] != k:
        raise ValueError(f"x must end in {k} features, got shape {tuple(x.shape)}")
    if x.dtype != pt.dtype or x.dtype not in _ROUND:
        raise TypeError(f"x must be of the weight's dtype {pt.dtype}, got {x.dtype}")
    if x.device != pt.device:
        raise ValueError(f"x is on {x.device}, the packed weight on {pt.device}")
    if bias is not None:
        if bias.shape != (n,) or bias.dtype != x.dtype:
            raise ValueError(f"bias must be [{n}] of {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device}, x on {x.device}")
        bias = bias.contiguous()
    return n, k, rows_of(x), bias


def _start(x: torch.Tensor, bias: torch.Tensor | None, n: int, k: int, m: int) -> tuple:
    """``(x as [m, k] contiguous, y [m, n], done)``; ``done`` when no kernel is needed (no
    rows or features: ``y`` is empty; ``k = 0``: ``y`` is the bias, or zeros)."""
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return x, y, True
    if k == 0:
        y.zero_().add_(bias if bias is not None else 0)
        return x, y, True
    return x.reshape(m, k).contiguous(), y, False


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
    n, k, m, bias = _check_linear(x, pt, bias)
    x2, y, done = _start(x, bias, n, k, m)
    if done:
        return y.view(*x.shape[:-1], n)
    widths, g, f = _layout(pt)
    # Feature blocks on grid axis 0 (up to 2^31 - 1), row blocks on axis 1 (at most 65535
    # on CUDA): more rows than 65535 of the smallest blocks go in several launches.
    step = GRID_Y_MAX * 32
    for r0 in range(0, m, step):
        r1 = min(m, r0 + step)
        x_r, y_r = x2[r0:r1], y[r0:r1]
        grid = lambda meta, rows=r1 - r0: (triton.cdiv(n, meta["BN"]),  # noqa: E731
                                           triton.cdiv(rows, meta["BM"]))
        packed_gemm_kernel[grid](
            x_r, pt.levels, widths, pt.tile_offsets, pt.scale,
            bias if bias is not None else x_r, y_r, r1 - r0, n, k, g, pt.base,
            x_r.stride(0), y_r.stride(0), size_bucket(r1 - r0),
            F=f, T=pt.tile_groups, LOG_G=_log_g(g), LSQ=pt.scheme == "lsq",
            R1=_ROUND.get(pt.record_dtype, 0), R2=_ROUND[pt.dtype], HAS_BIAS=bias is not None,
            DOT_F32=x.dtype == torch.float32 or (INTERPRET and x.dtype == torch.bfloat16),
            IS_BF16=x.dtype == torch.bfloat16, **_options())
    return y.view(*x.shape[:-1], n)
