"""The backend choice: device, environment, context manager; Triton-free import."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from diffq_triton.ops import dispatch
from diffq_triton.ops.dispatch import choose_backend, use_backend

CPU = torch.zeros(3)


def test_cpu_goes_to_triton_only_when_interpreting(monkeypatch):
    monkeypatch.setenv("DIFFQ_TRITON_BACKEND", "auto")
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert choose_backend(CPU) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert choose_backend(CPU) == "eager"
    monkeypatch.delenv("TRITON_INTERPRET")
    assert choose_backend(CPU) == "eager"


def test_cuda_goes_to_triton(monkeypatch):
    monkeypatch.setenv("DIFFQ_TRITON_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    # Only .device and .dtype are read: a stand-in for a CUDA tensor on a CPU machine.
    cuda_tensor = SimpleNamespace(device=torch.device("cuda"), dtype=torch.bfloat16)
    assert choose_backend(cuda_tensor) == "triton"
    with use_backend("eager"):
        assert choose_backend(cuda_tensor) == "eager"


def test_float64_runs_eager(monkeypatch):
    monkeypatch.setenv("DIFFQ_TRITON_BACKEND", "auto")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    assert choose_backend(CPU.double()) == "eager"


def test_environment_variable(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DIFFQ_TRITON_BACKEND", "eager")
    assert choose_backend(CPU) == "eager"
    monkeypatch.setenv("DIFFQ_TRITON_BACKEND", " Triton ")
    assert choose_backend(CPU) == "triton"
    monkeypatch.setenv("DIFFQ_TRITON_BACKEND", "cuda")
    with pytest.raises(ValueError, match="DIFFQ_TRITON_BACKEND"):
        choose_backend(CPU)


def test_context_manager_wins_and_nests(monkeypatch):
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("DIFFQ_TRITON_BACKEND", "triton")
    with use_backend("eager"):
        assert choose_backend(CPU) == "eager"
        with use_backend("auto"):
            assert choose_backend(CPU) == "triton"
        assert choose_backend(CPU) == "eager"
    assert choose_backend(CPU) == "triton"
    with pytest.raises(ValueError, match="name"):
        with use_backend("gpu"):
            pass


def test_forcing_triton_where_it_cannot_run_raises(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(dispatch, "HAS_TRITON", True)
    with use_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        choose_backend(CPU)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "HAS_TRITON", False)
    with use_backend("triton"), pytest.raises(RuntimeError, match="not installed"):
        choose_backend(CPU)
    with use_backend("auto"):
        assert choose_backend(CPU) == "eager"


def test_choice_is_logged_once_at_debug(monkeypatch, caplog):
    monkeypatch.setattr(dispatch, "_logged", set())
    monkeypatch.setenv("DIFFQ_TRITON_BACKEND", "eager")
    with caplog.at_level(logging.DEBUG, logger="diffq_triton.ops.dispatch"):
        for _ in range(3):
            choose_backend(CPU)
    records = [r for r in caplog.records if r.name == "diffq_triton.ops.dispatch"]
    assert len(records) == 1 and records[0].levelno == logging.DEBUG


def test_library_imports_and_trains_without_triton():
    script = textwrap.dedent("""
        import sys
        sys.modules["triton"] = None  # import triton now raises ImportError
        import torch
        from torch import nn
        import diffq_triton
        from diffq_triton.ops import dispatch
        assert not dispatch.HAS_TRITON
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4))
        opt = torch.optim.Adam(model.parameters())
        q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
        q.setup_optimizer(opt)
        (model(torch.randn(2, 32)).sum() + q.model_size()).backward()
        opt.step()
        model.eval()
        model(torch.randn(2, 32))
        print("NO-TRITON-OK")
    """)
    env = {k: v for k, v in os.environ.items() if k != "DIFFQ_TRITON_BACKEND"}
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "NO-TRITON-OK" in res.stdout
