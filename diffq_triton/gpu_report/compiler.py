"""Compiling one kernel variant for the GPU report, and reading ptxas and PTX.

:func:`specialise` binds a captured launch as Triton's runtime would for a CUDA capability
and gives a picklable :class:`Job`; :func:`compile_job` compiles it with ``triton.compile``
and returns one report row: the identifying columns (:func:`describe`), registers and spills
from the ptxas log (:func:`parse_ptxas`), shared memory, and the widths of the global
loads/stores in the PTX (:func:`count_accesses`).
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import time
from dataclasses import dataclass
from typing import Any

from .capture import Launch


@dataclass(frozen=True)
class Job:
    """A specialised variant to compile: picklable, so worker processes can take it."""

    module: str
    name: str
    cap: int
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict
    label: str


def _jit_of(module: str, name: str) -> Any:
    """The ``JITFunction`` behind ``module.name`` (unwrapping autotune/heuristics wrappers)."""
    from triton.runtime.jit import JITFunction

    fn = getattr(importlib.import_module(module), name)
    while not isinstance(fn, JITFunction):
        fn = fn.fn
    return fn


def specialise(launch: Launch, cap: int) -> Job:
    """Bind a captured launch as Triton's runtime would for a CUDA device of ``cap``.

    Uses the runtime's own binder (``create_function_from_signature``) and
    ``JITFunction._pack_args`` (Triton 3.x internals), so pointer and length divisibility
    hints are exactly those a launch with these arguments gets on a GPU.
    """
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    fn = launch.fn
    backend = make_backend(GPUTarget("cuda", cap, 32))
    kwargs = dict(launch.kwargs)
    kwargs["debug"] = kwargs.get("debug", fn.debug) or knobs.runtime.debug
    for opt in ("instrumentation_mode", "fpsan_homomorphic_casts"):
        if hasattr(knobs.compilation, opt):
            kwargs[opt] = getattr(knobs.compilation, opt)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound, spec, opts = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, spec, opts)
    return Job(fn.module, fn.__name__, cap, signature, constexprs, attrs,
               dict(options.__dict__), launch.label)


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTX_ACCESS = re.compile(r"\b(ld|st)\.global((?:\.[A-Za-z0-9_:]+)+)")


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame and spill bytes from a ``ptxas -v`` log of one kernel."""
    regs = _PTXAS_REGS.search(log)
    spill = _PTXAS_SPILL.search(log)
    if regs is None or spill is None:
        raise ValueError(f"unexpected ptxas output: {log!r}")
    return {"regs": int(regs.group(1)), "stack": int(spill.group(1)),
            "spill_st": int(spill.group(2)), "spill_ld": int(spill.group(3))}


def count_accesses(ptx: str) -> dict:
    """Static counts of global loads/stores in PTX by width: 128-bit, 64-bit, narrower.

    ``ld.global.v4.b32`` (4 × 32 bits; eight 16-bit values packed in pairs) and
    ``ld.global.v2.b64`` are 128-bit; ``v2.b32``, ``v4.b16`` and a single 64-bit value
    (an int64 seed, a float64 statistic) are 64-bit.
    """
    counts = {f"{op}{w}": 0 for op in ("ld", "st") for w in ("128", "64", "narrow")}
    for op, suffix in _PTX_ACCESS.findall(ptx):
        parts = suffix.split(".")[1:]
        vec = next((int(p[1:]) for p in parts if p in ("v2", "v4", "v8")), 1)
        bits = next((int(p[1:]) for p in reversed(parts)
                     if re.fullmatch(r"[bfsu]\d+", p)), 0)
        width = vec * bits
        counts[f"{op}{width if width in (128, 64) else 'narrow'}"] += 1
    return counts


def _keep_ptxas_log(*args: Any) -> Any:
    """``knobs.runtime.add_stages_inspection_hook``: keep Triton's own ``ptxas -v`` log.

    Triton's cubin stage already runs the bundled ptxas with ``-v`` (and prints the log when
    ``knobs.nvidia.dump_ptxas_log`` is on); the log is captured and stored as an extra
    ``ptxas`` stage, so it lands in the kernel cache next to the cubin and a cached variant
    needs no second ptxas run. Called with no arguments for the cache key.
    """
    if not args:
        return "gpu_report_ptxas_log", "1"
    stages = args[1]
    make_cubin = stages["cubin"]
    log: list[str] = []

    def cubin_stage(src: Any, metadata: dict) -> bytes:
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            cubin = make_cubin(src, metadata)
        log.append(buf.getvalue())
        return cubin

    stages["cubin"] = cubin_stage
    stages["ptxas"] = lambda src, metadata: log[-1] if log else ""
    return None


def compile_job(job: Job) -> dict:
    """Compile one variant and read its ptxas log; a result row (``error`` set on failure)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = describe(job)
    t0 = time.perf_counter()
    saved = knobs.runtime.add_stages_inspection_hook, knobs.nvidia.dump_ptxas_log
    try:
        knobs.runtime.add_stages_inspection_hook = _keep_ptxas_log
        knobs.nvidia.dump_ptxas_log = True
        fn = _jit_of(job.module, job.name)
        src = ASTSource(fn, job.signature, job.constexprs, job.attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", job.cap, 32), options=job.options)
        ptx = kernel.asm["ptx"]
        row["smem"] = int(kernel.metadata.shared)
        row.update(count_accesses(ptx))
        row.update(parse_ptxas(kernel.asm.get("ptxas", "")))
    except Exception as exc:  # one broken variant must not hide the others
        row["error"] = f"{type(exc).__name__}: {str(exc)[:2000]}"
    finally:
        knobs.runtime.add_stages_inspection_hook, knobs.nvidia.dump_ptxas_log = saved
    row["compile_s"] = round(time.perf_counter() - t0, 3)
    return row


_BLOCK_NAMES = ("BLOCK", "TILE")


def describe(job: Job) -> dict:
    """The identifying columns of a row: kernel, capability, dtype, G, block, warps, stages."""
    names = list(job.signature)
    consts = {names[k[0]]: v for k, v in job.constexprs.items() if len(k) == 1}
    ptrs = [t for t in job.signature.values() if t.startswith("*")]
    extra = {k: (int(v) if isinstance(v, bool) else v) for k, v in consts.items()
             if k not in ("G", *_BLOCK_NAMES)}
    # The length argument: with a divisibility-16 hint, masked accesses can still vectorise.
    length = next((n for n in ("n", "numel") if n in job.signature), None)
    return {
        "kernel": job.name, "module": job.module, "cap": job.cap,
        "dtype": ptrs[0][1:] if ptrs else "-",
        "G": consts.get("G", "-"),
        "block": next((consts[b] for b in _BLOCK_NAMES if b in consts), "-"),
        "warps": job.options.get("num_warps"), "stages": job.options.get("num_stages"),
        "n_div16": length is not None and bool(job.attrs.get((names.index(length),))),
        "const": " ".join(f"{k}={v}" for k, v in extra.items()),
        "workload": job.label, "error": None,
    }

