"""The torch reference decoder of the packed layout: what packed kernels are tested against.

It reads the buffers of a :class:`~.layout.PackedTensor` the way a kernel program does: a
tile's bit offset from ``tile_offsets``, its groups' widths from the width stream, an
exclusive prefix sum of ``width·group_len`` for each group's first bit, then each level from
the 3 bytes that hold its (at most 15 + 7) bits. The float math is the library's oracle
(:func:`diffq_triton.ops.reference.dequantize`), so the result equals the file loader's
weights bit for bit (tests/test_packed.py checks it). Slow (int64 temporaries per entry):
for tests and as documentation, never on a hot path.
"""

from __future__ import annotations

import torch

from ..ops import reference
from .layout import PackedTensor


def read_bits(stream: torch.Tensor, offsets: torch.Tensor, widths: torch.Tensor) -> torch.Tensor:
    """Unsigned values of ``widths`` bits at stream bit ``offsets`` (LSB first).

    Args:
        stream: padded uint8 stream (at least 2 bytes after the last value's first byte).
        offsets: ``[n]`` int64 bit offsets.
        widths: ``[n]`` int64 widths in ``[0, 15]``.

    Returns:
        ``[n]`` int64 values.
    """
    byte = offsets >> 3
    # A value of b <= 15 bits starting at bit (offset & 7) <= 7 lies within 3 bytes.
    window = (stream[byte].to(torch.int64) | stream[byte + 1].to(torch.int64) << 8
              | stream[byte + 2].to(torch.int64) << 16)
    return (window >> (offsets & 7)) & ((1 << widths) - 1)


def tile_widths(pt: PackedTensor, first_group: int, stop_group: int) -> torch.Tensor:
    """``[stop_group - first_group]`` int64 widths, read from the width stream (§2)."""
    n = stop_group - first_group
    if not pt.field_bits:
        return torch.full((n,), pt.base, dtype=torch.int64, device=pt.device)
    index = torch.arange(first_group, stop_group, dtype=torch.int64, device=pt.device)
    field = torch.full_like(index, pt.field_bits)
    return read_bits(pt.widths, index * pt.field_bits, field) + pt.base


def dequantize_tiles(pt: PackedTensor, first_tile: int, stop_tile: int) -> torch.Tensor:
    """Dequantize the entries of tiles ``[first_tile, stop_tile)`` (what one or several
    kernel programs produce).

    Args:
        pt: the packed tensor.
        first_tile, stop_tile: a tile range within ``[0, n_tiles]``.

    Returns:
        ``[e1 - e0]`` float32, entries ``e0 = first_tile·T·g`` to
        ``e1 = min(stop_tile·T·g, numel)`` of the row-major flattened weight
        (``g = group_size``, or ``numel`` for one group), before any dtype rounding.
    """
    n_tiles = pt.tile_offsets.numel()
    if not 0 <= first_tile <= stop_tile <= n_tiles:
        raise ValueError(f"tile range [{first_tile}, {stop_tile}) outside [0, {n_tiles}]")
    g = pt.group_size if pt.group_size and pt.n_groups > 1 else pt.numel
    g0 = first_tile * pt.tile_groups
    g1 = min(stop_tile * pt.tile_groups, pt.n_groups)
    e0, e1 = g0 * g, min(g1 * g, pt.numel)
    if e1 <= e0:
        return torch.empty(0, dtype=torch.float32, device=pt.device)
    widths = tile_widths(pt, g0, g1)
    # Entries per group: g, but for the tensor's last group, which may be shorter.
    lengths = torch.full_like(widths, g)
    lengths[-1] = e1 - (g1 - 1) * g
    starts = torch.cumsum(widths * lengths, 0) - widths * lengths  # exclusive prefix sum
    # Each tile restarts from its stored offset (a kernel program sees one tile).
    tile = torch.arange(g1 - g0, device=pt.device) // pt.tile_groups
    tile_base = pt.tile_offsets[first_tile:stop_tile][tile]
    first_of_tile = starts[tile * pt.tile_groups]
    group_bit = tile_base + (starts - first_of_tile)
    entry = torch.arange(e0, e1, dtype=torch.int64, device=pt.device)
    group = entry // g - g0
    width = widths[group]
    levels = read_bits(pt.levels, group_bit[group] + (entry - (group + g0) * g) * width, width)
    mn, mx = pt.scale[0], pt.scale[1]
    if pt.scheme == "lsq":
        # Stored as q + 2^(b-1); w = q·step (QuantizedTensor.dequantize).
        return (levels - (1 << (width - 1))).float() * mn
    return reference.dequantize(levels, widths, g, mn, mx)


def dequantize_packed(pt: PackedTensor) -> torch.Tensor:
    """The whole weight: ``[*shape]`` of ``pt.dtype``, rounded as the float model's
    parameter (float32 decode, then the record's dtype, then ``pt.dtype``)."""
    flat = dequantize_tiles(pt, 0, pt.tile_offsets.numel())
    return pt.cast(flat.view(pt.shape))
