"""The safetensors container of diffq-triton files, written and read with every check.

Layout (docs/format.md §3): 8-byte little-endian header length, a JSON header padded with
spaces to a multiple of 8, then the payloads back to back. It is written and read here
rather than through the ``safetensors`` package: every field of a hostile file is checked
before anything is allocated, nothing is unpickled, and the library keeps no extra
dependency. The files remain valid safetensors files.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO

import numpy as np
import torch

from ..codec import native
from ..codec.cpu_pool import call_workers, run_calls

# A header larger than this is refused before it is read (a forged length must not make
# the loader allocate); 16 MiB holds the metadata of some 50,000 tensors.
MAX_HEADER = 16 << 20
ALIGN = 8
# Python's JSON parser makes an object of ~60 bytes per list or object, a few bytes of text
# each: a header of empty lists would take 25 times its size in memory. Real headers open
# one list or object per 17 bytes at most (short names): denser text is refused unparsed.
MIN_BYTES_PER_CONTAINER = 12
# Tensors have at most this many dimensions (torch's own limit is 64)...
MAX_DIMS = 64
# ...and no count or offset can reach 2^62 (a file of that size cannot exist).
MAX_INT = 1 << 62

# safetensors' dtype names, for the dtypes both it and torch have (complex128 is not one).
STORED = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "F8_E4M3FNUZ": torch.float8_e4m3fnuz, "F8_E5M2FNUZ": torch.float8_e5m2fnuz,
          "C64": torch.complex64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
          "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
          "BOOL": torch.bool}
ITEMSIZE = {key: dtype.itemsize for key, dtype in STORED.items()}
CODES = {dtype: key for key, dtype in STORED.items()}


Bytes = torch.Tensor | list[torch.Tensor]


def chunks(entries: list[tuple[str, str, list[int], Bytes]], metadata: dict[str, str]
           ) -> list:
    """The file as a list of bytes-like chunks: length, header, then each payload.

    Args:
        entries: ``(key, dtype, shape, payload)`` in file order; ``payload`` a contiguous CPU
            uint8 tensor of the payload's bytes, or a list of them that make the payload
            back to back (``dtype`` one of :data:`STORED`).
        metadata: the ``__metadata__`` strings.
    """
    header: dict = {"__metadata__": metadata}
    offset = 0
    pieces = []
    for key, dtype, shape, raw in entries:
        parts = raw if isinstance(raw, list) else [raw]
        size = sum(part.numel() for part in parts)
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
        pieces += [as_bytes(part) for part in parts if part.numel()]
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % ALIGN)
    return [struct.pack("<Q", len(text)), text] + pieces


@dataclass
class Payload:
    """Where a tensor's bytes lie in the data region, and what the header says of them."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    stop: int


class Container:
    """A checked safetensors container: its header and a view of its data region."""

    def __init__(self, source: str | os.PathLike | BinaryIO | bytes):
        data = read_source(source)
        if len(data) < 8:
            raise ValueError(f"file is {len(data)} bytes long: too short for a header length")
        (length,) = struct.unpack_from("<Q", data, 0)
        if length > min(len(data) - 8, MAX_HEADER) or length < 2:
            raise ValueError(
                f"header length {length} does not fit a file of {len(data)} bytes "
                f"(or exceeds {MAX_HEADER})"
            )
        self.header = parse_json(bytes(data[8 : 8 + length]), "file header")
        if not isinstance(self.header, dict):
            raise ValueError("file header is not a JSON object")
        self.data = torch.frombuffer(data, dtype=torch.uint8)[8 + length :] if len(
            data) > 8 + length else torch.zeros(0, dtype=torch.uint8)
        self.payloads = self._check_payloads()
        self.meta = self.header.get("__metadata__")
        self.deferred: list[tuple[torch.Tensor, object, str, str]] = []

    def _check_payloads(self) -> dict[str, Payload]:
        payloads = {}
        for key, entry in self.header.items():
            if key == "__metadata__":
                continue
            where = f"file entry {key!r}"
            if not isinstance(entry, dict):
                raise ValueError(f"{where} is not an object")
            dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get(
                "data_offsets")
            if not isinstance(dtype, str) or dtype not in STORED:
                raise ValueError(f"{where}: unsupported dtype {dtype!r:.40}")
            shape = shape_list(shape, f"{where} shape")
            offsets = int_list(offsets, f"{where} data_offsets")
            if len(offsets) != 2 or not 0 <= offsets[0] <= offsets[1] <= self.data.numel():
                raise ValueError(f"{where}: data_offsets {offsets} lie outside the data "
                                 f"({self.data.numel()} bytes)")
            nbytes = ITEMSIZE[dtype] * math.prod(shape)
            if nbytes != offsets[1] - offsets[0]:
                raise ValueError(f"{where}: shape {shape} of {dtype} needs {nbytes} bytes, "
                                 f"data_offsets give {offsets[1] - offsets[0]}")
            payloads[key] = Payload(dtype, tuple(shape), offsets[0], offsets[1])
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

    def check_crc(self, data: torch.Tensor, crc: object, name: str, what: str,
                  defer: bool = False) -> None:
        """Compare ``data``'s CRC-32 with ``crc`` now, or at :meth:`verify` with ``defer``."""
        if not isinstance(crc, int) or isinstance(crc, bool):
            raise ValueError(f"tensor {name!r}: {what} checksum is missing or not an integer")
        if defer:
            self.deferred.append((data, crc, name, what))
        elif payload_crc(data) != crc:
            raise ValueError(f"tensor {name!r}: {what} checksum mismatch (file corrupted)")

    def verify(self) -> None:
        """Compare the deferred checksums; raise for the first mismatch in file order."""
        sums = payload_crcs([data for data, *_ in self.deferred])
        for (_, crc, name, what), actual in zip(self.deferred, sums, strict=True):
            if actual != crc:
                raise ValueError(f"tensor {name!r}: {what} checksum mismatch (file corrupted)")
        self.deferred = []


def read_source(source) -> bytearray | np.ndarray:
    """The whole content of a path, a binary file object, bytes, or a 1-D uint8 array."""
    if isinstance(source, np.ndarray):
        if source.dtype != np.uint8 or source.ndim != 1:
            raise TypeError(f"an array source must be 1-D uint8, got {source.dtype} "
                            f"of {source.ndim} dimensions")
        return source
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
    if not callable(getattr(source, "read", None)):
        raise TypeError(f"expected a path, a binary file or bytes, got {type(source).__name__}")
    return bytearray(source.read())


def parse_json(raw: bytes, what: str):
    """``raw`` parsed as strict JSON (no NaN, no repeated keys), or ``ValueError``."""
    if (raw.count(b"[") + raw.count(b"{")) * MIN_BYTES_PER_CONTAINER > len(raw) + 1024:
        raise ValueError(f"{what} nests lists or objects more densely than any real file")

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


def int_list(value, what: str) -> list[int]:
    """``value`` if it is a list of integers in ``[0, 2^62)``, else ``ValueError``."""
    if not isinstance(value, list) or not all(
        isinstance(v, int) and not isinstance(v, bool) and 0 <= v < MAX_INT for v in value
    ):
        shown = f"{value!r:.80}" if not isinstance(value, list) or len(value) < 100 else (
            f"a list of {len(value)} items")
        raise ValueError(f"{what} must be a list of integers in [0, 2^62), got {shown}")
    return value


def shape_list(value, what: str) -> list[int]:
    """``value`` if it is a tensor shape of at most 64 dimensions and 2^62 entries."""
    if isinstance(value, list) and len(value) > MAX_DIMS:
        raise ValueError(f"{what} has {len(value)} dimensions (at most {MAX_DIMS})")
    shape = int_list(value, what)
    if math.prod(shape) >= MAX_INT:
        raise ValueError(f"{what} {shape} holds 2^62 entries or more")
    return shape


def as_bytes(raw: torch.Tensor) -> memoryview:
    return memoryview(raw.numpy()).cast("B")


def payload_crc(raw: Bytes) -> int:
    """CRC-32 (zlib's) of a payload's bytes (of pieces: as if back to back)."""
    crc = 0
    for part in raw if isinstance(raw, list) else [raw]:
        if part.numel():
            flat = part.contiguous().cpu().reshape(-1).view(torch.uint8)
            crc = native.crc32(native.library(), flat, crc)
    return crc


def payload_crcs(raws: list[Bytes]) -> list[int]:
    """CRC-32 of each payload, several at once (zlib releases the GIL on large buffers)."""
    return run_calls([(payload_crc, (raw,)) for raw in raws], call_workers())
