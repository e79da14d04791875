"""Saving a quantized demo model and reloading it into a fresh one."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

import diffq_triton


def save(quantizer: diffq_triton.BaseQuantizer, path: Path) -> None:
    """Write ``quantizer``'s packed model to ``path`` with ``diffq_triton.save_quantized``."""
    saver = getattr(diffq_triton, "save_quantized", None)
    if saver is not None:
        saver(quantizer, path)
    else:  # Older checkouts without the file format: the diffq-style state dict.
        torch.save(quantizer.get_quantized_state(packed=True), path)


def load(model: nn.Module, path: Path) -> None:
    """Load a file written by :func:`save` into ``model`` (a plain model, no quantizer kept)."""
    loader = getattr(diffq_triton, "load_quantized", None)
    if loader is not None:
        loader(model, path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        diffq_triton.restore_quantized_state(model, state)
