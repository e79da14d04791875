"""Quantizers: what hooks a model and turns its weights noisy (training) or quantized (eval).

- :mod:`.base`: :class:`BaseQuantizer`: finding parameters, the weight swap, the optimizer.
- :mod:`.saved_state`: exporting records, ``get_quantized_state`` / ``restore_quantized_state``.
- :mod:`.swap_check`: a module computing with a replaced weight fails the first forward.
- :mod:`.live`: one quantizer per model; optimizer steps refresh the quantizers' caches.
- :mod:`.materialise`: ``reset_parameters`` after ``to_empty`` on a model built on ``meta``.
- :mod:`.diffq`, :mod:`.uniform`, :mod:`.lsq`: the three quantizers of diffq 0.2.4.
- :mod:`.budget`: :class:`SizeBudget`, the self-tuning size penalty of a DiffQuantizer.

They compute through :mod:`diffq_triton.ops` and save through
:mod:`diffq_triton.serialization`.
"""

from .base import BaseQuantizer
from .budget import SizeBudget, size_range
from .diffq import DiffQuantizer
from .lsq import LSQ
from .uniform import UniformQuantizer

__all__ = [
    "LSQ",
    "BaseQuantizer",
    "DiffQuantizer",
    "SizeBudget",
    "UniformQuantizer",
    "size_range",
]
