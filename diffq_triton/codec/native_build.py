"""Building and loading the native CPU codec: ``csrc/codec.c`` compiled at first use.

The source is compiled with the system C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``: Triton needs one too), cached under ``$DIFFQ_TRITON_CACHE_DIR`` or
``~/.cache/diffq_triton``, loaded with :mod:`ctypes` and checked on known values before use.
When no compiler works, or ``DIFFQ_TRITON_NATIVE=0``, :func:`library` returns ``None`` (with
one warning in the first case) and callers take the torch path of :mod:`.bitpack_cpu` and
:mod:`.cpu_codec`, which computes the same bytes and values. The calls on tensors are in
:mod:`.native`.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
import zlib
from pathlib import Path

import torch

from .bitpack_cpu import MAX_WIDTH

SOURCE = Path(__file__).with_name("csrc") / "codec.c"
# No -ffast-math and no FMA contraction: each float operation rounds as torch's does.
CFLAGS = ("-O3", "-std=c11", "-fPIC", "-shared", "-ffp-contract=off", "-fno-fast-math")

_P, _I, _F, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int32
_SIGNATURES = {
    "dq_quantize_pack": ([_P, _I, _I, _I, _P, _P, _F, _F, _P, _I, _I, _I32], None),
    "dq_pack_i16": ([_P, _I, _I, _I, _P, _I32, _P, _I, _I, _I32], _I),
    "dq_pack_u8": ([_P, _I, _I, _I, _P, _I32, _P, _I, _I, _I32], _I),
    "dq_unpack_dequantize": ([_P, _I, _I, _I, _I, _P, _I, _P, _F, _F, _P, _I32], None),
    "dq_unpack_i16": ([_P, _I, _I, _I, _I, _P, _I, _I32, _P, _I32], None),
    "dq_sum_u8": ([_P, _I], _I),
    "dq_crc32": ([_P, _I, ctypes.c_uint32, ctypes.POINTER(_I32)], ctypes.c_uint32),
}

_LOCK = threading.Lock()
_STATE: dict = {}



def library() -> ctypes.CDLL | None:
    """The loaded codec, building it on first use; ``None`` when disabled or unavailable."""
    if os.environ.get("DIFFQ_TRITON_NATIVE", "1") == "0":
        return None
    with _LOCK:
        if "lib" not in _STATE:
            try:
                _STATE["lib"] = _self_test(_load(_build()))
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                _STATE["lib"] = None
                _STATE["error"] = str(exc)
                warnings.warn(f"diffq_triton: native CPU codec unavailable ({exc}); "
                              "packing runs on the slower torch path", RuntimeWarning,
                              stacklevel=3)
        return _STATE["lib"]


def unavailable_reason() -> str | None:
    """Why :func:`library` returned ``None`` (``None`` when it did not, or was not called)."""
    if os.environ.get("DIFFQ_TRITON_NATIVE", "1") == "0":
        return "disabled by DIFFQ_TRITON_NATIVE=0"
    return _STATE.get("error")


# ----------------------------------------------------------------------------- build
def _compiler() -> str:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    raise RuntimeError("no C compiler found (set CC)")


def _cache_dir() -> Path:
    root = os.environ.get("DIFFQ_TRITON_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "diffq_triton"


def _build() -> Path:
    """Compile the codec unless a build of this source, compiler and flags is cached."""
    cc = _compiler()
    source = SOURCE.read_bytes()
    key = hashlib.sha256(b"\0".join(
        [source, cc.encode(), " ".join(CFLAGS).encode(), platform.machine().encode()]
    )).hexdigest()[:16]
    target = _cache_dir() / f"codec-{key}.so"
    if target.exists():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Build under a unique name and rename: processes building at once never load a
        # half written file.
        fd, partial = tempfile.mkstemp(suffix=".so", dir=target.parent)
    except OSError:  # read-only cache: build into a private temporary folder instead
        folder = Path(tempfile.mkdtemp(prefix="diffq_triton-"))
        target = folder / target.name
        fd, partial = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        res = subprocess.run([cc, *CFLAGS, "-o", partial, str(SOURCE)], capture_output=True,
                             text=True, timeout=120)
        if res.returncode != 0:
            raise RuntimeError(f"{cc} failed: {res.stderr.strip()[-2000:]}")
        os.replace(partial, target)
    finally:
        if os.path.exists(partial):
            os.unlink(partial)
    return target


def _load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, (args, result) in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = args, result
    return lib


def _self_test(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Refuse a build that does not reproduce docs/format.md's golden bytes and levels."""
    levels = torch.tensor([1, 2, 3, 0, 5], dtype=torch.int16)
    bits = torch.tensor([2, 3, 3], dtype=torch.uint8)
    out = torch.zeros(2, dtype=torch.uint8)
    bad = lib.dq_pack_i16(levels.data_ptr(), 0, 5, 2, bits.data_ptr(), 0, out.data_ptr(), 0, 13, 0)
    back = torch.empty(5, dtype=torch.int16)
    lib.dq_unpack_i16(out.data_ptr(), 2, 0, 5, 2, bits.data_ptr(), 0, 0, back.data_ptr(), 0)
    # Width 1 (unit 1): w is its own scaled value, so 0.5 is an exact tie and must round to
    # the even level 0. 160 entries: the rows path, then the per-entry path near the end.
    w = (torch.arange(160) * 7 % 3).to(torch.float32) / 2  # 0, 0.5, 1
    one = torch.tensor([1], dtype=torch.uint8)
    packed = torch.zeros(20, dtype=torch.uint8)
    lib.dq_quantize_pack(w.data_ptr(), 0, 160, 160, one.data_ptr(), _units().data_ptr(), 0.0,
                         1.0, packed.data_ptr(), 0, 160, 1)
    tied = sum(1 << i for i, x in enumerate(w.tolist()) if x == 1.0).to_bytes(20, "little")
    # Rows of 8 (the whole-byte fast path): the stream is the integer Σ q_i·2^(3i).
    rows = torch.arange(80, dtype=torch.int16) * 5 % 8
    row_bits = torch.tensor([3], dtype=torch.uint8)
    row_out = torch.zeros(30, dtype=torch.uint8)
    bad += lib.dq_pack_i16(rows.data_ptr(), 0, 80, 80, row_bits.data_ptr(), 0,
                           row_out.data_ptr(), 0, 240, 1)
    expected = sum(int(q) << 3 * i for i, q in enumerate(rows.tolist())).to_bytes(30, "little")
    sample = torch.arange(200, dtype=torch.int64).mul_(2654435761).to(torch.uint8)
    if (bad or out.tolist() != [0b00111001, 0b00010100] or back.tolist() != levels.tolist()
            or bytes(packed.tolist()) != tied or bytes(row_out.tolist()) != expected
            or _crc32(lib, sample, 7) != zlib.crc32(bytes(sample.tolist()), 7)):
        raise RuntimeError("the compiled codec failed its self-test")
    return lib


# ----------------------------------------------------------------------------- helpers
_UNITS: list[torch.Tensor] = []


def _units() -> torch.Tensor:
    """``u(b) = 1/(2^b - 1)`` for b = 0..15 in float32, computed as the reference does."""
    if not _UNITS:
        widths = torch.arange(MAX_WIDTH + 1, dtype=torch.int64)
        _UNITS.append((1 / ((1 << widths) - 1)).to(torch.float32).contiguous())
    return _UNITS[0]


def _crc32(lib: ctypes.CDLL, data: torch.Tensor, crc: int) -> int:
    n = data.numel()
    bulk = n - n % 16
    ok = ctypes.c_int32(0)
    value = lib.dq_crc32(data.data_ptr(), bulk, crc, ctypes.byref(ok)) if bulk >= 64 else 0
    if not ok.value:
        return zlib.crc32(data.numpy(), crc)
    return zlib.crc32(data[bulk:].numpy(), value)
