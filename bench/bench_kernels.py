"""Throughput of the DiffQ ops against a device copy: GB/s of the bytes each must move.

On a GPU the Triton kernels run; on a CPU the eager path (the interpreter is not timed).
Bytes per entry (float32): noise forward 12 (range read, read, write), noise backward 8
(read ∂L/∂ŵ, write ∂L/∂w), eval quantize 12 (range read, read, write); the ceiling is
``clone()`` (read + write, 8 bytes per entry). Rows go to bench/RESULTS.md.

Packed weights (CUDA only, the kernels of ``kernels/packed.py``; :func:`packed_rows`): the
dequantize kernel moves ``b̄/8`` bytes of levels + ``(f + 0.5)/(8·g)`` of metadata read and 2
bytes (float16) written per weight, against a float16 copy; the GEMV at one row, the GEMM at
64 and 1024 rows against ``F.linear`` on the float16 weight (2 bytes per weight), and the
embedding gather against ``F.embedding``, with the modelled bytes per weight and speed-up
of :mod:`diffq_triton.packed.traffic` (``16 / (b̄ + 0.5)`` for the GEMV) next to the
measured one. The GEMM and the gather rows appear when ``kernels.packed`` has them.

Run with ``pytest bench/bench_kernels.py``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from results import record

from diffq_triton.ops import custom_ops, reference
from diffq_triton.ops.dispatch import choose_backend
from diffq_triton.packed import traffic

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


# (group size, lowest width, highest width) of the packed weights; GEMM rows; looked-up ids.
PACKED_CONFIGS = ((8, 4, 4), (8, 1, 15), (64, 2, 6), (256, 3, 3))
GEMM_ROWS = (64, 1024)
EMBEDDING_IDS = 2048


def _gemm_block_m(packed_k) -> int | None:
    """The GEMM's BLOCK_M, for the model: the launcher's constant, or the autotuner's pick
    after a run; None when neither says."""
    block = getattr(packed_k, "GEMM_BLOCK_M", None)
    if isinstance(block, int):
        return block
    from diffq_triton.kernels import packed_matmul

    kernel = getattr(packed_matmul, "packed_gemm_kernel", None)
    best = getattr(kernel, "best_config", None)
    value = getattr(best, "kwargs", {}).get("BM")
    return value if isinstance(value, int) else None


def packed_rows(device: str, n_out: int = 4096, n_in: int = 4096,
                configs: tuple = PACKED_CONFIGS, gemm_rows: tuple = GEMM_ROWS,
                n_ids: int = EMBEDDING_IDS, time_fn: Callable = _time) -> list[dict]:
    """Rows of the packed kernels on ``[n_out, n_in]`` float16 weights, each against its
    float16 baseline: the dequantize against a copy, the GEMV (1 row) and the GEMM
    (``gemm_rows``, when ``kernels.packed`` has it) against ``F.linear``, the gather of
    ``n_ids`` rows (when it has ``embedding``) against ``F.embedding`` on the same weight as
    ``[vocab, dim]``. ``B/w model`` and ``model x`` are :mod:`diffq_triton.packed.traffic`'s
    bytes per weight and speed-up (baseline bytes / packed bytes); ``vs fp16`` the measured
    one (baseline time / packed time); GB/s counts the modelled bytes."""
    from diffq_triton.kernels import packed as packed_k

    f16 = torch.float16
    n = n_out * n_in
    src = torch.randn(n, device=device, dtype=f16)
    copy_s = time_fn(lambda: src.clone(), device)
    copy_gbs = traffic.dense_copy(n, f16).total / copy_s / 1e9
    rows = [{"op": "copy fp16 (ceiling)", "g": "-", "bits": 16, "ms": round(copy_s * 1e3, 4),
             "GB/s": round(copy_gbs, 1), "of copy": 1.0, "B/w model": 4.0, "model x": "-",
             "vs fp16": "-"}]

    def add(op: str, g: int, lay, s: float, model, base_s: float, base) -> None:
        gbs = model.total / s / 1e9
        rows.append({"op": op, "g": g, "bits": round(lay.mean_bits, 2),
                     "ms": round(s * 1e3, 4), "GB/s": round(gbs, 1),
                     "of copy": round(gbs / copy_gbs, 3),
                     "B/w model": round(model.per_weight, 4),
                     "model x": round(traffic.speedup(model, base), 2),
                     "vs fp16": round(base_s / s, 2)})

    x1 = torch.randn(1, n_in, device=device, dtype=f16)
    for g, low, high in configs:
        pt, _ = _packed_weight(n_out, n_in, g, low, high, device)
        lay = traffic.layout_of(pt)
        deq_s = time_fn(lambda pt=pt: packed_k.dequantize(pt), device)
        add("packed dequantize", g, lay, deq_s, traffic.dequantize(lay, f16), copy_s,
            traffic.dense_copy(n, f16))
        w16 = packed_k.dequantize(pt).view(n_out, n_in)
        lin_s = time_fn(lambda w16=w16: F.linear(x1, w16), device)
        mv_s = time_fn(lambda pt=pt: packed_k.gemv(x1, pt), device)
        add("packed GEMV M=1", g, lay, mv_s, traffic.gemv(lay, 1, f16), lin_s,
            traffic.dense_linear(n_out, n_in, 1))
        if hasattr(packed_k, "gemm"):
            for m in gemm_rows:
                x = torch.randn(m, n_in, device=device, dtype=f16)
                lin_s = time_fn(lambda w16=w16, x=x: F.linear(x, w16), device)
                mm_s = time_fn(lambda pt=pt, x=x: packed_k.gemm(x, pt), device)
                block_m = _gemm_block_m(packed_k)
                add(f"packed GEMM M={m}", g, lay, mm_s,
                    traffic.gemm(lay, m, block_m or 64, None, f16), lin_s,
                    traffic.dense_linear(n_out, n_in, m))
                if block_m is None:
                    rows[-1]["op"] += " (BLOCK_M 64 assumed)"
        if hasattr(packed_k, "embedding"):
            ids = torch.randint(0, n_out, (n_ids,), device=device)
            emb_s = time_fn(lambda w16=w16, ids=ids: F.embedding(ids, w16), device)
            gather_s = time_fn(lambda pt=pt, ids=ids: packed_k.embedding(ids, pt), device)
            add(f"packed embedding {n_ids} ids", g, lay, gather_s,
                traffic.embedding(lay, n_ids, f16), emb_s,
                traffic.dense_embedding(n_ids, n_in, f16))
    return rows


def test_packed_kernels_throughput(device):
    if device != "cuda":
        pytest.skip("the packed kernels run on CUDA; the CPU decode is in bench_packed.py "
                    "(tests/test_gpu_check.py runs packed_rows on a tiny weight, interpreted)")
    record(
        "Packed kernels against float16",
        packed_rows(device),
        note=("4096×4096 float16 weight (as [vocab, dim] for the gather). 'B/w model': bytes "
              "per weight each call must move (diffq_triton.packed.traffic): dequantize "
              "b̄/8 + (f + 0.5)/(8·g) read and 2 written; GEMV the same without the write "
              "(x and y once); GEMM the weight once per BLOCK_M rows; gather per looked-up "
              "entry. GB/s counts those bytes. 'model x': float16 bytes over packed bytes "
              "(GEMV: about 16 / (b̄ + 0.5)), against a copy, F.linear or F.embedding on the "
              "float16 weight; 'vs fp16': the measured time ratio. At M = 1024 the matmuls "
              "are compute-bound: the model does not apply there."),
    )
