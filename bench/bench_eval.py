"""Eval forward of a quantized model against the plain model: ours vs diffq 0.2.4.

diffq 0.2.4 re-quantizes every weight (and copies it to the CPU) on each eval forward; ours
keeps the quantized weights until the weights or the bits change. The three models are timed
round-robin in one run, so load on the machine hits them alike.
"""

from __future__ import annotations

import copy
import importlib.util
import statistics
import time

import torch
from results import record
from torch import nn

import diffq_triton


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(512, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(),
                         nn.Linear(1024, 16))


def _time(model: nn.Module, x: torch.Tensor, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        model(x)
    return (time.perf_counter() - start) / calls


def test_eval_forward_side_by_side(device):
    torch.manual_seed(0)
    plain = _mlp().to(device).eval()
    models = {"plain": plain, "ours": copy.deepcopy(plain)}
    diffq_triton.DiffQuantizer(models["ours"], group_size=8)
    if importlib.util.find_spec("diffq") is not None:
        import diffq

        models["diffq"] = copy.deepcopy(plain)
        diffq.DiffQuantizer(models["diffq"], group_size=8)
    x = torch.randn(64, 512, device=device)
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        for model in models.values():
            model.eval()
            model(x)  # warm-up (ours quantizes once here)
        for _ in range(15):
            for name, model in models.items():
                times[name].append(_time(model, x, 5))
    med = {name: statistics.median(ts) for name, ts in times.items()}
    row = {"model": "mlp 512-1024-1024-16, batch 64, group 8", "plain ms": med["plain"] * 1e3,
           "ours / plain": med["ours"] / med["plain"]}
    if "diffq" in med:
        row["diffq 0.2.4 / plain"] = med["diffq"] / med["plain"]
    record("eval forward against the unquantized model", [row],
           "Median of 15 rounds of 5 no-grad eval forwards, implementations interleaved.")
    assert row["ours / plain"] < 2.0  # a loose guard against losing the cache; figures above
