"""The weight swap module by module, for sharded and checkpointed models.

By default a quantizer derives every quantized weight at once before the root model's
forward (one multi-tensor call) and puts it in its module. Two setups need the swap at
each module instead:

- FSDP2 (``fully_shard``): a block's full weights exist only between FSDP's all-gather in
  the block's forward pre-hook and its reshard; the noisy or quantized weight must be
  derived from them there, after FSDP set them.
- Activation checkpointing: the backward recomputes a block's forward, after the root's
  forward is over. The recomputed modules must see the same noisy weights as the first
  forward, or the gradients are those of other weights.

:class:`ModuleSwaps` hooks every module that uses a quantized parameter. Its pre-hook reads
the tensors the module holds now (FSDP's unsharded weight and logits, or the parameters),
derives the module's weights in one call of the quantizer, and sets them; its post-hook
puts back what it replaced. The noise of a forward pass is keyed by one seed drawn by the
root's pre-hook and each parameter's index (the same noise as the one-call swap draws).

On a sharded model a module's derived weight is not kept for its backward (the layer would
save it: the whole unsharded weight of every block, from its forward to its backward,
which FSDP exists to avoid): the module's saved-tensor hooks keep how to derive it again,
and the backward derives it from the weight FSDP gathers again for it, with the same seed.

A recomputation inside the backward must use the seed of the forward it recomputes, which
need not be the last one (``loss = model(a) + model(b)``). Checkpointing replays torch's
random state from the region's start (as it does for dropout), so each module of a
checkpointed region files its pass's seed under the random state it sees, and its
recomputation finds the seed again under the same state.
"""

from __future__ import annotations

import copy
import functools
import sys
from collections import OrderedDict
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .sharding import full as sharding_full

# A BaseQuantizer and its QuantizedParam records (base.py imports this module).
BaseQuantizer = Any
QuantizedParam = Any


def in_checkpoint_region(root_grad_enabled: bool) -> bool:
    """Whether a module runs inside ``torch.utils.checkpoint`` (its first forward): a
    non-reentrant checkpoint runs it under the checkpoint's saved-tensor hooks, a reentrant
    one without gradients inside a forward with gradients, from ``CheckpointFunction``
    (not any ``torch.no_grad()`` block: a frozen part of a model is not a region)."""
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    if top is not None and getattr(top[0], "__module__", "") == "torch.utils.checkpoint":
        return True
    if not root_grad_enabled or torch.is_grad_enabled():
        return False
    frame = sys._getframe(1)
    while frame is not None:
        if (frame.f_code.co_name == "forward"
                and frame.f_globals.get("__name__") == "torch.utils.checkpoint"):
            return True
        frame = frame.f_back
    return False


def _rng_state(device: torch.device) -> object:
    """A key of the random state of ``device``'s default generator, which checkpointing
    restores before a recomputation."""
    if device.type == "cuda":
        generator = torch.cuda.default_generators[device.index or 0]
        return ("cuda", generator.initial_seed(), generator.get_offset())
    return bytes(torch.get_rng_state().numpy())


# Passes whose regions a backward may still recompute (a forward of several passes before
# one backward: micro-batches summed, two views): far more than any training loop keeps.
_REGION_SEEDS = 256


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


class _Rederivable:
    """A derived weight saved for a backward as the means to derive it again."""

    __slots__ = ("swaps", "record", "weight", "own", "seed", "stream", "size", "stride",
                 "offset")

    def __init__(self, swaps, record, weight, own, seed, stream, size, stride, offset):
        self.swaps, self.record, self.weight, self.own = swaps, record, weight, own
        self.seed, self.stream = seed, stream
        self.size, self.stride, self.offset = size, stride, offset

    def tensor(self) -> torch.Tensor:
        derived = self.swaps._rederive(self.record, self.weight, self.own, self.seed,
                                       self.stream)
        return derived.as_strided(self.size, self.stride,
                                  derived.storage_offset() + self.offset)


def _where(tensor: torch.Tensor) -> tuple:
    return (tensor.untyped_storage().data_ptr(), tensor.dtype, tensor.device,
            tensor.storage_offset())


def _unpack(saved: object) -> torch.Tensor:
    return saved.tensor() if isinstance(saved, _Rederivable) else saved


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class ModuleSwaps:
    """Per-module pre- and post-forward hooks swapping ``quantizer``'s weights.

    Args:
        quantizer: the quantizer whose records (``_qparams``) are swapped; it provides
            ``_train_weights(records, seed, streams)``, ``_quantized_weights(records)`` and
            ``_own_attr`` (the name of its own per-parameter tensor: ``logit``, ``step``).
    """

    def __init__(self, quantizer: BaseQuantizer):
        self._quantizer = quantizer
        firsts = list(quantizer._first_uses())
        index = {id(record): i for i, record in enumerate(firsts)}
        self._uses: dict[int, list[tuple[QuantizedParam, int]]] = {}
        modules: dict[int, nn.Module] = {}
        for record in quantizer._qparams:
            first = record.first or record
            self._uses.setdefault(id(record.module), []).append((record, index[id(first)]))
            modules[id(record.module)] = record.module
        # Eval shows float16-stored parameters rounded, module by module too.
        self._half: dict[int, list[str]] = {}
        for module, name, _ in quantizer._float16_uses:
            self._half.setdefault(id(module), []).append(name)
            modules[id(module)] = module
        self._handles: list[RemovableHandle] = []
        for module in modules.values():
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))
        self.seed: torch.Tensor | None = None
        # Seeds of the passes whose checkpointed regions may be recomputed, by the random
        # state at each of their modules (a bounded memory of recent passes).
        self._region_seeds: OrderedDict[object, torch.Tensor] = OrderedDict()
        # Within one forward pass a parameter's derived weight is shared by all its uses.
        self._this_pass: dict[int, torch.Tensor] = {}
        self._replaced: dict[int, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}
        # The saved-tensor hooks of the module calls in progress (sharded models).
        self._saving: dict[int, list] = {}

    def begin_pass(self, seed: torch.Tensor | None) -> None:
        """A root forward starts: ``seed`` keys its noise (None in eval)."""
        self._this_pass.clear()
        if seed is not None:
            self.seed = seed

    def end_pass(self) -> None:
        """The root forward is over: drop the derived weights it shared."""
        self._this_pass.clear()

    def note_region(self) -> None:
        """A module of a checkpointed region runs its first forward: file this pass's seed
        under the random state its recomputation will replay."""
        if self.seed is None:
            return
        key = _rng_state(self.seed.device)
        self._region_seeds[key] = self.seed
        self._region_seeds.move_to_end(key)
        while len(self._region_seeds) > _REGION_SEEDS:
            self._region_seeds.popitem(last=False)

    def _recomputed_seed(self) -> torch.Tensor | None:
        if self.seed is None:  # a quantizer without noise
            return None
        seed = self._region_seeds.get(_rng_state(self.seed.device))
        if seed is None:
            raise RuntimeError(
                "a checkpointed region is recomputed whose forward the quantizer did not see "
                "run: checkpointing must be on from the first training forward, with "
                "preserve_rng_state=True (the default), so that the recomputation uses the "
                "same noisy weights")
        return seed

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _sources(self, record: QuantizedParam, module: nn.Module
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and the quantizer's own tensor as the modules hold them now (under
        FSDP, the unsharded weight and the unsharded logits)."""
        q = self._quantizer
        first = record.first or record
        # After a switch in the middle of a forward the module holds the root's derived
        # weight: use the parameter.
        weight = record.param if q._swapped else module._parameters[record.name]
        own = None
        if q._own_attr is not None:
            own = first.module._parameters.get(first.name + q._param_suffix)
            if own is None or not q.model.training:
                # Eval rounds widths: from the float32 parameter itself (gathered when
                # sharded), not from a copy cast to a mixed-precision param_dtype.
                own = getattr(first, q._own_attr)
        return weight, own

    def _view(self, record: QuantizedParam, weight: torch.Tensor,
              own: torch.Tensor | None) -> QuantizedParam:
        """A copy of ``record``'s first use computing with ``weight`` and ``own``."""
        q = self._quantizer
        view = copy.copy(record.first or record)
        view.param = weight
        if own is not None:
            setattr(view, q._own_attr, q._own_for_compute(own))
        return view

    def _rederive(self, record: QuantizedParam, weight: torch.Tensor,
                  own: torch.Tensor | None, seed: torch.Tensor | None,
                  stream: int) -> torch.Tensor:
        """The derived weight a training forward set, again (no gradient: the forward's
        node carries it); ``weight`` and ``own`` hold FSDP's gathered values again."""
        with torch.no_grad(), torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
            return self._quantizer._train_weights(
                [self._view(record, weight, own)], seed=seed, streams=[stream])[0]

    def _pre(self, module: nn.Module, inputs: object) -> None:
        q = self._quantizer
        if q._quantized:
            return
        training = q.model.training
        # Traced (a block compiled with fullgraph=True): the compiled graph keeps its own
        # recomputation, so only the swap itself is traced.
        compiling = torch.compiler.is_compiling()
        recompute = training and not compiling and _in_backward()
        grad = torch.is_grad_enabled()
        seed = self.seed
        region = False
        if recompute:
            seed = self._recomputed_seed()
        elif training and not compiling and in_checkpoint_region(q._root_grad):
            region = True
            self.note_region()
        uses = self._uses.get(id(module), [])
        todo: list[tuple[QuantizedParam, int]] = []
        for record, i in uses:
            held = self._this_pass.get(i)
            # A recomputation, or a first use without gradients (inside a reentrant
            # checkpoint) followed by one with: derive again, from the same seed.
            if recompute or held is None or (grad and training and held.grad_fn is None):
                todo.append((record, i))
        if todo:
            sources = [self._sources(record, module) for record, _ in todo]
            views = [self._view(record, *src)
                     for (record, _), src in zip(todo, sources, strict=True)]
            if training:
                # Outside any checkpoint's saved-tensor hooks: the derivation's own saved
                # tensors are not the region's, which a recomputation must match one for one.
                streams = [i for _, i in todo]
                if compiling:
                    derived = q._train_weights(views, seed=seed, streams=streams)
                else:
                    with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                        derived = q._train_weights(views, seed=seed, streams=streams)
            else:
                with torch.no_grad():
                    derived = q._quantized_weights(views)
            if derived is None:  # the quantizer trains on the float weights
                derived = [None] * len(todo)
            fresh = {i: t for (_, i), t in zip(todo, derived, strict=True) if t is not None}
            # A recomputation's weights serve its own modules only; a sharded model's are
            # derived again for each use (holding them would hold every block's).
            if not recompute and not q._sharded:
                self._this_pass.update(fresh)
            if (q._sharded and training and grad and not compiling and not recompute
                    and not region and fresh):
                # Where each derived weight lies, not the tensor: autograd keeps the pack
                # hook with every tensor it saved, which would keep the weights alive.
                specs = [(_where(fresh[i]), record, *src, seed, i)
                         for (record, i), src in zip(todo, sources, strict=True) if i in fresh]
                hooks = torch.autograd.graph.saved_tensors_hooks(
                    functools.partial(self._pack, specs), _unpack)
                hooks.__enter__()
                self._saving.setdefault(id(module), []).append(hooks)
        else:
            fresh = {}
        replaced = []
        if not training:
            for name in self._half.get(id(module), []):
                held = module._parameters[name]
                rounded = sharding_full(held.detach()).half().to(held.dtype)
                replaced.append((name, held, rounded))
                module._parameters[name] = rounded
        for record, i in uses:
            tensor = fresh.get(i, self._this_pass.get(i))
            if tensor is None:
                continue
            replaced.append((record.name, module._parameters[record.name], tensor))
            module._parameters[record.name] = tensor
            if not compiling and q._swap_check.active:
                q._swap_check.expect(module, record.name, tensor)
        self._replaced[id(module)] = replaced
        q._fix_rnns()

    def _pack(self, specs: list[tuple], tensor: torch.Tensor) -> object:
        # A tensor the module's layer saves for its backward: one of the derived weights (or
        # a view of it, as linear saves the transposed weight) is kept as how to derive it.
        # (The derived weights are alive while the module runs: their storages are theirs.)
        where = _where(tensor)
        for derived, record, weight, own, seed, stream in specs:
            if where[:3] == derived[:3]:
                return _Rederivable(self, record, weight, own, seed, stream, tensor.size(),
                                    tensor.stride(), where[3] - derived[3])
        return tensor

    def _post(self, module: nn.Module, inputs: object, output: object) -> None:
        saving = self._saving.get(id(module))
        if saving:
            saving.pop().__exit__(None, None, None)
        for name, before, tensor in self._replaced.pop(id(module), []):
            # FSDP's post-forward may have resharded (set the sharded parameter) already.
            if module._parameters.get(name) is tensor:
                module._parameters[name] = before
        self._quantizer._fix_rnns()
