"""The traffic model of the packed kernels (diffq_triton.packed.traffic): its formulas against
hand-computed values, and its stream sizes against the buffers of real packed weights."""

from __future__ import annotations

import math

import pytest
import torch

from diffq_triton.packed import PackedTensor, traffic
from diffq_triton.packed.layout import PAD_BYTES
from diffq_triton.serialization.tensor_record import QuantizedTensor


def _packed(shape, group_size: int, bits: list[int] | int) -> tuple[PackedTensor, int]:
    """A packed float32 weight of random levels; widths cycle through ``bits``. Returns it and
    its level bits ``Σ b_s·len_s``."""
    gen = torch.Generator().manual_seed(0)
    numel = math.prod(shape)
    n_groups = 1 if group_size == 0 else -(-numel // group_size)
    cycle = [bits] if isinstance(bits, int) else bits
    widths = torch.tensor([cycle[s % len(cycle)] for s in range(n_groups)], dtype=torch.uint8)
    g = group_size or numel
    per_entry = widths.long().repeat_interleave(g)[:numel]
    levels = (torch.rand(numel, generator=gen) * (1 << per_entry)).floor().to(torch.int16)
    qt = QuantizedTensor("w", shape, torch.float32, "minmax", group_size, levels, widths,
                         -1.0, 1.0)
    return PackedTensor.from_record(qt), int(per_entry.sum())


# ----------------------------------------------------------------------------- formulas
@pytest.mark.parametrize(("g", "f", "bits"), [
    # docs/packed.md §2's table, bits per weight (f + 64/128)/g.
    (8, 0, 0.0625), (8, 2, 0.3125), (8, 4, 0.5625),
    (16, 0, 0.03125), (16, 2, 0.15625), (16, 4, 0.28125),
    (64, 0, 0.0078125), (64, 2, 0.0390625), (64, 4, 0.0703125),
    (256, 0, 0.001953125), (256, 2, 0.009765625), (256, 4, 0.017578125),
    (1, 0, 0.5),  # a tile offset per 128 weights
])
def test_metadata_bits_per_weight_is_the_docs_table(g, f, bits):
    assert traffic.metadata_bits_per_weight(g, f) == bits
    assert traffic.gemv_bytes_per_weight(4.0, g, f) == (4.0 + bits) / 8


def test_tile_size_enters_the_offset_cost():
    assert traffic.metadata_bits_per_weight(8, 0, tile_groups=64) == 0.125
    assert traffic.metadata_bits_per_weight(1, 0, tile_groups=64) == 1.0


def test_gemv_budget_of_the_issue():
    # (b̄ + 0.5)/8 bytes per weight including metadata: every g ≥ 9, and g = 8 with f ≤ 3.
    for b in (1.0, 3.2, 8.0, 15.0):
        budget = (b + 0.5) / 8
        for f in range(5):
            for g in (9, 16, 64, 1024):
                assert traffic.gemv_bytes_per_weight(b, g, f) <= budget
            assert (traffic.gemv_bytes_per_weight(b, 8, f) <= budget) == (f <= 3)
        assert traffic.gemv_bytes_per_weight(b, 8, 4) == (b + 0.5625) / 8


def test_modeled_gemv_speedup():
    assert traffic.modeled_gemv_speedup(4.0) == 16 / 4.5
    assert traffic.modeled_gemv_speedup(3.5) == 4.0
    assert traffic.modeled_gemv_speedup(4.0, 8, 0) == 16 / 4.0625
    # With the shape, x and y count on both sides; at 4096×4096 they are 0.1% of it.
    full = traffic.modeled_gemv_speedup(4.0, 8, 0, shape=(4096, 4096))
    assert full == pytest.approx(16 / 4.0625, rel=2e-3) and full < 16 / 4.0625
    dense = 2 * 4096 * 4096 + 2 * 4096 + 2 * 4096
    # packed: levels, tile offsets (8 bytes per 1024 weights), range, x and y.
    packed = 4 * 4096 * 4096 / 8 + 8 * (4096 * 4096 // 1024) + 8 + 2 * 4096 + 2 * 4096
    assert full == pytest.approx(dense / packed, rel=1e-12)
    with pytest.raises(ValueError):
        traffic.modeled_gemv_speedup(4.0, shape=(8, 8))


# ----------------------------------------------------------------------------- kernels, by hand
LAY = traffic.Layout((4, 64), 8, 0, 4.0)  # 256 weights, 32 groups of width 4, 1 tile


def test_layout_integers():
    assert (LAY.numel, LAY.n_groups, LAY.g, LAY.n_tiles) == (256, 32, 8, 1)
    one = traffic.Layout((3, 5), 0, 0, 2.0)
    assert (one.n_groups, one.g, one.n_tiles) == (1, 15, 1)
    assert traffic.Layout((1000,), 7, 4, 5.0).n_groups == 143
    assert traffic.Layout((100, 100), 1, 0, 1.0).n_tiles == 79


def test_dequantize_by_hand():
    t = traffic.dequantize(LAY, out_dtype=torch.float32)
    # levels 4·256/8, metadata: no widths, one tile offset, the range; 4 bytes written.
    assert (t.weights, t.weight, t.metadata, t.inputs, t.outputs) == (256, 128, 16, 0, 1024)
    assert t.total == 1168 and t.per_weight == 1168 / 256
    assert traffic.dequantize(LAY).outputs == 512  # float16 by default
    # docs/packed.md §6: a float16 decode of a 4-bit weight at g = 8 moves 2.51 bytes per
    # weight, 63% of a float16 copy's 4.
    big = traffic.Layout((4096, 4096), 8, 0, 4.0)
    t = traffic.dequantize(big, torch.float16)
    assert t.per_weight == pytest.approx(2.5078, abs=1e-4)
    assert t.per_weight / traffic.dense_copy(big.numel).per_weight == pytest.approx(0.627,
                                                                                   abs=1e-3)


def test_gemv_by_hand():
    t = traffic.gemv(LAY, rows=1)
    assert (t.weight, t.metadata, t.inputs, t.outputs) == (128, 16, 128, 8)
    assert t.rereads == 4 * 8  # a tile offset per output feature (no width stream)
    t = traffic.gemv(traffic.Layout((4, 64), 8, 4, 6.0), rows=16, x_dtype=torch.float32,
                     bias=True)
    # levels 6·256/8; widths 32·4/8, one offset, the range; x 16·64·4 + bias 4·4; y 16·4·4.
    assert (t.weight, t.metadata, t.inputs, t.outputs) == (192, 16 + 8 + 8, 4096 + 16, 256)
    assert t.rereads == 4 * (8 + 128 * 4 / 8)
    assert t.weight_per_weight == (192 + 32) / 256


def test_gemm_by_hand():
    t = traffic.gemm(LAY, rows=100, block_m=64)
    # Two M-blocks: the weight twice; x once (block_n None), y once.
    assert (t.weight, t.metadata, t.inputs, t.outputs) == (256, 32, 100 * 64 * 2, 100 * 4 * 2)
    t = traffic.gemm(LAY, rows=100, block_m=128, block_n=2)
    assert (t.weight, t.metadata, t.inputs) == (128, 16, 2 * 100 * 64 * 2)
    assert traffic.gemm(LAY, rows=64, block_m=64).weight == 128
    # linear: the GEMV up to 16 rows, the GEMM past.
    assert traffic.linear(LAY, 16, 64) == traffic.gemv(LAY, 16)
    assert traffic.linear(LAY, 17, 64) == traffic.gemm(LAY, 17, 64)


def test_embedding_by_hand():
    lay = traffic.Layout((10, 16), 8, 2, 3.0)
    t = traffic.embedding(lay, n_ids=5)
    # Per row: 16·3/8 bytes of levels, (16/8 + 1)·2/8 of width fields, a tile offset; the
    # range once; 8-byte ids; 16 float16 entries written.
    assert (t.weights, t.weight, t.metadata, t.inputs, t.outputs) == (
        80, 30, 5 * (0.75 + 8) + 8, 40, 160)
    assert t.rereads == 5 * 128 * 2 / 8
    d = traffic.dense_embedding(5, 16)
    assert (d.weight, d.inputs, d.outputs, d.per_weight) == (160, 40, 160, 4.5)


def test_dense_baselines():
    d = traffic.dense_linear(4096, 4096, 1)
    assert d.weight == 2 * 4096 * 4096 and d.metadata == 0
    assert d.total == 2 * 4096 * 4096 + 2 * 4096 + 2 * 4096
    assert d.weight_per_weight == 2.0
    assert traffic.dense_linear(8, 8, 4, x_dtype=4, bias=True).inputs == 4 * 8 * 4 + 8 * 4
    assert traffic.dense_copy(10, torch.float32).total == 80
    assert traffic.speedup(traffic.gemv(LAY), traffic.dense_linear(4, 64, 1)) == (
        (512 + 128 + 8) / 280)


def test_as_dict_is_json_ready():
    import json

    row = traffic.gemv(LAY).as_dict()
    assert row["total"] == 280 and row["per_weight"] == round(280 / 256, 4)
    json.dumps(row)


# ----------------------------------------------------------------------------- real buffers
@pytest.mark.parametrize(("shape", "group_size", "bits"), [
    ((64, 100), 8, [1, 5, 15, 3]),   # width stream of 4 bits, 800 groups, 7 tiles
    ((37, 29), 7, [2, 3]),           # last group shorter (1073 = 153·7 + 2), 1 field bit
    ((50, 40), 16, 4),               # one width: no width stream
    ((33, 31), 0, 6),                # one group
    ((300, 3), 1, [1, 2, 3, 4, 5, 6, 7, 8]),  # g = 1: a tile offset per 128 weights
])
def test_streams_are_the_buffers_of_a_packed_tensor(shape, group_size, bits):
    pt, level_bits = _packed(shape, group_size, bits)
    lay = traffic.layout_of(pt)
    assert lay == traffic.Layout(shape, group_size, pt.field_bits, level_bits / pt.numel,
                                 pt.tile_groups)
    assert (lay.numel, lay.n_groups, lay.n_tiles) == (pt.numel, pt.n_groups,
                                                      pt.tile_offsets.numel())
    s = traffic.stream_bytes(pt)
    assert math.ceil(s["levels"]) == pt.level_bytes == pt.levels.numel() - PAD_BYTES
    widths = pt.widths.numel() - PAD_BYTES if pt.field_bits else 0
    assert math.ceil(s["widths"]) == widths
    assert s["tile_offsets"] == pt.tile_offsets.numel() * pt.tile_offsets.element_size()
    assert s["scale"] == pt.scale.numel() * pt.scale.element_size()
    padding = PAD_BYTES * (2 if pt.field_bits else 1)
    assert sum(math.ceil(v) for v in s.values()) + padding == pt.nbytes()
    # A dequantize reads each stream once; a GEMV too.
    t = traffic.dequantize(pt, torch.float32)
    assert t.weight + t.metadata == pytest.approx(sum(s.values()))
    if len(shape) == 2:
        t = traffic.gemv(pt)
        assert t.weight + t.metadata == pytest.approx(sum(s.values()))


def test_per_weight_formula_is_the_limit_of_the_buffers():
    # 512×1024 at g = 8, widths 1..15: the exact streams per weight within 0.1% of
    # (b̄ + (f + 0.5)/g)/8, the range and a partial tile aside.
    pt, level_bits = _packed((512, 1024), 8, list(range(1, 16)))
    mean = level_bits / pt.numel
    t = traffic.gemv(pt)
    assert pt.field_bits == 4
    assert t.weight_per_weight == pytest.approx(traffic.gemv_bytes_per_weight(mean, 8, 4),
                                                rel=1e-3)
    assert pt.nbytes() / pt.numel == pytest.approx(t.weight_per_weight, rel=1e-3)
