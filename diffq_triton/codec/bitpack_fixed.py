"""Fixed-width CPU packing of the level bitstream: one width for every entry."""

# Vectorized torch and numpy, no Python loop per entry. Rows of 8 entries of one width are
# exactly ``b`` bytes, so fixed-width runs pack with a handful of whole-chunk shifts (2 and 3
# bits: one 64-bit multiply per 4 entries). Work runs in cache-sized chunks on the pool of
# :mod:`.cpu_pool`.

from __future__ import annotations

import math

import numpy as np
import torch

from .cpu_pool import run_chunks

# ----------------------------------------------------------------------------- fixed width
# L = 8 / gcd(b, 8) entries of width b fill a whole number of bytes. Entries start one per
# byte (b <= 8) or per int16 (b > 8); each step views pairs of lanes as one lane of twice the
# width and slides the upper half down next to the lower one: x + hi·(2^s - 2^half) with
# hi = x >> half, one shift and one fused multiply-add per step, log2(L) steps. Odd widths
# above 8 would need 128-bit lanes: they stop at 4 entries per int64 and pair words by hand.
_LANES = {8: torch.uint8, 16: torch.int16, 32: torch.int32, 64: torch.int64}


def _plan(width: int) -> tuple[int, int, int]:
    """(entry bits, entries per lane reached by the doubling steps, entries per byte-row)."""
    entry = 8 if width <= 8 else 16
    per_row = 8 // math.gcd(width, 8)
    return entry, min(per_row, 64 // entry), per_row


# Work in chunks that stay in cache: whole-tensor temporaries would each cost a trip to
# memory plus fresh pages from the allocator, which dominate at these speeds. Chunks run
# on a few Python threads (torch releases the GIL) with torch itself on one thread: its own
# parallel regions over chunk-sized ops cost more than they save, badly so on a busy host.
CHUNK = 1 << 17


def pack_fixed(values: torch.Tensor, width: int) -> torch.Tensor:
    """``[n]`` non-negative integers < 2^width → ``[ceil(n·width/8)]`` uint8, LSB first."""
    if width in _SMALL:
        if values.dtype != torch.int16 and values.numel():
            # Checked before narrowing so that no value wraps into range.
            low, high = torch.aminmax(values)
            if int(low) < 0 or int(high) >> width:
                raise ValueError(f"a level does not fit in {width} bits")
            values = values.to(torch.int16)
        return _pack_small(values, width)
    n = values.numel()
    entry, per_lane, per_row = _plan(width)
    rows_total = -(-n // per_row)
    row_bytes = per_row * width // 8
    out = torch.empty(rows_total * row_bytes, dtype=torch.uint8)
    chunk = min(CHUNK, rows_total * per_row)

    def work(starts: list[int]) -> None:
        x_buf = torch.empty(chunk, dtype=_LANES[entry])
        hi_buf = torch.empty(chunk, dtype=_LANES[entry])
        for start in starts:
            stop = min(start + chunk, n)
            rows = -(-(stop - start) // per_row)
            x = x_buf[: rows * per_row]
            part = values[start:stop]
            low, high = torch.aminmax(part)
            if int(low) < 0 or int(high) >> width:
                raise ValueError(f"a level does not fit in {width} bits")
            x[: stop - start].copy_(part)
            x[stop - start :] = 0
            lane, count = entry, 1
            while count < per_lane:
                xv, hv = x.view(_LANES[2 * lane]), hi_buf[: x.numel()].view(_LANES[2 * lane])
                torch.bitwise_right_shift(xv, lane, out=hv)
                xv.add_(hv, alpha=(1 << count * width) - (1 << lane))
                lane, count = 2 * lane, 2 * count
            dest = out[start // per_row * row_bytes :][: rows * row_bytes].view(rows, row_bytes)
            if per_lane < per_row:
                # Odd width > 8: two int64 lanes of 4 entries (4b bits each) make a row.
                h = x.view(torch.int64).view(-1, 2)
                lo = h[:, 0] | (h[:, 1] << 4 * width)
                hi = h[:, 1] >> (64 - 4 * width)
                dest.copy_(torch.stack((lo, hi), 1).view(torch.uint8).view(-1, 16)[:, :width])
            else:
                dest.copy_(x.view(torch.uint8).view(rows, lane // 8)[:, :row_bytes])

    run_chunks(n, chunk, work)
    return out[: (n * width + 7) // 8]


def unpack_fixed(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_fixed`: ``[n]`` int16."""
    if width in _SMALL:
        return _unpack_small(packed, width, n)
    entry, per_lane, per_row = _plan(width)
    row_bytes = per_row * width // 8
    lane_top = entry * per_lane if per_lane == per_row else 128
    out = torch.empty(n, dtype=torch.int16)
    chunk = min(CHUNK, -(-n // per_row) * per_row)

    def work(starts: list[int]) -> None:
        buf = torch.empty(chunk // per_row, lane_top // 8, dtype=torch.uint8)
        hi_buf = torch.empty(chunk * entry // 8, dtype=torch.uint8)
        for start in starts:
            stop = min(start + chunk, n)
            rows = -(-(stop - start) // per_row)
            src = packed[start // per_row * row_bytes :][: rows * row_bytes]
            b = buf[:rows]
            b.zero_()
            if src.numel() == rows * row_bytes:
                b[:, :row_bytes] = src.view(rows, row_bytes)
            else:  # the stream's last bytes: the final row is cut short
                body = (rows - 1) * row_bytes
                b[:-1, :row_bytes] = src[:body].view(rows - 1, row_bytes)
                b[-1, : src.numel() - body] = src[body:]
            lane = lane_top
            if lane == 128:
                words = b.view(torch.int64)
                lo, hi = words[:, 0], words[:, 1]
                quad = 4 * width
                h1 = ((lo >> quad) & ((1 << (64 - quad)) - 1)) | (hi << (64 - quad))
                x = torch.stack((lo & ((1 << quad) - 1), h1), 1).reshape(-1)
                lane = 64
            else:
                x = b.view(_LANES[lane]).reshape(-1)
            count = per_lane
            while count > 1:
                half, count = lane // 2, count // 2
                hv = hi_buf.view(_LANES[lane])[: x.numel()]
                torch.bitwise_right_shift(x, count * width, out=hv)
                x.add_(hv, alpha=(1 << half) - (1 << count * width))
                x = x.view(_LANES[half])
                lane = half
            out[start:stop].copy_(x[: stop - start])

    run_chunks(n, chunk, work)
    return out


# ----------------------------------------------------------------------------- 2 and 3 bits
# Narrow widths go through one 64-bit multiply per 4 entries instead of the doubling steps.
# Four int16 entries in a uint64 word times sum_j 2^(s - (16 - b)·j) put entry j at bit
# s + b·j; every partial product is a b-bit field and no two of them overlap (their bit
# positions differ by at least b), so nothing carries and the 4b bits at s are the packed
# entries. Unpacking multiplies a 4b-bit field (b <= 3: 4b < 16 - b) by sum_j 2^((16-b)·j),
# which copies it next to every int16 lane, and a mask keeps each lane's b bits.
_SMALL = (2, 3)
# 2 bits: a byte per word, landing at bit 48 (byte 6 of the little-endian word).
_PACK2 = np.uint64(sum(1 << (48 - 14 * j) for j in range(4)))
# 3 bits: 12 bits per word, landing at bit 40.
_PACK3 = np.uint64(sum(1 << (40 - 13 * j) for j in range(4)))
_SPREAD = {b: np.uint64(sum(1 << (16 - b) * j for j in range(4))) for b in _SMALL}
_LANE_MASK = {b: np.uint64(sum(((1 << b) - 1) << 16 * j for j in range(4))) for b in _SMALL}


def _small_rows(width: int, pack: bool = False) -> tuple[int, int]:
    """(entries, bytes) per row: a row is one byte (2 bits) or three (3 bits); packing
    3 bits works on pairs of rows (see :func:`_pack_small_rows`)."""
    if width == 2:
        return 4, 1
    return (16, 6) if pack else (8, 3)


def _pack_small_rows(x: np.ndarray, width: int, dest: np.ndarray) -> None:
    """int16 entries (a whole number of rows) → their rows' bytes in ``dest`` (uint8)."""
    words = x.view(np.uint64)
    if int(np.bitwise_or.reduce(words)) & ~int(_LANE_MASK[width]):
        raise ValueError(f"a level does not fit in {width} bits")
    if width == 2:
        dest[:] = (words * _PACK2).view(np.uint8)[6::8]
    else:
        f = words * _PACK3
        f >>= np.uint64(40)
        f &= np.uint64(0xFFF)
        f = f.reshape(-1, 4)  # the 12-bit fields of two 3-byte rows
        # Two passes of 4-byte stores 6 bytes apart (unaligned uint32 views): the first
        # writes row 0 and a zero byte, the second bytes 2..5 (last of row 0, all of row 1).
        units = f.shape[0]
        first = np.ndarray((units,), "<u4", dest, 0, (6,))
        second = np.ndarray((units,), "<u4", dest, 2, (6,))
        np.bitwise_or(f[:, 0], f[:, 1] << np.uint64(12), out=first, casting="unsafe")
        high = (f[:, 1] >> np.uint64(4)) | (f[:, 2] << np.uint64(8))
        np.bitwise_or(high, f[:, 3] << np.uint64(20), out=second, casting="unsafe")


def _unpack_small_rows(src: np.ndarray, width: int, out: np.ndarray) -> None:
    """Whole rows' bytes ``src`` (uint8) → their int16 entries in ``out``."""
    words = out.view(np.uint64)
    if width == 2:
        np.multiply(src, _SPREAD[2], out=words)
    else:
        rows = src.size // 3
        # The row's 24 bits as two 12-bit fields, read as uint16 from bytes 0 and 1 of it.
        even = np.ndarray((rows,), "<u2", src, 0, (3,))
        odd = np.ndarray((rows,), "<u2", src, 1, (3,))
        np.bitwise_and(even, 0xFFF, out=words[0::2], casting="unsafe")
        np.right_shift(odd, 4, out=words[1::2], casting="unsafe")
        words *= _SPREAD[3]
    words &= _LANE_MASK[width]


def _pack_small(values: torch.Tensor, width: int) -> torch.Tensor:
    """:func:`pack_fixed` for int16 levels of 2 or 3 bits."""
    n = values.numel()
    per_row, row_bytes = _small_rows(width, pack=True)
    full = n // per_row
    out = torch.empty(-(-n // per_row) * row_bytes, dtype=torch.uint8)
    src, dst = values.contiguous().numpy(), out.numpy()
    rows_per_chunk = max(1, CHUNK // per_row)

    def work(starts: list[int]) -> None:
        for r0 in starts:
            r1 = min(r0 + rows_per_chunk, full)
            _pack_small_rows(src[r0 * per_row : r1 * per_row], width,
                             dst[r0 * row_bytes : r1 * row_bytes])

    if full:
        run_chunks(full, rows_per_chunk, work)
    if full * per_row < n:  # the last row, short: padded with zeros
        tail = np.zeros(per_row, dtype=np.int16)
        tail[: n - full * per_row] = src[full * per_row :]
        _pack_small_rows(tail, width, dst[full * row_bytes :])
    return out[: (n * width + 7) // 8]


def _unpack_small(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """:func:`unpack_fixed` for 2 or 3 bits."""
    per_row, row_bytes = _small_rows(width)
    rows = -(-n // per_row)
    full = min(rows, packed.numel() // row_bytes)
    out = torch.empty(rows * per_row, dtype=torch.int16)
    src, dst = packed.contiguous().numpy(), out.numpy()
    rows_per_chunk = max(1, CHUNK // per_row)

    def work(starts: list[int]) -> None:
        for r0 in starts:
            r1 = min(r0 + rows_per_chunk, full)
            _unpack_small_rows(src[r0 * row_bytes : r1 * row_bytes], width,
                               dst[r0 * per_row : r1 * per_row])

    if full:
        run_chunks(full, rows_per_chunk, work)
    if full < rows:  # the stream's last row is cut short
        tail = np.zeros(row_bytes, dtype=np.uint8)
        rest = src[full * row_bytes :]
        tail[: rest.size] = rest
        _unpack_small_rows(tail, width, dst[full * per_row :])
    return out[:n]
