"""Quantizers on FSDP2-sharded models (``torch.distributed.fsdp.fully_shard``).

The documented order is: the quantizer first (it registers its own parameters, which FSDP
then shards with the rest), ``fully_shard`` on the blocks and the root, then the optimizer
and ``setup_optimizer``. ``fully_shard`` replaces every parameter by a sharded ``DTensor``
parameter; the quantizer then finds its records' parameters again (:func:`rebind`; after
``to_empty`` on a model built on the meta device, :mod:`.materialise`) and swaps module by
module (:mod:`.module_swap`), between FSDP's all-gather and reshard.
Whatever needs whole tensors outside a forward (sizes, saving) gathers one tensor at a time
(:func:`full`), so no rank ever holds the whole unsharded model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .. import validation

# A BaseQuantizer (base.py imports this module).
BaseQuantizer = Any


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a build without distributed support
        return None
    return DTensor


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (a sharded parameter)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def full(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a sharded parameter (a collective: every rank must call it);
    other tensors as they are. Differentiable."""
    return tensor.full_tensor() if is_sharded(tensor) else tensor


def refuse_sharded_model(model: nn.Module, owner: str) -> None:
    """A quantizer must be created before ``fully_shard``: refuse a model already sharded."""
    for name, param in model.named_parameters():
        if is_sharded(param):
            raise validation.UsageError(
                f"{owner}: parameter {name!r} is already sharded (a DTensor): create the "
                "quantizer before fully_shard, then shard, then create the optimizer and "
                "call setup_optimizer"
            )


def needs_rebind(quantizer: BaseQuantizer, every: bool = False) -> bool:
    """Whether parameters were replaced since the records were taken: by the first record
    (one lookup, every step), or by ``every`` record (the first forwards and
    ``setup_optimizer``: ``fully_shard`` may have left the first record's module alone)."""
    for record in quantizer._qparams:
        if record.module._parameters.get(record.name) is not record.param:
            return True
        if not every:
            return False
    return False


def sharded_params(model: nn.Module) -> dict[tuple[int, str], torch.Tensor]:
    """``(id(module), name) -> sharded parameter`` from the model's FSDP2 states: inside a
    forward a module holds FSDP's unsharded copy instead. Reads FSDP2's own records of its
    parameters (``FSDPParam``), kept by torch since 2.4."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:
        return {}
    found: dict[tuple[int, str], torch.Tensor] = {}
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        for group in getattr(module._get_fsdp_state(), "_fsdp_param_groups", []):
            for fsdp_param in group.fsdp_params:
                info = fsdp_param._module_info
                owners = [(info.module, info.param_name),
                          *zip(info.shared_modules, info.shared_param_names, strict=True)]
                for owner, name in owners:
                    found[(id(owner), name)] = fsdp_param.sharded_param
    return found


def rebind(quantizer: BaseQuantizer) -> bool:
    """Point the quantizer's records at the model's parameters after ``fully_shard``.

    Returns True when the model is sharded (the quantizer must swap module by module).

    Raises:
        UsageError: a quantized parameter was replaced by something other than FSDP2's
            sharded parameter (another wrapper, FSDP1), which the quantizer cannot follow.
    """
    owner = type(quantizer).__name__
    sharded = False
    by_fsdp = sharded_params(quantizer.model)
    for record in quantizer._qparams:
        current = by_fsdp.get((id(record.module), record.name),
                              record.module._parameters.get(record.name))
        if current is record.param:
            continue
        if current is None or not is_sharded(current):
            raise validation.UsageError(
                f"{owner}: parameter {record.full_name!r} was replaced since the quantizer "
                "was created, by something other than FSDP2's fully_shard (FSDP1's flat "
                "parameters, another wrapper): the quantizer cannot follow it. Use "
                "fully_shard (FSDP2) or DistributedDataParallel, created after the quantizer "
                "(a model materialised by to_empty() after the quantizer was created: call "
                "quantizer.reset_parameters() after the weights' init)"
            )
        sharded = True
        if record.first is None:
            record.param = current
            own = quantizer._own_attr
            if own is not None:
                own_name = record.name + quantizer._param_suffix
                replaced = by_fsdp.get((id(record.module), own_name),
                                       record.module._parameters.get(own_name))
                if replaced is not None:
                    setattr(record, own, replaced)
        else:
            record.param = current
    if not sharded:
        return False
    follow_floats(quantizer, by_fsdp)
    quantizer._rnns = []  # FSDP2 does not shard cuDNN's flat RNN weights: nothing to refresh
    return True


def follow_floats(quantizer: BaseQuantizer, by_fsdp: dict) -> None:
    """Point the float parameters' lists at the parameters the modules hold now."""
    modules = dict(quantizer.model.named_modules())

    def now(full_name: str, old: torch.Tensor) -> torch.Tensor:
        module_name, _, name = full_name.rpartition(".")
        module = modules.get(module_name)
        if module is None:
            return old
        return by_fsdp.get((id(module), name), module._parameters.get(name, old))

    quantizer._float16 = [(n, now(n, p)) for n, p in quantizer._float16]
    quantizer._others = [(n, now(n, p)) for n, p in quantizer._others]
    quantizer._float16_uses = [(m, n, by_fsdp.get((id(m), n), m._parameters.get(n, p)))
                               for m, n, p in quantizer._float16_uses]


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This rank's part of a sharded parameter (writable in place under ``no_grad``);
    other tensors as they are."""
    return tensor.to_local() if is_sharded(tensor) else tensor


def check_optimizer(quantizer: BaseQuantizer, optimizer: torch.optim.Optimizer) -> None:
    """The optimizer of a sharded model must hold the sharded parameters.

    Raises:
        UsageError: it holds parameters ``fully_shard`` replaced (created before sharding:
            it would step tensors the model no longer uses).
    """
    current = {id(p) for p in quantizer.model.parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            if id(p) not in current:
                raise validation.UsageError(
                    f"{type(quantizer).__name__}: the optimizer holds a parameter the model "
                    "no longer has (created before fully_shard?): create the optimizer after "
                    "sharding, then call setup_optimizer"
                )


def is_writer() -> bool:
    """Whether this process writes files: rank 0, or the only process."""
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def share_write_outcome(error: BaseException | None) -> None:
    """After rank 0's write of a sharded model's file: every rank learns its outcome (one
    broadcast, called by every rank; rank 0 passes its exception or None). A rank other
    than 0 raises ``RuntimeError`` when rank 0's write failed, so no rank goes on as if
    the file existed."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    outcome = [None if error is None else f"{type(error).__name__}: {error}"]
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None and error is None:
        raise RuntimeError(f"save_quantized: rank 0 failed to write the file: {outcome[0]}")
