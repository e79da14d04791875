"""Triton kernels packing and unpacking the dense level bitstream (layout in docs/format.md).

One program handles ``BLOCK`` consecutive entries. Entry ``i`` of group ``s`` starts at stream
bit ``o_i = goff_s + (i - s·g)·b_s`` where ``goff`` is the exclusive prefix sum of the
groups' bit lengths (a torch ``cumsum`` over groups, on the device). Packing ORs each
value into the one or two 32-bit words it touches with atomics, since neighbouring
programs share boundary words; unpacking reads the three bytes an entry can span.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def bitpack_fwd_kernel(p_levels, p_bits, p_goff, p_words, numel, group_size,
                       BLOCK: tl.constexpr):
    """Moves 2 bytes read + ``b/8`` bytes OR-ed (atomics) per entry, plus 9 bytes per group."""
    i_b = tl.program_id(0).to(tl.int64)
    o_i = i_b * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < numel
    o_g = o_i // group_size
    b_w = tl.load(p_bits + o_g, mask=m_i, other=0).to(tl.int64)
    b_off = tl.load(p_goff + o_g, mask=m_i, other=0) + (o_i - o_g * group_size) * b_w
    b_q = tl.load(p_levels + o_i, mask=m_i, other=0).to(tl.int64)
    b_val = b_q << (b_off & 31)
    o_word = b_off >> 5
    b_lo = (b_val & 0xFFFFFFFF).to(tl.int32)
    b_hi = (b_val >> 32).to(tl.int32)
    tl.atomic_or(p_words + o_word, b_lo, mask=m_i & (b_lo != 0))
    tl.atomic_or(p_words + o_word + 1, b_hi, mask=m_i & (b_hi != 0))


@triton.jit
def bitunpack_fwd_kernel(p_packed, p_bits, p_goff, p_levels, numel, nbytes, group_size,
                         BLOCK: tl.constexpr):
    """Moves ``b/8`` bytes read (up to 3 byte loads, cached) + 2 bytes written per entry."""
    i_b = tl.program_id(0).to(tl.int64)
    o_i = i_b * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < numel
    o_g = o_i // group_size
    b_w = tl.load(p_bits + o_g, mask=m_i, other=0).to(tl.int32)
    b_off = tl.load(p_goff + o_g, mask=m_i, other=0) + (o_i - o_g * group_size) * b_w
    o_byte = b_off >> 3
    b_0 = tl.load(p_packed + o_byte, mask=m_i & (o_byte < nbytes), other=0).to(tl.int32)
    b_1 = tl.load(p_packed + o_byte + 1, mask=m_i & (o_byte + 1 < nbytes), other=0).to(tl.int32)
    b_2 = tl.load(p_packed + o_byte + 2, mask=m_i & (o_byte + 2 < nbytes), other=0).to(tl.int32)
    b_span = b_0 | (b_1 << 8) | (b_2 << 16)
    b_q = (b_span >> (b_off & 7).to(tl.int32)) & ((1 << b_w) - 1)
    tl.store(p_levels + o_i, b_q.to(tl.int16), mask=m_i)


def _group_offsets(bits: torch.Tensor, group_size: int, numel: int) -> tuple[torch.Tensor, int]:
    """Exclusive bit offset of each group (int64, on bits' device) and the group length used."""
    n_groups = bits.numel()
    if n_groups == 1:
        return torch.zeros(1, dtype=torch.int64, device=bits.device), max(numel, 1)
    lengths = torch.full((n_groups,), group_size, dtype=torch.int64, device=bits.device)
    lengths[-1] = numel - group_size * (n_groups - 1)
    sizes = lengths * bits.to(torch.int64)
    return torch.cumsum(sizes, 0) - sizes, group_size


def pack(levels: torch.Tensor, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    """Triton version of :func:`diffq_triton.ops.bitpack.pack_levels` (inputs already checked).

    Args:
        levels: ``[numel]`` integer levels, ``0 <= q < 2^b``.
        bits: ``[n_groups]`` widths in ``[1, 15]``, same device.
        group_size: entries per group (0: one group).

    Returns:
        ``[ceil(Σ b_i / 8)]`` uint8 stream on the same device.
    """
    numel = levels.numel()
    goff, g = _group_offsets(bits, group_size, numel)
    last = numel - g * (bits.numel() - 1)
    total = int(goff[-1]) + last * int(bits[-1])
    nbytes = (total + 7) // 8
    words = torch.zeros(nbytes // 4 + 2, dtype=torch.int32, device=levels.device)
    grid = (triton.cdiv(numel, BLOCK),)
    bitpack_fwd_kernel[grid](levels.contiguous(), bits.contiguous(), goff, words, numel, g,
                             BLOCK=BLOCK)
    return words.view(torch.uint8)[:nbytes].clone()


def unpack(packed: torch.Tensor, bits: torch.Tensor, group_size: int, numel: int) -> torch.Tensor:
    """Triton version of :func:`diffq_triton.ops.bitpack.unpack_levels`: ``[numel]`` int16."""
    goff, g = _group_offsets(bits, group_size, numel)
    out = torch.empty(numel, dtype=torch.int16, device=packed.device)
    grid = (triton.cdiv(numel, BLOCK),)
    bitunpack_fwd_kernel[grid](packed.contiguous(), bits.contiguous(), goff, out, numel,
                               packed.numel(), g, BLOCK=BLOCK)
    return out


def pack_fixed(values: torch.Tensor, width: int) -> torch.Tensor:
    """Every entry at ``width`` bits (the per-group width fields)."""
    bits = torch.full((1,), width, dtype=torch.uint8, device=values.device)
    return pack(values.reshape(-1), bits, 0)


def unpack_fixed(packed: torch.Tensor, width: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_fixed`: ``[n]`` int16."""
    bits = torch.full((1,), width, dtype=torch.uint8, device=packed.device)
    return unpack(packed, bits, 0, n)
