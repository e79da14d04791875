"""DistributedDataParallel over 2 CPU ranks (gloo on loopback): the ranks stay in agreement."""

import datetime
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffq_triton
from tests.models import mlp

DEADLINE_S = 120


def _worker(rank: int, world: int, out_dir: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    # A file store needs no port: no race with other processes for a free one.
    dist.init_process_group(
        "gloo", init_method=f"file://{out_dir}/store", rank=rank, world_size=world,
        timeout=datetime.timedelta(seconds=DEADLINE_S),
    )
    ddp = None
    try:
        torch.manual_seed(0)  # same initial weights on every rank
        model = mlp()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        quantizer = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
        quantizer.setup_optimizer(opt)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(100 + rank)  # different data and noise per rank
        for _ in range(3):
            x = torch.randn(8, 32)
            loss = ddp(x).pow(2).mean() + 1e-3 * quantizer.model_size()
            opt.zero_grad()
            loss.backward()
            opt.step()
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        state["true_size"] = torch.tensor(quantizer.true_model_size())
        torch.save(state, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        # The DDP wrapper goes first, also on errors. Its Reducer holds the process group;
        # left for last, it frees the group when this function returns, from a destructor
        # that keeps the GIL while it joins gloo's worker threads, and a worker that is
        # freeing a finished allreduce needs the GIL: a deadlock in torch 2.13, not in diffq
        # (stacks of hung ranks: ~Reducer -> ~ProcessGroupGloo -> thread.join on the main
        # thread, ~AsyncAllreduceWork -> take_gil on the gloo thread; 5 hangs in 30 runs,
        # 2 in 30 with plain DDP and no quantizer; pytorch/pytorch#56297 for this class of
        # bug). destroy_process_group then drops the last reference without the GIL.
        ddp = None
        dist.destroy_process_group()


def test_ddp_two_ranks_agree(tmp_path):
    context = mp.spawn(_worker, args=(2, str(tmp_path)), nprocs=2, join=False)
    # Never hang the suite: give up (and kill the ranks) after a deadline.
    for _ in range(DEADLINE_S):
        if context.join(timeout=1):
            break
    else:
        for process in context.processes:
            process.kill()
        pytest.fail(f"DDP ranks did not finish within {DEADLINE_S} s")
    s0 = torch.load(tmp_path / "rank0.pt")
    s1 = torch.load(tmp_path / "rank1.pt")
    assert set(s0) == set(s1)
    assert any(k.endswith("_diffq") for k in s0)
    for key in s0:
        torch.testing.assert_close(s0[key], s1[key], rtol=0, atol=0, msg=key)
    torch.manual_seed(0)
    initial = mlp().state_dict()
    assert not torch.equal(s0["0.weight"], initial["0.weight"]), "training moved the weights"
