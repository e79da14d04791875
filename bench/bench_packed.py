"""Packed inference on the CPU: resident memory and latency of the packed vs the float model.

The packed model (``load_quantized(..., packed=True)``) keeps each weight at its trained
widths and decodes it just in time into a scratch buffer (native codec) before the same
``F.linear`` the float model runs: its latency is the float model's plus one decode of every
weight per forward (``b/8`` bytes read and 4 written per weight), so on the CPU it is slower,
not faster; the memory is what it buys. GPU kernels that never write the weight out are the
next step (docs/packed.md).
"""

from __future__ import annotations

import io
import statistics
import time
import warnings

import torch
from results import record
from torch import nn

import diffq_triton
from diffq_triton.demo.data import VOCAB_SIZE
from diffq_triton.demo.model import CharTransformer, ModelConfig


def _mlp() -> nn.Module:
    # 2048*4096*2 + 4096*2048 = 25.2M weights (100 MB in float32).
    return nn.Sequential(nn.Linear(2048, 4096), nn.ReLU(), nn.Linear(4096, 2048), nn.ReLU(),
                         nn.Linear(2048, 4096))


def _lm() -> nn.Module:
    # Width 128, the demo's width when bench/RESULTS.md's rows were measured (the demo now
    # trains at 96): the same model, so new rows compare with the old ones.
    return CharTransformer(ModelConfig(vocab=VOCAB_SIZE, dim=128))


def _spread(quantizer: diffq_triton.DiffQuantizer) -> None:
    """Widths spread around 4 bits (logits ~ N(0, 1.5) over min_bits 2..max_bits 8)."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in quantizer.model.named_parameters():
            if name.endswith("_diffq"):
                p.copy_(torch.randn(p.shape, generator=gen) * 1.5 - 1.0)


def _time(model: nn.Module, x: torch.Tensor, rounds: int = 7, calls: int = 3) -> float:
    times = []
    with torch.inference_mode():
        model(x)  # warm-up: scratch buffers, threads
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                model(x)
            times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def _row(name: str, make, x: torch.Tensor, batch: str) -> dict:
    torch.manual_seed(0)
    model = make()
    q = diffq_triton.DiffQuantizer(model, group_size=16, max_bits=8, init_bits=4)
    _spread(q)
    buf = io.BytesIO()
    diffq_triton.save_quantized(q, buf)
    data = buf.getvalue()
    q.detach()
    float_model = make()
    diffq_triton.load_quantized(float_model, data)
    with torch.device("meta"):
        packed = make()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        diffq_triton.load_quantized(packed, data, packed=True)
    float_model.eval(), packed.eval()
    float_ms, packed_ms = _time(float_model, x) * 1e3, _time(packed, x) * 1e3
    with torch.inference_mode():
        assert torch.equal(float_model(x), packed(x))
    return {
        "model": name, "input": batch, "file MB": len(data) / 2**20,
        "float MB": diffq_triton.resident_bytes(float_model) / 2**20,
        "packed MB": diffq_triton.resident_bytes(packed) / 2**20,
        "packed / file": diffq_triton.resident_bytes(packed) / len(data),
        "float ms": float_ms, "packed ms": packed_ms, "packed / float": packed_ms / float_ms,
    }


def test_packed_memory_and_latency():
    rows = [
        _row("demo LM (CharTransformer)", _lm, torch.randint(0, VOCAB_SIZE, (8, 64)),
             "8 x 64 tokens"),
        _row("MLP 2048-4096-2048-4096 (25.2M weights)", _mlp, torch.randn(1, 2048), "batch 1"),
        _row("MLP 2048-4096-2048-4096 (25.2M weights)", _mlp, torch.randn(64, 2048),
             "batch 64"),
    ]
    record("packed inference, memory and latency", rows,
           "DiffQ, group size 16, widths 2-8 bits spread around 4. Resident MB: parameters "
           "and buffers. Latency: median of 7 rounds of 3 inference-mode forwards; the packed "
           "model decodes every weight on each forward (CPU path, native codec) and outputs "
           "the float-loaded model's values bit for bit.")
    for row in rows:
        assert row["packed MB"] <= 1.1 * row["file MB"] + 64 / 1024
