"""Eager PyTorch reference of DiffQ's math: the oracle for every kernel and the CPU path.

Every function here is pure (no module state) and built from differentiable torch ops, so
``torch.autograd.gradcheck`` runs on it in float64. Notation follows the paper (Défossez et
al., TMLR 2022): ``w`` the weights, ``l`` one bit logit per group, ``b`` the bit widths,
``u(b) = 1 / (2^b - 1)`` the quantization step in units of the range ``r = max(w) - min(w)``.

Groups are runs of ``group_size`` consecutive entries of the row-major flattened tensor;
``group_size == 0`` means one group for the whole tensor, and when ``group_size`` does not
divide ``numel`` the last group is shorter.
"""

from __future__ import annotations

import math

import torch

PARAMS = ("bits", "noise")
NOISES = ("gaussian", "uniform")
# Sizes are reported in MB of 2^23 bits (spec §3), as diffq 0.2.4 reports them.
MEGABYTE_BITS = 8 * 2**20


def num_groups(numel: int, group_size: int) -> int:
    """Number of groups of ``group_size`` entries (the last may be shorter) in ``numel``."""
    if group_size == 0 or numel == 0:
        return 1
    return -(-numel // group_size)


def expand_groups(values: torch.Tensor, numel: int, group_size: int) -> torch.Tensor:
    """Repeat one value per group to one value per entry.

    Args:
        values: ``[n_groups]`` tensor, any dtype.
        numel: number of entries of the weight.
        group_size: entries per group (0: one group).

    Returns:
        ``[numel]`` tensor of ``values.dtype``; differentiable in ``values``.
    """
    if group_size == 0 or values.numel() == 1:
        return values.reshape(1).expand(numel)
    n = values.numel()
    return values[:, None].expand(n, group_size).reshape(-1)[:numel]


def bits_from_logits(
    logits: torch.Tensor, min_bits: float, max_bits: float, param: str = "bits"
) -> torch.Tensor:
    """Bit widths from the bit logits (paper eq. 11 and the ``noise`` variant).

    Args:
        logits: ``[n_groups]`` float tensor.
        min_bits, max_bits: the range of widths reachable.
        param: ``"bits"`` (``b = min + σ(l)(max - min)``) or ``"noise"`` (the noise scale is
            interpolated log-linearly between the steps of ``max_bits`` and ``min_bits``).

    Returns:
        ``[n_groups]`` tensor of ``logits.dtype``, differentiable.
    """
    t = torch.sigmoid(logits)
    if param == "noise":
        return torch.log2(1 + 1 / noise_scale_from_logits(logits, min_bits, max_bits))
    return max_bits * t + (1 - t) * min_bits


def noise_scale_from_logits(
    logits: torch.Tensor, min_bits: float, max_bits: float
) -> torch.Tensor:
    """The ``param="noise"`` scale: ``exp(t·ln u(max_bits) + (1-t)·ln u(min_bits))``."""
    t = torch.sigmoid(logits)
    log_min_noise = math.log(1 / (2**max_bits - 1))
    log_max_noise = math.log(1 / (2**min_bits - 1))
    return torch.exp(t * log_min_noise + (1 - t) * log_max_noise)


def initial_fraction(
    init_bits: float, min_bits: float, max_bits: float, param: str = "bits"
) -> float:
    """``σ(l)`` for the logit ``l`` whose width is exactly ``init_bits`` (min < init < max)."""
    if param == "noise":
        log_min_noise = math.log(1 / (2**max_bits - 1))
        log_max_noise = math.log(1 / (2**min_bits - 1))
        t = (math.log(1 / (2**init_bits - 1)) - log_max_noise) / (log_min_noise - log_max_noise)
    else:
        t = (init_bits - min_bits) / (max_bits - min_bits)
    return t


def step_unit(bits: torch.Tensor) -> torch.Tensor:
    """``u(b) = 1 / (2^b - 1)``: the quantization step for ``b`` bits, relative to the range."""
    return 1 / (2**bits - 1)


def weight_range(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tensor ``(min, max)`` as 0-dim tensors of ``w.dtype``; differentiable (ties split)."""
    flat = w.reshape(-1)
    return flat.min(), flat.max()


def draw_noise(
    shape: torch.Size | tuple[int, ...],
    noise: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``ξ``: ``N(0, 1)/2`` for ``"gaussian"``, ``U[-1/2, 1/2)`` for ``"uniform"``."""
    if noise == "gaussian":
        return torch.randn(shape, dtype=dtype, device=device, generator=generator) / 2
    if noise == "uniform":
        return torch.rand(shape, dtype=dtype, device=device, generator=generator) - 0.5
    raise ValueError(f"noise must be one of {NOISES}, got {noise!r}")


def noisy_weight(
    w: torch.Tensor,
    logits: torch.Tensor,
    xi: torch.Tensor,
    group_size: int,
    min_bits: float,
    max_bits: float,
    param: str = "bits",
) -> torch.Tensor:
    """Pseudo-quantized weight ``ŵ = w + r·u(b_s)·ξ`` (paper eq. 6), ``r = max(w) - min(w)``.

    The range is not detached: gradients reach ``w`` through the identity and through ``r``
    (the argmax and argmin entries), and every logit through ``u(b_s)``.

    Args:
        w: weight, any shape, floating dtype.
        logits: ``[n_groups]`` bit logits.
        xi: noise of ``w``'s shape (see :func:`draw_noise`).
        group_size, min_bits, max_bits, param: as in :class:`DiffQuantizer`.

    Returns:
        Tensor of ``w``'s shape and dtype.
    """
    flat = w.reshape(-1)
    mn, mx = weight_range(flat)
    unit = step_unit(bits_from_logits(logits, min_bits, max_bits, param))
    unit = expand_groups(unit.to(w.dtype), flat.numel(), group_size)
    return (flat + (mx - mn) * unit * xi.reshape(-1).to(w.dtype)).view_as(w)


def round_bits(bits: torch.Tensor) -> torch.Tensor:
    """Integer widths used for real quantization: ``round(b).clamp(1, 15)`` as uint8."""
    return bits.detach().round().clamp(1, 15).to(torch.uint8)


def _levels_per_entry(bits_int: torch.Tensor, numel: int, group_size: int) -> torch.Tensor:
    """``2^b - 1`` per entry, as float32 (the largest level of each entry's group)."""
    top = (2 ** bits_int.to(torch.int64)) - 1
    return expand_groups(top, numel, group_size)


def quantize(
    w: torch.Tensor,
    bits_int: torch.Tensor,
    group_size: int,
    mn: torch.Tensor | None = None,
    mx: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-tensor min-max quantization with per-group widths (spec §1).

    The arithmetic is the same sequence of float32 operations as diffq 0.2.4, so the levels
    are identical; a constant tensor (``mx == mn``) gives level 0 everywhere instead of NaN.

    Args:
        w: weight, any shape, floating dtype (computed in float32).
        bits_int: ``[n_groups]`` integer widths in ``[1, 15]``.
        group_size: entries per group (0: one group).
        mn, mx: optional precomputed range (0-dim float32 tensors).

    Returns:
        ``(levels, mn, mx)``: ``levels`` int16 of shape ``[numel]``; ``mn``/``mx`` 0-dim float32.
    """
    flat = w.detach().reshape(-1).float()
    if mn is None or mx is None:
        mn, mx = flat.min(), flat.max()
    scale = mx - mn
    safe_scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    unit = 1 / _levels_per_entry(bits_int, flat.numel(), group_size)
    levels = (((flat - mn) / safe_scale) / unit).round()
    return levels.to(torch.int16), mn.float(), mx.float()


def dequantize(
    levels: torch.Tensor,
    bits_int: torch.Tensor,
    group_size: int,
    mn: torch.Tensor,
    mx: torch.Tensor,
) -> torch.Tensor:
    """Inverse of :func:`quantize`: ``mn + q·u(b)·(mx - mn)``.

    Args:
        levels: ``[numel]`` integer levels.
        bits_int: ``[n_groups]`` integer widths.
        group_size: entries per group (0: one group).
        mn, mx: 0-dim float32 range.

    Returns:
        ``[numel]`` float32 tensor.
    """
    unit = 1 / _levels_per_entry(bits_int, levels.numel(), group_size)
    return levels.float() * unit * (mx - mn) + mn


def fake_quantize(w: torch.Tensor, bits_int: torch.Tensor, group_size: int) -> torch.Tensor:
    """Quantize then dequantize ``w``; returns a tensor of ``w``'s shape and dtype."""
    levels, mn, mx = quantize(w, bits_int, group_size)
    return dequantize(levels, bits_int, group_size, mn, mx).view(w.shape).to(w.dtype)


def bit_width_field(bits: torch.Tensor, min_bits: float) -> torch.Tensor:
    """Bits needed to store one group's width: ``ceil(log2(1 + round(max b) - min_bits))``.

    Where a negative ``extra_bits`` puts widths below ``min_bits``, the field counts from the
    smallest width instead, as files store it (diffq 0.2.4 cannot store such widths).
    Computed on the device (no host synchronisation); never negative.

    Args:
        bits: ``[n_groups]`` widths of one tensor.
        min_bits: the quantizer's ``min_bits``.
    """
    rounded = bits.detach().round()
    base = torch.clamp(rounded.min(), max=min_bits)
    span = (rounded.max() - base).clamp(min=0)
    return torch.ceil(torch.log2(1 + span))


def diffq_tensor_size_bits(
    bits: torch.Tensor, numel: int, group_size: int, min_bits: float
) -> torch.Tensor:
    """Size in bits of one quantized tensor (spec §3), differentiable in ``bits``.

    ``Σ_s len(s)·b_s + 64 (range) + 8 (width field size) + n_groups·field``, where
    ``len(s)`` is each group's true length (a shorter last group is counted exactly).

    Args:
        bits: ``[n_groups]`` widths (``extra_bits`` already added; rounded for exact sizes).
        numel: entries of the tensor.
        group_size: entries per group (0: one group).
        min_bits: the quantizer's ``min_bits``.
    """
    n = num_groups(numel, group_size)
    full = numel if n == 1 else group_size
    last = numel - full * (n - 1)
    payload = full * bits.sum()
    if last != full:  # the shorter last group counts its own length, not group_size
        payload = payload - (full - last) * bits[-1]
    field = bit_width_field(bits, min_bits)
    return payload + 2 * 32 + 8 + field * bits.numel()


def size_layout(numels: list[int], group_size: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What :func:`diffq_sizes_bits` needs of tensors of ``numels`` entries, concatenated.

    Returns:
        ``(lengths, tensor_ids, group_counts)``: float32 ``[Σ n_groups]`` true length of
        every group (a shorter last group counts its own), int64 ``[Σ n_groups]`` the tensor
        of every group, float32 ``[T]`` groups per tensor.
    """
    lengths, ids, counts = [], [], []
    for t, numel in enumerate(numels):
        n = num_groups(numel, group_size)
        full = numel if n == 1 else group_size
        lengths += [full] * (n - 1) + [numel - full * (n - 1)]
        ids += [t] * n
        counts.append(n)
    return (torch.tensor(lengths, dtype=torch.float32, device=device),
            torch.tensor(ids, dtype=torch.int64, device=device),
            torch.tensor(counts, dtype=torch.float32, device=device))


def diffq_sizes_bits(bits: torch.Tensor, layout: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
                     min_bits: float) -> torch.Tensor:
    """Σ over tensors of :func:`diffq_tensor_size_bits`, in a fixed number of operations.

    Args:
        bits: ``[Σ n_groups]`` widths of every group of every tensor, concatenated.
        layout: :func:`size_layout` of the tensors.
        min_bits: the quantizer's ``min_bits``.

    Returns:
        0-dim tensor of ``bits``' dtype, differentiable in ``bits``.
    """
    lengths, ids, counts = layout
    payload = (bits * lengths.to(bits.dtype)).sum()
    rounded = bits.detach().round()
    n_tensors = counts.numel()
    top = rounded.new_full((n_tensors,), float("-inf")).scatter_reduce(0, ids, rounded, "amax")
    low = rounded.new_full((n_tensors,), float("inf")).scatter_reduce(0, ids, rounded, "amin")
    # The width field of each tensor, as bit_width_field computes it.
    span = (top - torch.clamp(low, max=min_bits)).clamp(min=0)
    fields = (torch.ceil(torch.log2(1 + span)) * counts.to(bits.dtype)).sum()
    return payload + n_tensors * (2 * 32 + 8) + fields


def lsq_quantize(
    w: torch.Tensor, step: torch.Tensor, bits: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Learned step size quantization (Esser et al. 2020) with straight-through rounding.

    Args:
        w: weight, any shape.
        step: 0-dim learnable step ``s``.
        bits: width; levels are signed in ``[-2^(bits-1), 2^(bits-1) - 1]``.

    Returns:
        ``(w_q, index)``: ``w_q = round(clamp(w/s))·s`` of ``w``'s shape (gradient of the step
        scaled by ``1/sqrt(d·(2^(bits-1) - 1))``), and the float index before scaling.
    """
    low, high = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    grad_scale = 1 / math.sqrt(w.numel() * high)
    # Forward value of s, gradient of s·grad_scale.
    s = (step - step * grad_scale).detach() + step * grad_scale
    index = (w / s).clamp(low, high)
    index = (index.round() - index).detach() + index
    return index * s, index


def straight_through(w: torch.Tensor, w_q: torch.Tensor) -> torch.Tensor:
    """Value of ``w_q`` with the identity gradient to ``w`` (straight-through estimator)."""
    return w + (w_q - w).detach()
