"""Quantizers on models built on the ``meta`` device: ``reset_parameters`` after ``to_empty``.

torchtitan's flow builds the model on ``meta``, creates the quantizer there (before
``fully_shard``), then materialises it with ``model.to_empty(device=...)`` and its own weight
init. ``to_empty`` puts new tensors in place of the parameters the quantizer recorded (but
for ``fully_shard``'s ``DTensor`` parameters, which it swaps in place) and leaves the
quantizer's own parameters (logits, steps) as uninitialised memory. A quantizer created on
meta weights therefore sets a flag that every entry point reading the records checks (the
one place they are followed, ``_follow_sharding``) and refuses until
:meth:`Materialise.reset_parameters` has pointed the records at the model's current
parameters and initialised the quantizer's own as a creation on the materialised model
would, or until a ``load_state_dict`` of every key of the model has written them.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import validation
from . import sharding

# A BaseQuantizer and its QuantizedParam records (base.py imports this module).
BaseQuantizer = Any
QuantizedParam = Any


class Materialise:
    """``reset_parameters`` and the refusals before it, for :class:`~diffq_triton.BaseQuantizer`."""

    def _recorded_params(self) -> Iterator[torch.Tensor]:
        """Every parameter the records hold: quantized uses, float ones, own ones."""
        for record in self._qparams:
            yield record.param
            own = self._own_param(record) if record.first is None else None
            if own is not None:
                yield own
        yield from (p for _, p in self._float16)
        yield from (p for _, p in self._others)

    def reset_parameters(self) -> None:
        """Follow the model's current parameters and initialise the quantizer's own ones,
        as a quantizer created on the model as it is now would.

        For a model built on the ``meta`` device (torchtitan's flow): create the quantizer
        there (before ``fully_shard``), materialise the model with
        ``model.to_empty(device=...)``, initialise its weights, then call this, before
        loading a checkpoint (which it would overwrite) and before creating the optimizer
        (over ``model.parameters()``, as under ``fully_shard``: ``setup_optimizer`` moves
        the quantizer's parameters to their own group). ``to_empty`` puts new tensors in
        place of the parameters the quantizer recorded and leaves its own (bit logits, LSQ
        steps) as uninitialised memory: this points the records at the model's parameters
        (``fully_shard``'s sharded ones included) and sets the quantizer's own from the
        weights now there (DiffQ: every logit at ``init_bits``; LSQ: each step from its
        weight, gathered when sharded, so every rank must call it). Until it has run, a
        quantizer created on meta weights refuses every call that reads its records. A
        ``model.load_state_dict`` after ``to_empty`` that leaves no key of the model
        missing (resuming from a checkpoint of the quantized model) stands in for it: the
        quantizer then follows the loaded values. Also usable on any model to start the
        quantizer's parameters afresh after re-initialising the weights.

        Raises:
            UsageError: a parameter is still on the meta device (materialise it first); uses
                of a parameter that was tied when the quantizer was created are separate
                tensors now (``to_empty`` unties them: tie them again first); weights are
                quantized in place (:meth:`unquantize` first).
        """
        if self._quantized:
            raise validation.UsageError(
                "reset_parameters() while the weights are quantized in place: call "
                "unquantize() first")
        self._follow_materialised()
        with torch.no_grad():
            for record in self._first_uses():
                self._init_own(record)
        self._params_changed()

    def _follow_materialised(self) -> None:
        """Point the records at the model's current parameters; the meta flag is cleared."""
        self._restore_params()
        # Whatever replaced the parameters (to_empty, fully_shard or both), where
        # _follow_sharding's rebind follows fully_shard only.
        self._sharded = follow_current(self)
        self._materialised = self._materialised or self._meta_pending
        self._meta_pending = False
        if self._load_handle is not None:
            self._load_handle.remove()
            self._load_handle = None
        if self._sharded:
            self._use_module_swaps()
        self._params_changed()

    def _loaded(self, model: nn.Module, incompatible: object) -> None:
        """After ``model.load_state_dict`` (a post-hook, kept while the quantizer waits
        for :meth:`reset_parameters`): a load that left no key of the model missing wrote
        every weight and every quantizer parameter, so the quantizer follows the loaded
        values as they are (a resumed run: ``to_empty``, then the checkpoint); a partial
        load still leaves the quantizer's parameters to :meth:`reset_parameters`."""
        if not self._meta_pending or incompatible.missing_keys:
            return
        if any(p.is_meta for p in self.model.parameters()):
            return  # loaded into meta tensors (nothing materialised yet)
        self._follow_materialised()

    def _init_own(self, record: QuantizedParam) -> None:
        """Set the quantizer's own tensor of a first use in place, as :meth:`_register_param`
        creates it (on a sharded model, each rank its shard; under ``no_grad``)."""

    def _refuse_meta(self) -> None:
        """Raise: created on the meta device and not yet reset (the records are stale)."""
        owner = type(self).__name__
        own = f" and its {self._trained_name} hold no values yet" if self._own_attr else ""
        if any(p.is_meta for p in self.model.parameters()):
            todo = ("the model's parameters are still on the meta device: materialise them "
                    "(model.to_empty(device=...)), initialise the weights, then call "
                    "quantizer.reset_parameters()")
        else:
            todo = ("after model.to_empty(device=...) and the weights' init, call "
                    "quantizer.reset_parameters() (then load any checkpoint: it would "
                    "overwrite it; a load_state_dict of every key of the model stands in "
                    "for it)")
        raise validation.UsageError(
            f"{owner}: the model's weights were on the meta device when the quantizer was "
            f"created: it does not follow the materialised parameters{own}; {todo} before "
            "setup_optimizer, forwards, sizes or saving")


def follow_current(quantizer: BaseQuantizer) -> bool:
    """Point every record at the parameter its module holds now, whatever replaced it
    (``to_empty`` on a model built on the meta device, ``fully_shard``, both): for
    ``reset_parameters``. Returns True when the model is sharded.

    Raises:
        UsageError: a parameter is gone or still on the meta device; uses tied when the
            quantizer was created are separate tensors now.
    """
    owner = type(quantizer).__name__
    # Checked before anything changes: a refusal leaves the quantizer as it was.
    still = [name for name, p in quantizer.model.named_parameters() if p.is_meta]
    if still:
        raise validation.UsageError(
            f"{owner}: parameter {still[0]!r} is still on the meta device: materialise the "
            "model (model.to_empty(device=...)) and initialise its weights before "
            "reset_parameters()")
    by_fsdp = sharding.sharded_params(quantizer.model)

    def now(module: nn.Module, name: str) -> torch.Tensor | None:
        return by_fsdp.get((id(module), name), module._parameters.get(name))

    current = {}
    for record in quantizer._qparams:
        tensor = now(record.module, record.name)
        if tensor is None:
            raise validation.UsageError(
                f"{owner}: parameter {record.full_name!r} is no longer in its module")
        current[id(record)] = tensor
    for record in quantizer._qparams:
        first = record.first
        # to_empty() gives each module a new tensor of its own: a tie is undone silently,
        # and the quantizer would derive one weight from two tensors.
        if first is not None and current[id(record)] is not current[id(first)]:
            raise validation.UsageError(
                f"{owner}: {record.full_name!r} and {first.full_name!r} were one (tied) "
                "parameter when the quantizer was created and are two tensors now "
                "(model.to_empty() unties shared parameters): tie them again "
                f"(model.{record.full_name} = model.{first.full_name}) before "
                "reset_parameters() or loading a checkpoint")
    own_name = quantizer._own_attr
    for record in quantizer._qparams:
        record.param = current[id(record)]
        if own_name is not None and record.first is None:
            own = now(record.module, record.name + quantizer._param_suffix)
            if own is None:
                raise validation.UsageError(
                    f"{owner}: the {quantizer._trained_name} of {record.full_name!r} are no "
                    "longer in its module (detach() was called?)")
            setattr(record, own_name, own)
    sharding.follow_floats(quantizer, by_fsdp)
    sharded = any(sharding.is_sharded(record.param) for record in quantizer._qparams)
    if sharded:
        quantizer._rnns = []  # FSDP2 does not shard cuDNN's flat RNN weights
    return sharded


def check_not_meta(quantizer: BaseQuantizer, optimizer: torch.optim.Optimizer) -> None:
    """After ``to_empty``: the optimizer must not hold the meta tensors it replaced.

    Raises:
        UsageError: it does (created before ``to_empty``: it would step nothing).
    """
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p.is_meta:
                raise validation.UsageError(
                    f"{type(quantizer).__name__}: the optimizer holds parameters on the meta "
                    "device (created before model.to_empty()?): create the optimizer after "
                    "to_empty() and reset_parameters(), then call setup_optimizer")
