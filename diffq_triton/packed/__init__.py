"""Packed inference: quantized layers whose weights stay at their trained widths in memory.

- :mod:`.layout`: :class:`PackedTensor`, one weight in the layout of docs/packed.md (level
  and width streams, tile bit offsets, range), and its just-in-time CPU decode.
- :mod:`.reference`: the torch decoder of that layout, tile by tile, that kernels are
  tested against.
- :mod:`.traffic`: the bytes each packed kernel moves per weight (a pure-Python model, for
  the GPU report and the benchmarks).
- :mod:`.modules`: the packed ``Linear``, ``Embedding``, ``Conv1d``, ``Conv2d`` and GPT-2
  ``Conv1D`` layers.
- :mod:`.loader`: ``load_quantized(model, path, packed=True)``, :func:`pack_model` (from a
  live quantizer), :class:`PackReport`, :func:`resident_bytes`.
"""

from .layout import TILE_GROUPS, PackedTensor
from .loader import PackReport, load_quantized, pack_model, resident_bytes
from .modules import (
    PackedConv1D,
    PackedConv1d,
    PackedConv2d,
    PackedEmbedding,
    PackedLinear,
    PackedModule,
    release_scratch,
)

__all__ = [
    "TILE_GROUPS",
    "PackReport",
    "PackedConv1D",
    "PackedConv1d",
    "PackedConv2d",
    "PackedEmbedding",
    "PackedLinear",
    "PackedModule",
    "PackedTensor",
    "load_quantized",
    "pack_model",
    "release_scratch",
    "resident_bytes",
]
