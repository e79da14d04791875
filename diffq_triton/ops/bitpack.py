"""Dense bitstreams of quantized levels with per-group widths (layout in docs/format.md).

Layout: entry ``i`` of width ``b_i`` (its group's width) occupies stream bits
``[o_i, o_i + b_i)`` with ``o_i = Σ_{j<i} b_j``, least significant bit first; stream bit ``k``
is bit ``k % 8`` of byte ``k // 8``; the last byte is padded with zero bits. The stream is
the little-endian integer ``Σ_i q_i · 2^{o_i}`` written in ``ceil(Σ b_i / 8)`` bytes.

CPU tensors go through the vectorized code of :mod:`diffq_triton.codec.bitpack_cpu`, CUDA tensors
through the Triton kernels of :mod:`diffq_triton.kernels.bitpack`; this module checks the
arguments and dispatches.
"""

from __future__ import annotations

import math
import sys

import torch

from ..codec import native
from ..codec.bitpack_cpu import (
    MAX_WIDTH,
    pack_cpu,
    pack_fixed,
    stream_nbytes,
    unpack_cpu,
    unpack_fixed,
)
from ..codec.cpu_pool import cpu_threads
from .dispatch import bitpack_on_triton
from .reference import num_groups

__all__ = ["MAX_WIDTH", "pack_levels", "pack_widths", "packed_nbytes", "unpack_levels",
           "unpack_widths", "width_field_bits"]

if sys.byteorder != "little":  # pragma: no cover - the byte views below assume it
    raise ImportError("diffq_triton.ops.bitpack needs a little-endian host")


# ----------------------------------------------------------------------------- public API
def packed_nbytes(bits: torch.Tensor, group_size: int, numel: int) -> int:
    """Bytes of the stream of ``numel`` entries with per-group widths ``bits`` (host sync)."""
    if bits.device.type == "cpu" and bits.dtype == torch.uint8 and bits.numel() > 1:
        lib = native.library()
        if lib is not None:
            return native.stream_nbytes(lib, bits, group_size, numel)
    return stream_nbytes(bits, group_size, numel)


def pack_levels(levels: torch.Tensor, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """Pack unsigned levels into a dense bitstream.

    Args:
        levels: ``[numel]`` integer tensor (int16 usually), ``0 <= q < 2^b`` of its group.
        bits: ``[n_groups]`` integer widths in ``[1, 15]`` (uint8 usually).
        group_size: entries per group (0: one group); the last group may be shorter.

    Returns:
        ``[ceil(Σ b_i / 8)]`` uint8 tensor on ``levels.device``. Moves 2 bytes read +
        ``b/8`` bytes written per entry.

    Raises:
        ValueError: widths out of range, wrong number of groups, levels out of range.
    """
    if isinstance(levels, torch.Tensor) and bitpack_on_triton(levels):
        from ..kernels import bitpack as kernels

        levels, bits = _check_args(levels, bits.to(levels.device), group_size)
        if levels.numel() == 0:
            return torch.zeros(0, dtype=torch.uint8, device=levels.device)
        _check_levels_range(levels, bits, group_size)
        return kernels.pack(levels, bits, group_size)
    with cpu_threads():
        levels, bits = _check_args(levels, bits, group_size)
        if levels.numel() == 0:
            return torch.zeros(0, dtype=torch.uint8)
        lib = native.library()
        if lib is not None:
            return native.pack(lib, levels, bits.cpu(), group_size)
        return pack_cpu(levels, bits.cpu(), group_size)


def unpack_levels(
    packed: torch.Tensor, bits: torch.Tensor, group_size: int, numel: int
) -> torch.Tensor:
    """Inverse of :func:`pack_levels`.

    Args:
        packed: ``[nbytes]`` uint8 stream (exactly :func:`packed_nbytes` long).
        bits: ``[n_groups]`` integer widths in ``[1, 15]``.
        group_size: entries per group (0: one group).
        numel: number of entries.

    Returns:
        ``[numel]`` int16 levels on ``packed.device``. Moves ``b/8`` bytes read + 2 bytes
        written per entry.

    Raises:
        ValueError: widths out of range, or a stream of the wrong length.
    """
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed must be a 1-D uint8 tensor, got {packed.dtype} {packed.shape}")
    if numel < 0:
        raise ValueError(f"numel must be >= 0, got {numel}")
    with cpu_threads():
        bits = _check_bits(bits, group_size, numel).to(packed.device)
        expected = packed_nbytes(bits, group_size, numel) if numel else 0
        if packed.numel() != expected:
            raise ValueError(f"packed stream holds {packed.numel()} bytes, expected {expected}")
        if numel == 0:
            return torch.zeros(0, dtype=torch.int16, device=packed.device)
        if not bitpack_on_triton(packed):
            lib = native.library()
            if lib is not None:
                return native.unpack(lib, packed, bits, group_size, numel)
            return unpack_cpu(packed, bits, group_size, numel)
    from ..kernels import bitpack as kernels

    return kernels.unpack(packed, bits, group_size, numel)


def width_field_bits(bits: torch.Tensor, min_bits: int) -> int:
    """Spec §3 field width ``ceil(log2(1 + max(bits) - min_bits))`` (0 when all equal)."""
    span = int(bits.max()) - min_bits if bits.numel() else 0
    if span < 0:
        raise ValueError(f"min_bits={min_bits} exceeds the largest width {span + min_bits}")
    return math.ceil(math.log2(1 + span))


def pack_widths(bits: torch.Tensor, min_bits: int) -> tuple[torch.Tensor, int]:
    """Pack per-group widths as ``bits - min_bits`` in fields of spec §3's size.

    Args:
        bits: ``[n_groups]`` integer widths, each ``>= min_bits``.
        min_bits: the smallest width representable (the field stores the excess).

    Returns:
        ``(packed, field_bits)``: uint8 stream of ``ceil(n_groups·field_bits / 8)`` bytes and
        the field width (0 to 4; 0 means every width is ``min_bits`` and the stream is empty).
    """
    if bits.dim() != 1:
        raise ValueError(f"bits must be 1-D, got shape {tuple(bits.shape)}")
    if bits.numel() and int(bits.min()) < min_bits:
        raise ValueError(f"bits holds a width below min_bits={min_bits}")
    field = width_field_bits(bits, min_bits)
    if field == 0:
        return torch.zeros(0, dtype=torch.uint8, device=bits.device), 0
    if bitpack_on_triton(bits):
        from ..kernels import bitpack as kernels

        return kernels.pack_fixed(bits.to(torch.int64) - min_bits, field), field
    with cpu_threads():
        lib = native.library()
        if lib is not None:
            return native.pack(lib, bits, torch.tensor([field], dtype=torch.uint8), 0,
                               offset=-min_bits), field
        return pack_fixed(bits.to(torch.int64) - min_bits, field), field


def unpack_widths(
    packed: torch.Tensor, field_bits: int, n_groups: int, min_bits: int
) -> torch.Tensor:
    """Inverse of :func:`pack_widths`: ``[n_groups]`` uint8 widths.

    Raises:
        ValueError: a field width outside ``[0, 4]`` or a stream of the wrong length.
    """
    if not 0 <= field_bits <= 4:
        raise ValueError(f"field_bits must lie in [0, 4], got {field_bits}")
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed widths must be a 1-D uint8 tensor, got {packed.dtype}")
    expected = (n_groups * field_bits + 7) // 8
    if packed.numel() != expected:
        raise ValueError(f"packed widths hold {packed.numel()} bytes, expected {expected}")
    if field_bits == 0:
        return torch.full((n_groups,), min_bits, dtype=torch.uint8, device=packed.device)
    if bitpack_on_triton(packed):
        from ..kernels import bitpack as kernels

        excess = kernels.unpack_fixed(packed, field_bits, n_groups)
    else:
        with cpu_threads():
            lib = native.library()
            if lib is not None:
                widths = native.unpack(lib, packed, torch.tensor([field_bits], dtype=torch.uint8),
                                       0, n_groups, offset=-min_bits)
                return widths.to(torch.uint8)
            excess = unpack_fixed(packed, field_bits, n_groups)
    return (excess.to(torch.int16) + min_bits).to(torch.uint8)


# ----------------------------------------------------------------------------- checks
def _check_bits(bits: torch.Tensor, group_size: int, numel: int) -> torch.Tensor:
    if not isinstance(bits, torch.Tensor) or bits.dim() != 1:
        raise ValueError("bits must be a 1-D integer tensor of per-group widths")
    if bits.is_floating_point():
        raise ValueError(f"bits must be an integer tensor, got {bits.dtype}")
    if group_size < 0:
        raise ValueError(f"group_size must be >= 0, got {group_size}")
    expected = num_groups(numel, group_size)
    if bits.numel() != expected:
        raise ValueError(f"bits holds {bits.numel()} widths, {numel} entries need {expected}")
    low, high = torch.aminmax(bits)
    if int(low) < 1 or int(high) > MAX_WIDTH:
        raise ValueError(f"bit widths must lie in [1, {MAX_WIDTH}], got [{int(low)}, {int(high)}]")
    return bits


def _check_args(
    levels: torch.Tensor, bits: torch.Tensor, group_size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(levels, torch.Tensor) or levels.is_floating_point():
        raise ValueError("levels must be an integer tensor")
    levels = levels.reshape(-1)
    return levels, _check_bits(bits, group_size, levels.numel())


def _check_levels_range(levels: torch.Tensor, bits: torch.Tensor, group_size: int) -> None:
    """Raise unless ``0 <= q < 2^b`` for every entry (one pass per distinct width)."""
    if int(levels.min()) < 0:
        raise ValueError("levels must be >= 0 (unsigned); offset signed levels first")
    per_entry = _expand(bits, group_size, levels.numel())
    # int64 levels are shifted as int64: a cast to int32 first would wrap 2^32 + q to q.
    wide = torch.int64 if levels.dtype in (torch.int64, torch.uint32, torch.uint64) else (
        torch.int32)
    if bool(((levels.to(wide) >> per_entry.to(wide)) != 0).any()):
        raise ValueError("a level does not fit in its group's bit width")


# ----------------------------------------------------------------------------- helpers
def _expand(values: torch.Tensor, group_size: int, numel: int) -> torch.Tensor:
    if values.numel() == 1:
        return values.expand(numel)
    return values.repeat_interleave(group_size)[:numel]
