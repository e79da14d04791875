"""Ops: the math on weights, and the one seam between models and kernels.

The functions here are the operations quantizers and layers call on each weight, whatever
the device. They choose the backend (:func:`.dispatch.choose_backend`) and call the
``diffq_triton::`` custom ops, which run the fused Triton kernels or the lean eager path;
semantics are those of :mod:`.reference` either way.

- :mod:`.reference`: the eager float reference of spec.md (the correctness oracle).
- :mod:`.eager`: the lean eager path (CPU and fallback), equal to the reference.
- :mod:`.custom_ops`: the ``torch.library`` ops, their fakes and autograd.
- :mod:`.dispatch`: the one function that picks Triton or eager.
- :mod:`.bitpack`: level streams, by the Triton kernels or the CPU codec.
"""

from __future__ import annotations

import torch

from . import custom_ops, dispatch

# Largest seed drawn; Philox and torch.Generator both take it.
_SEED_HIGH = 2**31 - 1


@torch.compiler.assume_constant_result
def _backend(w: torch.Tensor) -> str:
    # Under torch.compile the choice is made once, when tracing, and baked into the graph.
    if w.numel() == 0:
        return "eager"
    return dispatch.choose_backend(w)


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

    The seed of ``ξ`` is drawn on ``w``'s device from torch's generator (no host sync), so
    ``torch.manual_seed`` makes a run reproducible and every call draws fresh noise.

    Args:
        w: weight, any shape, float32/bfloat16/float16.
        logits: ``[n_groups]`` float32 bit logits.
        group_size, min_bits, max_bits, param, noise: as in :class:`DiffQuantizer`.

    Returns:
        Tensor of ``w``'s shape and dtype, differentiable in ``w`` and ``logits``.
    """
    seed = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64, device=w.device)
    w_hat, _, _ = custom_ops.pseudo_quantize(
        w, logits, seed, int(group_size), float(min_bits), float(max_bits), param, noise,
        _backend(w),
    )
    return w_hat


def quantized_weight(w: torch.Tensor, bits_int: torch.Tensor, group_size: int) -> torch.Tensor:
    """Eval-time weight: quantized with integer widths ``bits_int`` then dequantized.

    Args:
        w: weight, any shape, floating dtype.
        bits_int: ``[n_groups]`` uint8 widths in ``[1, 15]``.
        group_size: entries per group (0: one group).

    Returns:
        Tensor of ``w``'s shape and dtype, without gradient.
    """
    return custom_ops.fake_quantize(w.detach(), bits_int, int(group_size), _backend(w))
