"""GPU readiness without a GPU: every kernel variant compiles for sm_80 and sm_90 without
spills, and the element-wise kernels move their entries with 128-bit accesses.

The report runs in a subprocess with the Triton interpreter off (it cannot run where the
interpreter is on); its JSON rows are checked here.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from diffq_triton import gpu_report  # noqa: E402

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
needs_ptxas = pytest.mark.skipif(
    not (PTXAS / "ptxas").exists() or not (PTXAS / "ptxas-blackwell").exists(),
    reason="this triton build has no bundled ptxas",
)

# Kernels whose every entry is read and written once: their stores must all be 128-bit.
ELEMENTWISE = ("noise_fwd_kernel", "fake_quant_fwd_kernel")
ELEM_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@pytest.fixture(scope="module", params=["quick", pytest.param("full", marks=pytest.mark.slow)])
def report(request):
    args = ["--jobs=2"] + (["--quick"] if request.param == "quick" else [])
    return gpu_report.run_report(*args, timeout=900)


def _variant(row):
    return (row["kernel"], row["dtype"], row["G"], row["block"], row["warps"], row["stages"],
            row["const"], row["n_div16"])


@needs_ptxas
def test_every_kernel_is_reached_by_a_workload(report):
    assert report["workload_errors"] == []
    assert report["uncovered"] == []
    kernels = {r["kernel"] for r in report["rows"]}
    assert {"noise_fwd_kernel", "noise_bwd_kernel", "fake_quant_fwd_kernel",
            "range_partial_kernel"} <= kernels


@needs_ptxas
def test_every_variant_compiles_for_sm80_and_sm90(report):
    failed = [f"{r['kernel']} sm_{r['cap']} {r['workload']}: {r['error']}"
              for r in report["rows"] if r["error"]]
    assert failed == []
    caps: dict[tuple, set[int]] = {}
    for r in report["rows"]:
        caps.setdefault(_variant(r), set()).add(r["cap"])
    assert all(c == {80, 90} for c in caps.values())
    # The autotuned noise forward is compiled for each of its warp counts.
    fwd_warps = {r["warps"] for r in report["rows"] if r["kernel"] == "noise_fwd_kernel"}
    assert len(fwd_warps) >= 2


@needs_ptxas
def test_no_register_spills(report):
    spills = [f"{r['kernel']} sm_{r['cap']} w{r['warps']} {r['workload']}: "
              f"{r['spill_st']}+{r['spill_ld']} B" for r in report["rows"]
              if not r["error"] and (r["spill_st"] or r["spill_ld"])]
    assert spills == []


@needs_ptxas
def test_elementwise_kernels_use_128bit_accesses(report):
    rows = [r for r in report["rows"] if r["kernel"] in ELEMENTWISE and r["n_div16"]
            and not r["error"]]
    assert {r["kernel"] for r in rows} == set(ELEMENTWISE)
    assert {r["dtype"] for r in rows} >= {"fp32", "bf16"}
    for r in rows:
        # Per thread: BLOCK·bytes / (32·warps) bytes of weight in, as many out.
        per_thread = r["block"] * ELEM_BYTES[r["dtype"]] // (32 * r["warps"])
        where = f"{r['kernel']} sm_{r['cap']} {r['workload']} w{r['warps']}"
        assert r["st128"] * 16 == per_thread, where
        assert r["ld128"] * 16 >= per_thread, where


def test_parse_ptxas_reads_registers_and_spills():
    log = (
        "ptxas info    : Compiling entry function 'k' for 'sm_90a'\n"
        "ptxas info    : Function properties for k\n"
        "    24 bytes stack frame, 16 bytes spill stores, 12 bytes spill loads\n"
        "ptxas info    : Used 168 registers, used 1 barriers\n"
    )
    assert gpu_report.parse_ptxas(log) == {"regs": 168, "stack": 24, "spill_st": 16,
                                           "spill_ld": 12}
    with pytest.raises(ValueError):
        gpu_report.parse_ptxas("ptxas fatal : Unresolved extern function")


def test_count_accesses_by_width():
    ptx = "\n".join([
        "@%p1 ld.global.v4.b32 { %r1, %r2, %r3, %r4 }, [ %rd1 + 0 ];",
        "ld.global.L1::evict_last.v4.b32 { %r5, %r6, %r7, %r8 }, [ %rd2 + 0 ];",
        "@%p2 st.global.v2.b32 [ %rd3 + 0 ], { %r9, %r10 };",
        "ld.global.b16 %rs1, [ %rd4 + 0 ];",
        "st.global.v4.b16 [ %rd5 + 0 ], { %rs1, %rs2, %rs3, %rs4 };",
        "ld.global.v2.b64 { %rd6, %rd7 }, [ %rd8 + 0 ];",
        "ld.shared.v4.b32 { %r1, %r2, %r3, %r4 }, [ %r11 + 0 ];",
    ])
    assert gpu_report.count_accesses(ptx) == {
        "ld128": 3, "ld64": 0, "ldnarrow": 1, "st128": 0, "st64": 2, "stnarrow": 0}


def test_refuses_to_run_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-m", "diffq_triton.gpu_report", "--quick"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert "TRITON_INTERPRET=0" in res.stderr
