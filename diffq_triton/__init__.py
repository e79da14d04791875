"""diffq-triton: differentiable quantization (DiffQ) with fused Triton kernels."""

__version__ = "0.1.0"
