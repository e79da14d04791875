"""DistributedDataParallel over 2 CPU ranks (gloo on loopback): the ranks stay in agreement."""

import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import diffq_triton
from tests.models import mlp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
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
        dist.destroy_process_group()


def test_ddp_two_ranks_agree(tmp_path):
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    s0 = torch.load(tmp_path / "rank0.pt")
    s1 = torch.load(tmp_path / "rank1.pt")
    assert set(s0) == set(s1)
    assert any(k.endswith("_diffq") for k in s0)
    for key in s0:
        torch.testing.assert_close(s0[key], s1[key], rtol=0, atol=0, msg=key)
    torch.manual_seed(0)
    initial = mlp().state_dict()
    assert not torch.equal(s0["0.weight"], initial["0.weight"]), "training moved the weights"
