"""Triton launches per training step: a small constant per quantized tensor.

Documented count (``DiffQuantizer``, any group size): 4 launches per quantized tensor per
training step — forward: range partials + noise; backward: group sums + finalize. The seed
of each tensor is one ``torch.randint`` (not a Triton launch). Eval: 2 per tensor (range
partials + quantize) the first time, none while weights and bits are unchanged (cached).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from torch import nn

import diffq_triton
from diffq_triton.ops.dispatch import use_backend

pytest.importorskip("triton")
import triton  # noqa: E402
from triton.runtime import interpreter  # noqa: E402

LAUNCHES_PER_TENSOR_STEP = 4
LAUNCHES_PER_TENSOR_EVAL = 2


@contextmanager
def count_launches() -> Iterator[Counter]:
    """Count Triton launches by kernel name, interpreted or compiled.

    The interpreter does not call ``launch_enter_hook``, so its grid executor is wrapped
    too; each path counts only its own launches.
    """
    counts: Counter = Counter()
    call = interpreter.GridExecutor.__call__

    def counted_call(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return call(self, *args, **kwargs)

    def hook(metadata):
        counts[metadata.name] += 1

    knobs = triton.knobs.runtime
    previous = knobs.launch_enter_hook
    interpreter.GridExecutor.__call__ = counted_call
    knobs.launch_enter_hook = hook
    try:
        yield counts
    finally:
        interpreter.GridExecutor.__call__ = call
        knobs.launch_enter_hook = previous


def _model():
    # Four quantized tensors (two weights, two biases) of different group layouts.
    return nn.Sequential(nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 24))


@pytest.mark.parametrize("group_size", [0, 8, 2048], ids=lambda g: f"g{g}")
def test_training_step_launches(group_size):
    torch.manual_seed(0)
    model = _model()
    opt = torch.optim.Adam(model.parameters())
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=group_size)
    q.setup_optimizer(opt)
    n_tensors = len(list(q._first_uses()))
    assert n_tensors == 4
    x = torch.randn(8, 48)
    with use_backend("triton"), count_launches() as counts:
        (model(x).pow(2).mean() + 1e-3 * q.model_size()).backward()
        opt.step()
    assert sum(counts.values()) == LAUNCHES_PER_TENSOR_STEP * n_tensors, counts
    assert counts["range_partial_kernel"] == counts["noise_fwd_kernel"] == n_tensors
    assert counts["noise_bwd_finalize_kernel"] == n_tensors


def test_eval_launches_once_then_cached():
    model = _model()
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.no_optimizer()
    model.eval()
    x = torch.randn(8, 48)
    with use_backend("triton"), torch.no_grad(), count_launches() as counts:
        model(x)
        first = sum(counts.values())
        model(x)
    assert first == LAUNCHES_PER_TENSOR_EVAL * 4, counts
    assert sum(counts.values()) == first
