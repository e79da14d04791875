"""Checks of user input, each raising ValueError/TypeError that names the culprit."""

from __future__ import annotations

import numbers

import torch


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def check_number(name: str, value: object, *, low: float, high: float) -> float:
    """Return ``value`` as float after checking it is a real number in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not (low <= float(value) <= high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return float(value)


def check_bit_width(name: str, value: object) -> int:
    """Return ``value`` as int after checking it is a whole number of bits in ``[1, 15]``."""
    number = check_number(name, value, low=1, high=15)
    if number != int(number):
        raise ValueError(f"{name} must be a whole number of bits, got {value}")
    return int(number)


def check_group_size(value: object) -> int:
    """``group_size`` must be an int ≥ 0 (0 means one group per tensor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"group_size must be an int, got {type(value).__name__}")
    if value < 0:
        raise ValueError(f"group_size must be >= 0 (0: one group per tensor), got {value}")
    return int(value)


def check_float_parameter(name: str, param: torch.Tensor) -> None:
    """Quantized parameters must be floating point."""
    if not param.is_floating_point():
        raise TypeError(
            f"parameter {name!r} has dtype {param.dtype}; only floating point parameters can be "
            "quantized (exclude it with exclude=[...] or raise min_size)"
        )


def check_finite(name: str, tensor: torch.Tensor) -> None:
    """Raise ValueError if ``tensor`` holds NaN or Inf (synchronises with the device)."""
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"parameter {name!r} holds NaN or Inf values; cannot quantize it")
