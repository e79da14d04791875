"""Edge cases of the native codec (csrc/codec.c through native.py) found in review.

Tiny pieces (``native.PIECE`` of 8 to 24 entries) put many piece borders inside bytes,
groups and rows of 8 and make four threads OR the bytes they share; tiny and odd sizes
reach the ends of the stream, where the rows path's 16-byte stores and the per-entry
path's 8-byte loads must stay inside. Everything is compared with the torch codec
(:mod:`bitpack_cpu`) and the reference (:func:`reference.quantize` / ``dequantize``).
The same cases ran clean under AddressSanitizer and UBSan in review; these tests need
neither: writes are checked against guard bytes and against the neighbours' bits in
shared bytes (which a sanitizer cannot see), reads against a guard page.
"""

from __future__ import annotations

import ctypes
import mmap
import sys

import pytest
import torch

from diffq_triton.codec import bitpack_cpu, native
from diffq_triton.ops import reference
from tests.conftest import poisoned_empty
from tests.test_bitpack import random_case, stream_as_int

GROUP_SIZES = [0, 1, 3, 5, 8, 16, 24, 1000]
# Around the rows of 8, the 16-byte stores, a block of 1024 entries and the group sizes.
NUMELS = [1, 2, 3, 7, 8, 9, 15, 16, 17, 23, 24, 25, 31, 33, 63, 64, 65, 129, 1023, 1025,
          2051]
WIDTHS = [(1, 15), (9, 15), (1, 1), (8, 8), (15, 15), (3, 3)]


@pytest.fixture
def lib(native_lib):
    """The compiled codec (tests/conftest.py)."""
    return native_lib


@pytest.fixture
def four_threads():
    """Four codec threads, so that neighbouring pieces really run at the same time."""
    threads = torch.get_num_threads()
    torch.set_num_threads(4)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def weights_case(numel: int, group_size: int, low: int, high: int, seed: int):
    """Normal weights and random widths in ``[low, high]`` (the reference's inputs)."""
    gen = torch.Generator().manual_seed(seed)
    bits = torch.randint(low, high + 1, (reference.num_groups(numel, group_size),),
                         generator=gen).to(torch.uint8)
    return torch.randn(numel, generator=gen) * 3 - 0.5, bits


def minmax_args(w: torch.Tensor) -> tuple[float, float, float]:
    """``(mn, safe, span)`` as state.quantize_minmax and serialization pass them."""
    mn, mx = torch.aminmax(w)
    scale = float(mx - mn)
    return float(mn), scale if scale > 0 else 1.0, float(mx - mn)


# 12 and 20 are not multiples of 8: single-group pieces then start inside bytes.
@pytest.mark.parametrize("piece", [8, 12, 16, 20, 24, 1 << 18])
@pytest.mark.parametrize("group_size", GROUP_SIZES)
def test_small_pieces_match_torch_and_reference(lib, monkeypatch, four_threads, piece,
                                                group_size):
    monkeypatch.setattr(native, "PIECE", piece)
    seed = piece * 1000 + group_size
    for numel in NUMELS:
        for low, high in WIDTHS:
            seed += 1
            case = (numel, group_size, low, high, seed)
            levels, bits = random_case(numel, group_size, low, high, seed)
            expected = bitpack_cpu.pack_cpu(levels, bits, group_size)
            with poisoned_empty():
                packed = native.pack(lib, levels, bits, group_size)
                back = native.unpack(lib, expected, bits, group_size, numel)
            assert torch.equal(packed, expected), case
            assert torch.equal(back, levels), case

            w, bits = weights_case(numel, group_size, low, high, seed)
            mn, safe, span = minmax_args(w)
            q, rmn, rmx = reference.quantize(w, bits, group_size)
            with poisoned_empty():
                stream = native.quantize_pack(lib, w, bits, group_size, mn, safe)
                weights = native.unpack_dequantize(lib, stream, bits, group_size, numel, mn,
                                                   span)
            assert torch.equal(stream, bitpack_cpu.pack_cpu(q, bits, group_size)), case
            assert torch.equal(weights, reference.dequantize(q, bits, group_size, rmn, rmx)), case


@pytest.mark.parametrize("group_size", [0, 8, 5, 1000])
def test_empty_tensor(lib, group_size):
    bits = torch.tensor([4], dtype=torch.uint8)
    empty = torch.zeros(0)
    assert native.quantize_pack(lib, empty, bits, group_size, 0.0, 1.0).numel() == 0
    assert native.pack(lib, empty.to(torch.int16), bits, group_size).numel() == 0
    stream = torch.zeros(0, dtype=torch.uint8)
    assert native.unpack(lib, stream, bits, group_size, 0).numel() == 0
    assert native.unpack_dequantize(lib, stream, bits, group_size, 0, 0.0, 1.0).numel() == 0


def test_group_larger_than_tensor_and_short_last_group(lib, monkeypatch, four_threads):
    monkeypatch.setattr(native, "PIECE", 16)
    for numel, group_size in [(5, 1000), (7, 8), (1, 3), (17, 16), (41, 24), (1001, 1000)]:
        levels, bits = random_case(numel, group_size, 1, 15, numel)
        packed = native.pack(lib, levels, bits, group_size)
        assert packed.tolist() == list(stream_as_int(levels, bits, group_size)), numel
        assert torch.equal(native.unpack(lib, packed, bits, group_size, numel), levels)


def guarded(nbytes: int, fill: int, guard: int = 32) -> torch.Tensor:
    """``nbytes + guard`` bytes of ``fill``: the codec may touch only the first ``nbytes``."""
    return torch.full((nbytes + guard,), fill, dtype=torch.uint8)


@pytest.mark.parametrize("rows", [0, 1])
@pytest.mark.parametrize("width", [1, 3, 7, 8, 13, 15])
def test_piece_starting_inside_a_byte_keeps_its_neighbours_bits(lib, rows, width):
    # One piece of one group written at stream bit `start`, as a middle piece is: the bits
    # below `start` and above its end in the two shared bytes belong to the neighbours
    # (OR-ed, never overwritten), and no byte past the piece's last may change.
    gen = torch.Generator().manual_seed(width)
    bits = torch.tensor([width], dtype=torch.uint8)
    for numel in [1, 2, 5, 8, 9, 16, 17, 40, 1030]:
        levels, _ = random_case(numel, 0, width, width, numel)
        w, _ = weights_case(numel, 0, width, width, numel)
        mn, safe, _ = minmax_args(w)
        q, _, _ = reference.quantize(w, bits, 0)
        for start in range(8):
            end = start + numel * width
            nbytes = (end + 7) // 8
            head = int(torch.randint(0, 256, (1,), generator=gen)) & ((1 << start) - 1)
            tail = (0xFF << (end % 8)) & 0xFF if end % 8 else 0
            for kind in ("pack", "quantize"):
                # Shared bytes hold only the neighbours' bits, as native.py leaves them
                # before the OR; the bytes of the piece alone start poisoned.
                out = guarded(nbytes, 0x5A)
                out[0] = out[nbytes - 1] = 0
                out[0] |= head
                out[nbytes - 1] |= tail
                if kind == "pack":
                    bad = lib.dq_pack_i16(levels.data_ptr(), 0, numel, numel, bits.data_ptr(), 0,
                                          out.data_ptr(), start, end, rows)
                    assert bad == 0
                    value = stream_as_int(levels, bits, 0)
                else:
                    lib.dq_quantize_pack(w.data_ptr(), 0, numel, numel, bits.data_ptr(),
                                         native._units().data_ptr(), mn, safe, out.data_ptr(),
                                         start, end, rows)
                    value = stream_as_int(q, bits, 0)
                expected = (int.from_bytes(value, "little") << start | head
                            | tail << 8 * (nbytes - 1))
                case = (kind, numel, start)
                assert bytes(out[:nbytes].tolist()) == expected.to_bytes(nbytes, "little"), case
                assert out[nbytes:].eq(0x5A).all(), case


class PageEnd:
    """Bytes placed at the very end of a readable page, before an inaccessible one.

    A load past the last byte faults at once (the test process dies) instead of reading
    whatever the heap holds there, which a sanitizer-free run would never notice.
    """

    def __init__(self, data: bytes):
        page = mmap.PAGESIZE
        self.map = mmap.mmap(-1, 2 * page + len(data) // page * page)
        base = ctypes.addressof(ctypes.c_char.from_buffer(self.map))
        end = base + len(self.map) - page
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.mprotect(end, page, 0) != 0:  # PROT_NONE, which mmap does not export
            pytest.skip("mprotect failed")
        self.ptr = end - len(data)
        ctypes.memmove(self.ptr, data, len(data))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="mprotect guard page")
@pytest.mark.parametrize("rows", [0, 1])
@pytest.mark.parametrize("width", [1, 5, 8, 11, 15])
def test_reads_stay_inside_the_stream(lib, rows, width):
    # The rows path loads 16 bytes and the per-entry path 8: near the end of the stream
    # they must shrink to it (the stream ends at a guard page), and no level may depend on
    # a neighbour's bits in the shared first and last bytes (here all ones).
    bits = torch.tensor([width], dtype=torch.uint8)
    for numel in [1, 2, 3, 7, 8, 9, 15, 16, 17, 33, 1030]:
        levels, _ = random_case(numel, 0, width, width, 7 * numel + width)
        value = int.from_bytes(stream_as_int(levels, bits, 0), "little")
        for start in (0, 3, 7):
            end = start + numel * width
            nbytes = (end + 7) // 8
            noise = ((1 << start) - 1) | (((1 << (8 * nbytes)) - 1) >> end << end)
            stream = PageEnd((value << start | noise).to_bytes(nbytes, "little"))
            back = torch.full((numel,), -1, dtype=torch.int16)
            lib.dq_unpack_i16(stream.ptr, nbytes, 0, numel, numel, bits.data_ptr(), start, 0,
                              back.data_ptr(), rows)
            assert torch.equal(back, levels), (numel, start)
            weights = torch.full((numel,), float("nan"))
            lib.dq_unpack_dequantize(stream.ptr, nbytes, 0, numel, numel, bits.data_ptr(),
                                     start, native._units().data_ptr(), -1.0, 2.0,
                                     weights.data_ptr(), rows)
            expected = reference.dequantize(levels, bits, 0, torch.tensor(-1.0),
                                            torch.tensor(1.0))
            assert torch.equal(weights, expected), (numel, start)


@pytest.mark.parametrize("bad", [[0], [16], [260], [-1], [255]])
def test_every_entry_point_refuses_widths_out_of_range(lib, bad):
    # The C loops index unit tables by width and shift by it: nothing outside 1..15 (nor a
    # value that narrows into range, 260 -> 4) may reach them.
    bits = torch.tensor(bad, dtype=torch.int64)
    w = torch.randn(8)
    stream = torch.zeros(8, dtype=torch.uint8)
    with pytest.raises(ValueError):
        native.quantize_pack(lib, w, bits, 0, 0.0, 1.0)
    with pytest.raises(ValueError):
        native.pack(lib, torch.zeros(8, dtype=torch.int16), bits, 0)
    with pytest.raises(ValueError):
        native.unpack(lib, stream, bits, 0, 8)
    with pytest.raises(ValueError):
        native.unpack_dequantize(lib, stream, bits, 0, 8, 0.0, 1.0)


def test_stream_of_wrong_length_is_refused(lib):
    # A shorter stream would be read past its end by the 8-byte loads.
    bits = torch.tensor([5, 7], dtype=torch.uint8)
    for nbytes in (0, 11, 13):  # 8·5 + 8·7 = 96 bits: exactly 12 bytes
        with pytest.raises(ValueError):
            native.unpack(lib, torch.zeros(nbytes, dtype=torch.uint8), bits, 8, 16)
        with pytest.raises(ValueError):
            native.unpack_dequantize(lib, torch.zeros(nbytes, dtype=torch.uint8), bits, 8, 16,
                                     0.0, 1.0)
