"""Pieces shared by the DiffQ kernels: in-kernel math, dtype handling, launch sizing."""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Read once at import: the interpreter needs a single autotune config and large blocks
# (each program instance costs ~1.4 ms there), the GPU wants a choice of configs.
INTERPRET: bool = bool(triton.knobs.runtime.interpret)

# Entries of tensors the kernels accept and the dtypes they read and write.
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

LN2 = math.log(2.0)

# Add 1.5·2^23 then subtract it: rounds a float32 of magnitude < 2^22 to the nearest
# integer, ties to even, exactly as torch.round, with no libdevice call (works everywhere).
RNE_MAGIC = tl.constexpr(12582912.0)


def size_bucket(n: int) -> int:
    """Autotune key for a length: its power-of-two order, so tuning runs once per bucket."""
    return max(int(n), 1).bit_length()


def next_pow2(n: int) -> int:
    """Smallest power of two ≥ ``n`` (1 for n ≤ 1)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def log_units(min_bits: float, max_bits: float) -> tuple[float, float]:
    """``(ln u(max_bits), ln u(min_bits))``: the ends of the ``param="noise"`` interpolation."""
    return math.log(1 / (2**max_bits - 1)), math.log(1 / (2**min_bits - 1))


@triton.jit
def unit_and_slope(logit, min_bits, max_bits, log_u_lo, log_u_hi, PARAM_NOISE: tl.constexpr):
    """Per-group step ``u(b(l))`` and its derivative ``du/dl``, float32 in and out.

    ``param="bits"``: ``b = min + σ(l)(max - min)``, ``u = 1/(2^b - 1)``,
    ``du/dl = -ln2·2^b·u²·(max - min)·σ(1-σ)``.
    ``param="noise"``: ``u = exp(σ·ln u(max) + (1-σ)·ln u(min))`` (then ``u(b) = u`` exactly),
    ``du/dl = u·(ln u(max) - ln u(min))·σ(1-σ)``; ``log_u_lo = ln u(max)``,
    ``log_u_hi = ln u(min)``.
    """
    t = tl.sigmoid(logit)
    dt = t * (1.0 - t)
    if PARAM_NOISE:
        u = tl.exp(t * log_u_lo + (1.0 - t) * log_u_hi)
        du = u * (log_u_lo - log_u_hi) * dt
    else:
        p = tl.exp2(min_bits + t * (max_bits - min_bits))
        u = 1.0 / (p - 1.0)
        du = -0.6931471805599453 * p * u * u * (max_bits - min_bits) * dt
    return u, du


@triton.jit
def draw_xi(seed, offs, GAUSSIAN: tl.constexpr):
    """``ξ`` for entry indices ``offs``: ``N(0,1)/2`` or ``U[-1/2, 1/2)``, Philox keyed by seed."""
    if GAUSSIAN:
        xi = tl.randn(seed, offs) * 0.5
    else:
        xi = tl.rand(seed, offs) - 0.5
    return xi


@triton.jit
def load_block(p, o, m, full):
    """``p[o]`` as float32; a whole block (``full``) unmasked, so that 16-byte aligned data
    loads 128 bits at a time (a mask on a runtime length would split the vectors)."""
    if full:
        b = tl.load(p + o).to(tl.float32)
    else:
        b = tl.load(p + o, mask=m, other=0.0).to(tl.float32)
    return b


@triton.jit
def store_block(p, o, b, m, full):
    """``p[o] = b``, unmasked for a whole block (see :func:`load_block`)."""
    if full:
        tl.store(p + o, b)
    else:
        tl.store(p + o, b, mask=m)


@triton.jit
def to_bf16_rne(x):
    """float32 → bfloat16 rounded to nearest even, by hand (the interpreter truncates)."""
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + 0x7FFF + ((bits >> 16) & 1)
    return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def cast_out(x, IS_BF16: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """float32 values to the output dtype with round-to-nearest-even on every backend."""
    if IS_BF16:
        y = to_bf16_rne(x)
    else:
        y = x.to(OUT_DTYPE)
    return y


def tl_dtype(dtype: torch.dtype):
    """The Triton dtype of a torch floating dtype."""
    return {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16,
            torch.float64: tl.float64}[dtype]
