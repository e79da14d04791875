"""Save a quantized model to one ``.safetensors`` file and load it back, safely and fast.

The container is written and read here (8-byte little-endian header length, JSON header,
raw bytes; see docs/format.md) rather than through the ``safetensors`` package: every
field of a hostile file is checked by this code before anything is allocated, nothing is
unpickled, and the library keeps no extra dependency. The files remain valid safetensors
files: the float parameters load with any safetensors reader under their own names.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import json
import math
import os
import secrets
import struct
import sys
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from . import bitpack, cpu_codec, native, reference
from .bitpack_cpu import call_workers, cpu_threads, run_calls
from .state import SCHEMES, QuantizedTensor

FORMAT = "diffq-triton"
VERSION = 1
META_KEY = "diffq_triton"
# A header larger than this is refused before it is read (a forged length must not make
# the loader allocate); 64 MiB holds the metadata of millions of tensors.
MAX_HEADER = 64 << 20
ALIGN = 8

_STORED = {"F32": torch.float32, "F16": torch.float16, "U8": torch.uint8}
_ITEMSIZE = {"F32": 4, "F16": 2, "U8": 1}
_DTYPES = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}


# ============================================================================ writing
def save_quantized(quantizer, path: str | os.PathLike | BinaryIO) -> None:
    """Write the quantized model held by ``quantizer`` to one ``.safetensors`` file.

    Quantized weights are stored bit-packed (:mod:`diffq_triton.bitpack`) with their
    per-group widths; the other parameters as float16 or float32 as the quantizer keeps
    them. Every payload and the metadata carry a CRC-32.

    Args:
        quantizer: a :class:`DiffQuantizer`, :class:`UniformQuantizer` or :class:`LSQ`
            (anything with ``export_quantized()`` and ``export_float()``).
        path: file name, or a writable binary file object.
    """
    # Torch on one thread inside, the codec on the chunk pool: torch's OpenMP threads, still
    # spinning after each small op (widths from logits), would take the pool's CPUs
    # (measured: packing half as fast).
    with cpu_threads():
        entries, meta = _encode(quantizer.export_quantized(), quantizer.export_float())
    header: dict = {"__metadata__": {
        "format": FORMAT, META_KEY: meta, "crc32": str(zlib.crc32(meta.encode())),
    }}
    offset = 0
    for key, dtype, shape, raw in entries:
        header[key] = {"dtype": dtype, "shape": shape,
                       "data_offsets": [offset, offset + raw.numel()]}
        offset += raw.numel()
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    chunks = [struct.pack("<Q", len(text)), text] + [_as_bytes(raw) for *_, raw in entries]
    if isinstance(path, (str, os.PathLike)):
        _write_atomic(path, chunks)
    else:
        path.writelines(chunks)


def _write_atomic(path: str | os.PathLike, chunks: list) -> None:
    """Write a new file next to ``path`` and rename it over ``path``.

    A save that fails half way (full disk, interrupt) leaves the previous file intact, and
    a reader never sees a partial file.
    """
    path = os.fspath(path)
    folder, base = os.path.split(path)
    partial = os.path.join(folder, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.partial")
    # os.open with 0o666 lets the umask set the permissions, as open() would.
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            f.writelines(chunks)
        _replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise


def _encode(exported: list[QuantizedTensor], float_params: list) -> tuple[list, str]:
    """Payloads ``(key, dtype, shape, bytes)`` in file order, and the metadata JSON."""
    entries: list[tuple[str, str, list[int], torch.Tensor]] = []
    # Float payloads first: with an 8-aligned data start they stay aligned for their dtype.
    floats = []
    for name, tensor, as_half in float_params:
        stored = "F16" if as_half else "F32"
        data = tensor.detach().to(_STORED[stored]).contiguous().cpu()
        raw = data.reshape(-1).view(torch.uint8)
        entries.append((name, stored, list(tensor.shape), raw))
        floats.append({"name": name, "dtype": _dtype_name(tensor.dtype), "crc": raw})
    entries.sort(key=lambda e: e[1] != "F32")
    quantized = [_encode_quantized(qt, entries) for qt in exported]
    # Records hold their payloads where the checksums go; all are summed at once.
    slots = [(r, k) for r in floats + quantized for k in ("crc", "widths_crc") if k in r]
    for (record, key), crc in zip(slots, _crcs([r[k] for r, k in slots]), strict=True):
        record[key] = crc
    meta = json.dumps({"version": VERSION, "quantized": quantized, "float": floats},
                      separators=(",", ":"), allow_nan=False)
    return entries, meta


def _encode_quantized(qt: QuantizedTensor, entries: list) -> dict:
    bits = qt.bits.reshape(-1).to(torch.uint8).cpu()
    base = int(bits.min())
    widths, field = bitpack.pack_widths(bits, base)
    packed = qt.stream().cpu()
    record = {
        "name": qt.name, "tied": list(qt.tied_names), "shape": list(qt.shape),
        "dtype": _dtype_name(qt.dtype), "scheme": qt.scheme, "group_size": qt.group_size,
        "min": _finite(qt.mn, qt.name), "max": _finite(qt.mx, qt.name),
        "min_bits": base, "field_bits": field, "crc": packed,
    }
    entries.append((f"{qt.name}:levels", "U8", [packed.numel()], packed))
    if field:
        widths = widths.cpu()
        entries.append((f"{qt.name}:widths", "U8", [widths.numel()], widths))
        record["widths_crc"] = widths
    return record


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPE_NAMES:
        raise TypeError(f"cannot store parameters of dtype {dtype}")
    return _DTYPE_NAMES[dtype]


def _finite(value: float, name: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"tensor {name!r}: range {value} is not finite; cannot save it")
    return value


def _as_bytes(raw: torch.Tensor) -> memoryview:
    return memoryview(raw.numpy()).cast("B")


def _crc(raw: torch.Tensor) -> int:
    """CRC-32 (zlib's) of a payload's bytes."""
    if not raw.numel():
        return 0
    return native.crc32(native.library(), raw.contiguous().cpu().reshape(-1).view(torch.uint8))


def _crcs(raws: list[torch.Tensor]) -> list[int]:
    """CRC-32 of each payload, several at once (zlib releases the GIL on large buffers)."""
    return run_calls([(_crc, (raw,)) for raw in raws], call_workers())


def _renameat2() -> Callable | None:
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2() if sys.platform.startswith("linux") else None
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _replace(partial: str, path: str) -> None:
    """``os.replace(partial, path)``, by an atomic swap and an unlink where Linux allows.

    Renaming over an existing file makes ext4 write the new file's data out at once (its
    ``auto_da_alloc`` guard), which doubled the time of a 20 MB save; swapping the two
    names and unlinking the old file is just as atomic for readers and costs no flush.
    """
    # Only over a regular file: an exchange would also swap a directory (contents and all)
    # into the partial name and succeed, where rename(2) refuses a directory.
    if _RENAMEAT2 is not None and os.path.isfile(path):
        if _RENAMEAT2(_AT_FDCWD, os.fsencode(partial), _AT_FDCWD, os.fsencode(path),
                      _RENAME_EXCHANGE) == 0:
            with contextlib.suppress(OSError):  # the save itself is done
                os.unlink(partial)  # now the previous file
            return
    os.replace(partial, path)


# ============================================================================ reading
@dataclass
class _Payload:
    """Where a tensor's bytes lie in the data region, and what the header says of them."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


class _File:
    """A checked safetensors container: its header and a view of its data region."""

    def __init__(self, source: str | os.PathLike | BinaryIO | bytes):
        data = _read_all(source)
        if len(data) < 8:
            raise ValueError(f"file is {len(data)} bytes long: too short for a header length")
        (length,) = struct.unpack_from("<Q", data, 0)
        if length > min(len(data) - 8, MAX_HEADER) or length < 2:
            raise ValueError(
                f"header length {length} does not fit a file of {len(data)} bytes "
                f"(or exceeds {MAX_HEADER})"
            )
        self.header = _parse_json(bytes(data[8 : 8 + length]), "file header")
        if not isinstance(self.header, dict):
            raise ValueError("file header is not a JSON object")
        self.data = torch.frombuffer(data, dtype=torch.uint8)[8 + length :] if len(
            data) > 8 + length else torch.zeros(0, dtype=torch.uint8)
        self.payloads = self._check_payloads()
        self.meta = self.header.get("__metadata__")
        self.deferred: list[tuple[torch.Tensor, object, str, str]] = []

    def _check_payloads(self) -> dict[str, _Payload]:
        payloads = {}
        for key, entry in self.header.items():
            if key == "__metadata__":
                continue
            where = f"file entry {key!r}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where} is not an object")
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get(
                "data_offsets")
            if dtype not in _STORED:
                raise ValueError(f"{where}: unsupported dtype {dtype!r}")
            shape = _int_list(shape, f"{where} shape")
            offsets = _int_list(offsets, f"{where} data_offsets")
            if len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1] <= self.data.numel():
                raise ValueError(f"{where}: data_offsets {offsets} lie outside the data "
                                 f"({self.data.numel()} bytes)")
            nbytes = _ITEMSIZE[dtype] * math.prod(shape)
            if nbytes != offsets[1] - offsets[0]:
                raise ValueError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, "
                                 f"data_offsets give {offsets[1] - offsets[0]}")
            payloads[key] = _Payload(dtype, tuple(shape), offsets[0], offsets[1])
        position = 0
        for key, p in sorted(payloads.items(), key=lambda kv: (kv[1].start, kv[1].stop)):
            if p.start != position:
                raise ValueError(f"file entry {key!r}: data starts at {p.start}, expected "
                                 f"{position} (payloads must tile the data without gaps)")
            position = p.stop
        if position != self.data.numel():
            raise ValueError(f"data region holds {self.data.numel()} bytes, payloads cover "
                             f"{position}")
        return payloads

    def raw(self, key: str, name: str, what: str, nbytes: int, crc: object,
            defer: bool = False) -> torch.Tensor:
        """The checked bytes of payload ``key``: present, U8 of ``nbytes``, CRC-32 ``crc``.

        With ``defer`` the checksum is compared by :meth:`verify` (with the others, in
        parallel); the bytes must not be used before.
        """
        p = self.payloads.get(key)
        if p is None:
            raise ValueError(f"tensor {name!r}: {what} payload {key!r} is missing")
        if p.dtype != "U8" or p.shape != (nbytes,):
            raise ValueError(f"tensor {name!r}: {what} payload holds {p.stop - p.start} "
                             f"bytes ({p.dtype}), expected {nbytes}")
        data = self.data[p.start : p.stop]
        self.check_crc(data, crc, name, what, defer)
        return data

    def check_crc(self, data: torch.Tensor, crc: object, name: str, what: str,
                  defer: bool = False) -> None:
        """Compare ``data``'s CRC-32 with ``crc`` now, or at :meth:`verify` with ``defer``."""
        if not isinstance(crc, int) or isinstance(crc, bool):
            raise ValueError(f"tensor {name!r}: {what} checksum is missing or not an integer")
        if defer:
            self.deferred.append((data, crc, name, what))
        elif _crc(data) != crc:
            raise ValueError(f"tensor {name!r}: {what} checksum mismatch (file corrupted)")

    def verify(self) -> None:
        """Compare the deferred checksums; raise for the first mismatch in file order."""
        sums = _crcs([data for data, *_ in self.deferred])
        for (_, crc, name, what), actual in zip(self.deferred, sums, strict=True):
            if actual != crc:
                raise ValueError(f"tensor {name!r}: {what} checksum mismatch (file corrupted)")
        self.deferred = []


def _read_all(source) -> bytearray | bytes:
    if isinstance(source, bytearray):
        return source
    if isinstance(source, bytes):
        return bytearray(source)
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            # numpy's allocator reuses mapped memory where a fresh bytearray would be
            # zeroed and faulted in page by page: a third of the read time at 20 MB.
            buf = np.empty(size, dtype=np.uint8)
            if f.readinto(memoryview(buf)) != size:
                raise ValueError("file changed size while being read")
            return buf
    return bytearray(source.read())


def _parse_json(raw: bytes, what: str):
    def refuse_constant(token: str):
        raise ValueError(f"{what} holds {token}, which is not a JSON number")

    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError(f"{what} repeats a key")
        return dict(pairs)

    try:
        return json.loads(raw.decode("utf-8"), parse_constant=refuse_constant,
                          object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{what} is not valid JSON: {type(e).__name__}") from None


def _int_list(value, what: str) -> list[int]:
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
    ):
        raise ValueError(f"{what} must be a list of non-negative integers, got {value!r:.80}")
    return value


# ============================================================================ decoding
@dataclass
class _Plan:
    """One checked record of the file, ready to decode into its parameters."""

    name: str
    params: list[nn.Parameter]
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


def _check_quantized(record: object, params: dict, file: _File) -> _Plan:
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise ValueError("a quantized record has no name")
    name = record["name"]
    tied = _field(record, "tied", list, name)
    if not all(isinstance(t, str) for t in tied):
        raise ValueError(f"tensor {name!r}: tied names must be strings")
    shape = tuple(_int_list(record.get("shape"), f"tensor {name!r} shape"))
    targets = _targets(name, [name, *tied], shape, params)
    dtype = _DTYPES.get(record.get("dtype"))
    if dtype is None:
        raise ValueError(f"tensor {name!r}: unknown dtype {record.get('dtype')!r}")
    scheme = record.get("scheme")
    if scheme not in SCHEMES:
        raise ValueError(f"tensor {name!r}: unknown scheme {scheme!r}")
    group_size = _field(record, "group_size", int, name)
    if group_size < 0:
        raise ValueError(f"tensor {name!r}: negative group_size {group_size}")
    mn, mx = (_field(record, k, (int, float), name) for k in ("min", "max"))
    if not (math.isfinite(mn) and math.isfinite(mx)):
        raise ValueError(f"tensor {name!r}: range ({mn}, {mx}) is not finite")
    # Weights are computed in float32: a range finite as a double may still overflow there.
    low, high = torch.tensor([mn, mx], dtype=torch.float32)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))
            and math.isfinite(float(high - low))):
        raise ValueError(f"tensor {name!r}: range ({mn}, {mx}) overflows float32")
    if scheme == "minmax" and mn > mx:
        raise ValueError(f"tensor {name!r}: range min {mn} exceeds max {mx}")
    base = _field(record, "min_bits", int, name)
    field = _field(record, "field_bits", int, name)
    if not 1 <= base <= bitpack.MAX_WIDTH or not 0 <= field <= 4:
        raise ValueError(f"tensor {name!r}: widths base {base} / field {field} out of range")
    numel = math.prod(shape)
    n_groups = reference.num_groups(numel, group_size)
    if field:
        raw = file.raw(f"{name}:widths", name, "widths", (n_groups * field + 7) // 8,
                       record.get("widths_crc"))
        bits = bitpack.unpack_widths(raw, field, n_groups, base)
    else:
        bits = torch.full((n_groups,), base, dtype=torch.uint8)
    if int(bits.max()) > bitpack.MAX_WIDTH:
        raise ValueError(f"tensor {name!r}: a group width exceeds {bitpack.MAX_WIDTH} bits")
    if scheme == "lsq" and n_groups != 1:
        raise ValueError(f"tensor {name!r}: lsq tensors have one group, got {n_groups}")
    nbytes = bitpack.packed_nbytes(bits, group_size, numel) if numel else 0
    packed = file.raw(f"{name}:levels", name, "levels", nbytes, record.get("crc"), defer=True)
    empty = torch.zeros(0, dtype=torch.int16)
    qt = QuantizedTensor(name, shape, dtype, scheme, group_size, empty, bits,
                         float(mn), float(mx), list(tied))
    return _Plan(name, targets, qt, packed=packed)


def _check_float(record: object, params: dict, file: _File) -> _Plan:
    if not isinstance(record, dict) or not isinstance(record.get("name"), str):
        raise ValueError("a float record has no name")
    name = record["name"]
    dtype = _DTYPES.get(record.get("dtype"))
    if dtype is None:
        raise ValueError(f"tensor {name!r}: unknown dtype {record.get('dtype')!r}")
    p = file.payloads.get(name)
    if p is None or p.dtype not in ("F16", "F32"):
        raise ValueError(f"tensor {name!r}: float payload missing or not F16/F32")
    targets = _targets(name, [name], p.shape, params)
    data = file.data[p.start : p.stop]
    file.check_crc(data, record.get("crc"), name, "data", defer=True)
    if data.storage_offset() % _ITEMSIZE[p.dtype]:
        data = data.clone()  # a file written by another tool may leave floats unaligned
    return _Plan(name, targets, floats=data.view(_STORED[p.dtype]).view(p.shape))


def _targets(name: str, names: Iterable[str], shape: tuple, params: dict) -> list:
    out = []
    for n in names:
        param = params.get(n)
        if param is None:
            raise ValueError(f"tensor {name!r}: the model has no parameter {n!r}")
        if tuple(param.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r}: file shape {tuple(shape)} does not match the "
                             f"model's {tuple(param.shape)} for {n!r}")
        if all(param is not p for p in out):
            out.append(param)
    return out


def _read_checked(model: nn.Module, source) -> list[_Plan]:
    """Parse and check a file against ``model`` without touching it (all checks, no copy).

    Raises:
        ValueError: naming the tensor and the problem, for any malformed or foreign file.
    """
    file = _File(source)
    meta = file.meta
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"not a {FORMAT} file (no '{FORMAT}' format tag in the metadata)")
    text = meta.get(META_KEY)
    if not isinstance(text, str) or meta.get("crc32") != str(zlib.crc32(text.encode())):
        raise ValueError("metadata checksum mismatch (file corrupted)")
    body = _parse_json(text.encode(), "metadata")
    if not isinstance(body, dict):
        raise ValueError("metadata is not a JSON object")
    if body.get("version") != VERSION:
        raise ValueError(f"unknown format version {body.get('version')!r} (this library "
                         f"reads version {VERSION})")
    quantized, floats = body.get("quantized"), body.get("float")
    if not isinstance(quantized, list) or not isinstance(floats, list):
        raise ValueError("metadata lacks the 'quantized' and 'float' lists")
    params = _model_params(model)
    plans = [_check_quantized(r, params, file) for r in quantized]
    plans += [_check_float(r, params, file) for r in floats]
    covered: dict[int, str] = {}
    for plan in plans:
        for p in plan.params:
            if id(p) in covered:
                raise ValueError(f"tensor {plan.name!r}: its parameter is also stored as "
                                 f"{covered[id(p)]!r}")
            covered[id(p)] = plan.name
    missing = [n for n, p in params.items() if id(p) not in covered]
    if missing:
        raise ValueError(f"the file holds no value for the model's parameter {missing[0]!r}"
                         + (f" and {len(missing) - 1} more" if len(missing) > 1 else ""))
    file.verify()
    return plans


def _decode(plan: _Plan, device: torch.device, out: torch.Tensor | None = None) -> torch.Tensor:
    """The weight of a checked record, on ``device`` (written into ``out`` when given)."""
    if plan.qt is None:
        return plan.floats.to(device)
    qt = plan.qt
    lib = native.library() if device.type == "cpu" and qt.scheme == "minmax" else None
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
    if device.type == "cpu":
        return cpu_codec.dequantize_cpu(levels, bits, qt, out).view(qt.shape).to(qt.dtype)
    decoded = QuantizedTensor(qt.name, qt.shape, qt.dtype, qt.scheme, qt.group_size, levels,
                              bits, qt.mn, qt.mx)
    return decoded.dequantize(device)


def load_quantized(model: nn.Module, path: str | os.PathLike | BinaryIO | bytes) -> None:
    """Restore the weights of a plain ``model`` from a file of :func:`save_quantized`.

    No quantizer is needed and nothing is unpickled. Every check (format, version,
    checksums, names, shapes, widths, ranges) runs before the first parameter is written:
    on failure the model is unchanged. Decoding a checked record cannot fail, so float32
    CPU weights are dequantized straight into the parameter. Tied parameters receive the
    same weight. Weights are unpacked and dequantized on each parameter's device.

    Raises:
        ValueError: the file is malformed, corrupted, or does not match the model; the
            message names the tensor and the problem.
    """
    # One torch thread for the many group-sized ops, the chunk pool for the big ones.
    with cpu_threads(), torch.no_grad():
        plans = _read_checked(model, path)
        for plan in plans:
            first = plan.params[0]
            direct = (plan.qt is not None and first.device.type == "cpu"
                      and first.dtype == torch.float32 and first.is_contiguous())
            value = _decode(plan, first.device, first.data if direct else None)
            for p in plan.params[0 if not direct else 1 :]:
                p.copy_(value.to(p.device))


def file_bytes(quantizer) -> bytes:
    """The bytes :func:`save_quantized` would write (for sizes and tests)."""
    buffer = io.BytesIO()
    save_quantized(quantizer, buffer)
    return buffer.getvalue()
