"""diffq-triton: differentiable quantization (DiffQ) with fused Triton kernels.

A drop-in for diffq 0.2.4: ``import diffq_triton as diffq``.
"""

from .packed import PackReport, load_quantized, pack_model, resident_bytes
from .quantizers import (
    LSQ,
    BaseQuantizer,
    DiffQuantizer,
    SizeBudget,
    UniformQuantizer,
    size_range,
)
from .serialization import (
    load_diffq_state,
    restore_quantized_state,
    save_quantized,
)

__version__ = "0.1.0"

__all__ = [
    "BaseQuantizer",
    "DiffQuantizer",
    "LSQ",
    "PackReport",
    "SizeBudget",
    "UniformQuantizer",
    "load_diffq_state",
    "load_quantized",
    "pack_model",
    "resident_bytes",
    "restore_quantized_state",
    "save_quantized",
    "size_range",
]
