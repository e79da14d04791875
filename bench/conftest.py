"""Benchmark session set-up: collect ``bench_*.py``, quiet Triton, pick the device."""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import pytest

# Before anything imports triton: silence its fp-fusion warning and keep compile caches out
# of the home directory.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
_CACHE = Path(tempfile.gettempdir()) / f"diffq-triton-bench-{os.getuid()}"
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(_CACHE / "inductor"))
os.environ.setdefault("TRITON_CACHE_DIR", str(_CACHE / "triton"))

# Benchmarks import their helpers (``results``) by module name.
sys.path.insert(0, str(Path(__file__).resolve().parent))


def pytest_collect_file(file_path: Path, parent: pytest.Collector):
    """Collect ``bench_*.py`` as test modules (pytest's default only takes ``test_*.py``)."""
    # Files named on the command line are already collected by pytest itself.
    if parent.session.isinitpath(file_path):
        return None
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_configure(config: pytest.Config) -> None:
    # BENCH_THREADS=1 gives steadier timings on a machine shared with other work.
    threads = os.environ.get("BENCH_THREADS")
    if threads:
        import torch

        torch.set_num_threads(int(threads))


@pytest.fixture(scope="session")
def device() -> str:
    """``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
