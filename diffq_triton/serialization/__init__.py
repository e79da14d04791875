"""The file format: saving quantized models and states, checking and loading them back.

- :mod:`.save_load`: :func:`save_quantized` / :func:`load_quantized` (docs/format.md).
- :mod:`.container`: the safetensors container; :mod:`.atomic_file`: replacing a file.
- :mod:`.file_records`: every check of a file's records against a model.
- :mod:`.tensor_record`: :class:`QuantizedTensor`, one quantized tensor, and its checks.
- :mod:`.restore`: checking an in-memory state and rebuilding the quantizer it names.
- :mod:`.diffq_compat`: reading diffq 0.2.4 states (no pickle code runs).
- :mod:`.summary`: what a file or a diffq state holds, read and checked without a model
  (``diffq-triton info``).

Bit streams are packed by :mod:`diffq_triton.ops.bitpack` and the CPU codec
(:mod:`diffq_triton.codec`). Nothing here imports a quantizer: quantizers register
themselves (:func:`.restore.register_quantizer`) for states to name them.
"""

from .diffq_compat import load_diffq_state
from .restore import restore_quantized_state
from .save_load import file_bytes, load_quantized, save_quantized

__all__ = [
    "file_bytes",
    "load_diffq_state",
    "load_quantized",
    "restore_quantized_state",
    "save_quantized",
]
