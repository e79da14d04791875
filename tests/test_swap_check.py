"""Never silently unquantized: a module that does not compute with the weight the quantizer
set fails the first training forward (or an eval forward before it) with a clear error."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffq_triton
from tests.models import TiedLM, mlp

QUANTIZERS = [
    (diffq_triton.DiffQuantizer, dict(group_size=8)),
    (diffq_triton.UniformQuantizer, dict(bits=4, qat=True)),
    (diffq_triton.LSQ, dict(bits=4)),
]


def _swap_back(module: nn.Module, param: nn.Parameter):
    """A forward pre-hook on ``module`` that puts its float weight back (as FSDP's all-gather
    or a careless wrapper would)."""
    def hook(mod, inputs):
        mod._parameters["weight"] = param
    return module.register_forward_pre_hook(hook)


@pytest.mark.parametrize("cls,kwargs", QUANTIZERS, ids=lambda v: getattr(v, "__name__", ""))
def test_a_hook_that_puts_the_float_weight_back_fails_the_first_training_forward(cls, kwargs):
    torch.manual_seed(0)
    model = mlp()
    q = cls(model, min_size=0, **kwargs)
    if hasattr(q, "no_optimizer"):
        q.no_optimizer()
    handle = _swap_back(model[2], model[2].weight)
    with pytest.raises(RuntimeError, match=r"module '2' did not compute with .*'2\.weight'"):
        model(torch.randn(3, 32))
    # The model is left as it was: float parameters in place.
    assert model[0]._parameters["weight"] is q._qparams[0].param
    handle.remove()
    model(torch.randn(3, 32)).sum().backward()  # fine once the hook is gone


def test_eval_before_training_is_checked_too():
    model = mlp()
    diffq_triton.DiffQuantizer(model, min_size=0, group_size=8).no_optimizer()
    _swap_back(model[0], model[0].weight)
    model.eval()
    with torch.no_grad(), pytest.raises(RuntimeError, match="module '0'"):
        model(torch.randn(3, 32))


def test_checks_end_after_the_first_training_forward():
    model = TiedLM()
    hooks_before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.no_optimizer()
    model(torch.randint(0, 300, (2, 5))).sum().backward()  # tied weights, an LSTM: no error
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()
            if name} == {name: n for name, n in hooks_before.items() if name}
    # Later steps are not checked (and cost nothing): a swap now goes unnoticed by design.
    model.eval()
    with torch.no_grad():
        model(torch.randint(0, 300, (2, 5)))


def test_detach_removes_the_checks():
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.detach()
    assert all(not m._forward_hooks for m in model.modules())


# ----------------------------------------------------------------------------- FSDP1
def _fsdp1_worker(rank: int, world: int, out_dir: str) -> None:
    import datetime
    import os

    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=60))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Sequential(nn.Linear(16, 32), nn.ReLU()), nn.Linear(32, 4))
        quantizer = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
        quantizer.no_optimizer()
        try:
            wrapped = FullyShardedDataParallel(model, device_id=torch.device("cpu"))
            wrapped(torch.randn(5, 16)).sum().backward()
            outcome = "trained"
        except RuntimeError as exc:
            outcome = str(exc)
        with open(os.path.join(out_dir, f"rank{rank}.txt"), "w") as f:
            f.write(outcome)
    finally:
        dist.destroy_process_group()
    # After a forward that raised inside FSDP, gloo's threads can abort the interpreter's
    # teardown ("terminate called without an active exception"): the outcome is written,
    # so leave without running destructors.
    os._exit(0)


def test_fsdp1_is_refused_loudly(tmp_path):
    # FSDP1 replaces the parameters by views of one flat parameter: the quantizer cannot
    # follow them (FSDP2's fully_shard is supported, tests/test_fsdp.py), and says so
    # instead of training without noise.
    import torch.multiprocessing as mp

    pytest.importorskip("torch.distributed.fsdp")
    context = mp.spawn(_fsdp1_worker, args=(2, str(tmp_path)), nprocs=2, join=False)
    for process in context.processes:  # the outcome files, not the exit codes, decide
        process.join(timeout=120)
    alive = [p for p in context.processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, "FSDP1 ranks did not finish in 120 s"
    for rank in range(2):
        outcome = (tmp_path / f"rank{rank}.txt").read_text()
        assert "parameter '0.0.weight' was replaced since the quantizer was created" in outcome
        assert "FSDP1" in outcome


def test_a_retried_forward_is_checked_again():
    model = mlp()
    diffq_triton.DiffQuantizer(model, min_size=0, group_size=8).no_optimizer()
    _swap_back(model[2], model[2].weight)
    for _ in range(3):  # a loop that catches the error and goes on must keep failing
        with pytest.raises(RuntimeError, match="module '2'"):
            model(torch.randn(3, 32))
