"""Throughput of the DiffQ ops against a device copy: GB/s of the bytes each must move.

On a GPU the Triton kernels run; on a CPU the eager path (the interpreter is not timed).
Bytes per entry (float32): noise forward 12 (range read, read, write), noise backward 8
(read ∂L/∂ŵ, write ∂L/∂w), eval quantize 12 (range read, read, write); the ceiling is
``clone()`` (read + write, 8 bytes per entry). Rows go to bench/RESULTS.md.

Run with ``pytest bench/bench_kernels.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
from results import record

from diffq_triton.ops import custom_ops, reference
from diffq_triton.ops.dispatch import choose_backend

SIZES = (1 << 20, 1 << 24)
GROUPS = (0, 1, 8, 64)
BYTES = {"noise fwd": 12, "noise bwd": 8, "eval quantize": 12, "copy (ceiling)": 8}


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn: Callable[[], object], device: str, target_s: float = 0.5) -> float:
    """Median seconds of ``fn`` over enough rounds to last about ``target_s``."""
    fn()
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    once = max(time.perf_counter() - start, 1e-6)
    rounds = int(min(max(target_s / once, 5), 200))
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ops(w, logits, bits, grad, seed, stats, xi, g, backend) -> dict[str, Callable]:
    args = (g, 2.0, 15.0, "bits", "gaussian", backend)
    return {
        "noise fwd": lambda: custom_ops.pseudo_quantize(w, logits, seed, *args),
        "noise bwd": lambda: custom_ops.pseudo_quantize_backward(grad, logits, seed, stats,
                                                                 xi, *args),
        "eval quantize": lambda: custom_ops.fake_quantize(w, bits, g, backend),
    }


def _many_ops(n: int, device: str) -> dict[str, Callable]:
    """The multi-tensor kernels of a training step over 64 tensors of ``n / 64`` entries
    (group 8): what one launch per kernel covers in a model."""
    from diffq_triton.kernels import noise_many, quantize

    weights = [torch.randn(n // 64, device=device) for _ in range(64)]
    logits = [torch.zeros(reference.num_groups(w.numel(), 8), device=device) for w in weights]
    bits = [torch.full_like(lg, 4, dtype=torch.uint8) for lg in logits]
    outputs = [torch.empty_like(w) for w in weights]
    grads = [torch.randn_like(w) for w in weights]
    seed = torch.tensor([1], device=device)
    args = (8, 2.0, 15.0, "bits", "gaussian")
    stats = noise_many.noise_forward_many(weights, logits, outputs, seed, *args)
    table = noise_many.table_for(weights, logits, 8, noise_many.BLOCKS)
    grad_w = [torch.empty_like(w) for w in weights]
    grad_l = [torch.empty_like(lg) for lg in logits]
    return {
        "noise fwd": lambda: noise_many.noise_forward_many(weights, logits, outputs, seed, *args),
        "noise bwd": lambda: noise_many.noise_backward_many(
            table, grads, grad_w, grad_l, torch.float32, seed, stats, 2.0, 15.0, "bits",
            "gaussian"),
        "eval quantize": lambda: quantize.fake_quantize_many(weights, bits, outputs, 8),
    }


def test_op_throughput(device):
    rows = []
    for n in SIZES:
        if device == "cpu" and n > SIZES[0]:
            continue  # large sizes only on a GPU
        w = torch.randn(n, device=device)
        backend = choose_backend(w)
        if device == "cpu" and backend == "triton":
            pytest.skip("the interpreter is not benchmarked")
        rows += _rows_for(w, n, device, backend)
    record(
        "Op throughput against a device copy",
        rows,
        note=("Median time per call; GB/s counts the bytes each op must move per float32 "
              "entry (noise fwd 12, noise bwd 8, eval 12, copy 8); 'of copy' is the "
              "fraction of the copy's bandwidth. 'many' rows: the multi-tensor kernels of "
              "the training step over 64 tensors holding n entries in all (group 8)."),
    )


def _rows_for(w: torch.Tensor, n: int, device: str, backend: str) -> list[dict]:
    seed = torch.tensor([1], device=device)
    copy_s = _time(lambda: w.clone(), device)
    copy_gbs = 8 * n / copy_s / 1e9
    rows = [{"op": "copy (ceiling)", "n": n, "g": "-", "backend": "torch",
             "ms": round(copy_s * 1e3, 4), "GB/s": round(copy_gbs, 1), "of copy": 1.0}]

    def add(name: str, g: object, label: str, fn: Callable) -> None:
        s = _time(fn, device)
        gbs = BYTES[name] * n / s / 1e9
        rows.append({"op": name, "n": n, "g": g, "backend": label, "ms": round(s * 1e3, 4),
                     "GB/s": round(gbs, 1), "of copy": round(gbs / copy_gbs, 3)})

    for g in GROUPS:
        logits = torch.zeros(reference.num_groups(n, g), device=device)
        bits = torch.full_like(logits, 4, dtype=torch.uint8)
        grad = torch.randn_like(w)
        _, stats, xi = custom_ops.pseudo_quantize(w, logits, seed, g, 2.0, 15.0, "bits",
                                                  "gaussian", backend)
        for name, fn in _ops(w, logits, bits, grad, seed, stats, xi, g, backend).items():
            add(name, g, backend, fn)
    if backend == "triton":
        for name, fn in _many_ops(n, device).items():
            add(name, 8, "triton many (64 tensors)", fn)
    return rows
