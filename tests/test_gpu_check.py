"""make gpu-check's driver (bench/gpu_check.py) and its GPT step benchmark, without a GPU."""

from __future__ import annotations

import importlib
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from diffq_triton.packed import traffic

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench_modules(monkeypatch):
    # The benchmarks import their helpers (gpt, results) by module name, as bench/conftest.py
    # arranges for pytest runs of bench/.
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    return importlib.import_module


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_without_a_gpu_it_says_so_and_fails():
    result = subprocess.run([sys.executable, "bench/gpu_check.py"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "no CUDA GPU" in result.stderr


def test_every_kernel_test_runs_on_the_gpu(bench_modules):
    gpu_check = bench_modules("gpu_check")
    kernel_tests = {f"tests/{p.name}" for p in (ROOT / "tests").glob("test_kernels_*.py")}
    assert kernel_tests <= set(gpu_check.KERNEL_TESTS)
    assert all((ROOT / path).exists() for path in gpu_check.KERNEL_TESTS)


def test_gpt_step_benchmark_runs_its_checks_on_a_tiny_model(bench_modules):
    step = bench_modules("bench_gpt_step")
    gpt = bench_modules("gpt")
    tiny = gpt.GPTConfig(layers=2, width=64, heads=4, context=32, vocab=300)
    rows = step.measure(tiny, "cpu", modes=("fp32 eager",), rounds=2, batch=2)
    impls = [row["impl"] for row in rows]
    assert impls[:2] == ["plain", "ours"]
    assert all(row["ms"] > 0 and row["step"] == "fp32 eager" for row in rows)
    assert rows[0]["vs plain"] == 1.0


def _once(fn, device):
    """One timed call (the benchmark's median of many is for real runs)."""
    start = time.perf_counter()
    fn()
    return max(time.perf_counter() - start, 1e-6)


def test_packed_kernel_rows_on_a_tiny_weight(bench_modules, monkeypatch):
    # The packed rows of make gpu-check's `ops` stage, on a 16×64 weight: the kernels run
    # under the interpreter; the GEMM and the gather, absent from kernels/packed.py until
    # they land, are stood in for by dequantize + F.linear / F.embedding.
    packed_k = pytest.importorskip("diffq_triton.kernels.packed")
    bench = bench_modules("bench_kernels")
    if not hasattr(packed_k, "gemm"):
        monkeypatch.setattr(packed_k, "gemm", lambda x, pt, bias=None: F.linear(
            x, packed_k.dequantize(pt).view(pt.shape), bias), raising=False)
        monkeypatch.setattr(packed_k, "GEMM_BLOCK_M", 32, raising=False)
    if not hasattr(packed_k, "embedding"):
        monkeypatch.setattr(packed_k, "embedding", lambda ids, pt: F.embedding(
            ids, packed_k.dequantize(pt).view(pt.shape)), raising=False)
    rows = bench.packed_rows("cpu", 16, 64, configs=((8, 4, 4),), gemm_rows=(64,), n_ids=8,
                             time_fn=_once)
    ops = [r["op"] for r in rows]
    assert ops[:3] == ["copy fp16 (ceiling)", "packed dequantize", "packed GEMV M=1"]
    assert ops[3].startswith("packed GEMM M=64") and ops[4] == "packed embedding 8 ids"
    assert all(r["ms"] > 0 for r in rows)
    by_op = {r["op"]: r for r in rows}
    lay = traffic.Layout((16, 64), 8, 0, 4.0)
    gemv = by_op["packed GEMV M=1"]
    assert gemv["bits"] == 4.0
    assert gemv["B/w model"] == round(traffic.gemv(lay).per_weight, 4)
    assert gemv["model x"] == round(traffic.speedup(traffic.gemv(lay),
                                                    traffic.dense_linear(16, 64, 1)), 2)
    assert by_op["packed dequantize"]["B/w model"] == round(traffic.dequantize(lay).per_weight, 4)
    block_m = packed_k.GEMM_BLOCK_M if isinstance(getattr(packed_k, "GEMM_BLOCK_M", None),
                                                  int) else None
    if block_m is not None:
        assert rows[3]["B/w model"] == round(traffic.gemm(lay, 64, block_m).per_weight, 4)
    assert by_op["packed embedding 8 ids"]["model x"] == round(traffic.speedup(
        traffic.embedding(lay, 8), traffic.dense_embedding(8, 64)), 2)
