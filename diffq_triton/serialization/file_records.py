"""The records of a file (docs/format.md), checked against a model before it is written.

Every check of docs/format.md §4 that concerns the metadata and the payloads lives here:
:func:`read_checked` turns a file into :class:`Plan` s, one per stored tensor, or raises one
``ValueError`` naming the tensor and the problem; decoding a plan cannot fail after that.
:mod:`.container` checks the container itself.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..ops import bitpack, reference
from . import container
from .tensor_record import QuantizedTensor, check_record_range, check_scheme, check_widths

FORMAT = "diffq-triton"
VERSION = 2
META_KEY = "diffq_triton"
# The payload holding every quantized tensor's width and level streams, in record order.
STREAMS = "__streams__"
# The dtypes a parameter record may name (restored on load).
DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def persistent_buffers(model: nn.Module | None, storable_only: bool = True
                       ) -> dict[str, torch.Tensor]:
    """The buffers ``model.state_dict()`` holds, by full name (every name of a shared one);
    only those of a dtype the format stores (:data:`container.STORED`) unless told."""
    if model is None:
        return {}
    out = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out[f"{module_name}.{name}" if module_name else name] = buf
    return {name: buf for name, buf in out.items()
            if buf.dtype in container.CODES or not storable_only}


@dataclass
class Plan:
    """One checked record of the file, ready to decode into its parameters."""

    name: str
    # Parameters, or one buffer; their names when the file is read without a model.
    params: list[torch.Tensor] | list[str]
    qt: QuantizedTensor | None = None  # levels still packed: ``packed`` holds the stream
    packed: torch.Tensor | None = None
    floats: torch.Tensor | None = None
    buffer: bool = False


def _model_params(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters(remove_duplicate=False))


def _field(record: dict, key: str, kind, name: str):
    value = record.get(key)
    ok = isinstance(value, kind) and not isinstance(value, bool)
    if not ok:
        raise ValueError(f"tensor {name!r}: field {key!r} is missing or has the wrong type")
    return value


def _finite_field(record: dict, key: str, name: str) -> float:
    value = _field(record, key, (int, float), name)
    try:
        value = float(value)  # a JSON integer may have hundreds of digits
    except OverflowError:
        value = math.inf
    if not math.isfinite(value):
        raise ValueError(f"tensor {name!r}: field {key!r} is not finite")
    return value


def _dtype_field(record: dict, name: str) -> torch.dtype:
    return _dtype_named(record.get("dtype", "float32"), name)


def _dtype_named(dtype: object, name: str) -> torch.dtype:
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r:.40}")
    return DTYPES[dtype]


def _names(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"tensor {name!r}: field 'tied' must be a list of names")
    return value


def _claim(covered: dict[int | str, str], name: str, targets: list) -> None:
    """Record that ``name`` gives the value of ``targets``; each parameter gets one."""
    for p in targets:
        # Without a model the targets are names: a name stored twice is caught the same way.
        key = p if isinstance(p, str) else id(p)
        if covered.get(key) == name:
            raise ValueError(f"tensor {name!r} is stored twice in the file")
        if key in covered:
            raise ValueError(f"tensor {name!r}: its parameter is also stored as "
                             f"{covered[key]!r}, and one tied parameter cannot take two "
                             "values (saved with detect_bound=False? load into an "
                             "untied model)")
        covered[key] = name


class _Streams:
    """The streams payload, handed out record by record in file order."""

    def __init__(self, file: container.Container):
        p = file.payloads.get(STREAMS)
        if p is not None and p.dtype != "U8":
            raise ValueError(f"file entry {STREAMS!r} must be U8, got {p.dtype}")
        self.data = file.data[p.start : p.stop] if p is not None else file.data[:0]
        self.position = 0

    def take(self, nbytes: int, name: str, what: str) -> torch.Tensor:
        """The next ``nbytes`` bytes, the ``what`` stream of tensor ``name``."""
        stop = self.position + nbytes
        if stop > self.data.numel():
            raise ValueError(f"tensor {name!r}: its {what} stream needs {nbytes} bytes, the "
                             f"streams payload has {self.data.numel() - self.position} left")
        piece = self.data[self.position : stop]
        self.position = stop
        return piece

    def finish(self) -> None:
        if self.position != self.data.numel():
            raise ValueError(f"streams payload holds {self.data.numel()} bytes, the records "
                             f"use {self.position}")


def _check_quantized(record: object, params: dict | None, file: container.Container,
                     covered: dict[int, str], streams: _Streams) -> Plan:
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise ValueError("a quantized record has no name")
    name = record["name"]
    tied = _names(record.get("tied", []), name)
    shape = tuple(container.shape_list(record.get("shape"), f"tensor {name!r} shape"))
    targets = _targets(name, [name, *tied], shape, params)
    # Before any work sized by the record: a file repeating a record must not cost more.
    _claim(covered, name, targets)
    dtype = _dtype_field(record, name)
    scheme = check_scheme(f"tensor {name!r}", record.get("scheme", "minmax"))
    group_size = _field(record, "group_size", int, name)
    if group_size < 0:
        raise ValueError(f"tensor {name!r}: negative group_size {group_size}")
    mn, mx = (_finite_field(record, k, name) for k in ("min", "max"))
    check_record_range(f"tensor {name!r}", scheme, mn, mx)
    base = _field(record, "min_bits", int, name)
    field = _field(record, "field_bits", int, name)
    if not 1 <= base <= bitpack.MAX_WIDTH or not 0 <= field <= 4:
        raise ValueError(f"tensor {name!r}: widths base {base} / field {field} out of range")
    numel = math.prod(shape)
    n_groups = reference.num_groups(numel, group_size)
    left = streams.data.numel() - streams.position
    if params is None and numel * base > 8 * left:
        # No model bounds the shape: the widths below would be allocated at its size.
        raise ValueError(f"tensor {name!r}: {numel} entries of at least {base} bits do not "
                         f"fit the {left} bytes left in the streams payload")
    if field:
        widths = streams.take((n_groups * field + 7) // 8, name, "widths")
        # Checked now: the levels' length, hence every later record's place, follows from
        # the widths, so a corrupted width must be reported as this tensor's.
        file.check_crc(widths, record.get("widths_crc"), name, "widths")
        bits = bitpack.unpack_widths(widths, field, n_groups, base)
    else:
        bits = torch.full((n_groups,), base, dtype=torch.uint8)
    bits = check_widths(f"tensor {name!r}", bits, numel, group_size, scheme)
    nbytes = bitpack.packed_nbytes(bits, group_size, numel) if numel else 0
    packed = streams.take(nbytes, name, "levels")
    file.check_crc(packed, record.get("crc"), name, "levels", defer=True)
    qt = QuantizedTensor(name, shape, dtype, scheme, group_size, None, bits,
                         float(mn), float(mx), list(tied), stream=packed)
    return Plan(name, targets, qt, packed=packed)


def _check_floats(floats: object, params: dict | None, file: container.Container,
                  covered: dict[int, str], buffers: dict) -> list[Plan]:
    """Plans for the float payloads (every payload but the streams and the buffers), in
    file order."""
    if not isinstance(floats, dict):
        raise ValueError("metadata 'float' is not an object")
    keys = sorted((k for k in file.payloads if k != STREAMS and k not in buffers),
                  key=lambda k: file.payloads[k].start)
    crcs, restored, tied = floats.get("crc"), floats.get("dtype", {}), floats.get("tied", {})
    if not isinstance(crcs, list) or len(crcs) != len(keys):
        raise ValueError(f"metadata lists {len(crcs) if isinstance(crcs, list) else 'no'} "
                         f"float checksums for {len(keys)} float payloads")
    if not isinstance(restored, dict) or not isinstance(tied, dict):
        raise ValueError("metadata 'float' dtype and tied entries must be objects")
    strays = (set(restored) | set(tied)) - set(keys)
    if strays:
        raise ValueError(f"tensor {min(strays)!r}: listed among the float tensors, but the "
                         "file holds no float payload of that name")
    plans = []
    for name, crc in zip(keys, crcs, strict=True):
        p = file.payloads[name]
        if p.dtype not in ("F16", "F32", "F64"):
            raise ValueError(f"tensor {name!r}: float payload of dtype {p.dtype}")
        if name in restored:
            _dtype_named(restored[name], name)
        targets = _targets(name, [name, *_names(tied.get(name, []), name)], p.shape, params)
        _claim(covered, name, targets)
        plans.append(Plan(name, targets, floats=_payload_tensor(file, name, crc)))
    return plans


def _check_buffers(buffers: object, model: nn.Module | None, file: container.Container
                   ) -> list[Plan]:
    """Plans for the buffer payloads: one for each persistent buffer of ``model`` (without
    a model: one for each buffer the metadata lists, its payload checked)."""
    targets = persistent_buffers(model)
    plans = []
    for name, crc in buffers.items():
        target = targets.get(name)
        p = file.payloads.get(name)
        if target is None and model is not None:
            raise ValueError(f"buffer {name!r}: the model has no persistent buffer of that name")
        if p is None or name == STREAMS:
            raise ValueError(f"buffer {name!r}: its payload is missing")
        if target is None:
            plans.append(Plan(name, [name], floats=_payload_tensor(file, name, crc),
                              buffer=True))
            continue
        if tuple(target.shape) != p.shape:
            raise ValueError(f"buffer {name!r}: file shape {p.shape} does not match the "
                             f"model's {tuple(target.shape)}")
        stored = container.STORED[p.dtype]
        # Floats may change precision (a model moved to float16); integers and flags do not
        # become floats, nor the reverse, nor another integer type.
        if stored != target.dtype and not (stored.is_floating_point
                                           and target.dtype.is_floating_point):
            raise ValueError(f"buffer {name!r}: file dtype {p.dtype} does not fit the model's "
                             f"{target.dtype}")
        plans.append(Plan(name, [target], floats=_payload_tensor(file, name, crc),
                          buffer=True))
    missing = [name for name in targets if name not in buffers]
    if missing:
        raise ValueError(f"the file holds no value for the model's buffer {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    return plans


def _payload_tensor(file: container.Container, name: str, crc: object) -> torch.Tensor:
    """Payload ``name`` as a tensor of its dtype and shape (checksum compared later)."""
    p = file.payloads[name]
    data = file.data[p.start : p.stop]
    file.check_crc(data, crc, name, "data", defer=True)
    if data.storage_offset() % container.ITEMSIZE[p.dtype]:
        data = data.clone()  # a file written by another tool may leave payloads unaligned
    return data.view(container.STORED[p.dtype]).view(p.shape)


def _targets(name: str, names: list[str], shape: tuple, params: dict | None) -> list:
    if len(set(names)) != len(names):
        raise ValueError(f"tensor {name!r}: its tied names repeat a name")
    if params is None:  # read without a model: the names stand for the parameters
        return list(names)
    out, ids = [], set()
    for n in names:
        param = params.get(n)
        if param is None:
            raise ValueError(f"tensor {name!r}: the model has no parameter {n!r}")
        if tuple(param.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r}: file shape {tuple(shape)} does not match the "
                             f"model's {tuple(param.shape)} for {n!r}")
        if id(param) not in ids:
            ids.add(id(param))
            out.append(param)
    return out


# What a check written for well-formed values may raise on a value of an unforeseen type or
# size: reported as a malformed file, never as a crash of the loader.
_MALFORMED = (TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError)


def read_checked(model: nn.Module, source) -> list[Plan]:
    """Parse and check a file against ``model`` without touching it (all checks, no copy).

    Raises:
        ValueError: naming the tensor and the problem, for any malformed or foreign file.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    return _checked(model, source)


def read_records(source) -> list[Plan]:
    """Parse and check a file without a model (for inspecting it): every check that needs
    none runs, as :func:`read_checked` runs it: container, format and version, checksums
    of the metadata and of every payload, ranges, widths, stream lengths, names stored
    twice. A plan's ``params`` are then the names its value goes to.

    Raises:
        ValueError: naming the tensor and the problem, for any malformed or foreign file.
    """
    return _checked(None, source)


def _checked(model: nn.Module | None, source) -> list[Plan]:
    data = container.read_source(source)
    try:
        return _check_file(model, data)
    except _MALFORMED as e:
        raise ValueError(f"malformed file ({type(e).__name__}: {e})") from e


def _check_file(model: nn.Module | None, data: bytearray | np.ndarray) -> list[Plan]:
    file = container.Container(data)
    meta = file.meta
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file (no '{FORMAT}' format tag in the metadata)")
    text = meta.get(META_KEY)
    try:
        raw = text.encode() if isinstance(text, str) else None
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON header
        raw = None
    if raw is None or meta.get("crc32") != str(zlib.crc32(raw)):
        raise ValueError("metadata checksum mismatch (file corrupted)")
    body = container.parse_json(raw, "metadata")
    if not isinstance(body, dict):
        raise ValueError("metadata is not a JSON object")
    version = body.get("version")
    if type(version) is not int or version != VERSION:
        raise ValueError(f"unknown format version {version!r:.40} (this library "
                         f"reads version {VERSION})")
    quantized = body.get("quantized")
    if not isinstance(quantized, list):
        raise ValueError("metadata lacks the 'quantized' list")
    params = _model_params(model) if model is not None else None
    covered: dict[int | str, str] = {}
    streams = _Streams(file)
    plans = [_check_quantized(r, params, file, covered, streams) for r in quantized]
    streams.finish()
    buffers = body.get("buffers")
    if buffers is not None and not isinstance(buffers, dict):
        raise ValueError("metadata 'buffers' is not an object")
    plans += _check_floats(body.get("float"), params, file, covered, buffers or {})
    # Files without the entry (none of the model's buffers saved) leave the buffers as
    # they are.
    if buffers is not None:
        plans += _check_buffers(buffers, model, file)
    missing = [n for n, p in (params or {}).items() if id(p) not in covered]
    if missing:
        raise ValueError(f"the file holds no value for the model's parameter {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    file.verify()
    return plans
