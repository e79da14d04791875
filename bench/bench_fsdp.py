"""Training step under FSDP2 and DDP, quantized and not: 2 CPU ranks (gloo, loopback).

Four set-ups of one small GPT (4 blocks, width 128, vocabulary 2048, context 64; tied
embedding and head), trained on the same batches, their steps interleaved round-robin on
each rank: DDP and FSDP2 (``fully_shard`` per block and the root), each with and without a
``DiffQuantizer`` (group 8, size penalty in the loss). Reported: the median step time of
each, and the ratio of quantized to unquantized under the same wrapper (what DiffQ costs
there). On a CPU the quantizer's per-module swap under FSDP2 runs one noise op per module
(the eager path).

``make gpu-check`` runs the same on its one GPU (``DIFFQ_TRITON_BENCH_FSDP_DEVICE=cuda``):
one rank over NCCL, a GPT-2-small-sized model at context 256, bf16 autocast. FSDP2 then
shards nothing, but its all-gather/reshard hooks and the quantizer's module-wise swap (one
set of launches per module instead of 7 for the model) run as they would on more GPUs.
"""

from __future__ import annotations

import datetime
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp
from gpt import GPT, GPTConfig
from results import record
from torch import nn

import diffq_triton

DEVICE = os.environ.get("DIFFQ_TRITON_BENCH_FSDP_DEVICE", "cpu")
if DEVICE == "cuda":
    WORLD = 1
    CONFIG = GPTConfig(layers=12, width=768, heads=12, context=256, vocab=50304)
    BATCH = 8
else:
    WORLD = 2
    CONFIG = GPTConfig(layers=4, width=128, heads=4, context=64, vocab=2048)
    BATCH = 4  # per rank
ROUNDS = 12
WARMUP = 2


def _setup(kind: str, quantized: bool, mesh) -> tuple:
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = GPT(CONFIG).to(DEVICE)
    q = None
    if kind == "ddp":
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if quantized:
            q = diffq_triton.DiffQuantizer(model, group_size=8)
            q.setup_optimizer(opt)
        forward = nn.parallel.DistributedDataParallel(
            model, device_ids=[0] if DEVICE == "cuda" else None)
    else:
        if quantized:
            q = diffq_triton.DiffQuantizer(model, group_size=8)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        if q is not None:
            q.setup_optimizer(opt)
        forward = model
    return forward, q, opt


def _step(forward, q, opt, tokens) -> float:
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=DEVICE == "cuda"):
        logits = forward(tokens[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, CONFIG.vocab).float(),
                                           tokens[:, 1:].reshape(-1))
    if q is not None:
        loss = loss + 1e-3 * q.model_size()
    opt.zero_grad()
    loss.backward()
    opt.step()
    if DEVICE == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def _worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("nccl" if DEVICE == "cuda" else "gloo",
                            init_method=f"file://{out_dir}/store", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    if DEVICE == "cuda":
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(1)  # one core per rank
    mesh = init_device_mesh(DEVICE, (WORLD,))
    setups = {(kind, quantized): _setup(kind, quantized, mesh)
              for kind in ("ddp", "fsdp2") for quantized in (False, True)}
    times: dict[tuple, list[float]] = {key: [] for key in setups}
    generator = torch.Generator().manual_seed(rank)
    for round_ in range(ROUNDS + WARMUP):
        tokens = torch.randint(0, CONFIG.vocab, (BATCH, CONFIG.context + 1),
                               generator=generator).to(DEVICE)
        for key, (forward, q, opt) in setups.items():
            seconds = _step(forward, q, opt, tokens)
            if round_ >= WARMUP:
                times[key].append(seconds)
    torch.save({key: statistics.median(v) for key, v in times.items()},
               Path(out_dir) / f"rank{rank}.pt")
    setups.clear()  # the DDP wrappers go before the group (see tests/test_ddp.py)
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def test_fsdp2_and_ddp_step():
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(out,), nprocs=WORLD)
        medians = [torch.load(Path(out) / f"rank{r}.pt") for r in range(WORLD)]
    # The slower rank sets the step.
    step = {key: max(m[key] for m in medians) for key in medians[0]}
    rows = []
    for kind in ("ddp", "fsdp2"):
        for quantized in (False, True):
            rows.append({
                "wrapper": kind.upper(), "model": "DiffQ" if quantized else "plain",
                "ms per step": 1e3 * step[(kind, quantized)],
                "× plain, same wrapper": step[(kind, quantized)] / step[(kind, False)],
                "× DDP plain": step[(kind, quantized)] / step[("ddp", False)],
            })
    where = ("1 GPU (NCCL), bf16 autocast" if DEVICE == "cuda"
             else "2 CPU ranks (gloo), one thread per rank")
    record(f"Training step, FSDP2 vs DDP, {where}", rows, note=(
        f"GPT {CONFIG.layers}×{CONFIG.width}, vocab {CONFIG.vocab}, context {CONFIG.context}, "
        f"batch {BATCH} per rank, AdamW; median of {ROUNDS} steps, set-ups interleaved; the "
        "slower rank's median. DiffQuantizer group 8 with its size penalty; under FSDP2 the "
        "weights are swapped module by module."))
    for row in rows:
        assert row["ms per step"] > 0
