"""The weight swap: the hooks that put derived weights in the modules around a forward.

:class:`WeightSwap` is a base of :class:`~diffq_triton.BaseQuantizer`. Before the root
model's forward its pre-hook asks the quantizer for every derived weight at once (noisy in
training, quantized in eval; one multi-tensor call) and puts each in its module's
``_parameters``; the forward hook puts the parameters back. On a model sharded by
``fully_shard``, or one whose first forward runs a checkpointed region, the swap moves to
each module (:mod:`.module_swap`), with the same noise.
"""

from __future__ import annotations

import torch
from torch import nn

from . import sharding
from .module_swap import ModuleSwaps, in_checkpoint_region


def _is_compiling() -> bool:
    return torch.compiler.is_compiling()


class WeightSwap:
    """The swap hooks of a quantizer (it provides the records and the derived weights)."""

    def _forward_pre_hook(self, module: nn.Module, inputs: object) -> None:
        # A forward that raised leaves the swap in place: undo it first.
        self._restore_params()
        if not _is_compiling():
            self._follow_sharding()
            self._root_grad = torch.is_grad_enabled()
        if self.model.training:
            self.unquantize()
        if self._module_swaps is not None:
            self._module_swaps.begin_pass(self._draw_seed() if self.model.training else None)
            return
        if self.model.training:
            derived = self._train_weights()
        else:
            derived = None if self._quantized else self._eval_weights()
        if derived is not None:
            check = not _is_compiling() and self._swap_check.active
            for record, tensor in zip(self._first_uses(), derived, strict=True):
                for use in record.uses:
                    use.module._parameters[use.name] = tensor
                    if check:
                        self._swap_check.expect(use.module, use.name, tensor)
            if not self.model.training:
                # Eval shows the stored model: float16-stored parameters are rounded too.
                for module, name, param in self._float16_uses:
                    module._parameters[name] = param.detach().half().to(param.dtype)
            self._swapped = True
            self._fix_rnns()

    def _forward_hook(self, module: nn.Module, inputs: object, output: object) -> None:
        self._restore_params()
        if self._module_swaps is not None:
            self._module_swaps.end_pass()

    def _draw_seed(self) -> torch.Tensor | None:
        """The seed of a training forward's noise (one draw from torch's generator on the
        weights' device, no host sync), kept for the module-wise swap's recomputations;
        None for quantizers without noise (their runs draw nothing, as a plain model's)."""
        if not self._trains_widths or not self._qparams:
            return None
        # The first record is a first use: its device is the weights'.
        self._seed = torch.randint(0, 2**31 - 1, (1,), dtype=torch.int64,
                                   device=self._qparams[0].param.device)
        return self._seed

    def _follow_sharding(self, every: bool = False) -> None:
        """After fully_shard: follow the sharded parameters, swap module by module."""
        # Created on the meta device and not yet reset_parameters(): nothing may read the
        # records (the one flag every entry point passes through).
        if self._meta_pending:
            self._refuse_meta()
        # Skipped while the root's swap is in place (the modules hold derived weights then)
        # and when tracing (sharding happens outside compiled code).
        if self._sharded or self._swapped or _is_compiling():
            return
        check = getattr(self, "_swap_check", None)
        if not sharding.needs_rebind(self, every or (check is not None and check.active)):
            return
        self._sharded = sharding.rebind(self)
        self._params_changed()
        self._use_module_swaps()

    def _use_module_swaps(self) -> None:
        if self._module_swaps is None:
            self._module_swaps = ModuleSwaps(self)
            self._module_swaps.seed = self._seed

    def _entering_module(self, module: nn.Module) -> None:
        # Called before each quantized module of the first forwards (the swap check): a
        # checkpointed region recomputes its modules in the backward, after the root's
        # swap is undone; from now on they swap their own weights (the same noise).
        if self.model.training and in_checkpoint_region(self._root_grad):
            self._use_module_swaps()
            self._module_swaps.note_region()

    def _own_for_compute(self, tensor: torch.Tensor) -> torch.Tensor:
        """The quantizer's own tensor of a parameter (logits, step) as a module-wise swap
        computes with it: whole (gathered when sharded) and float32 (under FSDP's mixed
        precision the unsharded copy comes in param_dtype)."""
        return sharding.full(tensor).float()

    @property
    def _writes_files(self) -> bool:
        """Whether save_quantized writes here: on a sharded model rank 0 only."""
        return not self._sharded or sharding.is_writer()

    def _share_write_outcome(self, error: BaseException | None) -> None:
        """Every rank of a sharded model learns whether rank 0 wrote the file (a collective:
        :func:`sharding.share_write_outcome`)."""
        sharding.share_write_outcome(error)

    def _forward_done(self, module: nn.Module, inputs: object, output: object) -> None:
        # Called only when a forward returned (not always_call): a forward that raised
        # leaves the check on, so that a retry is checked again.
        # A forward without gradients (a dry run, a no_grad evaluation in train mode) is
        # not a training forward: what it ran (checkpointed regions) may differ.
        if not _is_compiling() and self.model.training and torch.is_grad_enabled():
            self._swap_check.finish()  # checked once: later steps pay nothing
            self._done_handle.remove()

    def _restore_params(self) -> None:
        if not self._swapped:
            return
        for record in self._qparams:
            record.module._parameters[record.name] = record.param
        for module, name, param in self._float16_uses:
            module._parameters[name] = param
        self._swapped = False
        if not _is_compiling():
            self._swap_check.clear()
        self._fix_rnns()

    def _fix_rnns(self) -> None:
        # RNNs keep their own list of weight tensors, refreshed only by __setattr__.
        for rnn in self._rnns:
            rnn._flat_weights = [getattr(rnn, wn, None) for wn in rnn._flat_weights_names]

