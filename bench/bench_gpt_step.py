"""One training step of a GPT-2-small-sized model: plain, ours and diffq 0.2.4 side by side.

fp32 eager, bf16 autocast eager and bf16 ``torch.compile``; AdamW; DiffQ group 8 with the
size penalty ``loss + 1e-3·model_size()``. The implementations are timed interleaved
round-robin in one run (a CUDA synchronisation around each step), with the peak memory a
step adds above what is allocated before it, and the time of the first 3 steps (compilation
and kernel builds). Needs a GPU (``make gpu-check``); rows go to bench/RESULTS.md.
"""

from __future__ import annotations

import gc
import importlib.util
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from gpt import GPT, GPTConfig
from results import record

import diffq_triton

GROUP_SIZE = 8
PENALTY = 1e-3
BATCH = 8
MODES = ("fp32 eager", "bf16 eager", "bf16 compiled")
WARMUP = 3


@dataclass
class Impl:
    name: str
    step: Callable[[], float]  # runs one training step, returns the loss
    quantizer: object | None


def make_impl(name: str, cfg: GPTConfig, device: str, mode: str, batch: int) -> Impl:
    """A model, its optimizer and quantizer (``name``: plain, ours, diffq) and its step."""
    torch.manual_seed(0)
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    quantizer = None
    if name == "ours":
        quantizer = diffq_triton.DiffQuantizer(model, group_size=GROUP_SIZE)
    elif name == "diffq":
        import diffq

        quantizer = diffq.DiffQuantizer(model, group_size=GROUP_SIZE)
    if quantizer is not None:
        quantizer.setup_optimizer(opt)
    forward = torch.compile(model) if "compiled" in mode else model
    gen = torch.Generator(device="cpu").manual_seed(1)
    tokens = torch.randint(0, cfg.vocab, (batch, cfg.context + 1), generator=gen).to(device)
    x, y = tokens[:, :-1], tokens[:, 1:]
    dtype = torch.bfloat16 if "bf16" in mode else None

    def step() -> float:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            logits = forward(x)
            loss = F.cross_entropy(logits.float().view(-1, cfg.vocab), y.reshape(-1))
            if quantizer is not None:
                loss = loss + PENALTY * quantizer.model_size()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return Impl(name, step, quantizer)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(cfg: GPTConfig, device: str, modes=MODES, rounds: int = 10,
            batch: int = BATCH) -> list[dict]:
    """Rows of step time, ratio to plain, transient peak memory and start-up per impl.

    Raises:
        AssertionError: a loss is not finite, or ours and diffq disagree on the size.
    """
    names = ["plain", "ours"] + (["diffq"] if importlib.util.find_spec("diffq") else [])
    rows = []
    for mode in modes:
        impls = [make_impl(name, cfg, device, mode, batch) for name in names]
        if len(impls) == 3:  # same model, same widths: the same size
            ours, theirs = impls[1].quantizer, impls[2].quantizer
            sizes = (float(q.model_size().detach()) for q in (ours, theirs))
            assert abs(next(sizes) - next(sizes)) < 1e-4, mode
        startup, times, peaks = {}, {i.name: [] for i in impls}, {i.name: [] for i in impls}
        for impl in impls:
            _sync(device)
            start = time.perf_counter()
            for _ in range(WARMUP):
                impl.step()
            _sync(device)
            startup[impl.name] = time.perf_counter() - start
        for _ in range(rounds):
            for impl in impls:
                if device == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                _sync(device)
                start = time.perf_counter()
                loss = impl.step()
                _sync(device)
                times[impl.name].append(time.perf_counter() - start)
                assert torch.isfinite(loss), (mode, impl.name)
                if device == "cuda":
                    peaks[impl.name].append(torch.cuda.max_memory_allocated() - base)
        plain = statistics.median(times["plain"])
        for impl in impls:
            ms = statistics.median(times[impl.name])
            row = {"step": mode, "impl": impl.name if impl.name != "diffq" else "diffq 0.2.4",
                   "ms": 1e3 * ms, "vs plain": ms / plain,
                   f"first {WARMUP} steps s": startup[impl.name]}
            if peaks[impl.name]:
                row["step peak GiB"] = max(peaks[impl.name]) / 2**30
            rows.append(row)
        del impls
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def test_gpt_step(device):
    if device != "cuda":
        pytest.skip("the GPT-2-small-sized step is measured on a GPU (make gpu-check)")
    rows = measure(GPTConfig(), device)
    record(
        "GPT-2-small-sized training step",
        rows,
        note=(f"12 × 768 blocks, context 1024, vocab 50304, 163M weights, batch {BATCH}, "
              f"AdamW; DiffQ group {GROUP_SIZE}, loss + {PENALTY:g}·model_size(). Median "
              "step time with the implementations interleaved round-robin; 'vs plain' is the "
              "ratio to the unquantized model in the same mode; 'step peak GiB' is the most "
              "a step allocated above what was allocated before it."),
    )
