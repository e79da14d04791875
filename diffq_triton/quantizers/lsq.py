"""LSQ: learned step size quantization of the weights (Esser et al. 2020)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import validation
from ..ops import reference
from ..serialization.restore import register_quantizer
from ..serialization.tensor_record import QuantizedTensor
from . import sharding
from .base import MEGABYTE_BITS, BaseQuantizer, QuantizedParam


@register_quantizer
class LSQ(BaseQuantizer):
    """Signed uniform quantization ``round(clamp(w/s))·s`` with a learned step ``s``.

    One step per tensor, registered on the module as ``<name><suffix>`` and initialised to
    ``2·mean|w| / sqrt(2^(bits-1))``; training forwards round with a straight-through
    gradient and scale the step's gradient by ``1/sqrt(d·(2^(bits-1) - 1))``.

    Args:
        model: the model to quantize.
        bits: width, a whole number in ``[2, 15]``; levels in ``[-2^(bits-1), 2^(bits-1) - 1]``.
        min_size: parameters of at most ``min_size`` MB (float32) are kept in float.
        float16: keep the non-quantized parameters as float16.
        suffix: suffix of the step parameters' names.
        exclude: fnmatch patterns of parameter names not to quantize.
        detect_bound: treat a tied parameter once.
    """

    def __init__(
        self,
        model: nn.Module,
        bits: int = 8,
        min_size: float = 0.01,
        float16: bool = False,
        suffix: str = "_lsq",
        exclude: Sequence[str] | None = None,
        detect_bound: bool = True,
    ):
        self.bits = validation.check_bit_width("bits", bits)
        if self.bits < 2:
            raise validation.ArgumentError(f"bits must be >= 2 for signed LSQ levels, got {bits}")
        if not isinstance(suffix, str) or not suffix:
            raise validation.ArgumentError(f"suffix must be a non-empty string, got {suffix!r}")
        self.suffix = suffix
        self._param_suffix = suffix
        self._kwargs = dict(
            bits=bits, min_size=min_size, float16=float16, suffix=suffix,
            exclude=list(exclude or []), detect_bound=detect_bound,
        )
        self._step_hooks: dict[int, object] = {}
        super().__init__(model, min_size, float16, exclude, detect_bound)

    def _initial_step(self, weight: torch.Tensor) -> torch.Tensor:
        """A step's value at creation, from its whole weight: ``[1]`` float32."""
        step = 2 * weight.detach().abs().mean() / (2 ** (self.bits - 1)) ** 0.5
        return step.float().reshape(1)

    def _register_param(self, record: QuantizedParam) -> None:
        # One entry, not diffq's 0-dim tensor: FSDP2's fully_shard refuses scalar
        # parameters. State dicts of diffq's shape still load (the pre-hook reshapes them).
        record.step = nn.Parameter(self._initial_step(record.param))
        name = record.name + self.suffix
        record.module.register_parameter(name, record.step)
        if id(record.module) not in self._step_hooks:
            self._step_hooks[id(record.module)] = \
                record.module._register_load_state_dict_pre_hook(self._load_scalar_steps)

    def _init_own(self, record: QuantizedParam) -> None:
        # From the whole weight, gathered when sharded (a collective: every rank calls
        # reset_parameters), so the step equals an unsharded model's bit for bit; the
        # rank holding the step's one entry writes it (the others' shards are empty).
        step = self._initial_step(sharding.full(record.param.detach()))
        held = sharding.local(record.step)
        held.copy_(step.to(held.device).expand_as(held))

    def _unregister_params(self) -> None:
        super()._unregister_params()
        for handle in self._step_hooks.values():
            handle.remove()
        self._step_hooks.clear()

    def _load_scalar_steps(self, state_dict: dict, prefix: str, *args: object) -> None:
        for key, value in list(state_dict.items()):
            if (key.startswith(prefix) and key.endswith(self.suffix)
                    and "." not in key[len(prefix):] and isinstance(value, torch.Tensor)
                    and value.dim() == 0):
                state_dict[key] = value.reshape(1)

    _trained_name = "LSQ steps"

    def _own_param(self, record: QuantizedParam) -> nn.Parameter:
        return record.step

    def setup_optimizer(self, optimizer: torch.optim.Optimizer, **kwargs: object) -> None:
        """Add the steps to ``optimizer`` as a new group with its own hyper-parameters.

        Args:
            optimizer: created before the quantizer (it must not hold the steps already).
            **kwargs: overrides for the steps' param group (by default the optimizer's).
        """
        self._add_param_group(optimizer, kwargs)

    _own_attr = "step"

    def _train_weights(self, records: list[QuantizedParam] | None = None,
                       seed: torch.Tensor | None = None, streams: list[int] | None = None
                       ) -> list[torch.Tensor]:
        """Fake-quantized weights of ``records`` (default: every first use; no noise, so
        ``seed`` and ``streams`` are unused)."""
        self._require_optimizer()
        records = list(self._first_uses()) if records is None else records
        return [
            reference.lsq_quantize(record.param, record.step, self.bits)[0].to(record.param.dtype)
            for record in records
        ]

    def _cache_key(self, record: QuantizedParam) -> tuple:
        return (*super()._cache_key(record), record.step._version)

    def _levels(self, record: QuantizedParam) -> torch.Tensor:
        """Float32 signed levels of ``record``: what files and states store.

        A zero step (a weight of zeros at creation) gives level 0 everywhere, not the NaN
        of ``0/0``: the weight quantizes to 0, as a file restores it.
        """
        with torch.no_grad():
            index = reference.lsq_quantize(record.param.detach().float(), record.step,
                                           self.bits)[1]
            # A select, not a branch: no host synchronisation, and eval forwards compile.
            return torch.where(record.step == 0, torch.zeros_like(index), index)

    def _quantized_weight(self, record: QuantizedParam) -> torch.Tensor:
        # level·step with the plain step, in float32, as a saved file decodes (and as
        # diffq 0.2.4 evaluates): the straight-through step of training may differ from it
        # by an ulp, and computing in a bf16 weight's own dtype may round to another level.
        w_q = self._levels(record) * record.step.detach().float()
        return w_q.to(record.param.dtype)

    def _quantize_record(self, record: QuantizedParam, bits: torch.Tensor | None = None
                         ) -> QuantizedTensor:
        validation.check_finite(record.full_name, record.param.detach())
        index = self._levels(record)
        bits = torch.full((1,), self.bits, dtype=torch.uint8)
        return QuantizedTensor(
            record.full_name, tuple(record.param.shape), record.param.dtype, "lsq", 0,
            index.reshape(-1).to(torch.int16), bits, float(record.step.detach()), 0.0,
        )

    def model_size(self, exact: bool = False) -> torch.Tensor:
        """Size in MB: ``bits·d + 32`` bits per quantized tensor plus the float parameters."""
        quantized = sum(self.bits * r.param.numel() + 32 for r in self._first_uses())
        return super().model_size() + quantized / MEGABYTE_BITS

    def true_model_size(self) -> float:
        """Size in MB as stored without further compression."""
        return float(self.model_size(exact=True))
