"""Test-wide set-up: the Triton interpreter on, before anything imports triton.

``TRITON_INTERPRET=1`` must be set before ``import triton`` (``import torch._dynamo`` imports
it too), so it is set here, at conftest import. The backend used by tests that do not ask
for one is ``eager`` (the interpreter costs ~1.4 ms per program instance; quantizer tests
would crawl): kernel tests force Triton with ``use_backend("triton")``. Run the whole suite
on the kernels with ``DIFFQ_TRITON_BACKEND=auto pytest``.
"""

from __future__ import annotations

import os
import tempfile

os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("DIFFQ_TRITON_BACKEND", "eager")
_CACHE = os.path.join(tempfile.gettempdir(), f"diffq_triton_tests_{os.getuid()}")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_CACHE, "triton"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

# Integer buffers are filled with this, float buffers with NaN: a kernel that forgets to
# write an entry leaves a value no correct result has.
POISON_INT = -0x5A5A


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` in place with NaN (floating) or :data:`POISON_INT` (integer); returns it."""
    if t.is_floating_point():
        t.fill_(float("nan"))
    elif t.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        t.fill_(POISON_INT)
    elif t.dtype == torch.uint8:
        t.fill_(0xA5)
    return t


@contextmanager
def poisoned_empty() -> Iterator[None]:
    """Inside the block, ``torch.empty`` and ``torch.empty_like`` return poisoned tensors."""
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(*args, **kwargs):
        return poison(empty(*args, **kwargs))

    def poisoned_like(*args, **kwargs):
        return poison(empty_like(*args, **kwargs))

    torch.empty, torch.empty_like = poisoned, poisoned_like
    try:
        yield
    finally:
        torch.empty, torch.empty_like = empty, empty_like


@pytest.fixture
def poisoned():
    """Fixture form of :func:`poisoned_empty` for a whole test."""
    with poisoned_empty():
        yield


@pytest.fixture
def triton_backend():
    """Run the test with the Triton kernels (under the interpreter on a CPU machine)."""
    pytest.importorskip("triton")
    from diffq_triton.dispatch import use_backend

    with use_backend("triton"):
        yield


@pytest.fixture
def eager_backend():
    """Run the test with the eager path."""
    from diffq_triton.dispatch import use_backend

    with use_backend("eager"):
        yield
