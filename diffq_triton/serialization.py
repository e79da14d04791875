"""Save a quantized model to one ``.safetensors`` file and load it back, safely and fast.

This module maps a quantizer's tensors to payloads and metadata (docs/format.md) and back
onto a model; :mod:`diffq_triton.container` reads and writes the safetensors container
itself, and :mod:`diffq_triton.atomic_file` replaces the file on disk.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
import zlib
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from . import atomic_file, bitpack, container, cpu_codec, dispatch, native, reference
from .cpu_pool import cpu_threads
from .state import QuantizedTensor, check_record_range, check_scheme, check_widths

FORMAT = "diffq-triton"
VERSION = 2
META_KEY = "diffq_triton"
# The payload holding every quantized tensor's width and level streams, in record order.
STREAMS = "__streams__"
_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


# ============================================================================ writing
def save_quantized(quantizer, path: str | os.PathLike | BinaryIO) -> None:
    """Write the quantized model held by ``quantizer`` to one ``.safetensors`` file.

    Quantized weights are stored bit-packed (:mod:`diffq_triton.bitpack`) with their
    per-group widths; the other parameters as float16 when the quantizer keeps them so,
    else as float32 (float64 ones as float64); the model's persistent buffers (BatchNorm
    statistics...) as they are, but for complex ones, which safetensors cannot hold (left
    out, with a warning). Every payload and the metadata carry a CRC-32.

    Args:
        quantizer: a :class:`DiffQuantizer`, :class:`UniformQuantizer` or :class:`LSQ`
            (anything with ``export_quantized()`` and ``export_float()``).
        path: file name, or a writable binary file object.
    """
    # Torch on one thread inside, the codec on the cpu_pool threads: torch's OpenMP threads, still
    # spinning after each small op (widths from logits), would take the pool's CPUs
    # (measured: packing half as fast).
    model = getattr(quantizer, "model", None)
    with cpu_threads():
        entries, meta = _encode(quantizer.export_quantized(), quantizer.export_float(),
                                _other_names(model), _buffers_to_save(model))
    chunks = container.chunks(entries, {
        "format": FORMAT, META_KEY: meta, "crc32": str(zlib.crc32(meta.encode())),
    })
    if isinstance(path, (str, os.PathLike)):
        atomic_file.write_atomic(path, chunks)
    else:
        path.writelines(chunks)


def _other_names(model: nn.Module | None) -> dict[str, list[str]]:
    """For each parameter name of ``model``, the other names of the same (tied) parameter."""
    if model is None:
        return {}
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n: [m for m in group if m != n] for group in names.values() for n in group}


def _persistent_buffers(model: nn.Module | None) -> dict[str, torch.Tensor]:
    """The buffers ``model.state_dict()`` holds that a file can store, by full name (every
    name of a shared one); complex buffers are left out (safetensors has no such dtype)."""
    if model is None:
        return {}
    out = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for name, buf in module._buffers.items():
            if buf is not None and name not in module._non_persistent_buffers_set:
                out[f"{module_name}.{name}" if module_name else name] = buf
    return {name: buf for name, buf in out.items() if buf.dtype in container.CODES}


def _buffers_to_save(model: nn.Module | None) -> dict[str, torch.Tensor]:
    """:func:`_persistent_buffers`, with a warning naming those left out."""
    kept = _persistent_buffers(model)
    left_out = [name for name, buf in (model.named_buffers() if model is not None else [])
                if name not in kept and buf is not None and buf.dtype not in container.CODES]
    if left_out:
        warnings.warn(f"buffers of dtypes a file cannot hold are not saved: {left_out[:3]}",
                      RuntimeWarning, stacklevel=3)
    return kept


def _encode(exported: list[QuantizedTensor], float_params: list,
            other_names: dict[str, list[str]], buffers: dict[str, torch.Tensor]
            ) -> tuple[list, str]:
    """Payloads ``(key, dtype, shape, bytes)`` in file order, and the metadata JSON.

    A payload's bytes are a uint8 tensor, or a list of them written back to back (the
    streams of every quantized tensor form one payload, sparing a header entry each).
    """
    entries: list[tuple[str, str, list[int], torch.Tensor | list[torch.Tensor]]] = []
    restored: dict[str, str] = {}
    for name, tensor, as_half in float_params:
        # float64 stays float64: narrowing it would change the model the file restores.
        stored = "F16" if as_half else "F64" if tensor.dtype == torch.float64 else "F32"
        data = tensor.detach().to(container.STORED[stored]).contiguous().cpu()
        entries.append((name, stored, list(tensor.shape), data.reshape(-1).view(torch.uint8)))
        if tensor.dtype != container.STORED[stored]:
            restored[name] = _dtype_name(tensor.dtype)
    buffer_entries = []
    for name, buf in buffers.items():
        if name == STREAMS:
            raise ValueError(f"buffer name {STREAMS!r} is reserved by the file format")
        data = buf.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        buffer_entries.append((name, container.CODES[buf.dtype], list(buf.shape), data))
    # Widest dtype first: from an 8-aligned data start every payload stays aligned. (A
    # stable sort: the floats keep among themselves the order of their checksum list.)
    entries.sort(key=lambda e: -container.ITEMSIZE[e[1]])
    floats: dict = {"crc": [raw for *_, raw in entries]}
    if restored:
        floats["dtype"] = restored
    tied = {name: other_names[name] for name, *_ in entries if other_names.get(name)}
    if tied:
        floats["tied"] = tied
    records, streams = [], []
    stored_names = {qt.name for qt in exported} | {n for qt in exported for n in qt.tied_names}
    for qt in exported:
        # Every other name of the parameter (a module registered under two names is not
        # a tie the quantizer sees), but for names stored by a record of their own.
        aliases = [n for n in other_names.get(qt.name, []) if n not in stored_names]
        record, widths, levels = _encode_quantized(qt, aliases)
        records.append(record)
        if widths is not None:
            record["widths_crc"] = widths
            streams.append(widths)
        record["crc"] = levels
        streams.append(levels)
    entries = sorted(entries + buffer_entries, key=lambda e: -container.ITEMSIZE[e[1]])
    buffer_crcs = {name: raw for name, _, _, raw in buffer_entries}
    if streams:
        entries.append((STREAMS, "U8", [sum(p.numel() for p in streams)], streams))
    # Checksums last, all at once (in parallel): records hold their bytes where they go.
    slots = [(floats["crc"], i) for i in range(len(floats["crc"]))]
    slots += [(buffer_crcs, name) for name in buffer_crcs]
    slots += [(r, k) for r in records for k in ("widths_crc", "crc") if k in r]
    sums = container.payload_crcs([holder[key] for holder, key in slots])
    for (holder, key), crc in zip(slots, sums, strict=True):
        holder[key] = crc
    body = {"version": VERSION, "quantized": records, "float": floats}
    if buffer_crcs:
        body["buffers"] = buffer_crcs
    meta = json.dumps(body, separators=(",", ":"), allow_nan=False)
    return entries, meta


def _encode_quantized(qt: QuantizedTensor, aliases: list[str]
                      ) -> tuple[dict, torch.Tensor | None, torch.Tensor]:
    """A quantized tensor's record (defaults left out, ``aliases`` added to its tied names),
    its width stream (``None`` when every group has the same width) and its level stream."""
    bits = qt.bits.reshape(-1).to(torch.uint8).cpu()
    base = int(bits.min())
    widths, field = bitpack.pack_widths(bits, base)
    record: dict = {"name": qt.name}
    if qt.tied_names or aliases:
        record["tied"] = list(qt.tied_names) + aliases
    record["shape"] = list(qt.shape)
    if qt.dtype != torch.float32:
        record["dtype"] = _dtype_name(qt.dtype)
    if qt.scheme != "minmax":
        record["scheme"] = qt.scheme
    record.update(group_size=qt.group_size, min=_float32_number(qt.mn, qt.name),
                  max=_float32_number(qt.mx, qt.name), min_bits=base, field_bits=field)
    return record, widths.cpu() if field else None, qt.stream().cpu()


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"cannot store parameters of dtype {dtype}")
    return _DTYPE_NAMES[dtype]


def _float32_number(value: float, name: str) -> float:
    """``value`` (a float32) as the double with the shortest text that reads back to it."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"tensor {name!r}: range {value} is not finite; cannot save it")
    # str of a float32 has at most 9 digits, where repr of the double may take 17, and
    # reads back to the same float32 (loaders compute ranges in float32).
    return float(str(np.float32(value)))


# ============================================================================ decoding
@dataclass
class _Plan:
    """One checked record of the file, ready to decode into its parameters."""

    name: str
    params: list[torch.Tensor]  # parameters, or one buffer
    qt: QuantizedTensor | None = None  # levels still packed: ``packed`` holds the stream
    packed: torch.Tensor | None = None
    floats: torch.Tensor | None = None


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
    if not isinstance(dtype, str) or dtype not in _DTYPES:
        raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r:.40}")
    return _DTYPES[dtype]


def _names(value: object, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        raise ValueError(f"tensor {name!r}: field 'tied' must be a list of names")
    return value


def _claim(covered: dict[int, str], name: str, targets: list[nn.Parameter]) -> None:
    """Record that ``name`` gives the value of ``targets``; each parameter gets one."""
    for p in targets:
        if covered.get(id(p)) == name:
            raise ValueError(f"tensor {name!r} is stored twice in the file")
        if id(p) in covered:
            raise ValueError(f"tensor {name!r}: its parameter is also stored as "
                             f"{covered[id(p)]!r}, and one tied parameter cannot take two "
                             "values (saved with detect_bound=False? load into an "
                             "untied model)")
        covered[id(p)] = name


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


def _check_quantized(record: object, params: dict, file: container.Container,
                     covered: dict[int, str], streams: _Streams) -> _Plan:
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
    return _Plan(name, targets, qt, packed=packed)


def _check_floats(floats: object, params: dict, file: container.Container,
                  covered: dict[int, str], buffers: dict) -> list[_Plan]:
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
        plans.append(_Plan(name, targets, floats=_payload_tensor(file, name, crc)))
    return plans


def _check_buffers(buffers: object, model: nn.Module, file: container.Container
                   ) -> list[_Plan]:
    """Plans for the buffer payloads: one for each persistent buffer of ``model``."""
    targets = _persistent_buffers(model)
    plans = []
    for name, crc in buffers.items():
        target = targets.get(name)
        p = file.payloads.get(name)
        if target is None:
            raise ValueError(f"buffer {name!r}: the model has no persistent buffer of that name")
        if p is None or name == STREAMS:
            raise ValueError(f"buffer {name!r}: its payload is missing")
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
        plans.append(_Plan(name, [target], floats=_payload_tensor(file, name, crc)))
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


def _targets(name: str, names: list[str], shape: tuple, params: dict) -> list:
    if len(set(names)) != len(names):
        raise ValueError(f"tensor {name!r}: its tied names repeat a name")
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


def _read_checked(model: nn.Module, source) -> list[_Plan]:
    """Parse and check a file against ``model`` without touching it (all checks, no copy).

    Raises:
        ValueError: naming the tensor and the problem, for any malformed or foreign file.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    data = container.read_source(source)
    try:
        return _check_file(model, data)
    except _MALFORMED as e:
        raise ValueError(f"malformed file ({type(e).__name__}: {e})") from e


def _check_file(model: nn.Module, data: bytearray | np.ndarray) -> list[_Plan]:
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
    params = _model_params(model)
    covered: dict[int, str] = {}
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
    missing = [n for n, p in params.items() if id(p) not in covered]
    if missing:
        raise ValueError(f"the file holds no value for the model's parameter {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    file.verify()
    return plans


def _on_host(plan: _Plan, device: torch.device) -> bool:
    """Whether a quantized record decodes with the CPU codecs (else with the kernels)."""
    return device.type == "cpu" and not dispatch.bitpack_on_triton(plan.packed)


def _decode(plan: _Plan, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of a checked record, on ``device``.

    Args:
        out: a contiguous float32 CPU tensor of the weight's size, written in place when
            the record decodes on the host (:func:`_on_host`).
    """
    if plan.qt is None:
        return plan.floats.to(device)
    qt = plan.qt
    host = _on_host(plan, device)
    lib = native.library() if host and qt.scheme == "minmax" else None
    if lib is not None:
        # One pass from the stream to the weights, into the parameter when given.
        mn = torch.tensor(qt.mn, dtype=torch.float32)
        span = torch.tensor(qt.mx, dtype=torch.float32) - mn
        flat = out.view(-1) if out is not None else None
        weight = native.unpack_dequantize(lib, plan.packed, qt.bits, qt.group_size, qt.numel,
                                          float(mn), float(span), flat)
        return weight.view(qt.shape).to(qt.dtype)
    packed, bits = plan.packed.to(device), qt.bits.to(device)
    levels = bitpack.unpack_levels(packed, bits, qt.group_size, qt.numel)
    if qt.scheme == "lsq":
        levels = levels - (1 << (int(qt.bits[0]) - 1))
    if host:
        return cpu_codec.dequantize_cpu(levels, bits, qt, out).view(qt.shape).to(qt.dtype)
    decoded = QuantizedTensor(qt.name, qt.shape, qt.dtype, qt.scheme, qt.group_size, levels,
                              bits, qt.mn, qt.mx)
    return decoded.dequantize(device)


def load_quantized(model: nn.Module, path: str | os.PathLike | BinaryIO | bytes) -> None:
    """Restore the weights and persistent buffers of a plain ``model`` from a file of
    :func:`save_quantized`.

    No quantizer is needed and nothing is unpickled. Every check (format, version,
    checksums, names, shapes, widths, ranges) runs before the first parameter is written:
    on failure the model is unchanged. Decoding a checked record cannot fail, so float32
    CPU weights are dequantized straight into the parameter. Tied parameters receive the
    same weight. Weights are unpacked and dequantized on each parameter's device.

    Raises:
        ValueError: the file is malformed, corrupted, or does not match the model; the
            message names the tensor and the problem.
    """
    # One torch thread for the many group-sized ops, the cpu_pool threads for the big ones.
    with cpu_threads(), torch.no_grad():
        plans = _read_checked(model, path)
        for plan in plans:
            first = plan.params[0]
            # Straight into a float32 parameter only from a float32 record: a bf16 record
            # must reach every use rounded to bf16, as its tied copies receive it.
            direct = (plan.qt is not None and plan.qt.dtype == torch.float32
                      and _on_host(plan, first.device) and first.dtype == torch.float32
                      and first.is_contiguous())
            value = _decode(plan, first.device, first.data if direct else None)
            for p in plan.params[0 if not direct else 1 :]:
                p.copy_(value.to(p.device))


def file_bytes(quantizer) -> bytes:
    """The bytes :func:`save_quantized` would write (for sizes and tests)."""
    buffer = io.BytesIO()
    save_quantized(quantizer, buffer)
    return buffer.getvalue()
