"""The compression methods the demo compares, and how each one is attached to a model.

A method is a small record; :func:`attach` turns it into a quantizer on a model, the penalty
added to the loss and what to do once training ends. A new kind needs one record kind and
one branch in :func:`attach`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import torch
from torch import nn

import diffq_triton as diffq

KINDS = ("float", "qat", "diffq", "budget")


@dataclass(frozen=True)
class Method:
    """One row of the demo's table.

    Args:
        name: the label shown in the table and the plot.
        kind: ``"float"`` (no quantizer), ``"qat"`` (:class:`UniformQuantizer`, straight-through
            training at ``bits``), ``"diffq"`` (:class:`DiffQuantizer`, loss + ``penalty``
            times the differentiable size in MB) or ``"budget"`` (DiffQ whose penalty adapts
            so the stored model ends at ``target_mb``: :class:`~diffq_triton.SizeBudget`).
        bits: width of every weight for ``"qat"``; for a ``"budget"`` sized from a QAT row
            (``qat_ratio > 0``), the width of that QAT row.
        penalty: the size penalty λ for ``"diffq"``.
        target_mb: the size budget in MB for ``"budget"``.
        qat_ratio: for ``"budget"`` without ``target_mb``: the budget is this fraction of the
            stored size of the QAT row at ``bits``, set once that row is trained (see
            :func:`resolve_budget`), so the two are compared at the same size.
    """

    name: str
    kind: str
    bits: int = 4
    penalty: float = 0.0
    target_mb: float = 0.0
    qat_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.kind == "diffq" and not self.penalty > 0:
            raise ValueError(f"penalty must be > 0 for a diffq method, got {self.penalty!r}")
        if self.kind == "budget" and not (self.target_mb > 0 or self.qat_ratio > 0):
            raise ValueError(
                f"target_mb (or qat_ratio) must be > 0 for a budget method, got "
                f"target_mb={self.target_mb!r}, qat_ratio={self.qat_ratio!r}"
            )

    @property
    def paired_qat_bits(self) -> int | None:
        """Width of the QAT row this budget row is sized from (None: not sized from QAT)."""
        return self.bits if self.kind == "budget" and self.qat_ratio > 0 else None


@dataclass(frozen=True)
class QuantSettings:
    """Quantizer arguments shared by every method of one demo run.

    The figures below were measured on the demo at width 128 with ``min_bits=2``, and
    (init_bits, bits_lr, noise) checked again for the size budget at the 2- and 3-bit QAT
    sizes with ``min_bits=1``: each alternative was worse there too.

    Args:
        group_size: DiffQ entries sharing one bit width. 64 rather than 16: each group
            stores its width in 4 bits, 0.0625 bit per weight at 64 against 0.25 at 16, and
            in this demo that saving outweighed the finer widths (at λ=0.5, 0.186 MB and
            ppl 8.28 against 0.208 MB and ppl 8.26).
        init_bits: DiffQ's starting width (5 or 6 ended smaller but worse than 8 at the
            same λ, off the size/perplexity curve of 8; for a budget at the 2-bit size,
            starting at 2.5 or 3 gave ppl 10.36 and 10.04 against 9.81 from 8).
        bits_lr: Adam learning rate of DiffQ's bit logits. Larger than diffq's 1e-3 default
            because the demo trains for a few hundred steps only (0.01 and 0.05 moved along
            the same size/perplexity curve as a change of λ, no better).
        min_size: parameters of at most this many MB (float32) stay in float32.
        noise: DiffQ's pseudo-quantization noise. ``"uniform"``: in runs this short it
            gave a better size/perplexity trade-off than ``"gaussian"`` (with gaussian noise,
            λ=0.5 ended larger and worse than 4-bit QAT; with uniform, smaller and 1% worse).
        min_bits: DiffQ's narrowest width. 1, not diffq's 2: with every group at 2 bits a
            DiffQ model is still larger than 2-bit QAT (each tensor also stores the 8-bit
            width of its width field), so a budget at the 2-bit QAT size needs some groups
            under 2 bits.
        max_bits: DiffQ's widest width.
    """

    group_size: int = 64
    init_bits: float = 8.0
    bits_lr: float = 0.02
    min_size: float = 0.01
    noise: str = "uniform"
    min_bits: float = 1.0
    max_bits: float = 15.0


# The QAT widths of the trade-off curve: 2 and 3 bits, where the paper finds QAT breaking
# down, 4 (its usual comparison) and 8 (near-lossless, the other end of the curve).
DEFAULT_QAT_BITS = (2, 3, 4, 8)
# One fixed penalty, to show DiffQ picking a size itself (between the 3- and 4-bit QAT
# sizes in this demo).
DEFAULT_PENALTIES = (0.5,)


def default_methods(
    penalties: Sequence[float] = DEFAULT_PENALTIES,
    qat_bits: Sequence[int] = DEFAULT_QAT_BITS,
    qat_budget: float | None = 1.0,
) -> list[Method]:
    """The trade-off curve, in table order: the float32 baseline, then for each width in
    ``qat_bits`` QAT at that width followed by DiffQ trained to ``qat_budget`` times its size
    (None: no such rows), then one DiffQ run per penalty."""
    methods = [Method("float32 baseline", "float")]
    for bits in qat_bits:
        methods.append(Method(f"QAT {bits}-bit", "qat", bits))
        if qat_budget is not None:
            methods.append(qat_budget_method(bits, qat_budget))
    methods += [Method(f"DiffQ λ={p:g}", "diffq", penalty=p) for p in penalties]
    return methods


def budget_method(target_mb: float) -> Method:
    """DiffQ trained to end at ``target_mb`` MB (the ``--target-mb`` row of the demo)."""
    return Method(f"DiffQ ≤{target_mb:g} MB", "budget", target_mb=target_mb)


def qat_budget_method(bits: int, ratio: float = 1.0) -> Method:
    """DiffQ trained to end at ``ratio`` times the size of QAT at ``bits`` (resolved when it
    runs, from that QAT row)."""
    if not 0 < ratio:
        raise ValueError(f"ratio must be > 0, got {ratio!r}")
    scale = "" if ratio == 1 else f"{ratio:g}×"
    return Method(f"DiffQ ≤{scale}QAT {bits}-bit", "budget", bits, qat_ratio=ratio)


def resolve_budget(method: Method, qat_sizes_mb: Mapping[int, float]) -> Method:
    """``method`` with its budget fixed: a ``qat_ratio`` budget becomes ``target_mb`` MB.

    Args:
        qat_sizes_mb: stored size in MB of each QAT row trained so far, by width.

    Raises:
        ValueError: the method is sized from a QAT width that has no row in
            ``qat_sizes_mb`` (no QAT row at that width ran before it).
    """
    bits = method.paired_qat_bits
    if bits is None or method.target_mb > 0:
        return method
    if bits not in qat_sizes_mb:
        raise ValueError(
            f"{method.name!r} is sized from the QAT {bits}-bit row: put that method before it"
        )
    # The exact size, not a rounded one: a target rounded up could let DiffQ end larger.
    target = method.qat_ratio * qat_sizes_mb[bits]
    return replace(method, name=f"{method.name} ({target:.4g} MB)", target_mb=target)


@dataclass
class Attached:
    """A method put on a model.

    Args:
        quantizer: the quantizer (None for ``"float"``).
        penalty: gives the term added to the loss each step (None: no term).
        finish: called once after the last step, before evaluation (None: nothing to do).
    """

    quantizer: diffq.BaseQuantizer | None = None
    penalty: Callable[[], torch.Tensor] | None = None
    finish: Callable[[], object] | None = None


def attach(
    method: Method, model: nn.Module, optimizer: torch.optim.Optimizer, settings: QuantSettings
) -> Attached:
    """Put ``method``'s quantizer on ``model`` (after ``optimizer`` was made for its weights)."""
    if method.kind == "float":
        return Attached()
    if method.kind == "qat":
        quantizer = diffq.UniformQuantizer(
            model, bits=method.bits, qat=True, min_size=settings.min_size
        )
        return Attached(quantizer)
    quantizer = diffq.DiffQuantizer(
        model, group_size=settings.group_size, init_bits=settings.init_bits,
        min_size=settings.min_size, noise=settings.noise, min_bits=settings.min_bits,
        max_bits=settings.max_bits,
    )
    quantizer.setup_optimizer(optimizer, lr=settings.bits_lr)
    if method.kind == "budget":
        from diffq_triton import SizeBudget

        budget = SizeBudget(quantizer, method.target_mb)
        return Attached(quantizer, budget.penalty, budget.finalize)
    return Attached(quantizer, lambda: method.penalty * quantizer.model_size())
