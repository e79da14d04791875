"""The quantized form of one tensor, as quantizers export it and files store it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import reference

SCHEMES = ("minmax", "lsq")


def quantize_minmax(
    name: str, w: torch.Tensor, bits: torch.Tensor, group_size: int
) -> QuantizedTensor:
    """Quantize ``w`` (spec §1) with per-group widths into a record named ``name``.

    float32 CPU weights take the chunked CPU codec (same levels as the reference, several
    times faster on large tensors); others the reference.

    Raises:
        ValueError: ``w`` holds NaN or Inf (they show in its range).
    """
    if w.device.type == "cpu" and w.dtype == torch.float32:
        from .cpu_codec import quantize_cpu

        levels, mn, mx = quantize_cpu(w, bits, group_size)
    else:
        levels, mn, mx = reference.quantize(w, bits, group_size)
    mn, mx = float(mn), float(mx)
    if not (math.isfinite(mn) and math.isfinite(mx)):
        raise ValueError(f"parameter {name!r} holds NaN or Inf values; cannot quantize it")
    return QuantizedTensor(name, tuple(w.shape), w.dtype, "minmax", group_size, levels,
                           bits, mn, mx)


@dataclass
class QuantizedTensor:
    """One quantized parameter (counted once even when tied).

    Attributes:
        name: full parameter name of its first use (``"encoder.0.weight"``).
        tied_names: full names of the other uses of the same parameter.
        shape: the parameter's shape.
        dtype: the parameter's dtype (restored on load).
        scheme: ``"minmax"`` (DiffQ, Uniform: ``w ≈ mn + q·(mx - mn)/(2^b - 1)``, ``q ≥ 0``)
            or ``"lsq"`` (``w ≈ q·step`` with signed ``q``, stored offset by ``2^(b-1)``).
        group_size: entries per group (0: one group).
        levels: ``[numel]`` int16 levels (unsigned for minmax; signed for lsq).
        bits: ``[n_groups]`` uint8 widths in ``[1, 15]``.
        mn, mx: float32 range (minmax); ``mn`` holds the step for lsq, ``mx`` is unused (0).
    """

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    scheme: str
    group_size: int
    levels: torch.Tensor
    bits: torch.Tensor
    mn: float
    mx: float
    tied_names: list[str] = field(default_factory=list)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def dequantize(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The float weight this represents, of ``shape`` and ``dtype``, on ``device``."""
        levels = self.levels.to(device) if device is not None else self.levels
        if self.scheme == "lsq":
            out = levels.float() * torch.tensor(self.mn, dtype=torch.float32, device=levels.device)
        else:
            bits = self.bits.to(levels.device)
            mn = torch.tensor(self.mn, dtype=torch.float32, device=levels.device)
            mx = torch.tensor(self.mx, dtype=torch.float32, device=levels.device)
            out = reference.dequantize(levels, bits, self.group_size, mn, mx)
        return out.view(self.shape).to(self.dtype)
