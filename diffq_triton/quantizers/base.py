"""Common machinery of all quantizers: finding parameters, swapping weights, the optimizer.

A quantizer hooks the root model. Before a forward it puts a derived tensor (noisy in
training, quantized in eval) in place of each quantized parameter in its module's
``_parameters``; after the forward it puts the parameter back. The parameters themselves are
never written to, so ``state_dict()`` keys stay the plain model's (plus the quantizer's own
parameters), tied parameters get one derived tensor shared by every use, and the swap is made
of plain torch operations, which ``torch.compile(fullgraph=True)`` traces without a break.
Exporting, saving and restoring are the methods of :class:`.saved_state.QuantizerState`.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from fnmatch import fnmatch
from operator import itemgetter

import torch
from torch import nn

from .. import validation
from ..ops.reference import MEGABYTE_BITS
from ..serialization.tensor_record import QuantizedTensor
from . import live, sharding
from .materialise import Materialise, check_not_meta
from .module_swap import ModuleSwaps
from .saved_state import QuantizerState
from .swap import WeightSwap, _is_compiling
from .swap_check import SwapCheck


@dataclass(eq=False)
class QuantizedParam:
    """One use of a quantized parameter.

    ``first`` is None for the first use; later uses of a tied parameter point at the first
    use's record, which owns the quantizer's state for it (logits, step, caches).
    """

    name: str
    full_name: str
    param: nn.Parameter
    module: nn.Module
    first: QuantizedParam | None = None
    tied: list[QuantizedParam] = field(default_factory=list)

    @property
    def uses(self) -> list[QuantizedParam]:
        return [self, *self.tied]


class BaseQuantizer(WeightSwap, QuantizerState, Materialise):
    """Base of :class:`DiffQuantizer`, :class:`UniformQuantizer` and :class:`LSQ`.

    Args:
        model: the model to quantize; the quantizer hooks its forward.
        min_size: parameters with at most ``min_size·2^20/4`` entries (``min_size`` MB in
            float32) are not quantized.
        float16: store the non-quantized parameters as float16 (counted 16 bits each).
        exclude: fnmatch patterns matched against full and local parameter names; matches
            are not quantized.
        detect_bound: treat a parameter used by several modules as one (tied weights),
            quantized or kept float as its first use is.
    """

    _param_suffix: str | None = None
    # What the quantizer itself trains, for messages ("bit logits", "LSQ steps").
    _trained_name = "quantizer parameters"
    # Whether the quantizer trains per-group widths, the sizes a SizeBudget steers.
    _trains_widths = False
    # The record attribute of the quantizer's own tensor per parameter ("logit", "step").
    _own_attr: str | None = None
    # The constructor's arguments but the model (for __repr__ and saved states).
    _kwargs: dict

    def __init__(
        self,
        model: nn.Module,
        min_size: float = 0.01,
        float16: bool = False,
        exclude: Sequence[str] | None = None,
        detect_bound: bool = True,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        sharding.refuse_sharded_model(model, type(self).__name__)
        if model in live.ATTACHED:
            raise validation.UsageError(
                f"model already has a {type(live.ATTACHED[model]).__name__}; call detach() on it "
                "before creating a second quantizer"
            )
        if self._param_suffix is not None:
            for name, _ in model.named_parameters():
                if name.endswith(self._param_suffix):
                    raise validation.UsageError(
                        f"model already has a parameter {name!r} ending with suffix "
                        f"{self._param_suffix!r}: a second quantizer on the same model?"
                    )
        self.model = model
        self.min_size = validation.check_number("min_size", min_size, low=0, high=float("inf"))
        self.float16 = bool(float16)
        if isinstance(exclude, str):
            raise TypeError("exclude must be a list of patterns, not a string")
        self.exclude = list(exclude or [])
        self.detect_bound = bool(detect_bound)

        self._qparams: list[QuantizedParam] = []
        self._float16: list[tuple[str, nn.Parameter]] = []
        # Every (module, local name) where a float16-stored parameter is used, for eval.
        self._float16_uses: list[tuple[nn.Module, str, nn.Parameter]] = []
        self._others: list[tuple[str, nn.Parameter]] = []
        self._rnns: list[nn.RNNBase] = []
        self._swapped = False
        self._optimizer_setup = False
        self._quantized = False
        self._saved: list[torch.Tensor] = []
        # Set when the model is sharded by fully_shard, or checkpointed: weights are then
        # swapped module by module (module_swap.py).
        self._module_swaps: ModuleSwaps | None = None
        self._sharded = False
        self._root_grad = True
        self._seed: torch.Tensor | None = None
        # Reset after a creation on the meta device: the optimizer comes after, as under
        # fully_shard (it may hold the quantizer's parameters: setup_optimizer moves them).
        self._materialised = False
        self._find_params()
        # Built on the meta device (to be materialised by to_empty(), as torchtitan does):
        # entry points that read the records refuse until reset_parameters() (materialise.py).
        self._meta_pending = any(p.is_meta for p in self._recorded_params())
        # The records that own a parameter's state, in order (the list never changes; a
        # record's tensors may be replaced, by rebind, but not the record).
        self._firsts = [qp for qp in self._qparams if qp.first is None]
        module_names = {id(m): n for n, m in model.named_modules()}
        self._swap_check = SwapCheck(
            [(module_names.get(id(r.module), ""), r.module, r.name) for r in self._qparams],
            type(self).__name__, on_enter=self._entering_module)
        live.attach(model, self)
        self._pre_handle = model.register_forward_pre_hook(self._forward_pre_hook)
        self._post_handle = model.register_forward_hook(self._forward_hook, always_call=True)
        self._done_handle = model.register_forward_hook(self._forward_done)
        # A full load_state_dict after to_empty() stands in for reset_parameters().
        self._load_handle = (model.register_load_state_dict_post_hook(self._loaded)
                             if self._meta_pending else None)

    # ----------------------------------------------------------------- discovery
    def _find_params(self) -> None:
        min_params = self.min_size * 2**20 // 4
        seen: dict[int, QuantizedParam | None] = {}
        for module_name, module in self.model.named_modules():
            if isinstance(module, nn.RNNBase):
                self._rnns.append(module)
            for name, param in list(module.named_parameters(recurse=False)):
                full_name = f"{module_name}.{name}" if module_name else name
                excluded = any(fnmatch(full_name, p) or fnmatch(name, p) for p in self.exclude)
                # A tied parameter is one tensor: its first use decides for every use (kept
                # float there, it is float under every name; quantized, quantized).
                first = seen.get(id(param))
                kept_float = id(param) in seen and first is None
                if first is None and (param.numel() <= min_params or excluded or kept_float):
                    if self.float16:
                        self._float16_uses.append((module, name, param))
                    if id(param) in seen:
                        continue
                    if self.detect_bound:
                        seen[id(param)] = None
                    target = self._float16 if self.float16 else self._others
                    target.append((full_name, param))
                    continue
                validation.check_float_parameter(full_name, param)
                record = QuantizedParam(name, full_name, param, module, first=first)
                if first is None:
                    self._register_param(record)
                else:
                    first.tied.append(record)
                if self.detect_bound:
                    seen[id(param)] = record if first is None else first
                self._qparams.append(record)

    def _register_param(self, record: QuantizedParam) -> None:
        """Create the quantizer's state for a first use (logits, step...)."""

    def _first_uses(self) -> Iterator[QuantizedParam]:
        # Sizes, saving or an optimizer asked for after fully_shard, before any forward:
        # the records follow the sharded parameters first.
        self._follow_sharding()
        return iter(self._firsts)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._kwargs.items())
        return f"{type(self).__name__}({args})"

    def _init_kwargs(self) -> dict:
        return dict(self._kwargs)

    # ----------------------------------------------------------------- optimizer
    def _own_param(self, record: QuantizedParam) -> nn.Parameter | None:
        """The parameter the quantizer registered for a first use (its logits, its step)."""
        return None

    def _trained_params(self) -> list[nn.Parameter]:
        """The parameters the quantizer adds to the model (logits, steps), once each."""
        own = (self._own_param(record) for record in self._first_uses())
        return [p for p in own if p is not None]

    def _add_param_group(self, optimizer: torch.optim.Optimizer, group: dict) -> None:
        if self._optimizer_setup:
            raise validation.ArgumentError("setup_optimizer() was already called on this quantizer")
        self._follow_sharding(every=True)
        if self._sharded:
            sharding.check_optimizer(self, optimizer)
        elif self._materialised:
            check_not_meta(self, optimizer)
        if self._sharded or self._materialised:
            # Created after fully_shard or to_empty from model.parameters(), the optimizer
            # holds them already: they move to their own group.
            self.clear_optimizer(optimizer)
        params = self._trained_params()
        held = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if any(id(p) in held for p in params):
            raise validation.UsageError(
                f"the optimizer already holds the {self._trained_name}: create the optimizer "
                "before the quantizer (or pass only the model's other parameters)"
            )
        optimizer.add_param_group({"params": params, **group})
        self._optimizer_setup = True

    def clear_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """Remove the quantizer's own parameters from every param group of ``optimizer``."""
        mine = {id(p) for p in self._trained_params()}
        for group in optimizer.param_groups:
            group["params"][:] = [p for p in group["params"] if id(p) not in mine]

    def no_optimizer(self) -> None:
        """Allow training forwards without an optimizer for the quantizer's parameters."""
        self._optimizer_setup = True

    def _require_optimizer(self) -> None:
        if not self._optimizer_setup:
            raise RuntimeError(
                "call setup_optimizer(optimizer) (or no_optimizer()) before training forwards"
            )

    def _train_weights(self, records: list[QuantizedParam] | None = None,
                       seed: torch.Tensor | None = None, streams: list[int] | None = None
                       ) -> list[torch.Tensor] | None:
        """Weights for a training forward, one per record (default: every first use), or
        None to keep the floats; noise of record ``i`` keyed by ``(seed, streams[i])``."""
        return None

    def _eval_weights(self) -> list[torch.Tensor]:
        """Quantized weights for an eval forward, reused until the weights or bits change.

        The stale ones are quantized together (:meth:`_quantized_weights`: on the Triton
        backend a constant number of launches), after one finiteness check for all.
        """
        records = list(self._first_uses())
        if _is_compiling():
            return self._quantized_weights(records)
        keys = [self._cache_key(record) for record in records]
        stale = [i for i, (record, key) in enumerate(zip(records, keys, strict=True))
                 if getattr(record, "eval_cache", None) is None or record.eval_cache[0] != key]
        if stale:
            params = [records[i].param.detach() for i in stale]
            finite = torch.stack([torch.isfinite(p).all().to(params[0].device)
                                  for p in params])
            if not bool(finite.all()):  # one host sync for all of them
                bad = stale[int((~finite).nonzero()[0, 0])]
                validation.check_finite(records[bad].full_name, records[bad].param.detach())
            with torch.no_grad():
                fresh = self._quantized_weights([records[i] for i in stale])
            for i, weight in zip(stale, fresh, strict=True):
                records[i].eval_cache = (keys[i], weight)
        return [record.eval_cache[1] for record in records]

    def _quantized_weights(self, records: list[QuantizedParam]) -> list[torch.Tensor]:
        """:meth:`_quantized_weight` of several first uses (subclasses batch them)."""
        return [self._quantized_weight(record) for record in records]

    def _params_changed(self) -> None:
        """An optimizer stepped: drop what was derived from the parameters' values."""
        for record in self._qparams:
            record.__dict__.pop("eval_cache", None)

    def _cache_key(self, record: QuantizedParam) -> tuple:
        p = record.param
        return (p._version, p.data_ptr(), p.dtype, p.device)

    def _quantized_weight(self, record: QuantizedParam) -> torch.Tensor:
        """The quantized-then-dequantized weight of a first use (shape and dtype kept)."""
        raise NotImplementedError

    # ----------------------------------------------------------------- quantize in place
    def quantize(self) -> bool:
        """Write the quantized weights into the parameters (keeping the floats to restore).

        Not needed for evaluation (``model.eval()`` does it on the fly); useful to inspect
        the quantized weights. Returns True if the weights were changed.
        """
        if self._quantized:
            return False
        if self._sharded:
            raise validation.UsageError(
                "quantize() writes whole weights, which a sharded (fully_shard) model does not "
                "hold: eval forwards quantize on the fly; save_quantized and "
                "get_quantized_state gather one tensor at a time")
        self._restore_params()
        with torch.no_grad():
            self._saved = [r.param.detach().clone() for r in self._first_uses()]
            self._saved += [p.detach().clone() for _, p in self._float16]
            for record in self._first_uses():
                validation.check_finite(record.full_name, record.param.detach())
                record.param.copy_(self._quantized_weight(record))
            for _, p in self._float16:
                p.copy_(p.half())
        self._quantized = True
        self._fix_rnns()
        return True

    def unquantize(self) -> None:
        """Undo :meth:`quantize`, putting the float weights back."""
        if not self._quantized:
            return
        params = [r.param for r in self._first_uses()] + [p for _, p in self._float16]
        with torch.no_grad():
            for param, saved in zip(params, self._saved, strict=True):
                param.copy_(saved)
        self._saved = []
        self._quantized = False
        self._fix_rnns()

    @contextmanager
    def enter_quantize(self) -> Iterator[None]:
        """Context manager: quantized weights inside, float weights restored on exit."""
        self.quantize()
        try:
            yield
        finally:
            self.unquantize()

    def detach(self) -> None:
        """Remove the hooks and the quantizer's parameters from the model."""
        self._restore_params()
        self.unquantize()
        self._pre_handle.remove()
        self._post_handle.remove()
        self._done_handle.remove()
        if self._load_handle is not None:
            self._load_handle.remove()
        self._swap_check.finish()
        if self._module_swaps is not None:
            self._module_swaps.remove()
            self._module_swaps = None
        self._unregister_params()
        live.detach(self.model, self)

    def _unregister_params(self) -> None:
        """Remove the quantizer's own parameters (logits, steps) from the modules."""
        # Not yet reset after to_empty(): the modules hold the quantizer's parameters under
        # their names, but not the tensors the records hold (detach() must still work).
        pending = self._meta_pending
        firsts = [r for r in self._qparams if r.first is None] if pending else self._first_uses()
        for record in firsts:
            own = self._own_param(record)
            name = f"{record.name}{self._param_suffix}"
            held = record.module._parameters.get(name)
            if own is not None and held is not None and (held is own or pending):
                delattr(record.module, name)

    # ----------------------------------------------------------------- sizes
    def _float_size_bits(self) -> float:
        """Bits of the parameters kept in float: 16 or 32 per entry, counted once per set of
        lists (new lists after a rebind; moves keep sizes): model_size() adds this every
        step, and reading ~100 parameters the step does not touch otherwise costs more."""
        lists = (self._float16, self._others)
        cached = getattr(self, "_float_bits", None)
        if cached is None or cached[0][0] is not lists[0] or cached[0][1] is not lists[1]:
            entries = [sum(map(torch.Tensor.numel, map(itemgetter(1), params)))
                       for params in lists]
            # The lists are held: a list made later cannot take the address of one counted.
            cached = self._float_bits = (lists, 16 * entries[0] + 32 * entries[1])
        return cached[1]

    def model_size(self) -> torch.Tensor:
        """Size of the quantized model in MB (2^23 bits), as a 0-dim float32 tensor."""
        return torch.tensor(self._float_size_bits() / MEGABYTE_BITS)

    def true_model_size(self) -> float:
        """Size of the quantized model in MB, as stored without further compression."""
        return float(self.model_size())

    # ----------------------------------------------------------------- export hooks
    def _export_bits(self, record: QuantizedParam) -> torch.Tensor | None:
        """Integer widths of a record for export (``None`` when the record has none)."""
        return None

    def _quantize_record(self, record: QuantizedParam, bits: torch.Tensor | None
                         ) -> QuantizedTensor:
        raise NotImplementedError
