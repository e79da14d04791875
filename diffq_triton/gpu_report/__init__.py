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
64-bit global loads/stores in the PTX (static instruction counts). For each workload of the
packed-layout kernels it prints the modelled bytes moved per weight against the dense float16
call (:mod:`diffq_triton.packed.traffic`).

It cannot run in a process where the Triton interpreter is on (``TRITON_INTERPRET=1``); use
:func:`run_report` from such a process (tests do): it runs the report in a subprocess.

Modules: :mod:`.capture` records the launches, :mod:`.compiler` specialises and compiles one
variant and reads ptxas / PTX, :mod:`.packed_workloads` holds the packed kernels' workloads
and their traffic models, :mod:`.report` builds, checks and prints the report (CLI).
Importing this package imports neither torch nor Triton; its modules do so when called.
"""

from __future__ import annotations

from .capture import Capture, Launch, capture_launches, capturing, discover_kernels
from .compiler import Job, compile_job, count_accesses, describe, parse_ptxas, specialise
from .packed_workloads import format_traffic
from .report import CAPS, build_report, format_table, main, problems, run_report

__all__ = [
    "CAPS", "Capture", "Job", "Launch", "build_report", "capture_launches", "capturing",
    "compile_job", "count_accesses", "describe", "discover_kernels", "format_table",
    "format_traffic", "main", "parse_ptxas", "problems", "run_report", "specialise",
]
