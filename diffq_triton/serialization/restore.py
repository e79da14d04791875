"""Checking a saved quantized state and rebuilding its quantizer, before the model is written."""

from __future__ import annotations

import torch
from torch import nn

from .. import validation
from ..ops.bitpack import packed_nbytes
from .tensor_record import (
    QuantizedTensor,
    check_levels,
    check_record_range,
    check_scheme,
    check_widths,
)

# The quantizer classes a saved state may name, by class name: each registers itself with
# :func:`register_quantizer` where it is defined (the format layer imports no quantizer).
_QUANTIZERS: dict[str, type] = {}


def register_quantizer(cls: type) -> type:
    """Class decorator: states naming ``cls.__name__`` rebuild with ``cls``."""
    _QUANTIZERS[cls.__name__] = cls
    return cls


# ----------------------------------------------------------------------------- restore checks
def state_lists(state: object) -> tuple[list, list, list]:
    """A state's ``quantized``, ``float16`` and ``others`` lists, checked to be lists."""
    if not isinstance(state, dict):
        raise ValueError(f"a quantized state must be a dict, got {type(state).__name__}")
    lists = []
    for key in ("quantized", "float16", "others"):
        value = state.get(key)
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"state {key!r} must be a list, got {type(value).__name__}")
        lists.append(value)
    if any(not isinstance(entry, dict) for entry in lists[0]):
        raise ValueError(
            "state entries are not diffq_triton's: a state made by diffq 0.2.4 is read with "
            "diffq_triton.load_diffq_state(model, path)"
        )
    return lists[0], lists[1], lists[2]


def converted_float(kind: str, name: str, param: nn.Parameter, value: object
                     ) -> torch.Tensor:
    """``value`` checked and converted to ``param``'s dtype and device, ready to copy.

    Converted here, before anything is written: a tensor ``copy_`` cannot take (meta,
    sparse, complex) would otherwise fail after the quantized weights were written.
    """
    what = f"{kind} tensor for {name!r}"
    value = validation.check_state_tensor(what, value)
    if not value.is_floating_point():
        raise ValueError(f"{what} has dtype {value.dtype}, expected a floating point dtype")
    if value.shape != param.shape:
        raise ValueError(f"{what} has shape {tuple(value.shape)}, the model's is "
                         f"{tuple(param.shape)}")
    return value.to(device=param.device, dtype=param.dtype)


def checked_record(name: str, param: nn.Parameter, entry: dict) -> QuantizedTensor:
    """The state entry of parameter ``name`` as a record, checked as a file's records are
    (any field missing or of the wrong type is a ValueError naming the tensor and the field)."""
    what = f"quantized tensor for {name!r}"
    shape = _checked_shape(what, entry.get("shape"), tuple(param.shape))
    scheme = check_scheme(what, entry.get("scheme"))
    group_size = validation.check_int(f"{what}: group_size", entry.get("group_size"))
    mn, mx = (validation.check_real(f"{what}: {key}", entry.get(key)) for key in ("min", "max"))
    check_record_range(what, scheme, mn, mx)
    numel = param.numel()
    bits = check_widths(what, entry.get("bits"), numel, group_size, scheme)
    stream = entry.get("packed")
    if stream is not None:
        stream, levels = _checked_stream(what, stream, bits, group_size, numel), None
    else:
        levels = _checked_levels(what, entry.get("levels"), bits, group_size, numel, scheme)
    return QuantizedTensor(name, shape, param.dtype, scheme, group_size, levels, bits,
                           mn, mx, stream=stream)


def _checked_shape(what: str, shape: object, expected: tuple) -> tuple:
    """The entry's shape as ints, equal to the model's (``[16.0, 4.0] == [16, 4]`` in Python,
    but a float shape would fail in ``view`` after other parameters were written)."""
    if not isinstance(shape, (list, tuple)):
        raise ValueError(f"{what}: shape must be a list of ints, got {type(shape).__name__}")
    dims = tuple(validation.check_int(f"{what}: shape", d) for d in shape)
    if dims != expected:
        raise ValueError(f"{what} has shape {dims}, the model's is {expected}")
    return dims


def _checked_stream(what: str, stream: object, bits: torch.Tensor, group_size: int,
                    numel: int) -> torch.Tensor:
    """A packed level stream: 1-D uint8 of exactly the bytes its widths need (docs §1)."""
    stream = validation.check_state_tensor(f"{what}: packed stream", stream)
    expected = packed_nbytes(bits, group_size, numel) if numel else 0
    if stream.dtype != torch.uint8 or stream.dim() != 1 or stream.numel() != expected:
        raise ValueError(f"{what}: packed stream must be 1-D uint8 of {expected} bytes, got "
                         f"{stream.dtype} of shape {tuple(stream.shape)}")
    return stream


def _checked_levels(what: str, levels: object, bits: torch.Tensor, group_size: int,
                    numel: int, scheme: str) -> torch.Tensor:
    """Unpacked levels: one per entry (counted before any conversion), each within its
    group's width; then int16, which every checked level fits."""
    levels = validation.check_integer_tensor(f"{what}: levels", levels)
    if levels.numel() != numel:
        raise ValueError(f"{what} holds {levels.numel()} levels, the model's has {numel} "
                         "entries")
    check_levels(what, levels, bits, group_size, scheme)
    return levels.reshape(-1).to(torch.int16)


def write_weight(param: nn.Parameter, weight: QuantizedTensor | torch.Tensor) -> None:
    """Write a checked weight (decoding a record straight into the parameter)."""
    if not isinstance(weight, QuantizedTensor):
        param.copy_(weight)
        return
    target = param.data.view(-1)
    decoded = weight.dequantize(param.device, out=target)
    if decoded.data_ptr() != target.data_ptr():  # the codec was turned off
        param.copy_(decoded)


# ----------------------------------------------------------------------------- rebuilding
def _text(what: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {type(value).__name__}")
    return value


def _suffix(what: str, value: object) -> str:
    # register_parameter raises KeyError for a name holding "." (and for an empty one).
    if not _text(what, value) or "." in value:
        raise ValueError(f"{what} must be a non-empty parameter name suffix without '.', "
                         f"got {value!r:.40}")
    return value


def _patterns(what: str, value: object) -> list:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what} must be a list of strings")
    return list(value)


_real = validation.check_real
_COMMON_KWARGS = {"min_size": _real, "float16": validation.check_flag, "exclude": _patterns,
                  "detect_bound": validation.check_flag}
# The type of each constructor argument a saved state may pass (the constructors check the
# ranges); diffq 0.2.4 uses the same names.
_INIT_KWARGS = {
    "DiffQuantizer": {**_COMMON_KWARGS, "group_size": validation.check_int, "min_bits": _real,
                      "max_bits": _real, "param": _text, "noise": _text, "init_bits": _real,
                      "extra_bits": _real, "suffix": _suffix},
    "UniformQuantizer": {**_COMMON_KWARGS, "bits": _real, "qat": validation.check_flag},
    "LSQ": {**_COMMON_KWARGS, "bits": _real, "suffix": _suffix},
}


def _check_init_kwargs(name: str, kwargs: object) -> None:
    """Raise ValueError unless ``kwargs`` are arguments of quantizer ``name`` of the right
    types: a forged value must not reach a constructor (``bool(tensor)`` raises
    RuntimeError, ``float(10**400)`` OverflowError, a suffix with "." a KeyError)."""
    if not isinstance(kwargs, dict):
        raise ValueError(f"state meta init_kwargs must be a dict, got {type(kwargs).__name__}")
    schema = _INIT_KWARGS[name]
    unknown = [k for k in kwargs if k not in schema]
    if unknown:
        raise ValueError(f"state meta: unknown {name} arguments {sorted(map(str, unknown))}")
    for key, value in kwargs.items():
        schema[key](f"state meta init_kwargs {key!r}", value)


def rebuild_quantizer(model: nn.Module, name: object, kwargs: object):
    """The quantizer a saved state names (``"DiffQuantizer"``, ...), built on ``model``.

    Arguments are checked first (:func:`_check_init_kwargs`); what a constructor still
    raises for a model the state does not fit (a non-float parameter, a name taken) is a
    ValueError, and the parameters it had registered are removed: the model is unchanged.
    """
    if not isinstance(name, str) or name not in _QUANTIZERS:
        raise ValueError(f"unknown quantizer {name!r:.60} in state meta")
    _check_init_kwargs(name, kwargs)
    before = _param_slots(model)
    try:
        return _QUANTIZERS[name](model, **kwargs)
    except Exception as e:
        for module, key in _param_slots(model) - before:
            del module._parameters[key]
        if isinstance(e, (TypeError, KeyError)):
            raise ValueError(f"state meta: cannot rebuild {name} on this model: {e}") from None
        raise


def _param_slots(model: nn.Module) -> set:
    """Every (module, name) holding a parameter: what a failed constructor must not add."""
    return {(m, key) for m in model.modules() for key in m._parameters}


def restore_quantized_state(model: nn.Module, state: dict) -> None:
    """Load a state from ``get_quantized_state()`` into a plain model, no quantizer kept.

    The quantizer named in ``state["meta"]`` is rebuilt with its arguments, restores the
    weights, and is detached.

    Raises:
        ValueError: the state is malformed or does not match ``model``; the model is
            unchanged.
    """
    meta = state.get("meta") if isinstance(state, dict) else None
    if not isinstance(meta, dict) or "klass" not in meta:
        # diffq 0.2.4 asserts here: the error is an AssertionError too.
        raise validation.ArgumentError("state has no 'meta' entry naming its quantizer")
    klass = meta["klass"]
    name = klass if isinstance(klass, str) else getattr(klass, "__name__", klass)
    quantizer = rebuild_quantizer(model, name, meta.get("init_kwargs"))
    try:
        quantizer.restore_quantized_state(state)
    finally:
        quantizer.detach()
