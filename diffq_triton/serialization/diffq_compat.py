"""Migration: load a quantized state saved by diffq 0.2.4, without diffq and without pickle code.

diffq users save ``torch.save(quantizer.get_quantized_state(packed, torch_pack))``. That
pickle names diffq's quantizer class in ``state["meta"]["klass"]``; it is loaded here with
``torch.load(weights_only=True)``, whose restricted unpickler rebuilds tensors and plain
containers only, plus three inert stand-ins registered under diffq's class paths: anything
else in the file is refused. Before that, the zip archive itself is checked (stored
entries within the file's size, as torch.save writes them), so that reading it takes memory
in proportion to the file. The levels are then unpacked from either of diffq's bit layouts
(described in docs/format.md), checked as this library's records are, and restored with its
quantizer; nothing is written to the model before every value is checked.
"""

from __future__ import annotations

import contextlib
import math
import os
import zipfile
from typing import BinaryIO

import torch
from torch import nn

from .. import validation
from .restore import rebuild_quantizer
from .tensor_record import check_levels, check_record_range, check_widths

# diffq 0.2.4 class paths -> this library's quantizer of the same name.
_CLASS_PATHS = {
    "diffq.diffq.DiffQuantizer": "DiffQuantizer",
    "diffq.uniform.UniformQuantizer": "UniformQuantizer",
    "diffq.lsq.LSQ": "LSQ",
}
_STUBS = {path: type(path.rsplit(".", 1)[1], (), {"__module__": path.rsplit(".", 1)[0]})
          for path in _CLASS_PATHS}
# Cython bitpack: int64 words [blocks, nbits, 32]; 64 words' bit k hold entries k·32 + j.
_CYTHON_BLOCK = 64 * 32
_TORCH_PACK_BITS = {torch.uint8: 8, torch.int16: 16, torch.int32: 32, torch.int64: 64}
# Bound the temporaries of the bit-plane unpacking to ~64 MB.
_PLANE_CHUNK = 1 << 20
# Bytes read at a time when checking the CRC-32 of an archive's entries.
_CRC_CHUNK = 1 << 20


def load_diffq_state(model: nn.Module, path: str | os.PathLike | BinaryIO) -> None:
    """Restore ``model``'s weights from a diffq 0.2.4 quantized state file.

    Reads ``torch.save(quantizer.get_quantized_state(packed=..., torch_pack=...))`` files
    of ``DiffQuantizer``, ``UniformQuantizer`` and ``LSQ``: packed with diffq's Cython
    bitpack or its ``torch_pack`` layout, or not packed. Builds the same quantizer of this
    library on ``model`` (same arguments, hence the same parameters in the same order),
    restores the weights, and detaches it: the model is left plain.

    Args:
        model: the architecture the state was saved from.
        path: file name or binary file object.

    Raises:
        ValueError: the file is not a diffq state, holds anything besides tensors, plain
            containers and diffq's class names, or does not match the model; the model is
            then unchanged.
    """
    state = _load(path)
    meta = state["meta"]
    klass = meta["klass"]
    kwargs = meta["init_kwargs"]
    quantizer = rebuild_quantizer(model, klass, kwargs)
    try:
        firsts = list(quantizer._first_uses())
        if len(firsts) != len(state["quantized"]):
            raise ValueError(f"diffq state holds {len(state['quantized'])} quantized tensors, "
                             f"the model has {len(firsts)} (different model or min_size?)")
        entries = [
            _decode(klass, kwargs, meta, record.full_name, tuple(record.param.shape), entry)
            for record, entry in zip(firsts, state["quantized"], strict=True)
        ]
        converted = {
            "quantized": entries,
            "float16": state["float16"],
            "others": state["others"],
            "meta": {"klass": klass, "init_kwargs": kwargs, "packed": False},
        }
        quantizer.restore_quantized_state(converted)
    finally:
        quantizer.detach()


# ----------------------------------------------------------------------------- loading
def _load(path) -> dict:
    _check_archive(path)
    stubs = [(stub, full) for full, stub in _STUBS.items()]
    try:
        with torch.serialization.safe_globals(stubs):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to parse means "not a state file"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"not a loadable diffq state (only tensors, plain containers and "
                         f"diffq's quantizer classes are accepted): {first[:300]}") from None
    if not isinstance(state, dict) or not {"quantized", "float16", "others", "meta"} <= set(
            state):
        raise ValueError("diffq state must be a dict with quantized, float16, others, meta")
    meta = state["meta"]
    if not isinstance(meta, dict) or not isinstance(meta.get("init_kwargs"), dict):
        raise ValueError("diffq state meta lacks init_kwargs")
    stub = meta.get("klass")
    # By identity: a forged klass may be unhashable (a list), or equal to anything.
    paths = [path for path, s in _STUBS.items() if s is stub]
    if not paths:
        raise ValueError(f"diffq state names an unknown quantizer class {stub!r:.60}")
    for key in ("packed", "torch_pack"):
        validation.check_flag(f"diffq state meta {key!r}", meta.get(key, False))
    for key in ("quantized", "float16", "others"):
        if not isinstance(state[key], list):
            raise ValueError(f"diffq state {key!r} must be a list")
    for key in ("float16", "others"):
        for i, t in enumerate(state[key]):
            t = validation.check_state_tensor(f"diffq state {key!r} entry {i}", t)
            if not t.is_floating_point():
                raise ValueError(f"diffq state {key!r} entry {i} is not a float tensor")
    meta = dict(meta, klass=_CLASS_PATHS[paths[0]])
    return dict(state, meta=meta)


def _check_archive(path) -> None:
    """Refuse a file whose reading by ``torch.load`` could take memory out of proportion.

    ``torch.save`` writes a zip of stored (uncompressed) entries, and torch checks each
    storage against its entry's size: so stored entries summing to at most the file's size
    bound what loading allocates. A compressed entry could inflate a thousandfold (a zip
    bomb), overlapping entries could repeat the same bytes. Legacy (pre-1.6, non-zip) files
    are refused: torch allocates each of their storages at the size the pickle declares,
    before comparing it with the data that follows. Each entry's CRC-32 is checked too
    (torch.load does not), so that a corrupted file is refused instead of loading wrong
    weights.
    """
    opened = isinstance(path, (str, os.PathLike))
    try:
        with open(path, "rb") if opened else contextlib.nullcontext(path) as f:
            start = f.tell()
            try:
                problem = _zip_problem(f, start)
            finally:
                f.seek(start)
    except Exception as e:  # noqa: BLE001 - any failure to parse means "not a state file"
        problem = f"unreadable zip archive ({str(e)[:200] or type(e).__name__})"
    if problem is not None:
        raise ValueError(f"not a loadable diffq state: {problem}")


def _zip_problem(f: BinaryIO, start: int) -> str | None:
    """Why the zip archive at ``start`` in ``f`` is not one torch.save writes, or None."""
    if f.read(4) != b"PK\x03\x04":  # how torch.load tells a zip archive
        return "not a zip archive (a legacy torch.save file? re-save it with torch >= 1.6)"
    size = f.seek(0, os.SEEK_END) - start
    f.seek(start)
    with zipfile.ZipFile(f) as archive:
        entries = archive.infolist()
        for info in entries:
            if info.compress_type != zipfile.ZIP_STORED:
                return (f"zip entry {info.filename!r:.80} is compressed (torch.save stores "
                        "its entries uncompressed)")
        total = sum(info.file_size for info in entries)
        if total > size:
            return f"its zip entries hold {total} bytes, more than the file's {size}"
        # torch.load does not check the CRC-32 torch.save stores for every entry, and a diffq
        # state has no checksum of its own: without this, a flipped bit in a storage would
        # load as a wrong weight. Archives written with torch's CRC-32 turned off
        # (torch.serialization.set_crc32_options(False)) store 0 for every entry.
        if any(info.CRC for info in entries):
            for info in entries:
                problem = _entry_problem(archive, info)
                if problem is not None:
                    return problem
    return None


def _entry_problem(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> str | None:
    """Why entry ``info`` cannot be read back intact (its CRC-32, its local header), or None."""
    try:
        with archive.open(info) as entry:
            while entry.read(_CRC_CHUNK):  # zipfile checks the CRC-32 at the end
                pass
    except Exception as e:  # noqa: BLE001 - a corrupted entry, whatever zipfile says of it
        reason = str(e)[:200] or type(e).__name__
        return f"zip entry {info.filename!r:.80} is corrupted ({reason})"
    return None


# ----------------------------------------------------------------------------- decoding
def _decode(klass: str, kwargs: dict, meta: dict, name: str, shape: tuple, entry) -> dict:
    """One diffq quantized entry → this library's unpacked state entry."""
    numel = math.prod(shape)
    # Flags checked to be bools by _load; the quantizer's arguments by rebuild_quantizer.
    packed = meta.get("packed", False)
    unpack = _unpack_torch_pack if meta.get("torch_pack", False) else _unpack_cython
    if not isinstance(entry, (tuple, list)):
        raise ValueError(f"tensor {name!r}: diffq entry is a {type(entry).__name__}")
    what = f"tensor {name!r}"
    if klass == "DiffQuantizer":
        group_size = int(kwargs.get("group_size", 1))
        min_bits = int(kwargs.get("min_bits", 2))
        n_groups = 1 if group_size == 0 else numel // group_size
        span = numel if group_size == 0 else group_size
        if n_groups * span != numel:
            raise ValueError(f"tensor {name!r}: {numel} entries are not groups of {group_size}")
        if len(entry) != 3:
            raise ValueError(f"tensor {name!r}: diffq entry has {len(entry)} parts, expected 3")
        if packed:
            all_levels, scales, packed_bits = entry
            bits = unpack(_tensor(packed_bits, name, "widths"), n_groups, name) + min_bits
            bits = check_widths(what, bits, numel, group_size, "minmax")
            _check_packed_widths(bits, name)
            levels = _unpack_by_width(all_levels, bits, span, unpack, name)
        else:
            levels, scales, bits = entry
            bits = check_widths(what, bits, numel, group_size, "minmax")
            levels = _levels(levels, numel, name)
        mn, mx = _scales(scales, name)
        check_levels(what, levels, bits, group_size, "minmax")
        return _entry(shape, "minmax", group_size, bits, mn, mx, levels)
    width = int(kwargs.get("bits", 8))
    if not 1 <= width <= 15:
        raise ValueError(f"tensor {name!r}: {width} bits is out of range")
    if len(entry) != 2:
        raise ValueError(f"tensor {name!r}: diffq entry has {len(entry)} parts, expected 2")
    stored, scale = entry
    levels = unpack(_tensor(stored, name, "levels"), numel, name) if packed else _levels(
        stored, numel, name)
    bits = torch.tensor([width], dtype=torch.uint8)
    if klass == "UniformQuantizer":
        mn, mx = _scales(scale, name)
        check_levels(what, levels, bits, 0, "minmax")
        return _entry(shape, "minmax", 0, bits, mn, mx, levels)
    step = _scalar(scale, name)
    check_record_range(what, "lsq", step, 0.0)
    if packed:
        levels = levels.to(torch.int32) - (1 << (width - 1))
    check_levels(what, levels, bits, 0, "lsq")
    return _entry(shape, "lsq", 0, bits, step, 0.0, levels)


def _entry(shape, scheme, group_size, bits, mn, mx, levels) -> dict:
    """This library's state entry; ``levels`` were range-checked, so int16 holds them."""
    return {"shape": list(shape), "scheme": scheme, "group_size": group_size, "bits": bits,
            "min": mn, "max": mx, "levels": levels.reshape(-1).to(torch.int16)}


def _tensor(value, name: str, what: str) -> torch.Tensor:
    return validation.check_integer_tensor(f"tensor {name!r}: diffq {what}", value)


def _levels(value, numel: int, name: str) -> torch.Tensor:
    """Unpacked levels, counted before any copy and kept in their own dtype: narrowing
    before the range check would wrap an impossible level into a valid one."""
    levels = _tensor(value, name, "levels")
    if levels.numel() != numel:
        raise ValueError(f"tensor {name!r}: {levels.numel()} levels for {numel} entries")
    return levels.reshape(-1)


def _scalar(value, name: str) -> float:
    return validation.check_real(f"tensor {name!r}: diffq scale", value)


def _scales(value, name: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"tensor {name!r}: diffq range must be a (min, max) pair")
    mn, mx = (_scalar(v, name) for v in value)
    check_record_range(f"tensor {name!r}", "minmax", mn, mx)
    return mn, mx


def _check_packed_widths(bits: torch.Tensor, name: str) -> None:
    # Only diffq's packed layout drops 15-bit groups; an unpacked state holds every level.
    if bits.numel() and int(bits.max()) == 15:
        raise ValueError(f"tensor {name!r}: diffq 0.2.4 stored no levels for its 15-bit groups "
                         "(its packing covers widths 1 to 14): this state lost those weights")


def _unpack_by_width(all_levels, bits: torch.Tensor, span: int, unpack, name: str):
    """diffq's DiffQuantizer layout: per width 1..14, the groups of that width, packed."""
    if not isinstance(all_levels, (list, tuple)) or len(all_levels) != 14:
        raise ValueError(f"tensor {name!r}: diffq entry must hold 14 per-width streams")
    levels = torch.zeros(bits.numel(), span, dtype=torch.int32)
    for width, stream in enumerate(all_levels, start=1):
        sel = bits == width
        count = int(sel.sum()) * span
        if stream is None:
            if count:
                raise ValueError(f"tensor {name!r}: no stream for its {width}-bit groups")
            continue
        stream = _tensor(stream, name, f"{width}-bit levels")
        values = unpack(stream, count, name, max_bits=width)
        levels[sel] = values.view(-1, span)
    return levels


def _unpack_cython(packed: torch.Tensor, length: int, name: str,
                   max_bits: int = 15) -> torch.Tensor:
    """diffq's Cython bitpack: int64 ``[blocks, nbits, 32]``; entry ``i = blk·2048 + k·32 + j``
    has bit ``b`` at bit ``k`` of word ``[blk, b, j]``."""
    if packed.dtype != torch.int64 or packed.dim() != 3 or packed.shape[2] != 32:
        raise ValueError(f"tensor {name!r}: not a diffq bitpack stream "
                         f"({packed.dtype}, {tuple(packed.shape)})")
    blocks, nbits, _ = packed.shape
    if nbits > max_bits:
        raise ValueError(f"tensor {name!r}: stream of {nbits} bits, at most {max_bits} allowed")
    if blocks != -(-length // _CYTHON_BLOCK):
        raise ValueError(f"tensor {name!r}: {blocks} blocks cannot hold {length} entries")
    out = torch.zeros(blocks, 64, 32, dtype=torch.int32)
    shifts = torch.arange(64, dtype=torch.int64)[None, :, None]
    step = max(1, _PLANE_CHUNK // _CYTHON_BLOCK)
    for start in range(0, blocks, step):
        for b in range(nbits):
            plane = packed[start : start + step, b, :]
            out[start : start + step] |= (((plane[:, None, :] >> shifts) & 1) << b).to(
                torch.int32)
    return out.reshape(-1)[:length]


def _unpack_torch_pack(packed: torch.Tensor, length: int, name: str,
                       max_bits: int = 15) -> torch.Tensor:
    """diffq's ``torch_pack``: ``[nbits, cols]`` words of S bits; entry ``i = s·cols + c`` has
    bit ``b`` at bit ``s`` of word ``[b, c]``."""
    side = _TORCH_PACK_BITS.get(packed.dtype)
    if side is None or packed.dim() != 2:
        raise ValueError(f"tensor {name!r}: not a diffq torch_pack stream "
                         f"({packed.dtype}, {tuple(packed.shape)})")
    nbits, cols = packed.shape
    if nbits > max_bits:
        raise ValueError(f"tensor {name!r}: stream of {nbits} bits, at most {max_bits} allowed")
    if cols != -(-length // side):
        raise ValueError(f"tensor {name!r}: {cols} columns cannot hold {length} entries")
    out = torch.zeros(side, cols, dtype=torch.int32)
    shifts = torch.arange(side, dtype=torch.int64)[:, None]
    for b in range(nbits):
        out |= (((packed[b].to(torch.int64)[None, :] >> shifts) & 1) << b).to(torch.int32)
    return out.reshape(-1)[:length]
