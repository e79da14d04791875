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
from diffq_triton.gpu_report import packed_workloads as pw  # noqa: E402
from diffq_triton.packed import traffic  # noqa: E402

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


# ----------------------------------------------------------------------------- packed traffic
@needs_ptxas
def test_packed_workloads_print_their_bytes_per_weight(report):
    from diffq_triton.kernels import packed as packed_k

    labels = {r["workload"] for r in report["rows"] if r["module"].endswith(".packed")}
    # Every packed workload has its modelled traffic (rows are de-duplicated, so not every
    # label keeps a row of its own; the traffic keys are the workloads themselves).
    assert labels <= set(report["traffic"])
    kinds = {label.split()[1] for label in report["traffic"]}
    assert {"dequantize", "gemv"} <= kinds
    assert ("gemm" in kinds) == hasattr(packed_k, "gemm")
    assert ("embedding" in kinds) == hasattr(packed_k, "embedding")
    for label, rows in report["traffic"].items():
        assert rows, label
        for r in rows:
            p, d = r["packed"], r["dense"]
            assert p["per_weight"] == pytest.approx(p["total"] / p["weights"], rel=1e-3)
            assert r["speedup"] == pytest.approx(d["total"] / p["total"], rel=1e-3, abs=6e-4)
            meta = traffic.metadata_bits_per_weight(r["g"], r["f"])
            if "gemv" in label:
                # The contract: each weight's bits once, b̄/8 + (f + 0.5)/(8·g).
                assert p["weight_per_weight"] == pytest.approx((r["bits"] + meta) / 8,
                                                               rel=2e-3), label
                assert r["baseline"] == "F.linear float16" and d["weight_per_weight"] == 2
            if "dequantize" in label:
                out = 4 if "float32" in label else 2
                assert p["per_weight"] == pytest.approx((r["bits"] + meta) / 8 + out,
                                                        rel=1e-3), label
    text = gpu_report.format_traffic(report)
    assert text.count("\n") == sum(len(rs) for rs in report["traffic"].values()) + 1
    assert "packed gemv float16 g=8 M=1 " in text


def test_format_traffic_prints_one_line_per_row():
    lay = traffic.Layout((4096, 4096), 8, 0, 4.0)
    row = {"bits": 4.0, "g": 8, "f": 0, "baseline": "F.linear float16",
           "packed": traffic.gemv(lay).as_dict(),
           "dense": traffic.dense_linear(4096, 4096, 1).as_dict(),
           "speedup": round(traffic.speedup(traffic.gemv(lay),
                                            traffic.dense_linear(4096, 4096, 1)), 3)}
    gemm = dict(row, block_m=64, packed=traffic.gemm(lay, 64, 64).as_dict())
    text = gpu_report.format_traffic({"traffic": {"packed gemv float16 g=8 M=1": [row],
                                                  "packed gemm float16 g=8 M=64": [gemm]}})
    lines = text.splitlines()
    assert len(lines) == 4 and "bytes moved per weight" in lines[0]
    assert lines[1].split() == ["workload", "bits", "f", "B/w", "w+meta", "dense", "model",
                                "x", "baseline"]
    # 4 bits at g = 8, no width stream: 0.5078 bytes per weight of the weight (0.5088 with x
    # and y), 3.93× the float16 GEMV.
    assert lines[2].split()[5:] == ["4.00", "0", "0.5088", "0.5078", "2.001", "3.93",
                                    "F.linear", "float16"]
    assert lines[3].endswith("BLOCK_M=64")
    assert gpu_report.format_traffic({"traffic": {}}) == ""


def test_gemm_and_embedding_workloads_join_when_the_kernels_exist(monkeypatch):
    # Stand-ins for kernels/packed.py's gemm and embedding: the workloads call them (the
    # report records their launches) and model their traffic from the launches' BM (rows per block).
    from diffq_triton.kernels import packed as packed_k

    calls = []
    monkeypatch.setattr(packed_k, "gemm", lambda x, pt, bias=None: calls.append(
        ("gemm", tuple(x.shape), bias is not None)), raising=False)
    monkeypatch.setattr(packed_k, "embedding", lambda ids, pt: calls.append(
        ("embedding", tuple(ids.shape), pt.shape)), raising=False)
    work = dict(pw.packed_workloads(quick=True))
    assert {"packed gemm float16 g=8 M=64", "packed gemm bfloat16 g=8 M=1024",
            "packed embedding float16 g=8 ids=512"} <= set(work)

    rows = work["packed gemm bfloat16 g=8 M=1024"]()([{"BM": 64}, {"BM": 128},
                                                       {"BM": 64}])
    assert calls[-1] == ("gemm", (1024, 1000), True)
    assert [r["block_m"] for r in rows] == [64, 128]
    lay = traffic.Layout(pw.LINEAR_SHAPE, 8, 4, rows[0]["bits"])
    # 16 M-blocks of 64 rows read the weight 16 times, 8 of 128 rows 8 times.
    # (the row's b̄ is rounded to 3 decimals)
    assert rows[0]["packed"]["weight"] == pytest.approx(16 * lay.numel * lay.mean_bits / 8,
                                                        rel=1e-4)
    assert rows[1]["packed"]["weight"] == pytest.approx(8 * lay.numel * lay.mean_bits / 8,
                                                        rel=1e-4)
    assert rows[0]["baseline"] == "F.linear float16"
    assert work["packed gemm float16 g=8 M=64"]()([])[0]["block_m"] == "?"

    (row,) = work["packed embedding float16 g=8 ids=512"]()([])
    assert calls[-1] == ("embedding", (4, 128), pw.EMBEDDING_SHAPE)
    dim = pw.EMBEDDING_SHAPE[1]
    assert row["packed"]["weights"] == 512 * dim
    # Per looked-up entry: b̄/8 of levels, 2 bytes written; per row its dim/8 + 1 width
    # fields of 4 bits, a tile offset and an 8-byte id.
    assert row["packed"]["per_weight"] == pytest.approx(
        row["bits"] / 8 + 2 + ((dim / 8 + 1) * 4 / 8 + 8 + 8) / dim, rel=1e-3)
    assert row["dense"]["per_weight"] == pytest.approx(4 + 8 / dim, rel=1e-3)
    assert "embedding" in pw.format_traffic({"traffic": {"packed embedding": [row]}})


def test_without_the_kernels_there_are_no_gemm_or_embedding_workloads(monkeypatch):
    from diffq_triton.kernels import packed as packed_k

    monkeypatch.delattr(packed_k, "gemm", raising=False)
    monkeypatch.delattr(packed_k, "embedding", raising=False)
    kinds = {label.split()[1] for label, _ in pw.packed_workloads(quick=False)}
    assert kinds == {"dequantize", "gemv"}
