"""Ops: the math on weights, and the one seam between models and kernels.

The functions here are the operations quantizers and layers call on each weight, or on all
weights of a model at once (``*_many``: a constant number of launches), whatever the
device. They choose the backend (:func:`.dispatch.choose_backend`) and call the
``diffq_triton::`` custom ops, which run the fused Triton kernels or the lean eager path;
semantics are those of :mod:`.reference` either way.

- :mod:`.reference`: the eager float reference of spec.md (the correctness oracle).
- :mod:`.eager`: the lean eager path (CPU and fallback), equal to the reference.
- :mod:`.custom_ops`: the ``torch.library`` ops, their fakes and autograd.
- :mod:`.noise_many`, :mod:`.size_many`: eager-mode autograd of the multi-tensor kernels
  (one node for every weight of a model).
- :mod:`.dispatch`: the one function that picks Triton or eager.
- :mod:`.bitpack`: level streams, by the Triton kernels or the CPU codec.
"""

from __future__ import annotations

from operator import attrgetter

import torch

from . import custom_ops, dispatch
from .noise_many import NoiseMany, SizeToken, apply_noise_many
from .size_many import SizeMany

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


def _stream_seed(seed: torch.Tensor, stream: int) -> torch.Tensor:
    """The eager backend's seed of one weight: a function of the call's seed and the
    weight's stream (a tensor op, no host sync)."""
    return (seed.reshape(1) + stream * 1_000_000_007) % _SEED_HIGH


def _launch_groups(weights: list[torch.Tensor], logits: list[torch.Tensor] | None = None
                   ) -> dict[tuple, list[int]]:
    """Positions of the weights by what one launch can share: device, dtype, non-empty,
    and the logits' dtype (a kernel reads every tensor's logits as one type)."""
    groups: dict[tuple, list[int]] = {}
    for t, w in enumerate(weights):
        logit_dtype = None if logits is None else logits[t].dtype
        groups.setdefault((w.device, w.dtype, w.numel() > 0, logit_dtype), []).append(t)
    return groups


_DEVICE, _DTYPE = attrgetter("device"), attrgetter("dtype")


def _one_launch(weights: list[torch.Tensor], logits: list[torch.Tensor]) -> bool:
    """Whether :func:`_launch_groups` would make one group of these (non-empty) weights:
    one device, one dtype, no empty weight, one dtype of logits. C-level loops (map, set):
    a whole model's call checks this every step."""
    return (len(set(map(_DEVICE, weights))) == 1 and len(set(map(_DTYPE, weights))) == 1
            and all(map(torch.Tensor.numel, weights))
            and len(set(map(_DTYPE, logits))) == 1)


def pseudo_quantize_many(
    weights: list[torch.Tensor],
    logits: list[torch.Tensor],
    *,
    group_size: int,
    min_bits: float,
    max_bits: float,
    param: str,
    noise: str,
    seed: torch.Tensor | None = None,
    streams: list[int] | None = None,
) -> list[torch.Tensor]:
    """:func:`pseudo_quantize` of every weight of a model at once, one seed per call.

    On the Triton backend: 2 launches forward and 2 backward for all weights of one dtype
    and device, one autograd node (:mod:`.noise_many`); under ``torch.compile`` one custom op
    per direction (``diffq_triton::pseudo_quantize_many``); on the eager backend one
    :func:`pseudo_quantize` per weight.

    Args:
        weights: ``T`` weights, any shapes, float32/bfloat16/float16 (several dtypes or
            devices are launched group by group).
        logits: ``[n_groups_t]`` bit logits per weight.
        group_size, min_bits, max_bits, param, noise: as in :class:`DiffQuantizer`.
        seed: ``[1]`` int64 seed of the noise (default: drawn from torch's generator on the
            weights' device, one per dtype and device).
        streams: per weight, the index that keys its noise stream (default: its position).
            With ``seed``, a weight's noise depends only on ``(seed, stream)``: a model
            quantized module by module (sharded or checkpointed models) draws the same noise
            as in one call for all (on the eager backend the per-weight seed is derived from
            both, where the kernels key Philox by them).

    Returns:
        ``T`` noisy weights, each of its weight's shape and dtype, differentiable in the
        weights and the logits (a weight whose output gets no gradient gets none).
    """
    out: list[torch.Tensor | None] = [None] * len(weights)
    config = (int(group_size), float(min_bits), float(max_bits), param, noise)
    for (device, _, non_empty, _), members in _launch_groups(weights, logits).items():
        some_w = [weights[t] for t in members]
        some_l = [logits[t] for t in members]
        backend = _backend(some_w[0])
        call_seed = seed if seed is not None else torch.randint(
            0, _SEED_HIGH, (1,), dtype=torch.int64, device=device)
        some_streams = None if streams is None else [int(streams[t]) for t in members]
        if non_empty and (backend == "triton" or torch.compiler.is_compiling()):
            call_seed = call_seed.to(device)
            if torch.compiler.is_compiling():
                if some_streams:  # the op keys by position: the first stream joins the seed
                    call_seed = _stream_seed(call_seed, some_streams[0])
                noisy = custom_ops.pseudo_quantize_many(some_w, some_l, call_seed, *config,
                                                        backend)[0]
            else:
                noisy = NoiseMany.apply((*config, some_streams), None, call_seed, *some_w,
                                        *some_l)
        else:
            ids = members if some_streams is None else some_streams
            noisy = [custom_ops.pseudo_quantize(
                w, lg, _stream_seed(call_seed, i).to(w.device), *config, _backend(w))[0]
                for w, lg, i in zip(some_w, some_l, ids, strict=True)]
        for t, tensor in zip(members, noisy, strict=True):
            out[t] = tensor
    return out


def quantized_weight_many(weights: list[torch.Tensor], bits_int: list[torch.Tensor],
                          group_size: int) -> list[torch.Tensor]:
    """:func:`quantized_weight` of every weight: on the Triton backend 2 launches for all
    weights of one dtype and device (range partials, quantize), whatever their number.

    Args:
        weights: ``T`` weights, any shapes, floating dtypes.
        bits_int: ``[n_groups_t]`` uint8 widths in ``[1, 15]`` per weight.
        group_size: entries per group, shared (0: one group per weight).

    Returns:
        ``T`` tensors, each of its weight's shape and dtype, without gradient.
    """
    out: list[torch.Tensor | None] = [None] * len(weights)
    for (_, _, non_empty, _), members in _launch_groups(weights).items():
        some_w = [weights[t].detach() for t in members]
        if (non_empty and not torch.compiler.is_compiling()
                and _backend(some_w[0]) == "triton"):
            from ..kernels import quantize as quantize_kernels

            some_w = [w.contiguous() for w in some_w]
            quantized = [torch.empty_like(w) for w in some_w]
            quantize_kernels.fake_quantize_many(
                some_w, [bits_int[t].to(torch.uint8).contiguous() for t in members],
                quantized, int(group_size))
        else:
            quantized = [quantized_weight(w, bits_int[t], group_size)
                         for w, t in zip(some_w, members, strict=True)]
        for t, tensor in zip(members, quantized, strict=True):
            out[t] = tensor
    return out


def diffq_size_bits(weights: list[torch.Tensor], logits: list[torch.Tensor], *,
                    group_size: int, extra_bits: float, min_bits: float, max_bits: float,
                    param: str, exact: bool) -> torch.Tensor | None:
    """Σ of the DiffQ sizes (spec §3) of the weights, in bits, by the multi-tensor kernels:
    3 launches per step (2 forward, 1 backward) whatever the number of tensors.

    Args:
        weights: ``T`` weights (their lengths set the group layout; values unused).
        logits: ``[n_groups_t]`` bit logits per weight, all of one dtype and device.
        group_size, extra_bits, min_bits, max_bits, param: as in :class:`DiffQuantizer`.
        exact: round the widths as real quantization does (no gradient).

    Returns:
        One-entry float32 tensor on the logits' device, differentiable in the logits unless
        ``exact``; None where the kernels do not apply (eager backend, ``torch.compile``,
        logits other than float32, whose widths round in their own dtype, or on several
        devices): compute it with the reference then.
    """
    if (not weights or torch.compiler.is_compiling()
            or len(_launch_groups(logits)) != 1 or logits[0].dtype != torch.float32
            or any(w.numel() == 0 for w in weights) or _backend(weights[0]) != "triton"):
        return None
    config = (int(group_size), float(extra_bits), float(min_bits), float(max_bits), param,
              bool(exact))
    return SizeMany.apply(config, *weights, *logits)


def pseudo_quantize_many_with_size(
    weights: list[torch.Tensor],
    logits: list[torch.Tensor],
    *,
    group_size: int,
    min_bits: float,
    max_bits: float,
    param: str,
    noise: str,
    extra_bits: float,
    seed: torch.Tensor | None = None,
    streams: list[int] | None = None,
    mb_plus: float | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor | None, SizeToken | None]:
    """:func:`pseudo_quantize_many`, and the DiffQ size in bits of the same tensors from the
    same call when the kernels can give it (Triton backend, eager mode, one dtype of weights
    and float32 logits).

    ``seed`` and ``streams`` are those of :func:`pseudo_quantize_many`. The weights and
    logits are a model's parameters (the quantizer's step): the autograd node is made
    without torch's pass for functorch's dead wrappers (:func:`.noise_many.apply_noise_many`).

    With ``mb_plus`` the size comes in MB (2^23 bits) plus ``mb_plus``: a 0-dim tensor, bit
    for bit ``bits.reshape(()) / 2**23 + mb_plus``, which the kernel computes instead of 3
    torch ops and their 3 backward nodes (host time per step).

    Returns:
        ``(noisy weights, size, token)``: ``size`` a one-entry float32 tensor (0-dim with
        ``mb_plus``) whose gradient reaches the logits through the noise's backward (one
        gradient per logit per step), ``token.used`` once that backward ran;
        ``(noisy weights, None, None)`` otherwise.
    """
    if (weights and not torch.compiler.is_compiling() and _one_launch(weights, logits)
            and logits[0].dtype == torch.float32 and _backend(weights[0]) == "triton"):
        config = (int(group_size), float(min_bits), float(max_bits), param, noise)
        token = SizeToken()
        if seed is None:
            seed = torch.randint(0, _SEED_HIGH, (1,), dtype=torch.int64,
                                 device=weights[0].device)
        config = (*config, None if streams is None else [int(i) for i in streams])
        size_config = (float(extra_bits), token, None if mb_plus is None else float(mb_plus))
        *noisy, size = apply_noise_many(config, size_config, seed, *weights, *logits)
        return noisy, size, token
    noisy = pseudo_quantize_many(weights, logits, group_size=group_size, min_bits=min_bits,
                                 max_bits=max_bits, param=param, noise=noise, seed=seed,
                                 streams=streams)
    return noisy, None, None
