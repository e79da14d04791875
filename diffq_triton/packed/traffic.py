"""Modelled memory traffic of the packed kernels (docs/packed.md §2, §6): bytes per weight.

Pure Python (no torch, no Triton): the model takes a packed weight's integers
(:class:`Layout`: shape, group size, field bits, mean width, tiles) or a
:class:`~diffq_triton.packed.PackedTensor` (:func:`layout_of`) and a call's shape and
dtypes, and gives the bytes the call must move (:class:`Traffic`), split by operand.

Notation: ``d`` entries, ``g`` entries per group (the whole tensor when ``group_size = 0``
or there is one group), ``n_groups = ⌈d/g⌉``, ``f`` field bits of the width stream (0: no
width stream), ``b̄`` the mean width in bits per weight (``Σ b_s·len_s / d``), ``T`` groups
per tile (128), ``n_tiles = ⌈n_groups/T⌉``.

Streams of one packed weight, read once (:func:`stream_bytes`, exactly the buffers' contents
without their 8-byte padding):

- levels: ``b̄·d/8`` bytes (the buffer holds ``⌈b̄·d/8⌉``);
- metadata: widths ``n_groups·f/8`` (buffer ``⌈n_groups·f/8⌉``), tile offsets
  ``8·n_tiles``, range 8 bytes.

Per weight, for full tiles: ``b̄/8`` of levels and ``(f + 64/T)/(8·g)`` of metadata,
``(f + 0.5)/(8·g)`` at ``T = 128`` (:func:`metadata_bits_per_weight` / 8; the table of
docs/packed.md §2).

What the model counts: compulsory traffic, each operand read from memory as often as the
kernel's structure makes it (the weight once per M-block of a GEMM, ``x`` once per N-block
when ``block_n`` is given), with reuse inside a program and of small operands that stay in
cache (a GEMV's ``x``, read by every program, counts once). Lookups a program makes of its
tile's widths and offset to find where its first group starts (a GEMV row, an embedding row)
are cache hits in the model: they are given as :attr:`Traffic.rereads`, outside the total.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

# Groups per tile (diffq_triton.packed.layout.TILE_GROUPS; repeated so that this module
# imports nothing).
TILE_GROUPS = 128
# Bytes of one tile offset (int64) and of the range (two float32).
OFFSET_BYTES = 8
SCALE_BYTES = 8
# The dense baseline: a float16 weight.
FP16 = 2


def _nbytes(dtype: Any) -> int:
    """Bytes per entry of a dtype: an int, or anything with ``itemsize`` (a torch dtype)."""
    return dtype if isinstance(dtype, int) else int(dtype.itemsize)


@dataclass(frozen=True)
class Layout:
    """The integers of a packed weight the traffic depends on.

    Attributes:
        shape: the weight's shape (``[N, K]`` for a Linear, ``[vocab, dim]`` for an
            Embedding).
        group_size: entries per group as stored (0: one group of the whole tensor).
        field_bits: bits per width field, 0 when every group has the same width.
        mean_bits: ``b̄``, the level bits per weight (``Σ b_s·len_s / d``).
        tile_groups: ``T``, groups per tile offset.
    """

    shape: tuple[int, ...]
    group_size: int
    field_bits: int
    mean_bits: float
    tile_groups: int = TILE_GROUPS

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def n_groups(self) -> int:
        return 1 if self.group_size == 0 else max(1, -(-self.numel // self.group_size))

    @property
    def g(self) -> int:
        """The effective group size, as the kernels take it: ``numel`` for one group."""
        return self.group_size if self.group_size and self.n_groups > 1 else self.numel

    @property
    def n_tiles(self) -> int:
        return -(-self.n_groups // self.tile_groups)


@dataclass(frozen=True)
class Traffic:
    """Modelled bytes of one kernel call.

    Attributes:
        weights: entries of the weight the call covers (the per-weight denominator: the
            whole weight for a dequantize or a matmul, ``ids·dim`` for a gather).
        weight: bytes of the weight itself read (the level stream, or the dense weight),
            every pass counted.
        metadata: bytes of widths, tile offsets and range read, every pass counted.
        inputs: activations, ids and bias read.
        outputs: bytes written.
        rereads: per-program lookups of a tile's widths and offset, served by the cache
            (not in :attr:`total`).
    """

    weights: int
    weight: float
    metadata: float
    inputs: float
    outputs: float
    rereads: float = 0.0

    @property
    def total(self) -> float:
        """Bytes moved: weight + metadata + inputs + outputs."""
        return self.weight + self.metadata + self.inputs + self.outputs

    @property
    def per_weight(self) -> float:
        """:attr:`total` per weight entry."""
        return self.total / max(self.weights, 1)

    @property
    def weight_per_weight(self) -> float:
        """Bytes of the weight and its metadata per weight entry (``(b̄ + meta)/8`` once)."""
        return (self.weight + self.metadata) / max(self.weights, 1)

    def as_dict(self) -> dict:
        """Fields, total and per-weight figures, rounded for a report (JSON-ready)."""
        out = {k: round(v, 1) if isinstance(v, float) else v for k, v in asdict(self).items()}
        out.update(total=round(self.total, 1), per_weight=round(self.per_weight, 4),
                   weight_per_weight=round(self.weight_per_weight, 4))
        return out


def layout_of(pt: Any) -> Layout:
    """The :class:`Layout` of a :class:`~diffq_triton.packed.PackedTensor` (its exact mean
    width from the width stream: ``Σ b_s·len_s / d``)."""
    if pt.field_bits:
        widths = pt.group_widths().long()
        g = pt.group_size if pt.n_groups > 1 else pt.numel
        # Every group holds g entries but the last, which holds numel - (n_groups - 1)·g.
        bits = int(widths.sum()) * g - int(widths[-1]) * (pt.n_groups * g - pt.numel)
        mean = bits / max(pt.numel, 1)
    else:
        mean = float(pt.base)
    return Layout(tuple(pt.shape), pt.group_size, pt.field_bits, mean, pt.tile_groups)


def _layout(w: Any) -> Layout:
    return w if isinstance(w, Layout) else layout_of(w)


# ----------------------------------------------------------------------------- formulas
def metadata_bits_per_weight(group_size: int, field_bits: int,
                             tile_groups: int = TILE_GROUPS) -> float:
    """Metadata bits per weight for full tiles: ``(f + 64/T)/g`` (a width field per group,
    a 64-bit offset per tile of ``T`` groups); ``(f + 0.5)/g`` at ``T = 128``."""
    return (field_bits + 8 * OFFSET_BYTES / tile_groups) / group_size


def gemv_bytes_per_weight(mean_bits: float, group_size: int, field_bits: int,
                          tile_groups: int = TILE_GROUPS) -> float:
    """Bytes of the packed weight a GEMV reads per weight: ``(b̄ + (f + 64/T)/g)/8``, each
    weight's bits once (the issue's budget: at most ``(b̄ + 0.5)/8``)."""
    return (mean_bits + metadata_bits_per_weight(group_size, field_bits, tile_groups)) / 8


def stream_bytes(w: Any) -> dict[str, float]:
    """Bytes of each stream of a packed weight, read once: ``levels`` (``b̄·d/8``),
    ``widths`` (``n_groups·f/8``), ``tile_offsets`` (``8·n_tiles``), ``scale`` (8).

    The buffers of a :class:`PackedTensor` hold these rounded up to whole bytes, plus 8 bytes
    of padding after each stream (tests/test_packed_traffic.py checks both).
    """
    lay = _layout(w)
    return {"levels": lay.mean_bits * lay.numel / 8,
            "widths": lay.n_groups * lay.field_bits / 8,
            "tile_offsets": float(OFFSET_BYTES * lay.n_tiles),
            "scale": float(SCALE_BYTES)}


def _streams(lay: Layout, passes: int = 1) -> tuple[float, float]:
    s = stream_bytes(lay)
    return passes * s["levels"], passes * (s["widths"] + s["tile_offsets"] + s["scale"])


def _tile_lookup(lay: Layout) -> float:
    """Bytes a program reads to find its first group: a tile offset and the tile's ``T``
    width fields (``T·f/8 + 8``)."""
    return OFFSET_BYTES + lay.tile_groups * lay.field_bits / 8


# ----------------------------------------------------------------------------- kernels
def dequantize(w: Any, out_dtype: Any = FP16) -> Traffic:
    """The dequantize kernel on the whole weight: levels ``b̄/8`` and metadata
    ``(f + 0.5)/(8·g)`` read, ``out_dtype`` (2 or 4 bytes) written per weight."""
    lay = _layout(w)
    levels, meta = _streams(lay)
    return Traffic(lay.numel, levels, meta, 0.0, float(lay.numel * _nbytes(out_dtype)))


def gemv(w: Any, rows: int = 1, x_dtype: Any = FP16, bias: bool = False) -> Traffic:
    """The GEMV (``rows`` ≤ 16, one program per output feature of an ``[N, K]`` weight):
    every weight's bits read once (``b̄/8 + (f + 0.5)/(8·g)`` per weight), ``x``
    (``rows·K`` entries) read once (every program reads it, from cache), the bias ``N``
    entries, ``rows·N`` outputs written. Re-reads: per output feature, the tile's offset and
    ``T`` width fields (``(T·f/8 + 8)/K`` per weight)."""
    lay = _layout(w)
    n, k = lay.shape
    xb = _nbytes(x_dtype)
    levels, meta = _streams(lay)
    inputs = rows * k * xb + (n * xb if bias else 0)
    return Traffic(lay.numel, levels, meta, float(inputs), float(rows * n * xb),
                   rereads=n * _tile_lookup(lay))


def gemm(w: Any, rows: int, block_m: int, block_n: int | None = None, x_dtype: Any = FP16,
         bias: bool = False) -> Traffic:
    """The tiled GEMM (``[block_m, block_n]`` programs walking K): the weight's levels and
    metadata read once per M-block (``⌈rows/block_m⌉`` times), ``x`` once per N-block
    (``⌈N/block_n⌉`` times; once when ``block_n`` is None, all of it staying in cache),
    ``rows·N`` outputs written. The programs' lookups of their groups' starts depend on the
    kernel's tiling and are not modelled."""
    lay = _layout(w)
    n, k = lay.shape
    xb = _nbytes(x_dtype)
    levels, meta = _streams(lay, -(-rows // block_m))
    x_passes = 1 if block_n is None else -(-n // block_n)
    inputs = x_passes * rows * k * xb + (n * xb if bias else 0)
    return Traffic(lay.numel, levels, meta, float(inputs), float(rows * n * xb))


def linear(w: Any, rows: int, block_m: int, block_n: int | None = None, x_dtype: Any = FP16,
           bias: bool = False, max_gemv_rows: int = 16) -> Traffic:
    """``packed.linear``: :func:`gemv` up to ``max_gemv_rows`` rows, :func:`gemm` past."""
    if rows <= max_gemv_rows:
        return gemv(w, rows, x_dtype, bias)
    return gemm(w, rows, block_m, block_n, x_dtype, bias)


def embedding(w: Any, n_ids: int, out_dtype: Any = FP16, id_dtype: Any = 8) -> Traffic:
    """The gather of ``n_ids`` rows of a ``[vocab, dim]`` weight, each decoded from its
    packed bits (row ``r`` is entries ``[r·dim, (r+1)·dim)``), counted per lookup (repeated
    ids are not deduplicated): ``dim·b̄/8`` bytes of levels, the row's width fields
    (``(dim/g + 1)·f/8``, at most: its first group may start in the row before), its tile's
    offset (8) and the range (8); ``dim`` entries written; the ids read. Re-reads: the
    tile's ``T`` width fields before the row (its group's start)."""
    lay = _layout(w)
    dim = lay.shape[-1]
    row_groups = (dim / lay.g + 1) if lay.n_groups > 1 else 1
    levels = n_ids * dim * lay.mean_bits / 8
    meta = n_ids * (row_groups * lay.field_bits / 8 + OFFSET_BYTES) + SCALE_BYTES
    rereads = n_ids * lay.tile_groups * lay.field_bits / 8 if lay.n_groups > 1 else 0.0
    return Traffic(n_ids * dim, levels, meta, float(n_ids * _nbytes(id_dtype)),
                   float(n_ids * dim * _nbytes(out_dtype)), rereads=rereads)


# ----------------------------------------------------------------------------- dense baseline
def dense_linear(n: int, k: int, rows: int, weight_dtype: Any = FP16, x_dtype: Any = FP16,
                 bias: bool = False) -> Traffic:
    """``F.linear`` on a dense ``[n, k]`` weight (2 bytes per weight for float16), each
    operand read once: ``n·k`` weights, ``rows·k`` of ``x``, ``rows·n`` written."""
    xb = _nbytes(x_dtype)
    return Traffic(n * k, float(n * k * _nbytes(weight_dtype)), 0.0,
                   float(rows * k * xb + (n * xb if bias else 0)), float(rows * n * xb))


def dense_embedding(n_ids: int, dim: int, weight_dtype: Any = FP16,
                    id_dtype: Any = 8) -> Traffic:
    """``F.embedding`` on a dense weight: ``dim`` entries read and written per id."""
    wb = _nbytes(weight_dtype)
    return Traffic(n_ids * dim, float(n_ids * dim * wb), 0.0, float(n_ids * _nbytes(id_dtype)),
                   float(n_ids * dim * wb))


def dense_copy(numel: int, dtype: Any = FP16) -> Traffic:
    """A device copy of a dense weight (the dequantize's ceiling): read and write."""
    b = _nbytes(dtype)
    return Traffic(numel, float(numel * b), 0.0, 0.0, float(numel * b))


def modeled_gemv_speedup(mean_bits: float, group_size: int | None = None, field_bits: int = 0,
                         *, shape: tuple[int, int] | None = None, rows: int = 1,
                         x_dtype: Any = FP16, tile_groups: int = TILE_GROUPS) -> float:
    """Bytes of a float16 GEMV over bytes of the packed GEMV: the speed-up a memory-bound
    GEMV can reach.

    With ``mean_bits`` alone: the issue's budget, 0.5 bit of metadata per weight and the
    activations neglected, ``16 / (b̄ + 0.5)``. With ``group_size`` (and ``field_bits``):
    ``16 / (b̄ + (f + 64/T)/g)``. With ``shape = (N, K)`` too: the totals of
    :func:`dense_linear` and :func:`gemv` (``x`` and ``y`` counted on both sides).
    """
    if group_size is None:
        if shape is not None:
            raise ValueError("shape needs group_size (and field_bits)")
        return 16 / (mean_bits + 0.5)
    if shape is None:
        return 2 / gemv_bytes_per_weight(mean_bits, group_size, field_bits, tile_groups)
    lay = Layout(tuple(shape), group_size, field_bits, mean_bits, tile_groups)
    return dense_linear(*shape, rows, FP16, x_dtype).total / gemv(lay, rows, x_dtype).total


def speedup(packed: Traffic, dense: Traffic) -> float:
    """Modelled speed-up of a memory-bound call: dense bytes over packed bytes."""
    return dense.total / packed.total
