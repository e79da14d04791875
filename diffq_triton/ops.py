"""The operations quantizers call on each weight; the one seam between models and kernels.

Every quantizer goes through these functions, whatever the device; they pick the
implementation (fused Triton kernels or the eager reference) in one place.
"""

from __future__ import annotations

import torch

from . import reference


def pseudo_quantize(
    w: torch.Tensor,
    logits: torch.Tensor,
    *,
    group_size: int,
    min_bits: float,
    max_bits: float,
    param: str,
    noise: str,
) -> torch.Tensor:
    """Training-time noisy weight ``ŵ = w + r·u(b_s)·ξ`` with fresh noise ``ξ``.

    Args:
        w: weight, any shape, float32/bfloat16/float16.
        logits: ``[n_groups]`` float32 bit logits.
        group_size, min_bits, max_bits, param, noise: as in :class:`DiffQuantizer`.

    Returns:
        Tensor of ``w``'s shape and dtype, differentiable in ``w`` and ``logits``.
    """
    xi = reference.draw_noise(w.shape, noise, dtype=w.dtype, device=w.device)
    return reference.noisy_weight(w, logits, xi, group_size, min_bits, max_bits, param)


def quantized_weight(w: torch.Tensor, bits_int: torch.Tensor, group_size: int) -> torch.Tensor:
    """Eval-time weight: quantized with integer widths ``bits_int`` then dequantized.

    Args:
        w: weight, any shape, floating dtype.
        bits_int: ``[n_groups]`` uint8 widths in ``[1, 15]``.
        group_size: entries per group (0: one group).

    Returns:
        Tensor of ``w``'s shape and dtype, without gradient.
    """
    return reference.fake_quantize(w.detach(), bits_int, group_size)
