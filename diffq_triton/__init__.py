"""diffq-triton: differentiable quantization (DiffQ) with fused Triton kernels.

A drop-in for diffq 0.2.4: ``import diffq_triton as diffq``.
"""

from .base import BaseQuantizer, restore_quantized_state
from .diffq import DiffQuantizer
from .lsq import LSQ
from .uniform import UniformQuantizer

__version__ = "0.1.0"

__all__ = [
    "BaseQuantizer",
    "DiffQuantizer",
    "LSQ",
    "UniformQuantizer",
    "restore_quantized_state",
]
