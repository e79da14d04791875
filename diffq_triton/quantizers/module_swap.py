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
root's pre-hook and each parameter's index (the same noise as the one-call swap draws),
so a recomputation inside the backward rebuilds the very same weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

# A BaseQuantizer and its QuantizedParam records (base.py imports this module).
BaseQuantizer = Any
QuantizedParam = Any


def in_checkpoint_region(root_grad_enabled: bool) -> bool:
    """Whether a module runs inside ``torch.utils.checkpoint`` (its first forward): a
    reentrant checkpoint runs it without gradients inside a forward with gradients, a
    non-reentrant one under the checkpoint's saved-tensor hooks."""
    if root_grad_enabled and not torch.is_grad_enabled():
        return True
    top = torch._C._autograd._top_saved_tensors_default_hooks(False)
    return top is not None and getattr(top[0], "__module__", "") == "torch.utils.checkpoint"


def _keep(tensor: torch.Tensor) -> torch.Tensor:
    return tensor


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
        self._handles: list[RemovableHandle] = []
        for module in modules.values():
            self._handles.append(module.register_forward_pre_hook(self._pre))
            self._handles.append(module.register_forward_hook(self._post, always_call=True))
        self.seed: torch.Tensor | None = None
        # Within one forward pass a parameter's derived weight is shared by all its uses.
        self._this_pass: dict[int, torch.Tensor] = {}
        self._replaced: dict[int, list[tuple[str, torch.Tensor, torch.Tensor]]] = {}

    def begin_pass(self, seed: torch.Tensor | None) -> None:
        """A root forward starts: ``seed`` keys its noise (None in eval)."""
        self._this_pass.clear()
        if seed is not None:
            self.seed = seed

    def end_pass(self) -> None:
        """The root forward is over: drop the derived weights it shared."""
        self._this_pass.clear()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def _current(self, record: QuantizedParam, module: nn.Module) -> QuantizedParam:
        """A copy of ``record`` holding the tensors the modules hold now (under FSDP, the
        unsharded weight and the unsharded quantizer parameter)."""
        q = self._quantizer
        first = record.first or record
        view = copy.copy(first)
        # The weight the module holds now: under FSDP the unsharded one. After a switch in
        # the middle of a forward the module holds the root's derived weight: use the
        # parameter.
        view.param = record.param if q._swapped else module._parameters[record.name]
        own = q._own_attr
        if own is not None:
            current = first.module._parameters.get(first.name + q._param_suffix)
            if current is None or not q.model.training:
                # Eval rounds widths: from the float32 parameter itself (gathered when
                # sharded), not from a copy cast to a mixed-precision param_dtype.
                current = getattr(first, own)
            setattr(view, own, q._own_for_compute(current))
        return view

    def _pre(self, module: nn.Module, inputs: object) -> None:
        q = self._quantizer
        if q._quantized:
            return
        training = q.model.training
        recompute = training and _in_backward()
        grad = torch.is_grad_enabled()
        todo: list[tuple[QuantizedParam, int]] = []
        for record, i in self._uses[id(module)]:
            held = self._this_pass.get(i)
            # A recomputation, or a first use without gradients (inside a reentrant
            # checkpoint) followed by one with: derive again, from the same seed.
            if recompute or held is None or (grad and training and held.grad_fn is None):
                todo.append((record, i))
        if todo:
            views = [self._current(record, module) for record, _ in todo]
            if training:
                # Outside any checkpoint's saved-tensor hooks: the derivation's own saved
                # tensors are not the region's, which a recomputation must match one for one.
                with torch.autograd.graph.saved_tensors_hooks(_keep, _keep):
                    derived = q._train_weights(views, seed=self.seed,
                                               streams=[i for _, i in todo])
            else:
                with torch.no_grad():
                    derived = q._quantized_weights(views)
            if derived is None:  # the quantizer trains on the float weights
                return
            fresh = {i: t for (_, i), t in zip(todo, derived, strict=True)}
            if not recompute:  # a recomputation's weights serve its own modules only
                self._this_pass.update(fresh)
        else:
            fresh = {}
        replaced = []
        for record, i in self._uses[id(module)]:
            tensor = fresh.get(i, self._this_pass.get(i))
            if tensor is None:
                continue
            replaced.append((record.name, module._parameters[record.name], tensor))
            module._parameters[record.name] = tensor
            if not torch.compiler.is_compiling() and q._swap_check.active:
                q._swap_check.expect(module, record.name, tensor)
        self._replaced[id(module)] = replaced
        q._fix_rnns()

    def _post(self, module: nn.Module, inputs: object, output: object) -> None:
        for name, before, tensor in self._replaced.pop(id(module), []):
            # FSDP's post-forward may have resharded (set the sharded parameter) already.
            if module._parameters.get(name) is tensor:
                module._parameters[name] = before
        self._quantizer._fix_rnns()
