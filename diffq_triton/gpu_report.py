"""Ahead-of-time GPU report: compile every kernel variant for sm_80 / sm_90 and read ptxas.

``python -m diffq_triton.gpu_report [--quick] [--json] [--caps 80,90] [--jobs N]``

No GPU is needed. The launchers of ``diffq_triton.kernels`` are called on CPU tensors of
representative sizes while ``JITFunction.run`` and ``Autotuner.run`` are replaced by recorders,
so every launch is captured with exactly the arguments, constexprs and options the launcher
would use (all autotune configs of an autotuned kernel). Each captured launch is then
specialised as Triton's runtime would for a CUDA target (16-byte divisibility of aligned
pointers and of lengths divisible by 16), compiled with ``triton.compile`` for each
capability; the log of the bundled ``ptxas -v`` that Triton runs on the PTX (``ptxas-blackwell``
for capability ≥ 90) is kept. Per variant the report
gives registers, spill bytes (stores + loads), shared memory and the number of 128-bit and
64-bit global loads/stores in the PTX (static instruction counts).

It cannot run in a process where the Triton interpreter is on (``TRITON_INTERPRET=1``); use
:func:`run_report` from such a process (tests do): it runs the report in a subprocess.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import json
import os
import pkgutil
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from typing import Any

CAPS = (80, 90)
# 2^21 entries: 1024 blocks of 2048, so the range reduction runs with its largest partial
# count (P = 1024), the register-heaviest case of the consumers of the range.
N_LARGE = 1 << 21
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class Launch:
    """One captured kernel launch: the JIT function, its arguments and launch options."""

    fn: Any
    args: tuple
    kwargs: dict
    label: str


@dataclass
class Capture:
    """Launches recorded while the launchers ran, and the configs kept per autotuner."""

    quick: bool
    label: str = ""
    launches: list[Launch] = field(default_factory=list)


def _configs(tuner: Any, quick: bool) -> list:
    """The autotune configs to compile; ``quick`` keeps the first config per warp count."""
    if not quick:
        return list(tuner.configs)
    seen: dict[int, Any] = {}
    for cfg in tuner.configs:
        seen.setdefault(cfg.num_warps, cfg)
    return list(seen.values())


@contextlib.contextmanager
def capturing(quick: bool) -> Iterator[Capture]:
    """Replace kernel launches by recorders for the duration of the block.

    Autotuned kernels record one launch per config (what the autotuner would benchmark);
    heuristics wrappers run unchanged and reach the recorder through ``JITFunction.run``.
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    cap = Capture(quick)
    saved = JITFunction.run, Autotuner.run

    def jit_run(self, *args, grid, warmup, **kwargs):
        cap.launches.append(Launch(self, args, kwargs, cap.label))

    def tuner_run(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        grid = kwargs.pop("grid", None)
        for cfg in _configs(self, cap.quick):
            self.fn.run(*args, grid=grid, warmup=False, **kwargs, **cfg.all_kwargs())

    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        yield cap
    finally:
        JITFunction.run, Autotuner.run = saved


# --- Workloads: calls of the launchers that reach every kernel and its variants ---------------
#
# Group sizes cover the variant classes of the issue: one group (0), g = 1, powers of two
# (tiles reduced in registers; 1024 is the largest tile), another g (padded rows), and groups
# larger than a tile (chunked backward).

def _workloads(quick: bool) -> list[tuple[str, Callable[[], None]]]:
    """``(label, thunk)`` pairs; each thunk calls one launcher on CPU tensors."""
    import torch

    from .kernels import bitpack, noise, quantize

    seed = torch.zeros(1, dtype=torch.int64)
    stats = torch.zeros(4, dtype=torch.float64)
    fwd_groups = (0, 1, 8, 100)
    bwd_groups = (0, 1, 8, 100, 1024, 4096)
    flags = [("bits", "gaussian"), ("bits", "uniform"), ("noise", "gaussian"),
             ("noise", "uniform")]
    # Quick: every group class in float32, bfloat16 (the 16-bit type whose store rounds by
    # hand) at one group size, default flags. Full: every dtype at every group class.
    plan: list[tuple[str, int, str, str, int]] = []
    for name in DTYPE_NAMES:
        if quick and name == "float16":
            continue
        every = not quick or name == "float32"
        for g in (fwd_groups if every else (8,)):
            plan.append(("fwd", g, name, "bits/gaussian", N_LARGE))
            plan.append(("quant", g, name, "", N_LARGE))
        for g in (bwd_groups if every else (8,)):
            if not (quick and g == 4096):  # same chunked kernel as g = 0
                plan.append(("bwd", g, name, "bits/gaussian", N_LARGE))
    if not quick:
        for p, z in flags[1:]:
            plan.append(("fwd", 8, "float32", f"{p}/{z}", N_LARGE))
            plan.append(("bwd", 8, "float32", f"{p}/{z}", N_LARGE))
            plan.append(("bwd", 0, "float32", f"{p}/{z}", N_LARGE))
        # A length not divisible by 16 loses the divisibility hint: shows its cost.
        plan.append(("fwd", 8, "float32", "bits/gaussian", N_LARGE + 3))
        plan.append(("quant", 8, "float32", "", N_LARGE + 3))
        # Small tensors: few range partials (P = 2).
        plan.append(("fwd", 8, "float32", "bits/gaussian", 4096))

    def launch(op: str, g: int, name: str, pz: str, n: int) -> None:
        # Tensors are made when the workload runs, so only one set is alive at a time.
        n_groups = 1 if g == 0 else -(-n // g)
        w = torch.empty(n, dtype=getattr(torch, name))
        if op == "quant":
            quantize.fake_quantize(w, torch.full((n_groups,), 4, dtype=torch.uint8), g)
            return
        param, kind = pz.split("/")
        logits = torch.zeros(n_groups)
        if op == "fwd":
            noise.noise_forward(w, logits, seed, g, 2.0, 15.0, param, kind)
        else:
            noise.noise_backward(w, logits, seed, stats, g, 2.0, 15.0, param, kind)

    def pack(g: int, n: int) -> None:
        bits = torch.full((-(-n // g),), 4, dtype=torch.uint8)
        bitpack.pack(torch.zeros(n, dtype=torch.int16), bits, g)
        bitpack.unpack(torch.zeros(n // 2, dtype=torch.uint8), bits, g, n)

    out: list[tuple[str, Callable[[], None]]] = [
        (f"{op} {name} g={g} n={n}" + (f" {pz}" if pz else ""),
         functools.partial(launch, op, g, name, pz, n))
        for op, g, name, pz, n in plan
    ]
    # group_size is a runtime argument of the bitpack kernels: 64 carries a divisibility hint.
    for g in (8,) if quick else (8, 64, 100):
        out.append((f"pack/unpack g={g} n=65536", functools.partial(pack, g, 1 << 16)))
    return out


def capture_launches(quick: bool) -> tuple[list[Launch], list[str]]:
    """Run every workload under :func:`capturing`; returns launches and workload errors."""
    errors: list[str] = []
    with capturing(quick) as cap:
        for label, thunk in _workloads(quick):
            cap.label = label
            try:
                thunk()
            except Exception as exc:  # report every broken workload, not only the first
                errors.append(f"{label}: {type(exc).__name__}: {exc}")
    return cap.launches, errors


def discover_kernels() -> list[str]:
    """``module.name`` of every ``*_kernel`` JIT function defined in ``diffq_triton.kernels``."""
    from triton.runtime.jit import JITFunction

    from . import kernels

    found = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for value in vars(mod).values():
            fn = value
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
                fn = fn.fn
            if (isinstance(fn, JITFunction) and fn.module == mod.__name__
                    and fn.__name__.endswith("_kernel")):
                found.add(f"{fn.module}.{fn.__name__}")
    return sorted(found)


# --- Compiling one variant ---------------------------------------------------------------------

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


def _key(job: Job) -> str:
    return repr((job.module, job.name, job.cap, job.signature, sorted(job.constexprs.items()),
                 sorted(job.attrs.items()), sorted(job.options.items())))


def build_report(quick: bool, caps: tuple[int, ...] = CAPS, jobs: int = 1) -> dict:
    """Capture, specialise, de-duplicate and compile every variant; the report as a dict."""
    import torch
    import triton

    launches, errors = capture_launches(quick)
    unique: dict[str, Job] = {}
    for launch in launches:
        for cap in caps:
            try:
                job = specialise(launch, cap)
            except Exception as exc:
                errors.append(f"{launch.label}: specialise for sm_{cap}: {exc}")
                continue
            unique.setdefault(_key(job), job)
    work = list(unique.values())
    if jobs > 1 and len(work) > 1:
        # spawn: fresh interpreters, no state of this one (torch threads) carried over.
        with ProcessPoolExecutor(jobs, mp_context=get_context("spawn")) as pool:
            rows = list(pool.map(compile_job, work, chunksize=4))
    else:
        rows = [compile_job(job) for job in work]
    covered = {f"{r['module']}.{r['kernel']}" for r in rows}
    return {
        "triton": triton.__version__, "torch": torch.__version__, "caps": list(caps),
        "quick": quick, "rows": rows, "workload_errors": errors,
        "uncovered": [k for k in discover_kernels() if k not in covered],
    }


def problems(report: dict) -> list[str]:
    """Everything that should fail a check: errors, spills, kernels no workload reaches."""
    out = list(report["workload_errors"])
    out += [f"not compiled by any workload: {k}" for k in report["uncovered"]]
    for r in report["rows"]:
        where = f"{r['kernel']} sm_{r['cap']} ({r['workload']})"
        if r["error"]:
            # A CompilationError's last line names the cause; the first only the place.
            lines = [ln for ln in r["error"].splitlines() if ln.strip()]
            out.append(f"{where}: {lines[0]} ... {lines[-1][:200]}" if len(lines) > 1
                       else f"{where}: {lines[0]}")
        elif r["spill_st"] or r["spill_ld"]:
            out.append(f"{where}: spills {r['spill_st']} B stored, {r['spill_ld']} B loaded")
    return out


def format_table(report: dict) -> str:
    """One table per kernel, one line per variant, the capabilities side by side."""
    caps = report["caps"]
    ident = ("dtype", "G", "block", "warps", "stages", "const")
    by_variant: dict[tuple, dict[int, dict]] = {}
    for r in report["rows"]:
        key = (r["kernel"], *(str(r[c]) for c in ident), r["n_div16"])
        by_variant.setdefault(key, {})[r["cap"]] = r
    head = f"{'dtype':9}{'G':>5}{'block':>6}{'w':>3}{'s':>3}{'n%16':>5}  "
    for cap in caps:
        head += f"| sm_{cap}: {'regs':>4} {'spill':>5} {'smem':>5} {'ld128':>5} {'st128':>5} "
        head += f"{'ld64':>4} {'st64':>4} "
    lines: list[str] = []
    kernel = None
    for key in sorted(by_variant, key=lambda k: (k[0], k[1], k[2].rjust(6), k[3], k[4],
                                                 k[5], k[6], k[7])):
        if key[0] != kernel:
            kernel = key[0]
            lines += ["", kernel, head]
        dtype, g, block, warps, stages, const, div16 = key[1:]
        line = f"{dtype:9}{g:>5}{block:>6}{warps:>3}{stages:>3}{'yes' if div16 else 'no':>5}  "
        for cap in caps:
            r = by_variant[key].get(cap)
            if r is None or r["error"]:
                line += f"| sm_{cap}: {'ERROR' if r else '-':>46} "
                continue
            spill = r["spill_st"] + r["spill_ld"]
            line += (f"| sm_{cap}: {r['regs']:>4} {spill:>5} {r['smem']:>5} {r['ld128']:>5} "
                     f"{r['st128']:>5} {r['ld64']:>4} {r['st64']:>4} ")
        lines.append(line.rstrip() + (f"   [{const}]" if const else ""))
    return "\n".join(lines).lstrip("\n")


def _interpreting() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        return True
    triton = sys.modules.get("triton")
    return bool(triton is not None and triton.knobs.runtime.interpret)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; exit status 1 when any variant fails, spills or is not covered."""
    parser = argparse.ArgumentParser(prog="python -m diffq_triton.gpu_report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="16-bit dtypes at one group size, one config per warp count")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--caps", default=",".join(map(str, CAPS)),
                        help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--jobs", type=int, default=min(4, os.cpu_count() or 1),
                        help="compile in N processes (default: CPU count, at most 4)")
    args = parser.parse_args(argv)
    if _interpreting():
        print("gpu_report: the Triton interpreter is on; run with TRITON_INTERPRET=0 "
              "(or call diffq_triton.gpu_report.run_report from Python)", file=sys.stderr)
        return 2
    try:
        caps = tuple(int(c) for c in args.caps.split(","))
    except ValueError:
        parser.error(f"--caps must be integers separated by commas, got {args.caps!r}")
    if args.jobs < 1:
        parser.error(f"--jobs must be ≥ 1, got {args.jobs}")
    # Triton 3.9 warns when this is unset; the GPU default is fusion on.
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    t0 = time.perf_counter()
    report = build_report(args.quick, caps, args.jobs)
    report["wall_s"] = round(time.perf_counter() - t0, 1)
    found = problems(report)
    if args.json:
        print(json.dumps(report, default=str))
    else:
        print(format_table(report))
        print(f"\n{len(report['rows'])} variants compiled (triton {report['triton']}) "
              f"in {report['wall_s']} s; {len(found)} problem(s)")
        for p in found:
            print("  " + p)
    return 1 if found else 0


def run_report(*args: str, timeout: float = 600) -> dict:
    """Run the report in a subprocess with the interpreter off; returns its JSON as a dict.

    Args:
        args: extra command-line arguments (``"--quick"``, ``"--caps=90"``, ...).
        timeout: seconds before the subprocess is killed.

    Raises:
        RuntimeError: the report crashed (exit status other than 0 or 1).
    """
    env = dict(os.environ, TRITON_INTERPRET="0")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    res = subprocess.run([sys.executable, "-m", "diffq_triton.gpu_report", "--json", *args],
                         capture_output=True, text=True, env=env, timeout=timeout)
    if res.returncode not in (0, 1):
        raise RuntimeError(f"gpu_report exited {res.returncode}:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout)


if __name__ == "__main__":
    sys.exit(main())
