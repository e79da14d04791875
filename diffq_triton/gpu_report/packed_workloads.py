"""The GPU report's workloads of the packed-layout kernels, and their modelled traffic.

Each workload is ``(label, thunk)``: the thunk builds a packed weight (zero levels: only its
layout matters), calls one launcher of ``kernels/packed.py`` (recorded, never run) and returns
its traffic model, a function of the captured launches' named arguments (so a GEMM's
``BLOCK_M`` is the one its launcher chose) giving the report's rows of bytes per weight
(:mod:`diffq_triton.packed.traffic`, the packed call against the dense float call).

A kernel joins the report by adding an entry to :func:`packed_workloads`: the GEMM and the
embedding gather are included when ``kernels.packed`` has ``gemm`` / ``embedding``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

# What a workload's thunk returns: the captured launches' named arguments → report rows.
TrafficModel = Callable[[list[dict]], list[dict]]
# The shapes: a Linear weight [N, K] and an Embedding weight [vocab, dim].
LINEAR_SHAPE = (4096, 1000)
EMBEDDING_SHAPE = (8192, 768)


def packed_weight(shape: tuple[int, int], g: int, spread: bool, scheme: str, dtype: Any):
    """A packed weight of zero levels (nothing is launched: only its layout matters) with
    widths 1–15 in turn (``spread``, 4 field bits) or all 4 (no width stream)."""
    import torch

    from ..packed import PackedTensor
    from ..serialization.tensor_record import QuantizedTensor

    numel = shape[0] * shape[1]
    n_groups = 1 if g == 0 else -(-numel // g)
    bits = (torch.arange(n_groups) % 15 + 1 if spread else torch.full((n_groups,), 4))
    lengths = torch.full((n_groups,), g or numel)
    lengths[-1] = numel - (g or numel) * (n_groups - 1)
    total = int((bits * lengths).sum())
    qt = QuantizedTensor("w", shape, dtype, scheme, g, None, bits.to(torch.uint8), -1.0, 1.0,
                         stream=torch.zeros((total + 7) // 8, dtype=torch.uint8))
    return PackedTensor.from_record(qt, dtype=dtype)


def _row(lay, packed, dense, baseline: str, **extra: Any) -> dict:
    """One report row: the packed call's traffic against the dense call's."""
    from ..packed import traffic

    return {"bits": round(lay.mean_bits, 3), "g": lay.g, "f": lay.field_bits,
            "baseline": baseline, "packed": packed.as_dict(), "dense": dense.as_dict(),
            "speedup": round(traffic.speedup(packed, dense), 3), **extra}


def _block(launches: list[dict], name: str) -> list[int]:
    """The distinct integer values of constexpr ``name`` over the captured launches."""
    return sorted({a[name] for a in launches if isinstance(a.get(name), int)})


def packed_workloads(quick: bool) -> list[tuple[str, Callable[[], TrafficModel]]]:
    """The packed-layout kernels: the tile kernel (g = 1, 8, 1024: its largest block), the
    chunked one (one group, g = 2000), the GEMV at 1 and 16 rows (g = 8, 256: one piece,
    2000: several pieces per group; widths 1–15, and 4 bits with no width stream), the GEMM
    at 64 and 1024 rows and the embedding gather when ``kernels.packed`` has them."""
    import torch

    from ..kernels import packed
    from ..packed import traffic

    def dequant(g: int, spread: bool, scheme: str, name: str) -> TrafficModel:
        dtype = getattr(torch, name)
        pt = packed_weight(LINEAR_SHAPE, g, spread, scheme, dtype)
        packed.dequantize(pt)
        lay = traffic.layout_of(pt)
        return lambda launches: [_row(lay, traffic.dequantize(lay, dtype),
                                      traffic.dense_copy(lay.numel, dtype), f"copy {name}")]

    def gemv(g: int, rows: int, name: str, spread: bool = True) -> TrafficModel:
        dtype = getattr(torch, name)
        pt = packed_weight(LINEAR_SHAPE, g, spread, "minmax", dtype)
        packed.gemv(torch.empty(rows, 1000, dtype=dtype), pt, torch.empty(4096, dtype=dtype))
        lay = traffic.layout_of(pt)
        return lambda launches: [_row(lay, traffic.gemv(lay, rows, dtype, bias=True),
                                      traffic.dense_linear(*lay.shape, rows, 2, dtype, True),
                                      "F.linear float16")]

    def gemm(g: int, rows: int, name: str) -> TrafficModel:
        dtype = getattr(torch, name)
        pt = packed_weight(LINEAR_SHAPE, g, True, "minmax", dtype)
        packed.gemm(torch.empty(rows, 1000, dtype=dtype), pt, torch.empty(4096, dtype=dtype))
        lay = traffic.layout_of(pt)
        dense = traffic.dense_linear(*lay.shape, rows, 2, dtype, True)

        def model(launches: list[dict]) -> list[dict]:
            # One row per BLOCK_M the launcher (or its autotuner) would use; without one in
            # the launch, the weight once (a lower bound).
            blocks = _block(launches, "BM") or [None]
            return [_row(lay, traffic.gemm(lay, rows, bm or rows, None, dtype, True), dense,
                         "F.linear float16", block_m=bm or "?") for bm in blocks]
        return model

    def embedding(g: int, n_ids: int, name: str) -> TrafficModel:
        dtype = getattr(torch, name)
        pt = packed_weight(EMBEDDING_SHAPE, g, True, "minmax", dtype)
        packed.embedding(torch.zeros(4, n_ids // 4, dtype=torch.int64), pt)
        lay = traffic.layout_of(pt)
        return lambda launches: [_row(lay, traffic.embedding(lay, n_ids, dtype),
                                      traffic.dense_embedding(n_ids, lay.shape[1], 2),
                                      "F.embedding float16")]

    names = ("float32", "bfloat16", "float16")
    deq = [(8, True, "minmax", "float32"), (8, False, "minmax", "bfloat16"),
           (1, True, "minmax", "float16"), (1024, True, "minmax", "float32"),
           (0, False, "lsq", "float32"), (2000, True, "minmax", "bfloat16")]
    mv = [(8, 1, "float16"), (8, 16, "bfloat16"), (256, 16, "float32"), (2000, 1, "float16")]
    mm = [(8, 64, "float16"), (8, 1024, "bfloat16"), (2000, 64, "float32")]
    emb = [(8, 512, "float16"), (100, 512, "bfloat16")]
    if not quick:
        deq += [(g, True, "minmax", name) for name in names for g in (7, 64, 256, 2000)]
        mv += [(g, r, name) for name in names for g in (1, 7, 64, 0) for r in (1, 4, 16)]
        mm += [(g, r, name) for name in names for g in (1, 7, 64, 0) for r in (64, 1024)]
        emb += [(g, 512, name) for name in names for g in (1, 7, 64, 0)]
    out = [(f"packed dequantize {name} g={g} {scheme}{' spread' if spread else ''}",
            functools.partial(dequant, g, spread, scheme, name)) for g, spread, scheme, name in deq]
    out += [(f"packed gemv {name} g={g} M={rows}", functools.partial(gemv, g, rows, name))
            for g, rows, name in mv]
    # 4 bits everywhere (no width stream): the issue's 16 / (4 + 0.5) case.
    out.append(("packed gemv float16 g=64 M=1 4-bit",
                functools.partial(gemv, 64, 1, "float16", False)))
    # The GEMM and the gather join once kernels/packed.py has them.
    if hasattr(packed, "gemm"):
        out += [(f"packed gemm {name} g={g} M={rows}", functools.partial(gemm, g, rows, name))
                for g, rows, name in mm]
    if hasattr(packed, "embedding"):
        out += [(f"packed embedding {name} g={g} ids={n}",
                 functools.partial(embedding, g, n, name)) for g, n, name in emb]
    return out


def format_traffic(report: dict) -> str:
    """The modelled bytes per weight of each packed workload, one line per row."""
    rows = [(label, r) for label, rs in report.get("traffic", {}).items() for r in rs]
    if not rows:
        return ""
    width = max(len(label) for label, _ in rows) + 2
    lines = ["Modelled bytes moved per weight (diffq_triton.packed.traffic): the packed call, "
             "its weight + metadata, the dense call it replaces, dense bytes / packed bytes",
             f"{'workload':{width}}{'bits':>6}{'f':>3}{'B/w':>9}{'w+meta':>9}{'dense':>8}"
             f"{'model x':>9}  baseline"]
    for label, r in rows:
        p = r["packed"]
        extra = f"  BLOCK_M={r['block_m']}" if "block_m" in r else ""
        lines.append(f"{label:{width}}{r['bits']:>6.2f}{r['f']:>3}{p['per_weight']:>9.4f}"
                     f"{p['weight_per_weight']:>9.4f}{r['dense']['per_weight']:>8.3f}"
                     f"{r['speedup']:>9.2f}  {r['baseline']}{extra}")
    return "\n".join(lines)
