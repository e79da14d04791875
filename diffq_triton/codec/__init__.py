"""The CPU codec: bit streams and quantization on the host, in one pass, on all cores.

- :mod:`.bitpack_cpu`, :mod:`.bitpack_fixed`: numpy/torch packers of level streams.
- :mod:`.native_build`: compiling and loading ``csrc/codec.c``; :mod:`.native`: its calls
  on tensors (quantize-and-pack, unpack-and-dequantize, CRC-32).
- :mod:`.cpu_codec`: chunked torch quantize/dequantize, bit-identical to the reference.
- :mod:`.cpu_pool`: the thread pool all of them (and the eager ops) run on.

The bottom layer with :mod:`diffq_triton.kernels`: it imports nothing else of the package.
"""
