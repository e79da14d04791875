"""DiffQuantizer: differentiable quantization by pseudo-quantization noise (paper §3)."""

from __future__ import annotations

from collections.abc import Sequence
from operator import attrgetter

import torch
from torch import nn

from .. import ops, validation
from ..ops import reference
from ..serialization.restore import register_quantizer
from ..serialization.tensor_record import QuantizedTensor, quantize_minmax
from . import sharding
from .base import MEGABYTE_BITS, BaseQuantizer, QuantizedParam, _is_compiling
from .budget import SizeBudget

_VERSION, _DATA_PTR = attrgetter("_version"), torch.Tensor.data_ptr


def _versions(logits: list[torch.Tensor]) -> tuple:
    """What tells that logits changed: their version counters (an in-place write) and
    their data pointers (a new tensor). C-level loops: computed twice per step."""
    return tuple(map(_VERSION, logits)), tuple(map(_DATA_PTR, logits))


@register_quantizer
class DiffQuantizer(BaseQuantizer):
    """Trains the bit width of each group of weights along with the model.

    In training, every forward replaces each quantized weight ``w`` by
    ``w + (max w - min w)·u(b_s)·ξ`` with fresh noise ``ξ`` and ``u(b) = 1/(2^b - 1)``: the
    size of the quantization step for the group's ``b_s`` bits. The widths come from
    trainable logits (one per group, registered on the module as ``<name><suffix>``), so
    ``loss + λ·model_size()`` trades accuracy against size. In eval mode the forward uses
    the truly quantized weights (widths rounded).

    Args:
        model: the model to quantize.
        min_size: parameters of at most ``min_size`` MB (float32) are kept in float.
        float16: keep the non-quantized parameters as float16.
        group_size: consecutive entries sharing one width; 0 for one width per tensor. A
            tensor whose size is not a multiple gets a shorter last group.
        min_bits, max_bits: range of the widths, ``1 <= min_bits < max_bits <= 15``.
        param: ``"bits"`` (logit maps linearly to bits) or ``"noise"`` (log-linearly to the
            noise scale).
        noise: ``"gaussian"`` (``N(0,1)/2``) or ``"uniform"`` (``U[-1/2, 1/2]``).
        init_bits: initial width, strictly between ``min_bits`` and ``max_bits``.
        extra_bits: added to the widths when quantizing for real and in the sizes.
        suffix: suffix of the logit parameters' names.
        exclude: fnmatch patterns of parameter names not to quantize.
        detect_bound: share logits and noise between uses of a tied parameter.
    """

    def __init__(
        self,
        model: nn.Module,
        min_size: float = 0.01,
        float16: bool = False,
        group_size: int = 1,
        min_bits: float = 2,
        max_bits: float = 15,
        param: str = "bits",
        noise: str = "gaussian",
        init_bits: float = 8,
        extra_bits: float = 0,
        suffix: str = "_diffq",
        exclude: Sequence[str] | None = None,
        detect_bound: bool = True,
    ):
        self.group_size = validation.check_group_size(group_size)
        self.min_bits = validation.check_number("min_bits", min_bits, low=1, high=15)
        self.max_bits = validation.check_number("max_bits", max_bits, low=1, high=15)
        if self.min_bits >= self.max_bits:
            raise validation.ArgumentError(
                f"min_bits ({min_bits}) must be < max_bits ({max_bits})")
        self.init_bits = validation.check_number("init_bits", init_bits, low=1, high=15)
        if not self.min_bits < self.init_bits < self.max_bits:
            raise validation.ArgumentError(
                f"init_bits ({init_bits}) must lie strictly between min_bits ({min_bits}) "
                f"and max_bits ({max_bits})"
            )
        self.extra_bits = validation.check_number("extra_bits", extra_bits, low=-15, high=15)
        validation.check_choice("param", param, reference.PARAMS)
        validation.check_choice("noise", noise, reference.NOISES)
        if not isinstance(suffix, str) or not suffix:
            raise validation.ArgumentError(f"suffix must be a non-empty string, got {suffix!r}")
        self.param = param
        self.noise = noise
        self.suffix = suffix
        self._param_suffix = suffix
        self._kwargs = dict(
            min_size=min_size, float16=float16, group_size=group_size, min_bits=min_bits,
            max_bits=max_bits, param=param, noise=noise, init_bits=init_bits,
            extra_bits=extra_bits, suffix=suffix, exclude=list(exclude or []),
            detect_bound=detect_bound,
        )
        super().__init__(model, min_size, float16, exclude, detect_bound)

    # ----------------------------------------------------------------- logits
    def _initial_logit(self) -> float:
        """Every logit's value at creation: the width ``init_bits``."""
        t = reference.initial_fraction(self.init_bits, self.min_bits, self.max_bits, self.param)
        # The logit of the float32 fraction, so the logits equal diffq 0.2.4's bit for bit.
        return torch.logit(torch.tensor(float(t))).item()

    def _register_param(self, record: QuantizedParam) -> None:
        n = reference.num_groups(record.param.numel(), self.group_size)
        record.logit = nn.Parameter(torch.full((n,), self._initial_logit(),
                                               device=record.param.device))
        record.module.register_parameter(record.name + self.suffix, record.logit)

    def _init_own(self, record: QuantizedParam) -> None:
        # The same float as torch.full above wrote; each rank fills its own shard.
        sharding.local(record.logit).fill_(self._initial_logit())

    _trained_name = "bit logits"
    _trains_widths = True
    _own_attr = "logit"

    def _own_param(self, record: QuantizedParam) -> nn.Parameter:
        return record.logit

    def _logits(self) -> list[nn.Parameter]:
        return self._trained_params()

    def get_bits(self, logit: torch.Tensor) -> torch.Tensor:
        """Widths ``[n_groups]`` (float, differentiable) from logits ``[n_groups]``."""
        return reference.bits_from_logits(logit, self.min_bits, self.max_bits, self.param)

    _get_bits = get_bits  # diffq 0.2.4 name

    def _int_bits(self, record: QuantizedParam) -> torch.Tensor:
        """Rounded widths ``[n_groups]`` uint8: ``round_bits(extra_bits + get_bits(logit))``."""
        return self._rounded_widths(record.logit.detach())

    def _int_bits_many(self, records: list[QuantizedParam]) -> list[torch.Tensor]:
        """:meth:`_int_bits` of several records with one set of ops (elementwise widths)."""
        logits = [r.logit.detach().reshape(-1) for r in records]
        if len({(lg.device, lg.dtype) for lg in logits}) != 1:
            return [self._int_bits(r) for r in records]
        widths = self._rounded_widths(torch.cat(logits))
        return list(widths.split([lg.numel() for lg in logits]))

    def _rounded_widths(self, logit: torch.Tensor) -> torch.Tensor:
        if self.param != "bits" or type(self).get_bits is not DiffQuantizer.get_bits:
            return reference.round_bits(self.extra_bits + self.get_bits(logit))
        # The same float32 operations in the same order, in place: one temporary instead of
        # eight (a third of the time of a 25M-weight save went to fresh pages for them).
        t = torch.sigmoid(logit)
        bits = self.max_bits * t
        bits.add_(t.neg_().add_(1).mul_(self.min_bits))  # max·t + (1 - t)·min
        return bits.add_(self.extra_bits).round_().clamp_(1, 15).to(torch.uint8)

    # ----------------------------------------------------------------- optimizer
    def setup_optimizer(
        self, optimizer: torch.optim.Optimizer, lr: float = 1e-3, **kwargs: object
    ) -> None:
        """Add the bit logits to ``optimizer`` as a new group without weight decay.

        Args:
            optimizer: created before the quantizer (it must not hold the logits already).
            lr: learning rate of the logits (1e-3 suits Adam).
            **kwargs: other overrides for the logits' param group.
        """
        self._add_param_group(optimizer, {"lr": lr, "weight_decay": 0, **kwargs})

    def check_unused(self) -> None:
        """Zero the logits' gradients of weights that got no gradient (unused this step)."""
        for record in self._first_uses():
            grad = record.param.grad
            if record.logit.grad is not None and (grad is None or not bool(grad.any())):
                record.logit.grad.zero_()

    # ----------------------------------------------------------------- forward
    def _train_weights(self, records: list[QuantizedParam] | None = None,
                       seed: torch.Tensor | None = None, streams: list[int] | None = None
                       ) -> list[torch.Tensor]:
        """Noisy weights of ``records`` (default: every first use, with a fresh seed); the
        noise of record ``i`` is keyed by ``(seed, streams[i])``."""
        self._require_optimizer()
        whole_model = records is None
        if whole_model:
            # Streams by position: parameter i's, as the module-wise swap keys them.
            records, seed = list(self._first_uses()), self._draw_seed()
        weights = [record.param for record in records]
        logits = [record.logit for record in records]
        kwargs = dict(group_size=self.group_size, min_bits=self.min_bits,
                      max_bits=self.max_bits, param=self.param, noise=self.noise,
                      seed=seed, streams=streams)
        # One call for all weights: on the Triton backend a constant number of launches
        # and one autograd node per step, whatever the number of tensors.
        if type(self).get_bits is not DiffQuantizer.get_bits or not whole_model:
            return ops.pseudo_quantize_many(weights, logits, **kwargs)
        # The same call gives the model size, whose gradient then joins the logits' in the
        # noise's backward: model_size() returns it while the logits are unchanged.
        noisy, size, token = ops.pseudo_quantize_many_with_size(
            weights, logits, extra_bits=self.extra_bits,
            mb_plus=self._float_size_bits() / MEGABYTE_BITS, **kwargs)
        # A forward without gradients (torch.no_grad) leaves nothing to reuse: a size taken
        # from it would not train the logits.
        usable = size is not None and size.requires_grad
        # The size's own version too: a caller may write into the size model_size() handed
        # out (penalty *= λ), which then no longer is this step's size.
        self._step_size = ((size, token, _versions(logits), size._version) if usable
                           else None)
        self._step_size_handed = False
        return noisy

    def _params_changed(self) -> None:
        super()._params_changed()
        self._step_size = None

    def _size_of_this_step(self, logits: list[torch.Tensor] | None = None
                           ) -> torch.Tensor | None:
        """The size the last training forward computed (in MB, the float parameters
        included: what :meth:`model_size` returns), if it still holds: no optimizer step
        and no in-place change of the logits (``logits``: every first use's, when the
        caller has them) since, and its graph not yet used by a backward."""
        cached = getattr(self, "_step_size", None)
        if cached is None or _is_compiling():
            return None
        size, token, versions, version = cached
        if logits is None:
            logits = [r.logit for r in self._first_uses()]
        if token.used or size._version != version or versions != _versions(logits):
            self._step_size = None
            return None
        return size if torch.is_grad_enabled() else size.detach()

    def _cache_key(self, record: QuantizedParam) -> tuple:
        return (*super()._cache_key(record), record.logit._version)

    def _quantized_weight(self, record: QuantizedParam) -> torch.Tensor:
        return ops.quantized_weight(record.param, self._int_bits(record), self.group_size)

    def _quantized_weights(self, records: list[QuantizedParam]) -> list[torch.Tensor]:
        return ops.quantized_weight_many([r.param for r in records],
                                         self._int_bits_many(records), self.group_size)

    def _export_bits(self, record: QuantizedParam) -> torch.Tensor:
        return self._int_bits(record)

    def _quantize_record(self, record: QuantizedParam, bits: torch.Tensor | None
                         ) -> QuantizedTensor:
        bits = self._int_bits(record) if bits is None else bits
        return quantize_minmax(record.full_name, record.param.detach(), bits, self.group_size)

    # ----------------------------------------------------------------- sizes
    def model_size(self, exact: bool = False) -> torch.Tensor:
        """Size of the quantized model in MB (paper eq. 8), a 0-dim tensor.

        Differentiable in the logits unless ``exact``, which rounds the widths as real
        quantization does (then equal to :meth:`true_model_size`). Computed on the logits'
        device without synchronising with the host. On a model sharded by ``fully_shard`` it
        gathers the logits: every rank must call it.
        """
        records = list(self._first_uses())
        floats = self._float_size_bits() / MEGABYTE_BITS
        if not records:
            return super().model_size()
        # All tensors at once: a fixed number of small ops whatever their number (host time
        # per step), on the logits' device (a Python float joins without a copy).
        logits = [r.logit for r in records]
        step = None if exact else self._size_of_this_step(logits)
        if step is not None:
            # The step's first call hands out the forward's tensor itself, later calls a copy:
            # each caller may scale its size in place (penalty *= λ) without another seeing
            # it (a write into the first is noticed by its version: then computed afresh).
            if getattr(self, "_step_size_handed", False):
                return step.clone()
            self._step_size_handed = True
            return step
        total = None
        if self._sharded:
            # Whole logits, gathered one tensor at a time (differentiable: each rank's shard
            # gets its part of the gradient); the same figure on every rank.
            logits = [sharding.full(lg) for lg in logits]
        elif type(self).get_bits is DiffQuantizer.get_bits:
            # The kernels know these widths.
            total = ops.diffq_size_bits(
                [r.param for r in records], logits,
                group_size=self.group_size, extra_bits=self.extra_bits, min_bits=self.min_bits,
                max_bits=self.max_bits, param=self.param, exact=exact)
        if total is None:
            logits = torch.cat([lg.reshape(-1) for lg in logits])
            bits = self.extra_bits + self.get_bits(logits)
            if exact:
                bits = bits.detach().round().clamp(1, 15)
            total = reference.diffq_sizes_bits(bits, self._layout(records), self.min_bits)
        return total.reshape(()) / MEGABYTE_BITS + floats

    def _layout(self, records: list[QuantizedParam]) -> tuple:
        key = (tuple(r.param.numel() for r in records), records[0].logit.device)
        cached = getattr(self, "_size_layout", None)
        if cached is None or cached[0] != key:
            layout = reference.size_layout(list(key[0]), self.group_size, key[1])
            self._size_layout = cached = (key, layout)
        return cached[1]

    def true_model_size(self) -> float:
        """Size in MB with the widths rounded, as stored without further compression."""
        return float(self.model_size(exact=True))

    def size_penalty(self, target_mb: float) -> torch.Tensor:
        """``λ·model_size()`` with λ adapting so that training ends at ``target_mb`` MB.

        The first call creates ``self.budget``, a :class:`diffq_triton.SizeBudget` (``.lam``,
        ``.size`` for logging, ``.state_dict()`` to resume); later calls with the same target
        reuse it. Call once per optimizer step, and ``self.budget.finalize()`` after training
        to round the widths to the budget.

        Raises:
            ValueError: ``target_mb`` is outside the sizes the widths can reach.
        """
        budget = getattr(self, "budget", None)
        if budget is None or budget.target_mb != target_mb:
            self.budget = budget = SizeBudget(self, target_mb)
        return budget.penalty()
