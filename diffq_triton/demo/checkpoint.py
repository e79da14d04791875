"""Saving a quantized demo model and reloading it into a fresh one."""

from __future__ import annotations

from pathlib import Path

from torch import nn

import diffq_triton


def save(quantizer: diffq_triton.BaseQuantizer, path: Path) -> None:
    """Write ``quantizer``'s packed model to ``path`` (``diffq_triton.save_quantized``)."""
    diffq_triton.save_quantized(quantizer, path)


def load(model: nn.Module, path: Path) -> None:
    """Load a file written by :func:`save` into ``model``, a plain model without quantizer
    (``diffq_triton.load_quantized``)."""
    diffq_triton.load_quantized(model, path)
