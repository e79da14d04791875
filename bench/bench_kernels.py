"""Throughput of the DiffQ ops against a device copy: GB/s of the bytes each must move.

On a GPU the Triton kernels run; on a CPU the eager path (the interpreter is not timed).
Bytes per entry (float32): noise forward 12 (range read, read, write), noise backward 8
(read ∂L/∂ŵ, write ∂L/∂w), eval quantize 12 (range read, read, write); the ceiling is
``clone()`` (read + write, 8 bytes per entry). Rows go to bench/RESULTS.md.

Packed weights (CUDA only, the kernels of ``kernels/packed.py``): the dequantize kernel
moves ``b̄/8`` bytes of levels + ``(f + 0.5)/(8·g)`` of metadata read and 2 bytes (float16)
written per weight, against the same copy; the GEMV at one row against ``F.linear`` on the
float16 weight (2 bytes per weight), as the modeled speed-up ``16 / (b̄ + 0.5)``.

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


def _packed_weight(n_out: int, n_in: int, g: int, low: int, high: int, device: str):
    """A float16 packed weight ``[n_out, n_in]`` of widths drawn in ``[low, high]``."""
    from diffq_triton.packed import PackedTensor
    from diffq_triton.serialization.tensor_record import quantize_minmax

    w = torch.randn(n_out, n_in, device=device)
    bits = torch.randint(low, high + 1, (reference.num_groups(w.numel(), g),), device=device,
                         dtype=torch.uint8)
    qt = quantize_minmax("w", w, bits, g)
    return PackedTensor.from_record(qt, dtype=torch.float16, device=device), bits


def test_packed_kernels_throughput(device):
    if device != "cuda":
        pytest.skip("the packed kernels run on CUDA; the CPU decode is in bench_packed.py")
    import torch.nn.functional as F
    from diffq_triton.kernels import packed as packed_k

    n_out, n_in = 4096, 4096
    n = n_out * n_in
    src = torch.randn(n, device=device, dtype=torch.float16)
    copy_s = _time(lambda: src.clone(), device)
    copy_gbs = 4 * n / copy_s / 1e9  # float16: 2 bytes read + 2 written per entry
    x = torch.randn(1, n_in, device=device, dtype=torch.float16)
    rows = [{"op": "copy fp16 (ceiling)", "g": "-", "bits": 16, "ms": round(copy_s * 1e3, 4),
             "GB/s": round(copy_gbs, 1), "of copy": 1.0, "vs fp16 linear": "-"}]
    for g, low, high in ((8, 4, 4), (8, 1, 15), (64, 2, 6), (256, 3, 3)):
        pt, bits = _packed_weight(n_out, n_in, g, low, high, device)
        mean_bits = float(bits.float().mean())
        meta = (pt.field_bits + 0.5) / (8 * g)
        deq_s = _time(lambda pt=pt: packed_k.dequantize(pt), device)
        gbs = (mean_bits / 8 + meta + 2) * n / deq_s / 1e9
        rows.append({"op": "packed dequantize", "g": g, "bits": round(mean_bits, 2),
                     "ms": round(deq_s * 1e3, 4), "GB/s": round(gbs, 1),
                     "of copy": round(gbs / copy_gbs, 3), "vs fp16 linear": "-"})
        w16 = packed_k.dequantize(pt).view(n_out, n_in)
        lin_s = _time(lambda w16=w16: F.linear(x, w16), device)
        mv_s = _time(lambda pt=pt: packed_k.gemv(x, pt), device)
        gbs = (mean_bits / 8 + meta) * n / mv_s / 1e9
        rows.append({"op": "packed GEMV M=1", "g": g, "bits": round(mean_bits, 2),
                     "ms": round(mv_s * 1e3, 4), "GB/s": round(gbs, 1),
                     "of copy": round(gbs / copy_gbs, 3),
                     "vs fp16 linear": round(lin_s / mv_s, 2)})
    record(
        "Packed kernels against a device copy",
        rows,
        note=("4096×4096 float16 weight; GB/s counts the bytes each must move per weight: "
              "dequantize b̄/8 + (f + 0.5)/(8·g) read and 2 written, GEMV the same without "
              "the write; 'vs fp16 linear' is F.linear's time on the float16 weight over the "
              "GEMV's (modeled: 16 / (b̄ + 0.5))."),
    )
