"""Building, checking and printing the GPU report, and its command line.

:func:`build_report` captures every launch, specialises it per capability, compiles each
distinct variant once (in worker processes when asked) and returns the report as a dict;
:func:`problems` lists what should fail a check; :func:`format_table` prints the rows, and
:func:`~.packed_workloads.format_traffic` the modelled bytes per weight of the packed kernels.
:func:`main` is ``python -m diffq_triton.gpu_report``; :func:`run_report` runs it in a
subprocess with the Triton interpreter off and returns its JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

from .capture import capture_launches, discover_kernels
from .compiler import Job, compile_job, specialise
from .packed_workloads import format_traffic

CAPS = (80, 90)


def _key(job: Job) -> str:
    return repr((job.module, job.name, job.cap, job.signature, sorted(job.constexprs.items()),
                 sorted(job.attrs.items()), sorted(job.options.items())))


def build_report(quick: bool, caps: tuple[int, ...] = CAPS, jobs: int = 1) -> dict:
    """Capture, specialise, de-duplicate and compile every variant; the report as a dict."""
    import torch
    import triton

    traffic: dict[str, list[dict]] = {}
    launches, errors = capture_launches(quick, traffic)
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
        "traffic": traffic,
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
    # The package's docstring describes the tool as a whole; its first line is the summary.
    summary = (sys.modules[__package__].__doc__ or "").partition("\n")[0]
    parser = argparse.ArgumentParser(prog="python -m diffq_triton.gpu_report",
                                     description=summary)
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
        if report["traffic"]:
            print("\n" + format_traffic(report))
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
