"""The compression methods the demo compares, and how each one is attached to a model.

A method is a small record; :func:`attach` turns it into a quantizer on a model plus the
penalty added to the loss. A new kind (e.g. a size budget) needs one record kind and one
branch in :func:`attach`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

import diffq_triton as diffq

KINDS = ("float", "qat", "diffq")


@dataclass(frozen=True)
class Method:
    """One row of the demo's table.

    Args:
        name: the label shown in the table and the plot.
        kind: ``"float"`` (no quantizer), ``"qat"`` (:class:`UniformQuantizer`, straight-through
            training at ``bits``) or ``"diffq"`` (:class:`DiffQuantizer`, loss + ``penalty``
            times the differentiable size in MB).
        bits: width of every weight for ``"qat"``.
        penalty: the size penalty λ for ``"diffq"``.
    """

    name: str
    kind: str
    bits: int = 4
    penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "diffq" and not self.penalty > 0:
            raise ValueError(f"penalty must be > 0 for a diffq method, got {self.penalty!r}")


@dataclass(frozen=True)
class QuantSettings:
    """Quantizer arguments shared by every method of one demo run.

    Args:
        group_size: DiffQ entries sharing one bit width.
        init_bits: DiffQ's starting width.
        bits_lr: Adam learning rate of DiffQ's bit logits. Larger than diffq's 1e-3 default
            because the demo trains for a few hundred steps only.
        min_size: parameters of at most this many MB (float32) stay in float32.
    """

    group_size: int = 8
    init_bits: float = 8.0
    bits_lr: float = 0.05
    min_size: float = 0.01


def default_methods(
    penalties: Sequence[float] = (0.5, 2.0, 5.0), qat_bits: int = 4
) -> list[Method]:
    """Baseline, QAT at ``qat_bits`` and one DiffQ run per penalty, in table order."""
    methods = [Method("float32 baseline", "float"), Method(f"QAT {qat_bits}-bit", "qat", qat_bits)]
    methods += [Method(f"DiffQ λ={p:g}", "diffq", penalty=p) for p in penalties]
    return methods


Penalty = Callable[[], torch.Tensor]


def attach(
    method: Method, model: nn.Module, optimizer: torch.optim.Optimizer, settings: QuantSettings
) -> tuple[diffq.BaseQuantizer | None, Penalty | None]:
    """Put ``method``'s quantizer on ``model`` (after ``optimizer`` was made for its weights).

    Returns:
        ``(quantizer, penalty)``: the quantizer (None for ``"float"``) and a function giving the
        term to add to the loss each step (None when there is none).
    """
    if method.kind == "float":
        return None, None
    if method.kind == "qat":
        quantizer = diffq.UniformQuantizer(
            model, bits=method.bits, qat=True, min_size=settings.min_size
        )
        return quantizer, None
    quantizer = diffq.DiffQuantizer(
        model, group_size=settings.group_size, init_bits=settings.init_bits,
        min_size=settings.min_size,
    )
    quantizer.setup_optimizer(optimizer, lr=settings.bits_lr)
    return quantizer, lambda: method.penalty * quantizer.model_size()
