"""``make gpu-check``: everything that needs a GPU, in one run of a few minutes.

Stages, each timed, each failing the run loudly (exit status 1) when its own checks fail:

1. the kernel tests on CUDA with their own assertions (``DIFFQ_TRITON_TEST_DEVICE=cuda``,
   Triton compiled, not interpreted);
2. the GPT-2-small-sized training step, plain / ours / diffq 0.2.4 when installed, fp32,
   bf16 and compiled, step time and peak memory (``bench/bench_gpt_step.py``);
3. op throughput against a device copy, and the packed kernels (dequantize, GEMV, GEMM,
   embedding gather) against float16 with their modelled bytes per weight and speed-up
   (``bench/bench_kernels.py``);
4. the quantizer's host time per step (``bench/bench_host.py``);
5. FSDP2 against DDP on one GPU, quantized and plain (``bench/bench_fsdp.py``);
6. the demo on CUDA (a short run: train, compress, save, reload, report).

Rows go to ``bench/RESULTS.md``. Without a CUDA GPU it says so and exits with status 2.

Usage: ``python bench/gpu_check.py [--only STAGE ...]`` (what ``make gpu-check`` runs).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNEL_TESTS = [
    "tests/test_kernels_noise.py",
    "tests/test_kernels_noise_many.py",
    "tests/test_kernels_quantize.py",
    "tests/test_kernels_range.py",
    "tests/test_kernels_size_many.py",
    "tests/test_kernels_packed.py",
    "tests/test_bitpack_kernels.py",
    "tests/test_launches.py",
    "tests/test_custom_ops.py",
    "tests/test_quantizer_many.py",
]
# Seconds each stage may take: the whole check stays under 10 minutes with set-up. `ops`
# compiles the packed kernels too (the GEMM's autotune configs, at two row counts).
LIMITS = {"kernels": 200, "step": 240, "ops": 120, "host": 30, "fsdp": 60, "demo": 90}


def _pytest(paths: list[str], extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "pytest", *paths, "-q", "-p", "no:cacheprovider", *extra]


def _stages() -> dict[str, list[str]]:
    parallel = []
    try:
        import xdist  # noqa: F401

        # Kernel variants compile on the CPU: several processes build them at once.
        parallel = ["-n", str(min(8, os.cpu_count() or 1))]
    except ImportError:
        pass
    bench = ["-m", "", "--benchmark-disable-gc"]
    return {
        "kernels": _pytest(KERNEL_TESTS, ["-x", *parallel]),
        "step": _pytest(["bench/bench_gpt_step.py"], bench),
        "ops": _pytest(["bench/bench_kernels.py"], bench),
        "host": _pytest(["bench/bench_host.py"], bench),
        "fsdp": _pytest(["bench/bench_fsdp.py"], bench),
        "demo": [sys.executable, "-m", "diffq_triton", "demo", "--device", "cuda",
                 "--steps", "150", "--out", str(ROOT / "diffq_demo_out" / "gpu-check")],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=sorted(LIMITS), default=list(LIMITS),
                        help="stages to run (default: all, in order)")
    args = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu-check: no CUDA GPU is visible (torch.cuda.is_available() is False); "
              "these checks need one. The CPU test suite is `make test`.", file=sys.stderr)
        return 2
    print(f"gpu-check on {torch.cuda.get_device_name()}, torch {torch.__version__}", flush=True)
    env = dict(os.environ, DIFFQ_TRITON_TEST_DEVICE="cuda", TRITON_INTERPRET="0",
               PYTHONUNBUFFERED="1", DIFFQ_TRITON_BENCH_FSDP_DEVICE="cuda")
    env.pop("DIFFQ_TRITON_BACKEND", None)  # the benchmarks and the demo pick Triton on CUDA
    results = []
    for name, command in _stages().items():
        if name not in args.only:
            continue
        print(f"\n== {name}: {' '.join(command)}", flush=True)
        start = time.perf_counter()
        try:
            code = subprocess.run(command, cwd=ROOT, env=env, timeout=LIMITS[name]).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
        results.append((name, code, time.perf_counter() - start))
    print("\n== gpu-check summary")
    for name, code, seconds in results:
        print(f"{name:8s} {'ok' if code == 0 else f'FAILED ({code})':14s} {seconds:6.1f} s")
    failed = [name for name, code, _ in results if code != 0]
    if failed:
        print(f"gpu-check FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    print("gpu-check passed; rows written to bench/RESULTS.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
