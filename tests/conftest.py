"""Test-wide set-up: the Triton interpreter on, before anything imports triton.

Kernel tests make their tensors on :data:`DEVICE` (``DIFFQ_TRITON_TEST_DEVICE``, the CPU by
default): ``make gpu-check`` runs them on a GPU with their own assertions.

``TRITON_INTERPRET=1`` must be set before ``import triton`` (``import torch._dynamo`` imports
it too), so it is set here, at conftest import. The backend used by tests that do not ask
for one is ``eager`` (the interpreter costs ~1.4 ms per program instance; quantizer tests
would crawl): kernel tests force Triton with ``use_backend("triton")``. Run the whole suite
on the kernels with ``DIFFQ_TRITON_BACKEND=auto pytest``.
"""

from __future__ import annotations

import os
import tempfile

# The device the kernel tests run on: the CPU under Triton's interpreter by default, a GPU
# with DIFFQ_TRITON_TEST_DEVICE=cuda (make gpu-check), where the kernels run compiled.
TEST_DEVICE = os.environ.get("DIFFQ_TRITON_TEST_DEVICE", "cpu")
os.environ.setdefault("TRITON_INTERPRET", "0" if TEST_DEVICE.startswith("cuda") else "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ.setdefault("DIFFQ_TRITON_BACKEND", "eager")
_CACHE = os.path.join(tempfile.gettempdir(), f"diffq_triton_tests_{os.getuid()}")
os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(_CACHE, "triton"))
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(_CACHE, "inductor"))
# The native codec compiles into its cache dir: keep test builds out of the home directory.
os.environ.setdefault("DIFFQ_TRITON_CACHE_DIR", os.path.join(_CACHE, "native"))

from collections.abc import Iterator  # noqa: E402
from contextlib import contextmanager  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

DEVICE = torch.device(TEST_DEVICE)


def pytest_configure(config: pytest.Config) -> None:
    """With ``DIFFQ_TRITON_REQUIRE_TRITON=1`` (``make test``, hence CI, which installs Triton),
    a missing or broken Triton fails the run at once instead of skipping every kernel file
    through ``pytest.importorskip("triton")``."""
    if os.environ.get("DIFFQ_TRITON_REQUIRE_TRITON") != "1":
        return
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        raise pytest.UsageError(
            f"Triton is required for this run (DIFFQ_TRITON_REQUIRE_TRITON=1): {exc}") from exc

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
    """Inside the block, ``torch.empty``, ``torch.empty_like`` and ``numpy.empty`` return
    poisoned buffers (host code may allocate its outputs with numpy and wrap them)."""
    empty, empty_like, np_empty = torch.empty, torch.empty_like, np.empty

    def poisoned(*args, **kwargs):
        return poison(empty(*args, **kwargs))

    def poisoned_like(*args, **kwargs):
        return poison(empty_like(*args, **kwargs))

    def poisoned_np(*args, **kwargs):
        array = np_empty(*args, **kwargs)
        if array.dtype.kind in "fc":
            array.fill(np.nan)
        elif array.dtype.kind == "i" and array.itemsize > 1:
            array.fill(POISON_INT)
        elif array.dtype.kind in "iu":
            array.view(np.uint8).fill(0xA5)
        return array

    torch.empty, torch.empty_like, np.empty = poisoned, poisoned_like, poisoned_np
    try:
        yield
    finally:
        torch.empty, torch.empty_like, np.empty = empty, empty_like, np_empty


@pytest.fixture(params=["native", "torch"])
def cpu_codec(request, monkeypatch):
    """Run the test on the native C codec, then on the torch path (``DIFFQ_TRITON_NATIVE``).

    Both must give the same bytes and values; the torch path is also what users without a C
    compiler get, so it stays tested on machines where native works.
    """
    from diffq_triton.codec import native

    monkeypatch.setenv("DIFFQ_TRITON_NATIVE", "1" if request.param == "native" else "0")
    if request.param == "native" and native.library() is None:
        pytest.skip(f"native CPU codec unavailable: {native.unavailable_reason()}")
    return request.param


@pytest.fixture
def native_lib(monkeypatch):
    """The compiled native CPU codec (enabled whatever the caller's environment says)."""
    from diffq_triton.codec import native

    monkeypatch.setenv("DIFFQ_TRITON_NATIVE", "1")
    loaded = native.library()
    if loaded is None:
        pytest.skip(f"native CPU codec unavailable: {native.unavailable_reason()}")
    return loaded


def _has_c_compiler() -> bool:
    import shutil

    return any(shutil.which(name) for name in (os.environ.get("CC"), "cc", "gcc", "clang")
               if name)


# Inductor's CPU backend compiles C++: without a compiler its tests cannot run at all.
needs_c_compiler = pytest.mark.skipif(not _has_c_compiler(), reason="no C compiler found")
INDUCTOR = pytest.param("inductor", marks=needs_c_compiler)
