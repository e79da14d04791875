"""Never train silently without noise: check that modules use the weights the quantizer set.

The quantizer puts a derived tensor (noisy in training, quantized in eval) in each quantized
module's ``_parameters`` before the root model's forward. Anything that replaces it again
before the module computes (a forward pre-hook, FSDP1's flat parameters, another wrapper)
would make the model train on its float weights with no error. :class:`SwapCheck` hooks
every quantized module until the first training forward is over: after each module's
forward, the tensor in its ``_parameters`` must still be the one the quantizer set, or the
forward raises ``RuntimeError`` naming the module. The hooks are then removed, so later
steps pay nothing. Under ``torch.compile`` the check is skipped. Before each module's
forward the same hooks tell the quantizer, which notices a checkpointed region there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle


class SwapCheck:
    """Post-forward checks on the modules of ``uses`` (``(module name, module, parameter
    name)`` triples) until :meth:`finish`.

    Args:
        uses: every use of every quantized parameter.
        owner: the quantizer's class name, for messages.
        on_enter: called with each module before its forward while the checks last.
    """

    def __init__(self, uses: list[tuple[str, nn.Module, str]], owner: str,
                 on_enter: Callable[[nn.Module], None] | None = None):
        self._owner = owner
        self._on_enter = on_enter
        self._names: dict[int, tuple[str, list[str]]] = {}
        for module_name, module, name in uses:
            self._names.setdefault(id(module), (module_name, []))[1].append(name)
        modules = {id(m): m for _, m, _ in uses}
        self._handles: list[RemovableHandle] = [
            m.register_forward_hook(self._check) for m in modules.values()]
        if on_enter is not None:
            self._handles += [m.register_forward_pre_hook(self._enter)
                              for m in modules.values()]
        self._expected: dict[tuple[int, str], torch.Tensor] = {}

    @property
    def active(self) -> bool:
        return bool(self._handles)

    def expect(self, module: nn.Module, name: str, tensor: torch.Tensor) -> None:
        """``module`` must compute with ``tensor`` as its parameter ``name``."""
        if self._handles:
            self._expected[(id(module), name)] = tensor

    def clear(self) -> None:
        """The swap was undone: nothing is expected until the next one."""
        self._expected.clear()

    def finish(self) -> None:
        """Remove the hooks (after the first training forward)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._expected.clear()

    def _enter(self, module: nn.Module, inputs: object) -> None:
        if not torch.compiler.is_compiling():
            self._on_enter(module)

    def _check(self, module: nn.Module, inputs: object, output: object) -> None:
        if torch.compiler.is_compiling() or not self._expected:
            return
        module_name, names = self._names[id(module)]
        for name in names:
            expected = self._expected.get((id(module), name))
            if expected is not None and module._parameters.get(name) is not expected:
                where = f"{module_name}.{name}" if module_name else name
                raise RuntimeError(
                    f"{self._owner}: module {module_name or '(root)'!r} did not compute with "
                    f"the quantized weight set for {where!r}: something replaced the "
                    "parameter after the quantizer set it (a forward pre-hook, FSDP1 "
                    "gathering parameters, or another wrapper), so the model would train "
                    "without noise. Distributed training is supported with "
                    "DistributedDataParallel or FSDP2's fully_shard, applied after the "
                    "quantizer is created; remove whatever swaps the parameter."
                )
