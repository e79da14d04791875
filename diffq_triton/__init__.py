"""diffq-triton: differentiable quantization (DiffQ) with fused Triton kernels.

A drop-in for diffq 0.2.4: ``import diffq_triton as diffq``.
"""

from .base import BaseQuantizer
from .budget import SizeBudget, size_range
from .diffq import DiffQuantizer
from .diffq_compat import load_diffq_state
from .lsq import LSQ
from .restore import restore_quantized_state
from .serialization import load_quantized, save_quantized
from .uniform import UniformQuantizer

__version__ = "0.1.0"

__all__ = [
    "BaseQuantizer",
    "DiffQuantizer",
    "LSQ",
    "SizeBudget",
    "UniformQuantizer",
    "load_diffq_state",
    "load_quantized",
    "restore_quantized_state",
    "save_quantized",
    "size_range",
]
