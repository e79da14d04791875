"""Activation checkpointing: the recomputed forward sees the same noisy weights, so the
gradients are those of training without checkpointing (reentrant and non-reentrant)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import diffq_triton


class Blocks(nn.Module):
    """Three residual blocks and a head; ``mode`` checkpoints each block's call."""

    def __init__(self, mode: str | None = None, tied: bool = False) -> None:
        super().__init__()
        self.mode = mode
        self.emb = nn.Embedding(23, 12)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(12, 29), nn.GELU(), nn.Linear(29, 12)) for _ in range(3))
        self.head = nn.Linear(12, 23, bias=False)
        if tied:
            self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        for block in self.blocks:
            if self.mode is None:
                h = h + block(h)
            else:
                h = h + checkpoint(block, h, use_reentrant=self.mode == "reentrant")
        return self.head(h)


def _setup(mode: str | None, tied: bool = False, **kwargs) -> tuple:
    """A model of seed 0, its SGD and its DiffQuantizer (in the documented order)."""
    torch.manual_seed(0)
    model = Blocks(mode, tied)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    q = diffq_triton.DiffQuantizer(model, min_size=0, **kwargs)
    q.setup_optimizer(opt, lr=0.1)
    return model, opt, q


def _gradients(mode: str | None, tied: bool, steps: int = 2, **kwargs) -> list[dict]:
    model, opt, q = _setup(mode, tied, **kwargs)
    torch.manual_seed(1)
    grads = []
    for _ in range(steps):
        idx = torch.randint(0, 23, (3, 5))
        loss = model(idx).logsumexp(-1).mean() + 1e-2 * q.model_size()
        opt.zero_grad()
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        opt.step()
    return grads


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_checkpointing_keeps_the_gradients(mode, tied):
    # The first step switches to the module-wise swap mid-forward; the second uses it from
    # the start. Both must equal training without checkpointing, bit for bit but for the
    # order in which autograd sums a tied weight's two gradients.
    plain = _gradients(None, tied, group_size=4)
    checkpointed = _gradients(mode, tied, group_size=4)
    for step, (a, b) in enumerate(zip(plain, checkpointed, strict=True)):
        assert a.keys() == b.keys()
        for name in a:
            torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7,
                                       msg=f"step {step}: {name}")


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_checkpointing_on_the_triton_path(mode):
    pytest.importorskip("triton")
    from diffq_triton.ops.dispatch import use_backend

    with use_backend("triton"):  # the kernels, under the interpreter on a CPU machine
        plain = _gradients(None, True, steps=1, group_size=8)
        checkpointed = _gradients(mode, True, steps=1, group_size=8)
    for name in plain[0]:
        torch.testing.assert_close(checkpointed[0][name], plain[0][name], rtol=1e-5,
                                   atol=1e-6, msg=name)


def test_without_the_module_swap_the_gradients_would_differ():
    # The check above can fail: with the root-level swap only (the recomputation sees the
    # float weights), the gradients differ.
    plain = _gradients(None, False, steps=1, group_size=4)
    model, opt, q = _setup("non_reentrant", group_size=4)
    q._swap_check.finish()  # no first-forward hooks: checkpointing goes unseen
    torch.manual_seed(1)
    idx = torch.randint(0, 23, (3, 5))
    (model(idx).logsumexp(-1).mean() + 1e-2 * q.model_size()).backward()
    differs = [n for n, p in model.named_parameters()
               if not torch.allclose(p.grad, plain[0][n], rtol=1e-6, atol=1e-7)]
    assert "blocks.0.0.weight" in differs


@pytest.mark.parametrize("cls,kwargs", [(diffq_triton.UniformQuantizer, dict(bits=3, qat=True)),
                                        (diffq_triton.LSQ, dict(bits=3))],
                         ids=["uniform_qat", "lsq"])
def test_checkpointing_with_the_other_quantizers(cls, kwargs):
    def grads(mode):
        torch.manual_seed(0)
        model = Blocks(mode)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        q = cls(model, min_size=0, **kwargs)
        if hasattr(q, "setup_optimizer") and cls is diffq_triton.LSQ:
            q.setup_optimizer(opt)
        torch.manual_seed(1)
        model(torch.randint(0, 23, (3, 5))).logsumexp(-1).mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain = grads(None)
    for mode in ("reentrant", "non_reentrant"):
        got = grads(mode)
        for name in plain:
            torch.testing.assert_close(got[name], plain[name], rtol=1e-6, atol=1e-7,
                                       msg=f"{mode}: {name}")


@pytest.mark.parametrize("mode", ["reentrant", "non_reentrant"])
def test_several_forwards_before_one_backward(mode):
    # Each recomputed region finds the seed of its own forward (by the random state that
    # checkpointing replays), not the last forward's.
    def grads(mode):
        torch.manual_seed(0)
        model = Blocks(mode)
        q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=4)
        q.no_optimizer()
        torch.manual_seed(1)
        a, b = torch.randint(0, 23, (3, 5)), torch.randint(0, 23, (2, 7))
        model(a[:1]).sum().backward()  # a first step: module swaps on from the next one
        model.zero_grad()
        (model(a).logsumexp(-1).mean() + model(b).logsumexp(-1).mean()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    plain, checkpointed = grads(None), grads(mode)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-6, atol=1e-7,
                                   msg=name)


def test_a_dry_run_without_gradients_then_checkpointing():
    # A train-mode forward under no_grad is not the training forward that detection watches.
    plain = _gradients(None, False, steps=1, group_size=4)
    model, opt, q = _setup("non_reentrant", group_size=4)
    with torch.no_grad():
        model(torch.randint(0, 23, (1, 3)))
    torch.manual_seed(1)
    idx = torch.randint(0, 23, (3, 5))
    (model(idx).logsumexp(-1).mean() + 1e-2 * q.model_size()).backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, plain[0][name], rtol=1e-6, atol=1e-7, msg=name)


class FrozenPart(nn.Module):
    """A forward with a torch.no_grad() block (a frozen encoder): not a checkpoint."""

    def __init__(self) -> None:
        super().__init__()
        self.frozen = nn.Linear(12, 12)
        self.head = nn.Linear(12, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            x = self.frozen(x)
        return self.head(x)


def test_a_no_grad_block_is_not_taken_for_a_checkpoint():
    model = FrozenPart()
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=4)
    q.no_optimizer()
    model(torch.randn(3, 12)).sum().backward()
    assert q._module_swaps is None  # still one call for every weight per step


def test_module_wise_eval_rounds_float16_parameters():
    torch.manual_seed(0)
    model = Blocks()
    q = diffq_triton.DiffQuantizer(model, min_size=0.001, float16=True, group_size=4)
    q.no_optimizer()
    assert q._float16, "the test needs parameters stored as float16"
    model.eval()
    idx = torch.randint(0, 23, (3, 5))
    with torch.no_grad():
        whole = model(idx)
        q._use_module_swaps()
        torch.testing.assert_close(model(idx), whole, rtol=0, atol=0)
