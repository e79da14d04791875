"""Triton launches per training step: a constant for the whole model.

Documented count (``DiffQuantizer``, any group size, weights of one dtype): 7 launches per
training step with the size penalty, whatever the number of quantized tensors — noise
forward: range partials + noise; size: partial sums + total; backward: noise group sums +
finalize, size gradient; each one launch over every tensor. The step's seed is one
``torch.randint`` (not a Triton launch). Eval: 2 (range partials + quantize, each over every
tensor) the first time, none while weights and bits are unchanged (cached).
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
from tests.conftest import DEVICE

pytest.importorskip("triton")
from triton.runtime import interpreter  # noqa: E402

LAUNCHES_PER_STEP = 7  # at most 8, the bound
LAUNCHES_PER_EVAL = 2


@contextmanager
def count_launches() -> Iterator[Counter]:
    """Count Triton launches by kernel name, interpreted or compiled.

    Under the interpreter a launch goes through its grid executor; compiled, through
    ``JITFunction.run`` (an autotuned kernel's chosen configuration too). Each path counts
    only its own launches. (Triton's launch hooks are not used: their argument changed form
    across versions.)
    """
    from triton.runtime.jit import JITFunction

    counts: Counter = Counter()
    call, run = interpreter.GridExecutor.__call__, JITFunction.run

    def counted_call(self, *args, **kwargs):
        counts[self.fn.__name__] += 1
        return call(self, *args, **kwargs)

    def counted_run(self, *args, **kwargs):
        if not kwargs.get("warmup", False):
            counts[self.__name__] += 1
        return run(self, *args, **kwargs)

    interpreter.GridExecutor.__call__ = counted_call
    JITFunction.run = counted_run
    try:
        yield counts
    finally:
        interpreter.GridExecutor.__call__ = call
        JITFunction.run = run


def _model(blocks: int = 1):
    # 4 quantized tensors per block (two weights, two biases) of different group layouts.
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(48, 96), nn.ReLU(), nn.Linear(96, 48)]
    return nn.Sequential(*layers).to(DEVICE)


@pytest.mark.parametrize("blocks", [1, 10], ids=lambda b: f"{4 * b}tensors")
@pytest.mark.parametrize("group_size", [0, 8, 2048], ids=lambda g: f"g{g}")
def test_training_step_launches(group_size, blocks):
    torch.manual_seed(0)
    model = _model(blocks)
    opt = torch.optim.Adam(model.parameters())
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=group_size)
    q.setup_optimizer(opt)
    assert len(list(q._first_uses())) == 4 * blocks
    x = torch.randn(8, 48, device=DEVICE)
    with use_backend("triton"), count_launches() as counts:
        (model(x).pow(2).mean() + 1e-3 * q.model_size()).backward()
        opt.step()
    assert sum(counts.values()) == LAUNCHES_PER_STEP, counts
    assert counts["range_many_partial_kernel"] == counts["noise_many_fwd_kernel"] == 1
    assert counts["noise_many_finalize_kernel"] == 1
    assert counts["size_many_fwd_kernel"] == counts["size_many_bwd_kernel"] == 1
    for record in q._first_uses():
        assert record.param.grad is not None and record.logit.grad is not None


@pytest.mark.parametrize("blocks", [1, 10], ids=lambda b: f"{4 * b}tensors")
def test_eval_launches_once_then_cached(blocks):
    model = _model(blocks)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.no_optimizer()
    model.eval()
    x = torch.randn(8, 48, device=DEVICE)
    with use_backend("triton"), torch.no_grad(), count_launches() as counts:
        model(x)
        first = sum(counts.values())
        model(x)
    assert first == LAUNCHES_PER_EVAL, counts
    assert sum(counts.values()) == first
    # One weight changed: only it is quantized again (still 2 launches).
    with torch.no_grad():
        model[0].weight.add_(1)
    with use_backend("triton"), torch.no_grad(), count_launches() as counts:
        model(x)
    assert sum(counts.values()) == LAUNCHES_PER_EVAL, counts


@pytest.mark.parametrize("blocks", [1, 10], ids=lambda b: f"{4 * b}tensors")
def test_qat_training_step_launches(blocks):
    # UniformQuantizer(qat=True): the quantized weights of every tensor, 2 launches.
    model = _model(blocks)
    q = diffq_triton.UniformQuantizer(model, min_size=0, bits=4, qat=True)
    x = torch.randn(8, 48, device=DEVICE)
    with use_backend("triton"), count_launches() as counts:
        (model(x).pow(2).mean() + 1e-3 * q.model_size()).backward()
    assert counts == {"range_many_partial_kernel": 1, "fake_quant_many_kernel": 1}, counts
    assert all(p.grad is not None for p in model.parameters())
