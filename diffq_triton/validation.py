"""Checks of user input, each raising ValueError/TypeError that names the culprit.

Where diffq 0.2.4 refuses the same misuse, the error is also of diffq's type, so that code
written against diffq catches ours: :class:`ArgumentError` where diffq asserts,
:class:`UsageError` where it raises RuntimeError.
"""

from __future__ import annotations

import math
import numbers

import numpy as np
import torch


class ArgumentError(ValueError, AssertionError):
    """A quantizer argument out of range, or a call repeated: a ValueError, and an
    AssertionError as diffq 0.2.4's asserts raise for the same misuse."""


class UsageError(RuntimeError, ValueError):
    """Calls out of order (an optimizer created after the quantizer, a second quantizer on
    a model): a RuntimeError as diffq 0.2.4 raises, and a ValueError as earlier releases of
    this library raised."""


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    """Raise :class:`ArgumentError` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ArgumentError(f"{name} must be one of {choices}, got {value!r}")


def check_number(name: str, value: object, *, low: float, high: float) -> float:
    """Return ``value`` as float after checking it is a real number in ``[low, high]``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    number = _as_float(value)
    if number is None or not (low <= number <= high):
        raise ArgumentError(f"{name} must lie in [{low}, {high}], got {value!s:.40}")
    return number


def _as_float(value: numbers.Real) -> float | None:
    """``float(value)``, or None where it overflows (a huge int): never an OverflowError."""
    try:
        return float(value)
    except OverflowError:
        return None


def check_bit_width(name: str, value: object) -> int:
    """Return ``value`` as int after checking it is a whole number of bits in ``[1, 15]``."""
    number = check_number(name, value, low=1, high=15)
    if number != int(number):
        raise ArgumentError(f"{name} must be a whole number of bits, got {value}")
    return int(number)


def check_group_size(value: object) -> int:
    """``group_size`` must be an int ≥ 0 (0 means one group per tensor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"group_size must be an int, got {type(value).__name__}")
    if value < 0:
        raise ArgumentError(f"group_size must be >= 0 (0: one group per tensor), got {value}")
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


# ----------------------------------------------------------------------------- state values
# What a saved state (a file unpickled with weights_only, or an in-memory dict) may hold. A
# wrong type must give one ValueError naming the field, not whatever torch or Python raises
# deep inside a restore (RuntimeError from bool(tensor), OverflowError from float(10**400)).
_INTEGER_DTYPES = (torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64,
                   torch.uint16, torch.uint32, torch.uint64)
_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def check_state_tensor(what: str, value: object) -> torch.Tensor:
    """``value`` as a plain strided tensor with real storage, else ValueError naming ``what``.

    ``torch.load(weights_only=True)`` rebuilds meta tensors (no data), sparse, quantized and
    nested tensors and registered tensor subclasses: each passes dtype and shape checks but
    fails in the ``copy_`` into a parameter, after other parameters were written.
    """
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{what} must be a tensor, got {type(value).__name__}")
    kind = _unusable_kind(value)
    if kind is not None:
        raise ValueError(f"{what} must be a plain tensor with data, got a {kind} tensor")
    return value


def _unusable_kind(tensor: torch.Tensor) -> str | None:
    """What makes ``tensor`` unusable as a parameter's value, or None for a plain tensor."""
    if type(tensor) not in _PLAIN_TENSORS:
        return type(tensor).__name__
    if tensor.is_meta:
        return "meta"
    if tensor.layout != torch.strided:
        return str(tensor.layout).removeprefix("torch.")
    if tensor.is_quantized:
        return "quantized"
    if tensor.is_nested:
        return "nested"
    return None


def check_integer_tensor(what: str, value: object) -> torch.Tensor:
    """A plain tensor of an integer dtype (not bool): levels and widths are counts of bits."""
    tensor = check_state_tensor(what, value)
    if tensor.dtype not in _INTEGER_DTYPES:
        raise ValueError(f"{what} must be an integer tensor, got {tensor.dtype}")
    return tensor


def check_real(what: str, value: object) -> float:
    """A finite real number (Python, numpy, or a one-entry real tensor) as a float.

    ``bool`` is refused (it is an ``int`` to Python, never a meaningful range or step).
    """
    if isinstance(value, torch.Tensor):
        tensor = check_state_tensor(what, value)
        if tensor.numel() != 1 or tensor.dtype == torch.bool or tensor.is_complex():
            raise ValueError(f"{what} must be a real number, got a {tensor.dtype} tensor of "
                             f"shape {tuple(tensor.shape)}")
        value = tensor.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a real number, got {type(value).__name__}")
    number = _as_float(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"{what} is not a finite number: {value!s:.40}")
    return number


def check_int(what: str, value: object, *, low: int = 0) -> int:
    """An ``int`` (not ``bool``, not a float) of at least ``low``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{what} must be >= {low}, got {value!r:.40}")
    return int(value)


def check_flag(what: str, value: object) -> bool:
    """A bool, or an integer 0 or 1 (the constructors take any truthy value, so a state
    saved with ``float16=1`` must restore); not a tensor (``bool(tensor)`` raises or
    guesses) nor a string (``bool("False")`` is True)."""
    if isinstance(value, np.bool_) or (isinstance(value, numbers.Integral)
                                        and value in (0, 1)):
        return bool(value)
    raise ValueError(f"{what} must be a bool, got {type(value).__name__} {value!r:.40}")
