"""The native CPU codec on tensors: bit packing fused with quantization, in pieces.

Packing a model of 25M weights with whole-tensor torch ops costs several passes over
memory and fresh pages for every temporary; the C loops of ``csrc/codec.c`` (built and
loaded by :mod:`.native_build`) quantize and pack (or unpack and dequantize) a block of
entries while it is in L1, one pass each way. ctypes releases the GIL, so the pieces of a
tensor run on the pool of :mod:`.cpu_pool`.

The float arithmetic is the reference's, operation for operation, so the levels and the
weights are bit-identical to :mod:`diffq_triton.ops.reference` (the tests compare them).
"""

from __future__ import annotations

import ctypes
import zlib

import numpy as np
import torch

from .bitpack_cpu import MAX_WIDTH
from .cpu_pool import call_workers, cpu_threads, run_calls

# library() and unavailable_reason() are re-exported: callers load and call through here.
from .native_build import _crc32, _units
from .native_build import library as library
from .native_build import unavailable_reason as unavailable_reason

# Entries per piece of work: large enough that a ctypes call is negligible, small enough
# that both threads stay busy to the end.
PIECE = 1 << 18


# ----------------------------------------------------------------------------- pieces
class _Layout:
    """Pieces of one tensor's stream: ``(first entry, end entry, first bit, end bit)``.

    Pieces start on group boundaries (anywhere for a single group), so the C loops know
    each entry's width; the bit offsets are prefix sums of the widths.
    """

    def __init__(self, lib: ctypes.CDLL, bits: torch.Tensor, group_size: int, numel: int):
        self.single = bits.numel() == 1
        self.group = numel if self.single or group_size == 0 else group_size
        # Rows of 8 entries start on bytes: one width, or groups of a multiple of 8 entries
        # (pieces start on multiples of 8 entries, PIECE being one).
        self.rows = int(self.single or self.group % 8 == 0)
        step = PIECE if self.single else max(1, PIECE // self.group) * self.group
        bits_ptr = bits.data_ptr()
        self.pieces: list[tuple[int, int, int, int]] = []
        bit = 0
        for e0 in range(0, numel, step):
            e1 = min(numel, e0 + step)
            if self.single:
                span = (e1 - e0) * int(bits[0])
            else:
                g0, g1 = e0 // self.group, -(-e1 // self.group)
                span = lib.dq_sum_u8(bits_ptr + g0, g1 - g0) * self.group
                if e1 == numel:  # the last group may be shorter
                    span -= (g1 * self.group - numel) * int(bits[-1])
            self.pieces.append((e0, e1, bit, bit + span))
            bit += span
        self.total_bits = bit
        self.nbytes = (bit + 7) // 8

    def empty_stream(self) -> torch.Tensor:
        """An uninitialised stream with the bytes that pieces share zeroed (they OR them)."""
        out = _host_bytes(self.nbytes)
        if self.nbytes:
            shared = [b0 >> 3 for _, _, b0, _ in self.pieces if b0 & 7] + [self.nbytes - 1]
            out[torch.tensor(shared, dtype=torch.int64)] = 0
        return out


def _host_bytes(count: int, dtype: type = np.uint8) -> torch.Tensor:
    """``[count]`` uninitialised entries (uint8 unless ``dtype``) from numpy's allocator.

    torch's CPU allocator maps every large block afresh, so each new stream pays a page
    fault per 4 KiB (about as long as packing it); the C allocator behind numpy reuses
    freed blocks, already mapped, from one save to the next.
    """
    return torch.from_numpy(np.empty(count, dtype=dtype))


def _widths(bits: torch.Tensor, numel: int, group_size: int) -> torch.Tensor:
    """Checked contiguous uint8 widths: the C loops index tables by them.

    Checked before narrowing to uint8, so that no width wraps (257) or truncates (1.9)
    into range.
    """
    if bits.is_floating_point() or bits.is_complex() or bits.dtype == torch.bool:
        raise ValueError(f"bit widths must be an integer tensor, got {bits.dtype}")
    bits = bits.reshape(-1)
    # The groups of docs/format.md §1 (as ops.reference.num_groups, which this layer
    # does not import).
    expected = 1 if group_size == 0 or numel == 0 else -(-numel // group_size)
    if bits.numel() != expected:
        raise ValueError(f"bits holds {bits.numel()} widths, {numel} entries need {expected}")
    if bits.numel():
        low, high = torch.aminmax(bits)
        if int(low) < 1 or int(high) > MAX_WIDTH:
            raise ValueError(f"bit widths must lie in [1, {MAX_WIDTH}], got "
                             f"[{int(low)}, {int(high)}]")
    return bits.to("cpu", torch.uint8).contiguous()


# ----------------------------------------------------------------------------- public
def crc32(lib: ctypes.CDLL | None, data: torch.Tensor, crc: int = 0) -> int:
    """``zlib.crc32`` of a contiguous CPU uint8 tensor, about 3× faster on large ones.

    The codec folds the bulk with carry-less multiplications (x86-64 with PCLMULQDQ) and
    zlib finishes the last bytes; elsewhere, or without ``lib``, zlib does it all.
    """
    if data.device.type != "cpu" or data.dtype != torch.uint8 or data.dim() != 1:
        raise ValueError(f"crc32 takes a 1-D uint8 CPU tensor, got {data.dtype} "
                         f"{tuple(data.shape)} on {data.device}")
    data = data.contiguous()
    if lib is None or data.numel() < 64:
        return zlib.crc32(data.numpy(), crc)
    return _crc32(lib, data, crc)


def stream_nbytes(lib: ctypes.CDLL, bits: torch.Tensor, group_size: int, numel: int) -> int:
    """Bytes of the stream of ``numel`` entries with uint8 CPU widths ``bits`` ``[n_groups]``."""
    bits = bits.contiguous()
    n_groups = bits.numel()
    if n_groups == 1:
        return (numel * int(bits[0]) + 7) // 8
    total = group_size * lib.dq_sum_u8(bits.data_ptr(), n_groups)
    total -= (group_size * n_groups - numel) * int(bits[-1])  # the shorter last group
    return (total + 7) // 8


def value_range(w: torch.Tensor) -> tuple[float, float]:
    """``(min, max)`` of a CPU tensor as Python floats (NaN if it holds NaN), in parallel.

    torch.aminmax over slices on the pool threads (torch releases the GIL): the range is a
    whole pass over the weights before the quantizing pass can start.
    """
    flat = w.detach().reshape(-1)
    n = flat.numel()
    if n == 0:
        raise ValueError("cannot take the range of an empty tensor")
    step = max(PIECE, -(-n // 8))
    # Torch ops on the pool: torch itself on one thread meanwhile (cpu_threads).
    with cpu_threads():
        parts = run_calls([(torch.aminmax, (flat[i : i + step],)) for i in range(0, n, step)])
    lows = torch.stack([lo for lo, _ in parts])
    highs = torch.stack([hi for _, hi in parts])
    if bool(torch.isnan(lows).any() | torch.isnan(highs).any()):
        return float("nan"), float("nan")
    return float(lows.min()), float(highs.max())


def quantize_pack(lib: ctypes.CDLL, w: torch.Tensor, bits: torch.Tensor, group_size: int,
                  mn: float, safe: float) -> torch.Tensor:
    """Quantize float32 CPU weights and pack the levels in one pass.

    Levels are ``round(((w - mn)/safe)/u(b))`` in float32, half to even, as
    :func:`reference.quantize` computes them; the stream is :func:`bitpack.pack_levels`'s.

    Args:
        lib: :func:`library`'s codec.
        w: float32 CPU weights, any shape (read flattened).
        bits: ``[n_groups]`` integer widths in ``[1, 15]``.
        group_size: entries per group (0: one group).
        mn, safe: the range minimum and ``mx - mn`` (1 when the range is empty), finite, and
            holding every entry of ``w`` (from :func:`value_range`): a level above
            ``2^b - 1`` would spill into its neighbours' bits, so this is a precondition.

    Returns:
        ``[ceil(Σ b_i / 8)]`` uint8 stream. Moves 4 bytes read + ``b/8`` written per entry.
    """
    flat = w.detach().reshape(-1).contiguous()
    if flat.dtype != torch.float32 or flat.device.type != "cpu":
        raise ValueError(f"quantize_pack needs float32 CPU weights, got {flat.dtype} on "
                         f"{flat.device}")
    bits = _widths(bits, flat.numel(), group_size)
    layout = _Layout(lib, bits, group_size, flat.numel())
    out = layout.empty_stream()
    units = _units()
    run_calls([
        (lib.dq_quantize_pack, (flat.data_ptr(), e0, e1, layout.group, bits.data_ptr(),
                                units.data_ptr(), mn, safe, out.data_ptr(), b0, b1,
                                layout.rows))
        for e0, e1, b0, b1 in layout.pieces
    ], call_workers())
    return out


def pack(lib: ctypes.CDLL, levels: torch.Tensor, bits: torch.Tensor, group_size: int,
         offset: int = 0) -> torch.Tensor:
    """Pack integer levels ``q + offset`` (int16 or uint8, CPU) into a stream.

    Raises:
        ValueError: a level plus ``offset`` lies outside ``[0, 2^b)`` of its group.
    """
    _check_offset(offset)
    flat = levels.reshape(-1)
    if flat.dtype not in (torch.int16, torch.uint8):
        flat = _narrow(flat, offset)
    flat = flat.contiguous()
    fn = lib.dq_pack_u8 if flat.dtype == torch.uint8 else lib.dq_pack_i16
    bits = _widths(bits, flat.numel(), group_size)
    layout = _Layout(lib, bits, group_size, flat.numel())
    out = layout.empty_stream()
    bad = run_calls([
        (fn, (flat.data_ptr(), e0, e1, layout.group, bits.data_ptr(), offset,
              out.data_ptr(), b0, b1, layout.rows))
        for e0, e1, b0, b1 in layout.pieces
    ], call_workers())
    if any(bad):
        raise ValueError("a level does not fit in its group's bit width")
    return out


def _check_offset(offset: int) -> None:
    # Passed to C as int32; levels and their offsets stay within 16 bits.
    if not -(1 << 16) <= offset <= 1 << 16:
        raise ValueError(f"offset {offset} lies outside [-65536, 65536]")


def _narrow(levels: torch.Tensor, offset: int) -> torch.Tensor:
    """int16 copy of wider integer levels, refusing values that would wrap."""
    if levels.numel():
        low, high = torch.aminmax(levels)
        if int(low) + offset < 0 or int(high) + offset > (1 << MAX_WIDTH) - 1:
            raise ValueError("a level does not fit in its group's bit width")
    return levels.to(torch.int16)


def unpack(lib: ctypes.CDLL, packed: torch.Tensor, bits: torch.Tensor, group_size: int,
           numel: int, offset: int = 0) -> torch.Tensor:
    """``[numel]`` int16 levels ``q - offset`` of a stream of exactly the right length."""
    _check_offset(offset)
    bits = _widths(bits, numel, group_size)
    layout = _Layout(lib, bits, group_size, numel)
    packed = _stream(packed, layout)
    out = _host_bytes(numel, np.int16)
    run_calls([
        (lib.dq_unpack_i16, (packed.data_ptr(), layout.nbytes, e0, e1, layout.group,
                             bits.data_ptr(), b0, offset, out.data_ptr(), layout.rows))
        for e0, e1, b0, _ in layout.pieces
    ], call_workers())
    return out


def unpack_dequantize(lib: ctypes.CDLL, packed: torch.Tensor, bits: torch.Tensor,
                      group_size: int, numel: int, mn: float, span: float,
                      out: torch.Tensor | None = None) -> torch.Tensor:
    """Unpack a minmax stream and dequantize it (``q·u(b)·span + mn`` in float32).

    Args:
        out: optional contiguous float32 CPU tensor of ``numel`` entries to write into
            (a model's parameter: no new memory).

    Returns:
        ``[numel]`` float32 (``out`` flattened when given). Moves ``b/8`` bytes read + 4
        written per entry.
    """
    bits = _widths(bits, numel, group_size)
    layout = _Layout(lib, bits, group_size, numel)
    packed = _stream(packed, layout)
    if out is None:
        out = _host_bytes(numel, np.float32)
    if (out.device.type != "cpu" or out.dtype != torch.float32 or not out.is_contiguous()
            or out.numel() != numel):
        raise ValueError(f"out must be a contiguous float32 CPU tensor of {numel} entries, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    out = out.view(-1)
    units = _units()
    run_calls([
        (lib.dq_unpack_dequantize, (packed.data_ptr(), layout.nbytes, e0, e1,
                                    layout.group, bits.data_ptr(), b0, units.data_ptr(),
                                    mn, span, out.data_ptr(), layout.rows))
        for e0, e1, b0, _ in layout.pieces
    ], call_workers())
    return out


def check_stream(lib: ctypes.CDLL, packed: torch.Tensor, bits: torch.Tensor,
                 group_size: int, numel: int) -> None:
    """Raise ``ValueError`` unless :func:`unpack_dequantize` would accept these arguments.

    For callers that must check every tensor before writing any (a failed restore must
    leave the model unchanged).
    """
    bits = _widths(bits, numel, group_size)
    _stream(packed, _Layout(lib, bits, group_size, numel))


def _stream(packed: torch.Tensor, layout: _Layout) -> torch.Tensor:
    # The C loops read every byte up to nbytes: a shorter buffer would be read past its end.
    if packed.device.type != "cpu" or packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed stream must be a 1-D uint8 CPU tensor, got {packed.dtype} "
                         f"{tuple(packed.shape)} on {packed.device}")
    if packed.numel() != layout.nbytes:
        raise ValueError(f"packed stream holds {packed.numel()} bytes, expected "
                         f"{layout.nbytes}")
    return packed.contiguous()
