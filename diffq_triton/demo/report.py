"""The demo's outputs: the results table, a JSON record and the size-against-perplexity plot."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from .train import RunResult

COLUMNS = ("method", "bits/weight", "size MB", "compression ×", "val ppl", "time s")


def table_rows(results: Sequence[RunResult]) -> list[list[str]]:
    """One row of formatted cells per result; compression is against the first (float) run."""
    reference = results[0].size_mb
    return [
        [
            r.method.name,
            f"{r.bits_per_weight:.2f}",
            f"{r.size_mb:.3f}",
            f"{reference / r.size_mb:.1f}",
            f"{r.val_ppl:.3f}",
            f"{r.seconds:.0f}",
        ]
        for r in results
    ]


def format_table(results: Sequence[RunResult], markdown: bool = False) -> str:
    """The table as aligned plain text, or as a Markdown table when ``markdown``."""
    rows = [list(COLUMNS), *table_rows(results)]
    if markdown:
        lines = ["| " + " | ".join(row) + " |" for row in rows]
        lines.insert(1, "|" + "|".join("---" for _ in COLUMNS) + "|")
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(COLUMNS))]
    # Names left-aligned, numbers right-aligned.
    lines = [
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def to_records(results: Sequence[RunResult]) -> list[dict]:
    """Plain-data form of the results (for ``results.json``)."""
    return [
        {
            "method": r.method.name,
            "kind": r.method.kind,
            "penalty": r.method.penalty,
            "target_mb": r.method.target_mb,
            "params": r.params,
            "size_mb": r.size_mb,
            "bits_per_weight": r.bits_per_weight,
            "val_ppl": r.val_ppl,
            "seconds": r.seconds,
        }
        for r in results
    ]


def write_json(path: Path, results: Sequence[RunResult], extra: dict) -> None:
    """Write the results and ``extra`` (settings, reload checks) as indented JSON."""
    path.write_text(json.dumps({"results": to_records(results), **extra}, indent=2) + "\n")


# One line per method family on the plot: label, marker, line style.
FAMILIES = {
    "qat": ("QAT (UniformQuantizer, qat=True)", "^", "-"),
    "budget": ("DiffQ, size budget (SizeBudget)", "D", "-"),
    "diffq": ("DiffQ, fixed penalty λ", "o", ":"),
}


def plot_size_vs_ppl(results: Sequence[RunResult], path: Path) -> str | None:
    """Size (MB, log scale) against validation perplexity, saved as PNG: one line per
    method family (QAT, DiffQ with a size budget, DiffQ with a fixed λ), each through its
    points in size order, and the float32 baseline as a point and a dashed level.

    Returns None on success, or a message saying why no plot was written (matplotlib is an
    optional extra: ``pip install diffq-triton[plot]``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return (
            "no plot: matplotlib is not installed "
            "(pip install 'diffq-triton[plot]' or pip install matplotlib)"
        )
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for r in results:
        if r.method.kind == "float":
            ax.axhline(r.val_ppl, color="gray", linestyle="--", linewidth=1)
            ax.scatter(r.size_mb, r.val_ppl, marker="s", s=50, color="gray",
                       label=f"float32 ({r.size_mb:.2f} MB)")
    for kind, (label, marker, style) in FAMILIES.items():
        points = sorted((r for r in results if r.method.kind == kind), key=lambda r: r.size_mb)
        if not points:
            continue
        ax.plot([r.size_mb for r in points], [r.val_ppl for r in points], marker=marker,
                linestyle=style, markersize=7, label=label)
        if kind == "qat":  # the widths, so each DiffQ-budget point finds its QAT twin
            for r in points:
                ax.annotate(f"{r.method.bits}-bit", (r.size_mb, r.val_ppl), fontsize=8,
                            textcoords="offset points", xytext=(5, 6))
    ax.set_xscale("log")
    # Ticks at 1, 2, 5 x 10^k written as plain numbers: the default 3x10^-1 style overlaps.
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.margins(x=0.1, y=0.1)
    ax.set_xlabel("stored model size (MB, log scale)")
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.set_title("DiffQ demo: size against perplexity (lower left is better)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def _verdict(r: RunResult, qat: RunResult) -> str:
    ratio = qat.size_mb / r.size_mb
    change = 100 * (r.val_ppl / qat.val_ppl - 1)
    if r.method.paired_qat_bits == qat.method.bits:
        size = f"at {qat.method.name}'s size ({r.size_mb:.4g} vs {qat.size_mb:.4g} MB)"
        verdict = "DiffQ better" if change < 0 else "QAT better" if change > 0 else "equal"
    else:
        size = (f"{ratio:.2f}x smaller than" if ratio >= 1 else f"{1 / ratio:.2f}x larger than"
                ) + f" {qat.method.name}"
        if ratio >= 1 and change <= 0:
            verdict = "beats it on both"
        elif ratio >= 1:
            verdict = "smaller, but worse perplexity"
        else:
            verdict = "larger" + (", better perplexity" if change < 0 else ", no better")
    return (f"{r.method.name}: {size}, perplexity {r.val_ppl:.3f} vs {qat.val_ppl:.3f} "
            f"({change:+.1f}%): {verdict}")


def comparison(results: Sequence[RunResult]) -> list[str]:
    """One sentence per DiffQ run against a QAT run: a size-budget run sized from a QAT
    width against that QAT run (same size: which perplexity is lower); any other DiffQ run
    against the smallest QAT run at least its size (the one it must beat), or the largest
    QAT run when all are smaller.

    Returns an empty list when the results hold no QAT run or no DiffQ run.
    """
    qats = sorted((r for r in results if r.method.kind == "qat"), key=lambda r: r.size_mb)
    if not qats:
        return []
    lines = []
    for r in results:
        if r.method.kind not in ("diffq", "budget"):
            continue
        paired = [q for q in qats if q.method.bits == r.method.paired_qat_bits]
        larger = [q for q in qats if q.size_mb >= r.size_mb]
        lines.append(_verdict(r, (paired or larger or qats[-1:])[0]))
    return lines
