"""make test (and CI) require Triton: without it the run fails instead of skipping every
kernel file."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Runs pytest with the import of triton failing, as on a machine where it is missing.
WITHOUT_TRITON = textwrap.dedent(
    """
    import builtins, sys
    real = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton" or name.startswith("triton."):
            raise ImportError("triton is not installed (simulated)")
        return real(name, *args, **kwargs)

    builtins.__import__ = no_triton
    import pytest
    sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", "tests/test_reference.py"]))
    """
)


def _run(require: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, DIFFQ_TRITON_REQUIRE_TRITON=require)
    return subprocess.run([sys.executable, "-c", WITHOUT_TRITON], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


def test_missing_triton_fails_the_run_when_required():
    result = _run("1")
    assert result.returncode == 4, result.stdout[-2000:]  # pytest's usage error
    assert "Triton is required" in result.stdout + result.stderr


def test_missing_triton_is_allowed_otherwise():
    assert _run("0").returncode == 0
