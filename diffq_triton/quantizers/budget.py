"""Train to a size budget: the size penalty's λ tunes itself (paper eq. 9–10, §5.6).

DiffQ trades accuracy against size through ``loss + λ·model_size()``, and the size a run ends
at depends on λ in a way nobody can predict: finding the λ for a wanted size used to take a
sweep of full trainings. :class:`SizeBudget` solves the constrained problem the paper states
instead — best accuracy subject to ``model_size() <= target`` — by adjusting λ during the one
run, from the gap between the current size and the target:

* the multiplier lives in log space, so it is scale-free: whatever the loss's units, λ moves
  by a bounded *factor* per step and reaches any magnitude in a few hundred steps;
* log λ = I + P·e, with ``e = (size - target) / target``: the integral ``I`` accumulates the
  gap (dual ascent on the Lagrangian, rate-limited so λ grows at most 5% per step, and held
  while the size already closes in on the target, since the size lags λ), and the
  proportional term ``P·e`` is an augmented-Lagrangian-like stiffening whose gain grows
  with the step count, as augmented Lagrangian methods raise their penalty, so the size
  holds the target more tightly as training goes on;
* λ starts small and grows into place: a large first λ would fill Adam's second moment and
  leave the logits unable to climb back for ~1/(1 - β2) steps;
* everything is a handful of 0-dim tensor ops on the logits' device: no host sync per step,
  the same λ on every DDP rank (it depends only on the logits, which DDP keeps equal), and
  traceable by ``torch.compile``.

The penalty sees the differentiable size, whose widths are not rounded. Rounding moves the
stored size (often by whole bits, since groups trained alike sit at the same width), so
:meth:`SizeBudget.finalize` rounds the widths *to the budget* at the end of training: it
picks, among the roundings ``round(b + c)`` with one shared offset ``c``, the largest stored
size that fits the target, and rewrites only the logits whose rounding changes.
"""

from __future__ import annotations

import math
import numbers
import warnings

import torch

from ..ops import reference
from .base import MEGABYTE_BITS, BaseQuantizer

# λ starts at _INIT_SCALE / target: a penalty worth 0.1% of a unit of loss at the target,
# below what cross-entropy-sized losses need (0.01–0.3 in bench/bench_budget.py), so λ grows
# into place instead of starting with a spike: Adam remembers a large gradient in its second
# moment for ~1/(1 - β2) steps, during which the logits barely move back up.
_INIT_SCALE = 1e-3
# Integral (dual ascent) gain in log space and its per-step clamp: the integral changes λ by
# at most e^0.05 ≈ 5% per step, so 100× takes ~90 steps.
_INTEGRAL_GAIN = 0.2
_MAX_LOG_STEP = 0.05
# Anti-windup: the integral holds while the gap closes fast enough to vanish within
# _HORIZON × (steps so far): the size lags λ (Adam moves a logit at most ~lr per step), and
# integrating during that lag would overshoot once the size catches up.
_HORIZON = 0.25
# Proportional (augmented-Lagrangian-like) gain: grows as _P_RATE·step, as augmented
# Lagrangian methods raise their penalty, so the size is held tighter as training goes on;
# capped at _P_MAX (a 2% excess then multiplies λ by e) because the stored width field jumps
# by one bit per group when a tensor's widest group crosses a rounding boundary, and an
# unbounded gain would turn each jump into a kick. The gap it sees is clamped to ±_P_CLAMP.
_P_RATE = 0.05
_P_MAX = 50.0
_P_CLAMP = 0.2
# Relative gaps are clamped so a far-off start does not produce an absurd integral step.
_MAX_REL_ERROR = 1.0
# finalize() ends at most at the target and warns when it ends further below it than this
# fraction (too few groups to fit closely, or a size that has not converged).
FINAL_TOLERANCE = 0.02


def size_range(quantizer: BaseQuantizer) -> tuple[float, float]:
    """Stored sizes in MB with every group at the narrowest and at the widest width.

    Any target in this interval can be reached; these are the sizes ``true_model_size()``
    reports with all widths rounded to ``round(min_bits + extra_bits)`` and
    ``round(max_bits + extra_bits)`` (clamped to ``[1, 15]``), non-quantized parameters
    included.
    """
    _check_quantizer(quantizer)
    low, high = _width_limits(quantizer)
    sizes = []
    for width in (low, high):
        bits = [torch.full((r.logit.numel(),), float(width)) for r in _records(quantizer)]
        sizes.append(_stored_size_mb(quantizer, bits))
    return sizes[0], sizes[1]


class SizeBudget:
    """A size penalty whose weight λ adapts so the model ends at ``target_mb``.

    Use it in place of ``penalty * quantizer.model_size()``::

        budget = SizeBudget(quantizer, target_mb=5.0)
        for batch in data:
            loss = criterion(model(batch.x), batch.y)
            (loss + budget.penalty()).backward()
            optimizer.step(); optimizer.zero_grad()
        budget.finalize()  # round the widths to the budget: true_model_size() <= target
        # log budget.lam and budget.size (0-dim tensors) when you log the loss

    Call :meth:`penalty` once per optimizer step (with gradient accumulation, pass
    ``update=False`` on all micro-batches but one). λ and the step count are saved by
    :meth:`state_dict` for resuming.

    Args:
        quantizer: a :class:`~diffq_triton.DiffQuantizer` (its logits must train).
        target_mb: wanted ``true_model_size()`` in MB, within :func:`size_range`.

    Raises:
        TypeError: ``quantizer`` is not a DiffQuantizer, or ``target_mb`` not a number.
        ValueError: ``target_mb`` lies outside the reachable range.
    """

    def __init__(self, quantizer: BaseQuantizer, target_mb: float):
        _check_quantizer(quantizer)
        self.quantizer = quantizer
        self.target_mb = _check_target(quantizer, target_mb)
        device = quantizer.model_size().device
        # λ's integral part (log space) and the count of updates: on the device, updated in
        # place, so a step never waits for the host and torch.compile sees plain mutations.
        self._log_lam = torch.full((), math.log(_INIT_SCALE / self.target_mb), device=device)
        self._step = torch.zeros((), device=device)
        self._last_gap = torch.zeros((), device=device)
        self._lam = self._log_lam.exp()
        self._size = torch.full((), float("nan"), device=device)

    def __repr__(self) -> str:
        return f"SizeBudget(target_mb={self.target_mb!r})"

    @property
    def lam(self) -> torch.Tensor:
        """λ used by the last :meth:`penalty` (0-dim tensor on the logits' device, in loss/MB)."""
        return self._lam

    @property
    def size(self) -> torch.Tensor:
        """Differentiable-size value at the last :meth:`penalty`, in MB (0-dim tensor; NaN
        before the first call)."""
        return self._size

    def penalty(self, update: bool = True) -> torch.Tensor:
        """``λ·model_size()``, to add to the loss; then move λ toward the target.

        Args:
            update: advance λ (once per optimizer step).

        Returns:
            0-dim tensor, differentiable in the bit logits; λ itself carries no gradient.
        """
        size = self.quantizer.model_size()
        target = self.target_mb
        with torch.no_grad():
            gap = ((size.detach() - target) / target).clamp(-_MAX_REL_ERROR, _MAX_REL_ERROR)
            gain = (_P_RATE * self._step).clamp(max=_P_MAX)
            lam = torch.exp(self._log_lam + gain * gap.clamp(-_P_CLAMP, _P_CLAMP))
            if update:
                # Anti-windup (see _HORIZON): on track, λ is already large enough.
                closing = self._last_gap.abs() - gap.abs()
                on_track = (closing * _HORIZON * self._step >= gap.abs()) & (self._step > 0)
                step = (_INTEGRAL_GAIN * gap).clamp(-_MAX_LOG_STEP, _MAX_LOG_STEP)
                self._log_lam.add_(torch.where(on_track, 0.0, step))
                self._last_gap.copy_(gap)
                self._step.add_(1)
                self._lam = lam
                self._size = size.detach()
        return lam * size

    def __call__(self, update: bool = True) -> torch.Tensor:
        """Same as :meth:`penalty`: a budget can stand where a penalty function is expected."""
        return self.penalty(update)

    # ----------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything needed to resume: target, λ's integral (log), and the step count."""
        return {
            "target_mb": self.target_mb,
            "log_lambda": self._log_lam.detach().clone(),
            "step": self._step.detach().clone(),
            "last_gap": self._last_gap.detach().clone(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict` (the target included) so training continues identically.

        Raises:
            ValueError: ``state`` lacks an entry or its target is out of range.
        """
        missing = {"target_mb", "log_lambda", "step", "last_gap"} - set(state)
        if missing:
            raise ValueError(f"state is missing {sorted(missing)}")
        self.target_mb = _check_target(self.quantizer, state["target_mb"])
        with torch.no_grad():
            self._log_lam.copy_(torch.as_tensor(state["log_lambda"]))
            self._step.copy_(torch.as_tensor(state["step"]))
            self._last_gap.copy_(torch.as_tensor(state["last_gap"]))
        self._lam = self._log_lam.exp()

    # ----------------------------------------------------------------- end of training
    def finalize(self) -> float:
        """Round the widths to the budget, so ``true_model_size() <= target_mb``.

        Among the roundings ``round(b + c)`` of the trained widths ``b`` with one offset
        ``c`` shared by all groups (which keeps the order the training gave the groups),
        chooses the largest stored size not above the target; groups whose rounding thus
        changes get their logit rewritten to the middle of the new width's rounding interval,
        every other logit is left as it is. Ties between groups trained to the same width are
        broken by position. Synchronises with the device; call it once, after training.

        Returns:
            ``true_model_size()`` after rounding, in MB.
        """
        q = self.quantizer
        records = list(_records(q))
        if not records:
            return q.true_model_size()
        low, high = _width_limits(q)
        soft = [(q.extra_bits + q.get_bits(r.logit.detach())).double().cpu() for r in records]
        plain = [b.round().clamp(low, high) for b in soft]
        best = self._fit(soft, low, high, cap=None)
        # With the widest group of each tensor kept where plain rounding puts it, the shift
        # cannot add a width-field bit per group: sometimes the closer fit.
        capped = self._fit(soft, low, high, cap=[float(b.max()) for b in plain])
        widths = max((best, capped), key=lambda pair: pair[0])[1]
        with torch.no_grad():
            for record, new, old in zip(records, widths, plain, strict=True):
                changed = new != old
                if bool(changed.any()):
                    logit = _logits_for_widths(q, new).to(record.logit)
                    record.logit[changed.to(record.logit.device)] = logit[changed.to(logit.device)]
        size = q.true_model_size()
        if abs(size - self.target_mb) > FINAL_TOLERANCE * self.target_mb:
            warnings.warn(
                f"rounding to the budget reached {size:.6g} MB for a target of "
                f"{self.target_mb:.6g} MB: too few groups to fit it closely, or training "
                "too short for the size to converge",
                stacklevel=2,
            )
        return size

    def _fit(
        self, soft: list[torch.Tensor], low: int, high: int, cap: list[float] | None
    ) -> tuple[float, list[torch.Tensor]]:
        """Largest stored size ``<= target`` over shared rounding offsets, and its widths."""
        q = self.quantizer
        tops = cap or [float(high)] * len(soft)

        def widths(c: float) -> list[torch.Tensor]:
            return [(b + c).round().clamp(low, top) for b, top in zip(soft, tops, strict=True)]

        def fits(ws: list[torch.Tensor]) -> bool:
            return _stored_size_mb(q, ws) <= self.target_mb

        span = float(high - low + 1)
        lo, hi = -span, span
        if not fits(widths(lo)):
            return -math.inf, widths(lo)
        if fits(widths(hi)):
            ws = widths(hi)
            return _stored_size_mb(q, ws), ws
        for _ in range(60):  # 2·span/2^60: far below any gap between two groups' widths
            mid = (lo + hi) / 2
            if fits(widths(mid)):
                lo = mid
            else:
                hi = mid
        below, above = widths(lo), widths(hi)
        # Groups that step up between lo and hi are tied: take as many as fit. Two orders,
        # the better kept: those that do not widen their tensor's widest group first (no
        # width-field bit added), or spread evenly over the tensors (each pays its field
        # bit once, then fills in).
        flat_below, flat_above = torch.cat(below), torch.cat(above)
        steps = (flat_above > flat_below).nonzero().flatten()
        if steps.numel():
            sizes = [len(b) for b in below]
            widest = torch.cat([torch.full_like(b, float(b.max())) for b in below])
            widens = (flat_above[steps] > widest[steps]).double()
            position = torch.cat([torch.arange(n, dtype=torch.float64) / n for n in sizes])
            orders = [torch.sort(widens, stable=True).indices,
                      torch.sort(position[steps], stable=True).indices]
            fitted = [self._take_ties(flat_below, flat_above, steps[o], sizes) for o in orders]
            below = max(fitted, key=lambda ws: _stored_size_mb(q, ws))
        return _stored_size_mb(q, below), below


    def _take_ties(
        self, below: torch.Tensor, above: torch.Tensor, steps: torch.Tensor, sizes: list[int]
    ) -> list[torch.Tensor]:
        """Widths with the longest prefix of ``steps`` raised to ``above`` that still fits."""

        def take(n: int) -> list[torch.Tensor]:
            flat = below.clone()
            flat[steps[:n]] = above[steps[:n]]
            return list(torch.split(flat, sizes))

        n_lo, n_hi = 0, steps.numel()
        while n_lo < n_hi:  # take(0) fits; the size grows with n
            n = (n_lo + n_hi + 1) // 2
            if _stored_size_mb(self.quantizer, take(n)) <= self.target_mb:
                n_lo = n
            else:
                n_hi = n - 1
        return take(n_lo)


# --------------------------------------------------------------------- helpers
def _check_quantizer(quantizer: object) -> None:
    # DiffQuantizer imports this module (size_penalty), so it is recognised by its flag.
    if not (isinstance(quantizer, BaseQuantizer) and quantizer._trains_widths):
        raise TypeError(
            f"quantizer must be a diffq_triton.DiffQuantizer, got {type(quantizer).__name__}"
        )


def _check_target(quantizer: BaseQuantizer, target_mb: object) -> float:
    if isinstance(target_mb, bool) or not isinstance(target_mb, numbers.Real):
        raise TypeError(f"target_mb must be a number, got {type(target_mb).__name__}")
    target = float(target_mb)
    low, high = size_range(quantizer)
    if not (math.isfinite(target) and low <= target <= high):
        raise ValueError(
            f"target_mb={target_mb} is outside the sizes this quantizer can reach: "
            f"[{low:.6g}, {high:.6g}] MB (every group at min_bits … at max_bits, "
            "non-quantized parameters included); change the target, min_bits/max_bits, "
            "or which parameters are quantized"
        )
    return target


def _records(quantizer: BaseQuantizer):
    # One record per quantized tensor, tied copies excluded: the ones that own logits.
    return quantizer._first_uses()


def _width_limits(quantizer: BaseQuantizer) -> tuple[int, int]:
    """Narrowest and widest stored widths the logits can produce after rounding."""
    low = min(max(round(quantizer.min_bits + quantizer.extra_bits), 1), 15)
    high = min(max(round(quantizer.max_bits + quantizer.extra_bits), 1), 15)
    return low, high


def _stored_size_mb(quantizer: BaseQuantizer, widths: list[torch.Tensor]) -> float:
    """``true_model_size()`` the quantizer would report with these integer widths."""
    total = BaseQuantizer._float_size_bits(quantizer)
    for record, bits in zip(_records(quantizer), widths, strict=True):
        total += float(
            reference.diffq_tensor_size_bits(
                bits, record.param.numel(), quantizer.group_size, quantizer.min_bits
            )
        )
    return total / MEGABYTE_BITS


def _logits_for_widths(quantizer: BaseQuantizer, widths: torch.Tensor) -> torch.Tensor:
    """Logits whose widths round (with ``extra_bits``) to ``widths``, mid-interval.

    Args:
        widths: integer-valued float tensor ``[n_groups]`` within :func:`_width_limits`.
    """
    q = quantizer
    widths = widths.double()
    # Soft widths that round to w lie in [w - 1/2, w + 1/2) - extra_bits, and the logits
    # reach only the open (min_bits, max_bits): aim at the middle of the intersection.
    lower = (widths - 0.5 - q.extra_bits).clamp(min=q.min_bits)
    upper = (widths + 0.5 - q.extra_bits).clamp(max=q.max_bits)
    bits = (lower + upper) / 2
    if q.param == "noise":
        log_max_noise = math.log(1 / (2**q.min_bits - 1))
        log_min_noise = math.log(1 / (2**q.max_bits - 1))
        frac = (torch.log(1 / (2**bits - 1)) - log_max_noise) / (log_min_noise - log_max_noise)
    else:
        frac = (bits - q.min_bits) / (q.max_bits - q.min_bits)
    return torch.logit(frac).float()
