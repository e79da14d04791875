"""Triton kernels of diffq-triton (importable as ``diffq_triton.kernels``; needs Triton).

The training step and eval go through the multi-tensor kernels, one launch per kernel for
every quantized weight of a model (their tensors found through :mod:`.tensor_table`):

- :mod:`.noise_many`: noise forward (range partials + noise) and backward (group sums +
  finalize), 4 launches per step; :mod:`.size_many`: the model size and its gradient, 3;
- :mod:`.quantize`: eval quantize → dequantize (2 launches for all weights, or per tensor);
- :mod:`.range`: per-tensor min/max/argmin/argmax (partials + in-kernel reduction);
- :mod:`.noise`: the per-tensor noise forward and backward (the public per-tensor op);
- :mod:`.bitpack`: packing of quantized levels;
- :mod:`.packed`: the packed-inference layout (docs/packed.md): dequantize, GEMV.

Callers go through :mod:`diffq_triton.ops`, which chooses between these kernels and the
eager path (:mod:`diffq_triton.ops.dispatch`).
"""
