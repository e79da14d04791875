"""Triton kernels of diffq-triton (importable as ``diffq_triton.kernels``; needs Triton).

- :mod:`.range`: per-tensor min/max/argmin/argmax (partials + in-kernel reduction).
- :mod:`.noise`: pseudo-quantization noise forward and backward (2 + 2 launches per tensor).
- :mod:`.quantize`: eval-time quantize → dequantize with per-group widths (2 launches).
- :mod:`.bitpack`: packing of quantized levels.

Callers go through :mod:`diffq_triton.ops`, which chooses between these kernels and the
eager path (:mod:`diffq_triton.ops.dispatch`).
"""
