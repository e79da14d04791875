"""make gpu-check's driver (bench/gpu_check.py) and its GPT step benchmark, without a GPU."""

from __future__ import annotations

import importlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch

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
