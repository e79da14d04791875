"""What a saved file holds, read without a model: per tensor widths, bytes and size (``info``).

:func:`summarize` reads a file of :func:`~diffq_triton.save_quantized` through the same
checks as the loader (:func:`.file_records.read_records`: container, checksums, widths,
stream lengths), or a diffq 0.2.4 state through :mod:`.diffq_compat`'s safe loading (no
pickle code runs) and its checks, and returns a :class:`FileSummary`. Sizes follow spec §3.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..ops import bitpack, reference
from . import container
from . import diffq_compat as compat
from .file_records import VERSION, read_records
from .tensor_record import check_levels, check_widths

MEGABYTE_BITS = 2**23  # spec §3: 1 MB = 2^23 bits
# Bits per entry of the float payloads a file stores, by safetensors dtype.
_FLOAT_BITS = {"F16": 16, "F32": 32, "F64": 64}
# What a check written for well-formed values raises on a value of an unforeseen type.
_MALFORMED = (TypeError, KeyError, IndexError, AttributeError, OverflowError, RecursionError)


@dataclass(frozen=True)
class TensorSummary:
    """One stored tensor as its file describes it.

    Attributes:
        name: its name (diffq states store none: ``quantized[i]``, ``float16[i]``...).
        kind: ``"quantized"``, ``"float"`` or ``"buffer"``.
        shape: its shape, ``None`` where the file does not record it (diffq states).
        numel: its entries; an upper bound where ``exact`` is False.
        dtype: the dtype it is restored to (``"float16"`` for float16-stored floats).
        stored_bytes: bytes its payloads take in the file (streams, or the float data).
        size_bits: its size in bits (spec §3 for quantized tensors; its entries at their
            stored width for floats; 0 for buffers, which no model size counts).
        group_size: entries per width group (0: one group), for quantized tensors.
        widths: entries stored at each width, ``{width: entries}``, for quantized tensors.
        tied: the other names of a tied parameter (stored once).
        exact: False where diffq's packed layout leaves the entry count uncertain.
    """

    name: str
    kind: str
    shape: tuple[int, ...] | None
    numel: int
    dtype: str
    stored_bytes: int
    size_bits: int
    group_size: int | None = None
    widths: dict[int, int] = field(default_factory=dict)
    tied: tuple[str, ...] = ()
    exact: bool = True

    @property
    def min_width(self) -> int | None:
        return min(self.widths) if self.widths else None

    @property
    def max_width(self) -> int | None:
        return max(self.widths) if self.widths else None

    @property
    def mean_width(self) -> float | None:
        """Mean width over the entries (what each weight costs, before side information)."""
        total = sum(self.widths.values())
        return sum(w * n for w, n in self.widths.items()) / total if total else None


@dataclass(frozen=True)
class FileSummary:
    """A whole file: its tensors and the model's size.

    Attributes:
        path: the file.
        format: what it is, e.g. ``"diffq-triton file, format version 2"``.
        file_bytes: its length in bytes.
        tensors: every stored tensor, in file order.
        min_bits: the ``min_bits`` the width fields were counted from (``None``: each
            tensor's smallest width, as the file stores it).
        notes: what the figures cannot say (e.g. diffq's packed layout).
    """

    path: str
    format: str
    file_bytes: int
    tensors: list[TensorSummary]
    min_bits: int | None = None
    notes: tuple[str, ...] = ()

    def of_kind(self, kind: str) -> list[TensorSummary]:
        return [t for t in self.tensors if t.kind == kind]

    @property
    def size_bits(self) -> int:
        return sum(t.size_bits for t in self.tensors)

    @property
    def size_mb(self) -> float:
        """Model size in MB of 2^23 bits, as ``true_model_size()`` counts it (spec §3)."""
        return self.size_bits / MEGABYTE_BITS

    @property
    def file_mb(self) -> float:
        """File size in MB of 2^20 bytes, as ``packed_model_size()`` counts it."""
        return self.file_bytes / 2**20

    @property
    def weights(self) -> int:
        """Entries of the model's parameters (quantized and float, tied ones once)."""
        return sum(t.numel for t in self.tensors if t.kind != "buffer")

    @property
    def bits_per_weight(self) -> float | None:
        return self.size_bits / self.weights if self.weights else None

    @property
    def exact(self) -> bool:
        return all(t.exact for t in self.tensors)


def summarize(path: str | os.PathLike, min_bits: int | None = None) -> FileSummary:
    """Read and check ``path`` without a model and describe what it holds.

    Args:
        path: a file of :func:`~diffq_triton.save_quantized`, or a diffq 0.2.4 state saved
            with ``torch.save(quantizer.get_quantized_state(...))``.
        min_bits: for our files, count each tensor's width field from
            ``min(min_bits, smallest width)`` as ``DiffQuantizer(min_bits=...)`` does
            (files do not record the quantizer's ``min_bits``). diffq states name theirs.

    Raises:
        OSError: the file cannot be read.
        ValueError: the file is empty, malformed, corrupted or of another format; the
            message names the tensor and the problem.
    """
    if min_bits is not None and (isinstance(min_bits, bool) or not isinstance(min_bits, int)
                                 or not 1 <= min_bits <= bitpack.MAX_WIDTH):
        raise ValueError(f"min_bits must be an integer in [1, {bitpack.MAX_WIDTH}], "
                         f"got {min_bits!r}")
    with open(path, "rb") as f:
        head = f.read(9)
        size = os.fstat(f.fileno()).st_size
    if size == 0:
        raise ValueError("the file is empty")
    try:
        if head[:4] == b"PK\x03\x04":  # a zip archive: what torch.save writes
            return _diffq_state(os.fspath(path), size)
        if len(head) == 9 and head[8:] != b"{":  # a safetensors header is a JSON object
            raise ValueError("neither a diffq-triton file (a safetensors header) nor a "
                             "diffq 0.2.4 state (a zip archive)")
        return _our_file(os.fspath(path), size, min_bits)
    except _MALFORMED as e:
        raise ValueError(f"malformed file ({type(e).__name__}: {e})") from e


# ------------------------------------------------------------------------- our files
def _our_file(path: str, size: int, min_bits: int | None) -> FileSummary:
    tensors = []
    for plan in read_records(path):
        others = tuple(plan.params[1:])  # the names the value also goes to
        if plan.qt is None:
            dtype = container.CODES[plan.floats.dtype]  # the stored dtype
            kind = "buffer" if plan.buffer else "float"
            bits = 0 if plan.buffer else _FLOAT_BITS.get(dtype, 0) * plan.floats.numel()
            tensors.append(TensorSummary(
                plan.name, kind, tuple(plan.floats.shape), plan.floats.numel(),
                _dtype_name(plan.floats.dtype), plan.floats.numel()
                * plan.floats.element_size(), bits, tied=others))
            continue
        qt = plan.qt
        bits = qt.bits.reshape(-1).to(torch.int64)
        stored = min(bits.tolist()) if bits.numel() else 1
        field_bits = bitpack.width_field_bits(bits, stored) if bits.numel() else 0
        widths_bytes = (bits.numel() * field_bits + 7) // 8
        widths = _entries_per_width(bits, qt.numel, qt.group_size)
        if qt.scheme == "lsq":  # LSQ: one step of 32 bits per tensor
            size_bits = qt.numel * int(bits[0]) + 32
        else:
            base = stored if min_bits is None else min(min_bits, stored)
            count_field = bitpack.width_field_bits(bits, base) if bits.numel() else 0
            size_bits = _minmax_bits(widths, bits.numel(), count_field)
        tensors.append(TensorSummary(
            qt.name, "quantized", tuple(qt.shape), qt.numel, _dtype_name(qt.dtype),
            plan.packed.numel() + widths_bytes, size_bits, qt.group_size, widths,
            tied=others))
    return FileSummary(path, f"diffq-triton file, format version {VERSION}", size, tensors,
                       min_bits)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _entries_per_width(bits: torch.Tensor, numel: int, group_size: int) -> dict[int, int]:
    """``{width: entries}`` of a tensor of ``numel`` entries in groups of widths ``bits``."""
    if not numel:
        return {}
    n = reference.num_groups(numel, group_size)
    full = numel if n == 1 else group_size
    counts = torch.bincount(bits, minlength=bitpack.MAX_WIDTH + 1) * full
    counts[int(bits[-1])] -= full * n - numel  # the shorter last group counts its own length
    return {w: int(c) for w, c in enumerate(counts.tolist()) if c}


def _minmax_bits(widths: dict[int, int], n_groups: int, field_bits: int) -> int:
    """Spec §3: levels, 2·32 bits of range, 8 bits of field size, a field per group."""
    return sum(w * n for w, n in widths.items()) + 2 * 32 + 8 + n_groups * field_bits


# ------------------------------------------------------------------- diffq 0.2.4 states
def _diffq_state(path: str, size: int) -> FileSummary:
    state = compat._load(path)  # the archive checked, then torch.load(weights_only=True)
    meta, kwargs = state["meta"], state["meta"]["init_kwargs"]
    klass, packed = meta["klass"], meta.get("packed", False)
    torch_pack = meta.get("torch_pack", False)
    tensors = []
    for i, entry in enumerate(state["quantized"]):
        name = f"quantized[{i}]"
        if not isinstance(entry, (tuple, list)):
            raise ValueError(f"tensor {name!r}: diffq entry is a {type(entry).__name__}")
        if klass == "DiffQuantizer":
            tensors.append(_diffq_entry(name, entry, kwargs, packed, torch_pack))
        else:
            tensors.append(_fixed_entry(name, entry, klass, kwargs, packed, torch_pack))
    for key, bits in (("float16", 16), ("others", 32)):  # as diffq's model_size counts them
        for i, t in enumerate(state[key]):
            tensors.append(TensorSummary(
                f"{key}[{i}]", "float", tuple(t.shape), t.numel(), _dtype_name(t.dtype),
                t.numel() * t.element_size(), bits * t.numel()))
    layout = "unpacked" if not packed else "packed, " + (
        "torch_pack" if torch_pack else "Cython bitpack")
    notes = () if all(t.exact for t in tensors) else (
        "diffq's packed layout pads every stream to a whole block and records no tensor "
        "size: entry counts marked ≤ are upper bounds (a state saved with packed=False "
        "gives exact figures)",)
    min_bits = _kwarg(kwargs, "min_bits", 2) if klass == "DiffQuantizer" else None
    return FileSummary(path, f"diffq 0.2.4 {klass} state ({layout})", size, tensors,
                       min_bits, notes)


def _kwarg(kwargs: dict, key: str, default: int, low: int = 1, high: int = 15) -> int:
    value = kwargs.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"diffq state init_kwargs {key!r} must be an integer in "
                         f"[{low}, {high}], got {value!r:.40}")
    return value


def _nbytes(*values) -> int:
    """Bytes of the tensors among ``values`` (and inside lists of them)."""
    out = 0
    for v in values:
        if isinstance(v, torch.Tensor):
            out += v.numel() * v.element_size()
        elif isinstance(v, (list, tuple)):
            out += _nbytes(*v)
    return out


def _capacity(stream, torch_pack: bool, name: str, what: str, max_bits: int
              ) -> tuple[int, int]:
    """``(entries, block)``: how many entries a diffq packed stream holds, counting the
    padding of its last block (``block`` entries per block), its layout checked as
    :mod:`.diffq_compat` checks it before unpacking."""
    stream = compat._tensor(stream, name, what)
    if torch_pack:
        side = compat._TORCH_PACK_BITS.get(stream.dtype)
        if side is None or stream.dim() != 2:
            raise ValueError(f"tensor {name!r}: not a diffq torch_pack stream "
                             f"({stream.dtype}, {tuple(stream.shape)})")
        nbits, capacity, block = stream.shape[0], stream.shape[1] * side, side
    else:
        if stream.dtype != torch.int64 or stream.dim() != 3 or stream.shape[2] != 32:
            raise ValueError(f"tensor {name!r}: not a diffq bitpack stream "
                             f"({stream.dtype}, {tuple(stream.shape)})")
        nbits, capacity = stream.shape[1], stream.shape[0] * compat._CYTHON_BLOCK
        block = compat._CYTHON_BLOCK
    if nbits > max_bits:
        raise ValueError(f"tensor {name!r}: stream of {nbits} bits, at most {max_bits} allowed")
    return capacity, block


def _diffq_entry(name: str, entry, kwargs: dict, packed: bool, torch_pack: bool
                 ) -> TensorSummary:
    """A DiffQuantizer entry: ``(levels, (min, max), widths)``, or packed
    ``(14 per-width streams, (min, max), widths stream)``."""
    what = f"tensor {name!r}"
    group_size = _kwarg(kwargs, "group_size", 1, low=0, high=2**62)
    min_bits = _kwarg(kwargs, "min_bits", 2)
    if len(entry) != 3:
        raise ValueError(f"{what}: diffq entry has {len(entry)} parts, expected 3")
    compat._scales(entry[1], name)
    exact = True
    if not packed:
        levels = compat._tensor(entry[0], name, "levels")
        numel = levels.numel()
        span = group_size or numel
        if not numel or numel % span:
            raise ValueError(f"{what}: {numel} entries are not groups of {group_size}")
        bits = check_widths(what, entry[2], numel, group_size, "minmax").to(torch.int64)
        check_levels(what, levels.reshape(-1), bits, group_size, "minmax")
    else:
        streams, stream_bits = entry[0], entry[2]
        if not isinstance(streams, (list, tuple)) or len(streams) != 14:
            raise ValueError(f"{what}: diffq entry must hold 14 per-width streams")
        unpack = compat._unpack_torch_pack if torch_pack else compat._unpack_cython
        capacity, block = _capacity(stream_bits, torch_pack, name, "widths", 15)
        decoded = unpack(stream_bits, capacity, name).to(torch.int64) + min_bits
        n_groups, fewest, numel = _group_bounds(what, decoded, capacity, block, streams,
                                                group_size, min_bits, torch_pack, name)
        exact = fewest == numel
        bits = check_widths(what, decoded[:n_groups], numel, group_size, "minmax").to(
            torch.int64)
        compat._check_packed_widths(bits, name)
    widths = _entries_per_width(bits, numel, group_size)
    # diffq counts the field from its min_bits, the level bits as group_size·Σ widths.
    field_bits = bitpack.width_field_bits(bits, min(min_bits, int(bits.min())))
    return TensorSummary(name, "quantized", None, numel, "float32", _nbytes(*entry),
                         _minmax_bits(widths, bits.numel(), field_bits), group_size, widths,
                         exact=exact)


def _group_bounds(what: str, decoded: torch.Tensor, capacity: int, block: int, streams,
                  group_size: int, min_bits: int, torch_pack: bool, name: str
                  ) -> tuple[int, int, int]:
    """``(groups, fewest entries, most entries)`` a packed DiffQuantizer entry can hold,
    taking the most groups. Padding decodes as ``min_bits``: groups of other widths are
    counted exactly, those of ``min_bits`` only up to their stream's last block."""
    counts = torch.bincount(decoded, minlength=16)
    if group_size == 0:  # one group: its width's stream gives the entries
        width = int(decoded[0])
        if not 1 <= width <= 14 or streams[width - 1] is None:
            raise ValueError(f"{what}: no stream for its {width}-bit group")
        cap, blk = _capacity(streams[width - 1], torch_pack, name, f"{width}-bit levels", width)
        if any(s is not None for i, s in enumerate(streams) if i != width - 1) or bool(
                (decoded[1:] != min_bits).any()):
            raise ValueError(f"{what}: widths or streams beyond its one group")
        return 1, max(1, cap - blk + 1), cap
    low, high = 0, 0
    for width, stream in enumerate(streams, start=1):
        count = int(counts[width]) if width < counts.numel() else 0
        if stream is None:
            if count and width != min_bits:
                raise ValueError(f"{what}: no stream for its {width}-bit groups")
            continue
        cap, blk = _capacity(stream, torch_pack, name, f"{width}-bit levels", width)
        most = cap // group_size  # groups of this width the stream can hold
        fewest = (cap - blk) // group_size + 1
        if width == min_bits:
            fewest, most = max(fewest, 0), min(most, count)
        elif not fewest <= count <= most:
            raise ValueError(f"{what}: its {width}-bit stream holds {cap} entries, "
                             f"{count} groups of {group_size} need {count * group_size}")
        else:
            fewest = most = count
        low, high = low + fewest, high + most
    last = int((decoded != min_bits).nonzero().max()) + 1 if (decoded != min_bits).any() else 0
    low = max(low, last, capacity - block + 1)
    high = min(high, capacity)
    if low > high:
        raise ValueError(f"{what}: its widths and level streams disagree on the number of "
                         "groups (corrupted state)")
    return high, low * group_size, high * group_size


def _fixed_entry(name: str, entry, klass: str, kwargs: dict, packed: bool, torch_pack: bool
                 ) -> TensorSummary:
    """A UniformQuantizer ``(levels, (min, max))`` or LSQ ``(levels, step)`` entry."""
    what = f"tensor {name!r}"
    width = _kwarg(kwargs, "bits", 8)
    if len(entry) != 2:
        raise ValueError(f"{what}: diffq entry has {len(entry)} parts, expected 2")
    lsq = klass == "LSQ"
    compat._scalar(entry[1], name) if lsq else compat._scales(entry[1], name)
    if packed:
        capacity, block = _capacity(entry[0], torch_pack, name, "levels", width)
        numel, exact, shape = capacity, block == 1, None
    else:
        levels = compat._tensor(entry[0], name, "levels")
        check_levels(what, levels, torch.tensor([width]), 0, "lsq" if lsq else "minmax")
        numel, exact, shape = levels.numel(), True, tuple(levels.shape)
    # diffq's sizes: UniformQuantizer bits·d + 64 (its range), LSQ bits·d + 32 (its step).
    size_bits = width * numel + (32 if lsq else 64)
    return TensorSummary(name, "quantized", shape, numel, "float32", _nbytes(entry[0]),
                         size_bits, 0, {width: numel} if numel else {}, exact=exact)
