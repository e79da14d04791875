"""Which implementation runs an op: fused Triton kernels or the eager PyTorch path.

One function, :func:`choose_backend`, decides from (in order of priority): a
:func:`use_backend` context, the environment variable ``DIFFQ_TRITON_BACKEND``
(``triton`` | ``eager`` | ``auto``, default ``auto``), then the device: CUDA tensors go to
Triton, CPU tensors to the eager path unless ``TRITON_INTERPRET=1`` (Triton's interpreter
runs the kernels on the CPU, which is how the kernel tests run). Without Triton installed
the answer is ``eager`` (forcing ``triton`` then raises); float64 always runs eager.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

BACKENDS = ("triton", "eager", "auto")
ENV_VAR = "DIFFQ_TRITON_BACKEND"
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_log = logging.getLogger(__name__)
_logged: set[tuple[str, str, str]] = set()
_forced = threading.local()

try:
    import triton  # noqa: F401

    HAS_TRITON = True
except ImportError:  # the eager path needs no Triton
    HAS_TRITON = False


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def requested_backend() -> str:
    """The backend asked for: the innermost :func:`use_backend`, else the environment."""
    forced = getattr(_forced, "stack", None)
    if forced:
        return forced[-1]
    value = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"{ENV_VAR} must be one of {BACKENDS}, got {value!r}")
    return value


def choose_backend(t: torch.Tensor) -> str:
    """``"triton"`` or ``"eager"`` for an op on tensor ``t`` (its device and dtype).

    ``auto`` picks Triton when it can run: Triton is installed and ``t`` is on CUDA, or on
    the CPU with the interpreter on. Tensors of a dtype the kernels do not take (float64)
    always run eager. Forcing ``triton`` where it cannot run raises ``RuntimeError``.
    """
    requested = requested_backend()
    device_ok = t.device.type == "cuda" or (t.device.type == "cpu" and _interpreting())
    if requested == "triton" and not (HAS_TRITON and device_ok):
        raise RuntimeError(
            f"backend 'triton' was forced but cannot run on {t.device.type} tensors "
            f"(triton {'installed' if HAS_TRITON else 'not installed'}; on the CPU it "
            "needs TRITON_INTERPRET=1 set before triton is imported)"
        )
    runnable = HAS_TRITON and device_ok and t.dtype in KERNEL_DTYPES
    choice = "triton" if requested != "eager" and runnable else "eager"
    key = (requested, t.device.type, choice)
    if key not in _logged:
        _logged.add(key)
        _log.debug("diffq_triton backend %s for %s tensors (requested %s, triton %s)",
                   choice, t.device.type, requested, "installed" if HAS_TRITON else "missing")
    return choice


def bitpack_on_triton(t: torch.Tensor) -> bool:
    """Whether the bitstream kernels (:mod:`diffq_triton.kernels.bitpack`) handle ``t``.

    CUDA tensors always; CPU tensors only when the ``triton`` backend is forced with the
    interpreter on (so that tests run the GPU file path on a CPU machine): elsewhere the
    native or torch CPU codec is much faster than interpreted kernels.
    """
    if t.is_cuda:
        return True
    return (t.device.type == "cpu" and HAS_TRITON and _interpreting()
            and requested_backend() == "triton")


def packed_on_triton(t: torch.Tensor) -> bool:
    """Whether packed layers decode their weights with the Triton kernels
    (:mod:`diffq_triton.kernels.packed`); ``t`` has the packed weight's device and the dtype
    it decodes to.

    CUDA tensors as :func:`choose_backend` decides (``use_backend("eager")`` keeps the
    library's decode); CPU tensors only when the ``triton`` backend is forced with the
    interpreter on (tests run the CUDA path so): the native codec is the CPU path.
    """
    if t.device.type == "cpu":
        return bitpack_on_triton(t) and t.dtype in KERNEL_DTYPES
    return choose_backend(t) == "triton"


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force a backend inside the block: ``with use_backend("eager"): ...``.

    Args:
        name: ``"triton"``, ``"eager"`` or ``"auto"`` (back to the device rule).

    In eager mode the choice is made at each call. Under ``torch.compile`` it is made when
    the graph is traced and kept by that graph (no guard on it): compile inside the block,
    or call ``torch._dynamo.reset()`` after changing backend. Thread-local; blocks nest.
    """
    if name not in BACKENDS:
        raise ValueError(f"name must be one of {BACKENDS}, got {name!r}")
    stack = getattr(_forced, "stack", None)
    if stack is None:
        stack = _forced.stack = []
    stack.append(name)
    try:
        yield
    finally:
        stack.pop()
