"""Bitstream layout (docs/format.md): golden bytes, exact round trips on every CPU path, errors."""

from __future__ import annotations

import pytest
import torch

from diffq_triton.codec import bitpack_fixed
from diffq_triton.ops import bitpack
from diffq_triton.ops.reference import bit_width_field, expand_groups, num_groups

# Every test runs on the native codec and on the torch path: both must write the same bytes.
pytestmark = pytest.mark.usefixtures("cpu_codec")


def stream_as_int(levels: torch.Tensor, bits: torch.Tensor, group_size: int) -> bytes:
    """The layout's definition: the little-endian integer Σ q_i·2^{o_i}, o_i = Σ_{j<i} b_j."""
    widths = expand_groups(bits.to(torch.int64), levels.numel(), group_size).tolist()
    acc, offset = 0, 0
    for q, b in zip(levels.tolist(), widths, strict=True):
        acc |= q << offset
        offset += b
    return acc.to_bytes((offset + 7) // 8, "little")


def random_case(numel: int, group_size: int, low: int, high: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    n_groups = num_groups(numel, group_size)
    bits = torch.randint(low, high + 1, (n_groups,), generator=gen, dtype=torch.int64)
    top = (1 << expand_groups(bits, numel, group_size)) - 1
    levels = (torch.rand(numel, generator=gen, dtype=torch.float64) * (top + 1)).long()
    return levels.clamp(max=top).to(torch.int16), bits.to(torch.uint8)


def test_golden_fixed_width():
    levels = torch.tensor([1, 2, 3, 4, 15, 0], dtype=torch.int16)
    packed = bitpack.pack_levels(levels, torch.tensor([4], dtype=torch.uint8), 0)
    # Packing is LSB first: byte = q[2k] | q[2k+1] << 4.
    assert packed.tolist() == [0x21, 0x43, 0x0F]


def test_golden_mixed_widths():
    levels = torch.tensor([1, 2, 3, 0, 5], dtype=torch.int16)
    bits = torch.tensor([2, 3, 3], dtype=torch.uint8)
    packed = bitpack.pack_levels(levels, bits, 2)
    # bits 0-1: 1 -> 10, 2-3: 2 -> 01, 4-6: 3 -> 110, 7-9: 0 -> 000, 10-12: 5 -> 101
    # stream bit k = bit k%8 of byte k//8: 0b00111001, 0b00010100
    assert packed.tolist() == [0b00111001, 0b00010100]
    assert bitpack.unpack_levels(packed, bits, 2, 5).tolist() == [1, 2, 3, 0, 5]


def test_golden_odd_wide_width():
    levels = torch.tensor([0x1ABC, 0x0001], dtype=torch.int16)
    packed = bitpack.pack_levels(levels, torch.tensor([13], dtype=torch.uint8), 0)
    assert packed.tolist() == [0xBC, 0x3A, 0x00, 0x00]


@pytest.mark.parametrize("width", range(1, 16), ids=lambda w: f"b{w}")
@pytest.mark.parametrize("numel", [1, 7, 8, 63, 1151], ids=lambda n: f"n{n}")
def test_fixed_width_round_trip(width, numel):
    levels, bits = random_case(numel, 0, width, width, seed=width * 1000 + numel)
    packed = bitpack.pack_levels(levels, bits, 0)
    assert bytes(packed.tolist()) == stream_as_int(levels, bits, 0)
    assert packed.numel() == (numel * width + 7) // 8
    assert torch.equal(bitpack.unpack_levels(packed, bits, 0, numel), levels)


# group sizes multiple of 8 take the aligned path (narrow <= 8 bits, or wide), the others
# the 32-bit word path; lengths not multiple of the group size give a shorter last group.
@pytest.mark.parametrize("group_size", [1, 3, 8, 16, 24, 1000], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("numel", [5, 64, 1151, 4099], ids=lambda n: f"n{n}")
@pytest.mark.parametrize("widths", [(1, 8), (2, 15), (9, 15)], ids=lambda w: f"b{w[0]}-{w[1]}")
def test_mixed_width_round_trip(group_size, numel, widths):
    levels, bits = random_case(numel, group_size, *widths, seed=numel + group_size)
    packed = bitpack.pack_levels(levels, bits, group_size)
    assert bytes(packed.tolist()) == stream_as_int(levels, bits, group_size)
    assert packed.numel() == bitpack.packed_nbytes(bits, group_size, numel)
    assert torch.equal(bitpack.unpack_levels(packed, bits, group_size, numel), levels)


@pytest.mark.parametrize("group_size", [0, 1, 8, 5], ids=lambda g: f"g{g}")
def test_many_chunks(monkeypatch, group_size):
    # Chunk borders fall inside rows, words and groups.
    monkeypatch.setattr(bitpack_fixed, "CHUNK", 24)
    low, high = (3, 3) if group_size == 0 else (1, 15)
    levels, bits = random_case(1001, group_size, low, high, seed=7)
    packed = bitpack.pack_levels(levels, bits, group_size)
    assert bytes(packed.tolist()) == stream_as_int(levels, bits, group_size)
    assert torch.equal(bitpack.unpack_levels(packed, bits, group_size, 1001), levels)


def test_extreme_levels():
    for width in range(1, 16):
        levels = torch.tensor([0, (1 << width) - 1] * 9, dtype=torch.int16)
        bits = torch.tensor([width], dtype=torch.uint8)
        packed = bitpack.pack_levels(levels, bits, 0)
        assert torch.equal(bitpack.unpack_levels(packed, bits, 0, 18), levels)


def test_empty():
    bits = torch.tensor([4], dtype=torch.uint8)
    packed = bitpack.pack_levels(torch.zeros(0, dtype=torch.int16), bits, 0)
    assert packed.numel() == 0
    assert bitpack.unpack_levels(packed, bits, 0, 0).numel() == 0


@pytest.mark.parametrize(
    "levels, bits, group_size, match",
    [
        ([1, 2], [0], 0, "widths must lie"),
        ([1, 2], [16], 0, "widths must lie"),
        ([4, 1], [2], 0, "does not fit"),
        ([-1, 1], [2], 0, "does not fit"),
        ([1, 2, 3], [2, 2], 1, "holds 2 widths"),
        ([3] * 16, [2, 1], 8, "does not fit"),
        ([3] * 16, [9, 1], 8, "does not fit"),
        ([1, 9, 1], [3, 3, 3], 1, "does not fit"),
    ],
)
def test_pack_rejects(levels, bits, group_size, match):
    with pytest.raises(ValueError, match=match):
        bitpack.pack_levels(
            torch.tensor(levels, dtype=torch.int16), torch.tensor(bits, dtype=torch.uint8),
            group_size,
        )


def test_unpack_rejects_wrong_length():
    bits = torch.tensor([4], dtype=torch.uint8)
    with pytest.raises(ValueError, match="expected 2"):
        bitpack.unpack_levels(torch.zeros(3, dtype=torch.uint8), bits, 0, 4)
    with pytest.raises(ValueError, match="uint8"):
        bitpack.unpack_levels(torch.zeros(2, dtype=torch.int16), bits, 0, 4)


@pytest.mark.parametrize("min_bits", [1, 2, 3])
def test_widths_round_trip_and_field_size(min_bits):
    gen = torch.Generator().manual_seed(min_bits)
    bits = torch.randint(min_bits, 16, (1001,), generator=gen).to(torch.uint8)
    packed, field = bitpack.pack_widths(bits, min_bits)
    assert field == int(bit_width_field(bits.float(), min_bits))
    assert packed.numel() == (1001 * field + 7) // 8
    assert torch.equal(bitpack.unpack_widths(packed, field, 1001, min_bits), bits)


def test_widths_all_equal_is_empty():
    bits = torch.full((10,), 4, dtype=torch.uint8)
    packed, field = bitpack.pack_widths(bits, 4)
    assert field == 0 and packed.numel() == 0
    assert torch.equal(bitpack.unpack_widths(packed, 0, 10, 4), bits)


def test_widths_golden():
    packed, field = bitpack.pack_widths(torch.tensor([2, 5, 3, 2], dtype=torch.uint8), 2)
    # excess 0, 3, 1, 0 in 2-bit fields: 0b00_01_11_00
    assert field == 2 and packed.tolist() == [0b00011100]


def test_widths_reject():
    with pytest.raises(ValueError, match="below min_bits"):
        bitpack.pack_widths(torch.tensor([1, 3], dtype=torch.uint8), 2)
    with pytest.raises(ValueError, match="field_bits"):
        bitpack.unpack_widths(torch.zeros(1, dtype=torch.uint8), 5, 1, 2)
    with pytest.raises(ValueError, match="expected 1"):
        bitpack.unpack_widths(torch.zeros(2, dtype=torch.uint8), 2, 3, 2)


def test_kernel_path_level_check_reads_int64_levels_whole():
    # The range check before the Triton pack: 2^32 + 1 must not wrap to a valid 1.
    from diffq_triton.ops.bitpack import _check_levels_range

    bits = torch.tensor([4, 4], dtype=torch.uint8)
    with pytest.raises(ValueError, match="does not fit"):
        _check_levels_range(torch.tensor([2**32 + 1, 0] * 5), bits, 5)
    _check_levels_range(torch.tensor([15, 0] * 5), bits, 5)
