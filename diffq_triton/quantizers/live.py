"""The live quantizers: which model carries one, and telling them of optimizer steps.

A model carries at most one quantizer (a second is an error). Every optimizer step tells
the live quantizers that parameters may have changed: a fused optimizer
(``Adam(fused=True)``) writes them without bumping their version counters, which the
quantizers' caches (eval weights, the step's model size) would otherwise miss.
"""

from __future__ import annotations

import weakref

from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

# model -> its quantizer
ATTACHED: weakref.WeakKeyDictionary[nn.Module, object] = weakref.WeakKeyDictionary()
_LIVE: weakref.WeakSet = weakref.WeakSet()
_STEP_HOOK: list = []


def _after_any_optimizer_step(optimizer: object, args: object, kwargs: object) -> None:
    for quantizer in list(_LIVE):
        quantizer._params_changed()


def attach(model: nn.Module, quantizer: object) -> None:
    """Record ``quantizer`` as ``model``'s, told of every optimizer step from now on."""
    if not _STEP_HOOK:
        _STEP_HOOK.append(register_optimizer_step_post_hook(_after_any_optimizer_step))
    ATTACHED[model] = quantizer
    _LIVE.add(quantizer)


def detach(model: nn.Module, quantizer: object) -> None:
    """Forget ``quantizer`` (``model`` may take another)."""
    if ATTACHED.get(model) is quantizer:
        del ATTACHED[model]
    _LIVE.discard(quantizer)
