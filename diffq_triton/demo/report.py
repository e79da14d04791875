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


def plot_size_vs_ppl(results: Sequence[RunResult], path: Path) -> str | None:
    """Scatter of size (MB, log scale) against validation perplexity, saved as PNG.

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
    markers = {"float": "s", "qat": "^", "diffq": "o", "budget": "D"}
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in results:
        ax.scatter(r.size_mb, r.val_ppl, marker=markers.get(r.method.kind, "x"), s=60)
        ax.annotate(r.method.name, (r.size_mb, r.val_ppl), textcoords="offset points",
                    xytext=(6, 4), fontsize=8)
    ax.set_xscale("log")
    # Ticks at 1, 2, 5 x 10^k written as plain numbers: the default 3x10^-1 style overlaps.
    ax.xaxis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(ticker.NullFormatter())
    ax.margins(x=0.25, y=0.1)  # room for the labels of the end points
    ax.set_xlabel("model size (MB, log scale)")
    ax.set_ylabel("validation perplexity (lower is better)")
    ax.set_title("DiffQ demo: size against quality")
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


def comparison(results: Sequence[RunResult]) -> list[str]:
    """One sentence per DiffQ run against the QAT run: smaller or not, perplexity better or not.

    Returns an empty list when the results hold no QAT run or no DiffQ run.
    """
    qat = next((r for r in results if r.method.kind == "qat"), None)
    if qat is None:
        return []
    lines = []
    for r in results:
        if r.method.kind not in ("diffq", "budget"):
            continue
        size = qat.size_mb / r.size_mb
        change = 100 * (r.val_ppl / qat.val_ppl - 1)
        smaller = f"{size:.2f}x smaller than" if size >= 1 else f"{1 / size:.2f}x larger than"
        if size >= 1 and change <= 0:
            verdict = "beats it on both"
        elif size >= 1:
            verdict = "smaller, but worse perplexity"
        else:
            verdict = "larger" + (", better perplexity" if change < 0 else ", no better")
        lines.append(
            f"{r.method.name}: {smaller} {qat.method.name}, perplexity {r.val_ppl:.3f} vs "
            f"{qat.val_ppl:.3f} ({change:+.1f}%): {verdict}"
        )
    return lines
