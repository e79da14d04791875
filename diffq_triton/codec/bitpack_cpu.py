"""Mixed-width packing of the level bitstream on CPU (layout in docs/format.md); see bitpack.py."""

# Vectorized torch and numpy, no Python loop per entry or per group. One width for the whole
# tensor goes to :mod:`.bitpack_fixed`; when every group starts on a byte (``group_size % 8
# == 0``, or a single group) rows of mixed widths are packed in 64/128-bit lanes and their
# bytes gathered; other group sizes place each entry in 64-bit words with segmented sums.
# Work runs in cache-sized chunks (``bitpack_fixed.CHUNK``, read at call time) on the pool
# of :mod:`.cpu_pool`.

from __future__ import annotations

import numpy as np
import torch

from . import bitpack_fixed
from .bitpack_fixed import pack_fixed, unpack_fixed
from .cpu_pool import run_chunks

MAX_WIDTH = 15


def stream_nbytes(bits: torch.Tensor, group_size: int, numel: int) -> int:
    """Bytes of the stream of ``numel`` entries with per-group widths ``bits`` (host sync)."""
    n_groups = bits.numel()
    if n_groups == 1:
        return (numel * int(bits.reshape(-1)[0]) + 7) // 8
    last = numel - group_size * (n_groups - 1)
    total = group_size * int(bits.sum(dtype=torch.int64)) + (last - group_size) * int(bits[-1])
    return (total + 7) // 8


def _aligned(group_size: int, n_groups: int) -> bool:
    """Whether every group starts on a byte boundary of the stream."""
    return n_groups == 1 or group_size % 8 == 0


# ----------------------------------------------------------------------------- CPU paths
def pack_cpu(levels: torch.Tensor, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """:func:`diffq_triton.ops.bitpack.pack_levels` for checked CPU arguments (uint8 stream).

    Each path checks ``0 <= q < 2^b`` chunk by chunk, while the data is in cache.
    """
    low, high = torch.aminmax(bits)
    if int(low) == int(high):
        return pack_fixed(levels, int(low))
    if _aligned(group_size, bits.numel()):
        return _pack_aligned(levels, bits, group_size)
    return _pack_words(levels, bits, group_size)


def unpack_cpu(
    packed: torch.Tensor, bits: torch.Tensor, group_size: int, numel: int
) -> torch.Tensor:
    """:func:`diffq_triton.ops.bitpack.unpack_levels` for checked CPU arguments (int16 levels)."""
    low, high = torch.aminmax(bits)
    if int(low) == int(high):
        return unpack_fixed(packed, int(low), numel)
    if _aligned(group_size, bits.numel()):
        return _unpack_aligned(packed, bits, group_size, numel)
    return _unpack_words(packed, bits, group_size, numel)


# Aligned layout with mixed widths: a group of g entries (g % 8 == 0) is g/8 rows of 8
# entries, each row exactly b_s bytes. A row is built in a 64-bit lane (widths <= 8) or a
# 128-bit one (two int64) by the doubling steps with per-row factors, and its first b_s
# bytes are kept: row-major selection of those bytes is the stream, written at the chunk's
# byte offset.

# Byte masks "first w of 8 bytes" as one uint64 each, for w in 0..8: a gather, not a compare.
_FIRST_BYTES = np.array([(1 << 8 * w) // 255 for w in range(9)], dtype=np.uint64)


_COUNT = np.arange(1 << 18, dtype=np.int64)  # 0, 1, 2, ... grown on demand, never written


def _kept_bytes(w: np.ndarray, lane: int) -> np.ndarray:
    """Indices of the first ``w[r]`` bytes of each ``lane``-byte row, in order (int64)."""
    global _COUNT
    w = w.astype(np.int64)
    if not w.size:
        return np.zeros(0, dtype=np.int64)
    ends = np.cumsum(w)
    total = int(ends[-1])
    count = _COUNT  # one read: other threads may swap in a longer one meanwhile
    if total > count.size:
        count = _COUNT = np.arange(2 * total, dtype=np.int64)
    # Byte j of row r sits at r·lane + j; its kept rank is start_r + j.
    index = np.repeat(np.arange(0, w.size * lane, lane, dtype=np.int64) - ends + w, w)
    index += count[:total]
    return index


# Per-width factors and shifts of the doubling steps, one table row per width, gathered
# per row (np.take) into arrays the shape of the lanes: numpy's broadcasting of a [R, 1]
# factor over a short inner axis runs several times slower than a same-shape operand.
_W = np.arange(16, dtype=np.int64)[:, None]


def _table(values: np.ndarray, dtype: type, lanes: int) -> np.ndarray:
    """``values[w]`` (per width) repeated over ``lanes`` columns: ``[16, lanes]``."""
    return np.ascontiguousarray(np.broadcast_to(values.astype(dtype), (16, lanes)))


_NARROW_PACK = [  # (lane bits, lane dtype, factor table) per doubling step
    (8, np.int16, _table((1 << _W) - (1 << 8), np.int16, 4)),
    (16, np.int32, _table((1 << 2 * _W) - (1 << 16), np.int32, 2)),
    (32, np.int64, _table((1 << 4 * _W) - (1 << 32), np.int64, 1)),
]
_NARROW_UNPACK = [  # (lane dtype, shift table, factor table) per halving step
    (np.int64, _table(4 * _W, np.int64, 1), _table((1 << 32) - (1 << 4 * _W), np.int64, 1)),
    (np.int32, _table(2 * _W, np.int32, 2), _table((1 << 16) - (1 << 2 * _W), np.int32, 2)),
    (np.int16, _table(_W, np.int16, 4), _table((1 << 8) - (1 << _W), np.int16, 4)),
]
_WIDE_PAIR = _table((1 << _W) - (1 << 16), np.int32, 4)
_WIDE_QUAD = _table((1 << 2 * _W) - (1 << 32), np.int64, 2)
_WIDE_SHIFT = (_table(2 * _W, np.int64, 2), _table(_W, np.int32, 4))


def _check_rows(r: np.ndarray, w64: np.ndarray) -> None:
    """Raise unless every entry of row ``i`` of ``r`` ``[R, 8]`` int16 is in
    ``[0, 2^w64[i])``: the OR of a row's entries (a negative one sets bit 15) must fit."""
    x = r.view(np.int64)
    o = x[:, 0] | x[:, 1]
    o |= o >> 32
    o |= o >> 16
    o &= 0xFFFF
    if (o >> w64).any():
        raise ValueError("a level does not fit in its group's bit width")


def _pack_rows_narrow(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Rows of 8 levels ``[R, 8]`` int16 with per-row widths ``w`` ``[R]`` (all <= 8) →
    their ``w`` bytes each, concatenated (numpy: cheaper per call than torch at chunk size).

    Same doubling steps as the fixed path, with the per-row slide factor as an array."""
    r = rows.numpy()
    wn = w.numpy()
    _check_rows(r, wn.astype(np.int64))
    x = r.astype(np.uint8)
    for lane, dtype, table in _NARROW_PACK:
        x = x.view(dtype)
        x = x + (x >> lane) * np.take(table, wn, axis=0)
    keep = _FIRST_BYTES[wn].view(np.bool_)
    return torch.from_numpy(np.compress(keep.reshape(-1), x.view(np.uint8).reshape(-1)))


# Unpacking reads each row's bytes back with two or three aligned 64-bit loads around its
# byte offset and funnel shifts, then zeroes the bytes past its width: row-sized work, not
# byte-sized scatters.
_ROW_MASKS = np.array([[((1 << 8 * w) - 1) >> 64 * k & ((1 << 64) - 1) for k in range(2)]
                       for w in range(16)], dtype=np.uint64)


def _row_words(stream: np.ndarray, wn: np.ndarray, words: int) -> np.ndarray:
    """Row ``r``'s ``wn[r]`` bytes (rows packed back to back in ``stream``) as
    ``[R, words]`` uint64, little-endian, bytes past ``wn[r]`` zero."""
    buf = np.zeros(stream.size // 8 + words + 2, dtype=np.uint64)
    buf.view(np.uint8)[: stream.size] = stream
    w = wn.astype(np.uint64)
    start = np.cumsum(w) - w
    q = (start >> np.uint64(3)).astype(np.intp)
    shift = (start & np.uint64(7)) << np.uint64(3)
    spill = np.uint64(63) - shift  # (x << 1) << spill: no shift by 64 when shift is 0
    out = np.empty((wn.size, words), dtype=np.uint64)
    nxt = buf[q]
    for k in range(words):
        cur, nxt = nxt, buf[q + (k + 1)]
        np.bitwise_or(cur >> shift, (nxt << np.uint64(1)) << spill, out=out[:, k])
    out &= np.take(_ROW_MASKS[:, :words], wn, axis=0)
    return out


def _unpack_rows_narrow(stream: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_rows_narrow`: ``[R, 8]`` int16."""
    wn = w.numpy()
    x = _row_words(stream.numpy(), wn, 1).view(np.int64)
    for dtype, shifts, factors in _NARROW_UNPACK:
        x = x.view(dtype)
        x = x + (x >> np.take(shifts, wn, axis=0)) * np.take(factors, wn, axis=0)
    return torch.from_numpy(x.view(np.uint8).reshape(-1, 8).astype(np.int16))


def _pack_rows_wide(rows: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """As :func:`_pack_rows_narrow` for widths up to 15: int16 entries, two int64 per row."""
    r = rows.numpy()
    wn = w.numpy()
    w64 = wn.astype(np.int64)
    _check_rows(r, w64)
    x = r.view(np.int32)
    x = x + (x >> 16) * np.take(_WIDE_PAIR, wn, axis=0)
    x = x.view(np.int64)
    x = x + (x >> 32) * np.take(_WIDE_QUAD, wn, axis=0)
    quad = 4 * w64
    lanes = np.empty_like(x)
    np.bitwise_or(x[:, 0], x[:, 1] << quad, out=lanes[:, 0])
    np.right_shift(x[:, 1], 64 - quad, out=lanes[:, 1])
    return torch.from_numpy(np.take(lanes.view(np.uint8).reshape(-1), _kept_bytes(wn, 16)))


def _unpack_rows_wide(stream: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`_pack_rows_wide`: ``[R, 8]`` int16."""
    wn = w.numpy()
    words = _row_words(stream.numpy(), wn, 2).view(np.int64)
    quad = 4 * wn.astype(np.int64)
    lo, hi = words[:, 0], words[:, 1]
    x = np.empty_like(words)
    np.bitwise_and(lo, (np.int64(1) << quad) - 1, out=x[:, 0])
    h1 = (lo >> quad) & ((np.int64(1) << (64 - quad)) - 1)
    np.bitwise_or(h1, hi << (64 - quad), out=x[:, 1])
    pair = np.take(_WIDE_QUAD, wn, axis=0)
    x = x - (x >> np.take(_WIDE_SHIFT[0], wn, axis=0)) * pair
    x = x.view(np.int32)
    x = x - (x >> np.take(_WIDE_SHIFT[1], wn, axis=0)) * np.take(_WIDE_PAIR, wn, axis=0)
    return torch.from_numpy(x.view(np.int16).reshape(-1, 8).copy())


class _Rows:
    """The aligned layout of a tensor: rows of 8 entries, each ``b_s`` bytes of the stream."""

    def __init__(self, bits: torch.Tensor, group_size: int, numel: int):
        self.full = numel // group_size if group_size else 0
        self.widths = bits[: self.full].repeat_interleave(max(group_size, 8) // 8)
        self.n = self.widths.numel()
        starts = torch.cumsum(self.widths, 0, dtype=torch.int64)
        self.body = int(starts[-1]) if self.n else 0
        self.starts = np.concatenate(([0], starts.numpy()))
        self.chunk = max(1, bitpack_fixed.CHUNK // 8)

    def span(self, start: int) -> tuple[int, int, torch.Tensor]:
        stop = min(start + self.chunk, self.n)
        return int(self.starts[start]), int(self.starts[stop]), self.widths[start:stop]


def _pack_aligned(levels: torch.Tensor, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    numel = levels.numel()
    if levels.dtype != torch.int16:
        low, high = torch.aminmax(levels)
        if int(low) < 0 or int(high) >= 1 << MAX_WIDTH:
            raise ValueError("a level does not fit in its group's bit width")
        levels = levels.to(torch.int16)
    layout = _Rows(bits, group_size, numel)
    out = torch.empty(stream_nbytes(bits, group_size, numel), dtype=torch.uint8)
    rows = levels[: layout.n * 8].view(layout.n, 8)

    def work(starts: list[int]) -> None:
        for start in starts:
            first, last, w = layout.span(start)
            pack = _pack_rows_narrow if int(w.max()) <= 8 else _pack_rows_wide
            out[first:last] = pack(rows[start : start + w.numel()], w)

    if layout.n:
        run_chunks(layout.n, layout.chunk, work)
    if layout.full < bits.numel():
        width = int(bits[-1])
        tail = levels[layout.full * group_size :]
        if int(tail.max()) >= 1 << width or int(tail.min()) < 0:
            raise ValueError(f"a level does not fit in its group's {width} bits")
        out[layout.body :] = pack_fixed(tail, width)
    return out


def _unpack_aligned(
    packed: torch.Tensor, bits: torch.Tensor, group_size: int, numel: int
) -> torch.Tensor:
    layout = _Rows(bits, group_size, numel)
    out = torch.empty(numel, dtype=torch.int16)
    rows = out[: layout.n * 8].view(layout.n, 8)

    def work(starts: list[int]) -> None:
        for start in starts:
            first, last, w = layout.span(start)
            unpack = _unpack_rows_narrow if int(w.max()) <= 8 else _unpack_rows_wide
            rows[start : start + w.numel()] = unpack(packed[first:last], w)

    if layout.n:
        run_chunks(layout.n, layout.chunk, work)
    if layout.full < bits.numel():
        rest = numel - layout.full * group_size
        out[layout.full * group_size :] = unpack_fixed(packed[layout.body :], int(bits[-1]), rest)
    return out


# Any group size: each entry lands at bit offset o in 64-bit word o // 64, spilling into
# the next word; words start at least one entry each (b <= 15 < 64), so a segmented sum
# (np.add.reduceat) over entries grouped by word builds every word, disjoint bits adding
# like OR. Chunks know their bit offset from a prefix sum over groups and run in
# parallel; their first and last words, shared with neighbours, are OR-ed in order.
class _Entries:
    """Per-group prefix sums giving each chunk its entries' widths and its stream offset."""

    def __init__(self, bits: torch.Tensor, group_size: int, numel: int):
        self.bits = bits.numpy()
        self.g = group_size if self.bits.size > 1 else max(numel, 1)
        lengths = np.full(self.bits.size, self.g, dtype=np.int64)
        lengths[-1] = numel - self.g * (self.bits.size - 1)
        self.prefix = np.concatenate(([0], np.cumsum(lengths * self.bits)))

    def offset(self, i: int) -> int:
        """Stream bit offset of entry ``i``."""
        group, rest = divmod(i, self.g)
        if group >= self.bits.size:
            return int(self.prefix[-1])
        return int(self.prefix[group]) + rest * int(self.bits[group])

    def widths(self, start: int, stop: int) -> np.ndarray:
        first, last = start // self.g, (stop - 1) // self.g
        per = np.repeat(self.bits[first : last + 1], self.g)
        return per[start - first * self.g : stop - first * self.g]


def _chunk_offsets(entries: _Entries, start: int, stop: int) -> tuple[int, np.ndarray,
                                                                       np.ndarray]:
    """First word of the chunk, and its entries' widths and bit offsets within that word."""
    first = entries.offset(start)
    w = entries.widths(start, stop).astype(np.int64)
    offsets = np.cumsum(w) - w + (first & 63)
    return first >> 6, w, offsets


def _pack_words(levels: torch.Tensor, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    numel = levels.numel()
    entries = _Entries(bits, group_size, numel)
    nbytes = stream_nbytes(bits, group_size, numel)
    words = np.zeros(nbytes // 8 + 2, dtype=np.uint64)
    source = levels.numpy()
    chunk = bitpack_fixed.CHUNK
    starts = list(range(0, numel, chunk))
    results: dict[int, tuple[int, np.ndarray]] = {}

    def work(chunk_starts: list[int]) -> None:
        for start in chunk_starts:
            stop = min(start + chunk, numel)
            base, w, offsets = _chunk_offsets(entries, start, stop)
            v = source[start:stop].astype(np.int64)
            if (v >> w).any():
                raise ValueError("a level does not fit in its group's bit width")
            v = v.view(np.uint64)
            shift = (offsets & 63).view(np.uint64)
            index = offsets >> 6
            segments = np.flatnonzero(np.diff(index)) + 1
            segments = np.concatenate(([0], segments))
            local = np.zeros(int(index[-1]) + 2, dtype=np.uint64)
            local[:-1] = np.add.reduceat(v << shift, segments)
            local[1:] += np.add.reduceat((v >> np.uint64(1)) >> (np.uint64(63) - shift), segments)
            results[start] = (base, local)

    run_chunks(numel, chunk, work)
    for start in starts:
        base, local = results[start]
        words[base : base + local.size] |= local
    return torch.from_numpy(words.view(np.uint8)[:nbytes].copy())


def _unpack_words(
    packed: torch.Tensor, bits: torch.Tensor, group_size: int, numel: int
) -> torch.Tensor:
    entries = _Entries(bits, group_size, numel)
    buf = np.zeros((packed.numel() // 8 + 2) * 8, dtype=np.uint8)
    buf[: packed.numel()] = packed.numpy()
    words = buf.view(np.uint64)
    out = torch.empty(numel, dtype=torch.int16)
    target = out.numpy()
    chunk = bitpack_fixed.CHUNK

    def work(chunk_starts: list[int]) -> None:
        for start in chunk_starts:
            stop = min(start + chunk, numel)
            base, w, offsets = _chunk_offsets(entries, start, stop)
            index = (offsets >> 6) + base
            shift = (offsets & 63).view(np.uint64)
            lo = words[index] >> shift
            hi = (words[index + 1] << np.uint64(1)) << (np.uint64(63) - shift)
            mask = (np.uint64(1) << w.view(np.uint64)) - np.uint64(1)
            target[start:stop] = ((lo | hi) & mask).astype(np.int16)

    run_chunks(numel, chunk, work)
    return out
