"""``diffq-triton info FILE``: per-tensor widths and bytes, the model's size; text, JSON, plot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .serialization.summary import FileSummary, TensorSummary, summarize

# Eight heights of a text histogram; a width no entry has is a dot.
_BARS = "▁▂▃▄▅▆▇█"


def add_parser(commands) -> argparse.ArgumentParser:
    """Add the ``info`` sub-command to ``commands`` (an argparse sub-parsers object)."""
    info = commands.add_parser(
        "info",
        help="show the widths, bytes and size of a saved quantized model",
        description=(
            "Read a file written by save_quantized, or a diffq 0.2.4 quantized state saved "
            "with torch.save, without a model and without running any pickled code; check "
            "it as the loader does (checksums, widths, lengths) and print per tensor its "
            "shape, group size, widths (min / mean / max and a histogram over min..max) "
            "and bytes, then the model's size (spec §3, 1 MB = 2^23 bits) and bits per "
            "weight. A bad file exits with status 2 and a one-line message."
        ),
    )
    info.add_argument("file", type=Path, help="the file to inspect")
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.add_argument("--plot", type=Path, default=None, metavar="OUT.png",
                      help="draw the widths of each quantized tensor into a PNG (needs "
                           "matplotlib, the 'plot' extra)")
    info.add_argument("--min-bits", type=_width, default=2,
                      help="the DiffQuantizer's min_bits, from which each group's width "
                           "field is counted as its true_model_size() counts it (files do "
                           "not record it; default 2, DiffQuantizer's default)")
    return info


def _width(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if not 1 <= value <= 15:
        raise argparse.ArgumentTypeError(f"must lie in [1, 15], got {value}")
    return value


def run(args: argparse.Namespace) -> int:
    """Run ``info`` on parsed arguments; returns the exit status (2 for a bad file)."""
    if args.plot is not None:
        try:  # before any output: a missing plotting library is a usage error
            import matplotlib  # noqa: F401
        except ImportError:
            return _fail("--plot needs matplotlib (the package's 'plot' extra): "
                         "pip install matplotlib")
    try:
        summary = summarize(args.file, min_bits=args.min_bits)
    except OSError as err:
        return _fail(f"{args.file}: cannot read it: {err.strerror or err}")
    except ValueError as err:
        return _fail(f"{args.file}: {err}")
    print(json.dumps(as_json(summary), indent=1) if args.json else format_text(summary))
    if args.plot is not None:
        try:
            plot(summary, args.plot)
        except (OSError, ValueError) as err:
            return _fail(f"cannot write the plot {args.plot}: {err}")
    return 0


def _fail(message: str) -> int:
    # One line, whatever the message quotes (a torch error may span several).
    print(f"diffq-triton info: error: {' '.join(message.split())}", file=sys.stderr)
    return 2


# ----------------------------------------------------------------------------- text
def histogram(tensor: TensorSummary) -> str:
    """One character per width from the smallest to the largest: its share of the entries
    (``█`` for the commonest width, ``·`` for a width no entry has)."""
    if not tensor.widths:
        return ""
    top = max(tensor.widths.values())
    out = []
    for width in range(tensor.min_width, tensor.max_width + 1):
        n = tensor.widths.get(width, 0)
        out.append(_BARS[max(0, -(-n * len(_BARS) // top) - 1)] if n else "·")
    return "".join(out)


def _count(tensor: TensorSummary) -> str:
    prefix = "" if tensor.exact else "≤"
    if tensor.shape is None:
        return f"{prefix}{tensor.numel:,}"
    return prefix + ("×".join(str(d) for d in tensor.shape) or "scalar")


def format_text(summary: FileSummary) -> str:
    """The report ``info`` prints: a table of tensors, then the whole model."""
    rows = [("tensor", "kind", "shape", "group", "widths min/mean/max", "histogram", "bytes")]
    for t in summary.tensors:
        if t.kind == "quantized":
            widths = f"{t.min_width}/{t.mean_width:.2f}/{t.max_width}" if t.widths else "-"
            group = "all" if t.group_size == 0 else str(t.group_size)
            hist = histogram(t)
        else:
            widths, group, hist = t.dtype, "", ""
        name = t.name + (f" (= {', '.join(t.tied)})" if t.tied else "")
        rows.append((name, t.kind, _count(t), group, widths, hist, f"{t.stored_bytes:,}"))
    sizes = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [f"{summary.path}: {summary.format}, {summary.file_bytes:,} bytes"]
    for row in rows:
        cells = [cell.rjust(size) if i in (2, 3, 6) else cell.ljust(size)
                 for i, (cell, size) in enumerate(zip(row, sizes, strict=True))]
        lines.append("  ".join(cells).rstrip())
    counts = {kind: len(summary.of_kind(kind)) for kind in ("quantized", "float", "buffer")}
    bound, approx = ("", "") if summary.exact else ("≤ ", "~")
    bpw = summary.bits_per_weight
    lines += [
        f"model size: {bound}{summary.size_mb:.6f} MB ({summary.size_bits:,} bits, as "
        "true_model_size() counts them, 1 MB = 2^23 bits), "
        + (f"{approx}{bpw:.3f} bits per weight over {bound}{summary.weights:,} weights"
           if bpw is not None else "no weights"),
        f"tensors: {counts['quantized']} quantized, {counts['float']} float, "
        f"{counts['buffer']} buffers; file {summary.file_mb:.6f} MB (2^20 bytes)",
    ]
    if summary.min_bits is not None:
        lines.append(f"width fields counted from min_bits={summary.min_bits}"
                     + (" (--min-bits; files do not record the quantizer's)"
                        if summary.format.startswith("diffq-triton") else " (the state's)"))
    lines += [f"note: {note}" for note in summary.notes]
    return "\n".join(lines)


def as_json(summary: FileSummary) -> dict:
    """The report as plain JSON values (widths as ``{"width": entries}``)."""
    tensors = []
    for t in summary.tensors:
        row = {"name": t.name, "kind": t.kind, "shape": None if t.shape is None else list(
            t.shape), "numel": t.numel, "dtype": t.dtype, "bytes": t.stored_bytes,
            "size_bits": t.size_bits, "exact": t.exact, "tied": list(t.tied)}
        if t.kind == "quantized":
            row.update(group_size=t.group_size, min_width=t.min_width,
                       mean_width=t.mean_width, max_width=t.max_width,
                       widths={str(w): n for w, n in sorted(t.widths.items())})
        tensors.append(row)
    return {
        "file": str(summary.path), "format": summary.format,
        "file_bytes": summary.file_bytes, "file_mb": summary.file_mb,
        "size_bits": summary.size_bits, "size_mb": summary.size_mb,
        "bits_per_weight": summary.bits_per_weight, "weights": summary.weights,
        "quantized": len(summary.of_kind("quantized")), "float": len(summary.of_kind("float")),
        "buffers": len(summary.of_kind("buffer")), "min_bits": summary.min_bits,
        "exact": summary.exact, "notes": list(summary.notes), "tensors": tensors,
    }


# ----------------------------------------------------------------------------- plot
def plot(summary: FileSummary, path: Path) -> None:
    """Draw the widths of every quantized tensor into the PNG ``path``: on top the mean
    width (bars) and the range (whiskers), below each width's share of the entries.

    Raises:
        ImportError: matplotlib is not installed.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, none opened
    import matplotlib.pyplot as plt

    tensors = summary.of_kind("quantized")
    names = [t.name for t in tensors]
    x = range(len(tensors))
    fig, (top, bottom) = plt.subplots(
        2, 1, sharex=True, figsize=(max(6.0, 0.35 * len(tensors) + 2), 6.5),
        gridspec_kw={"height_ratios": [1, 1.3]})
    means = [t.mean_width or 0 for t in tensors]
    low = [m - (t.min_width or 0) for m, t in zip(means, tensors, strict=True)]
    high = [(t.max_width or 0) - m for m, t in zip(means, tensors, strict=True)]
    top.bar(x, means, color="tab:blue", yerr=[low, high], capsize=3, ecolor="0.3")
    top.set_ylabel("width (bits)\nmean, min–max")
    top.set_title(f"{Path(summary.path).name}: {summary.size_mb:.4f} MB, "
                  + (f"{summary.bits_per_weight:.2f} bits per weight"
                     if summary.bits_per_weight is not None else "no weights"))
    cmap = plt.get_cmap("viridis")
    bottoms = [0.0] * len(tensors)
    for width in range(1, 16):
        shares = [t.widths.get(width, 0) / max(1, sum(t.widths.values())) for t in tensors]
        if any(shares):
            bottom.bar(x, shares, bottom=bottoms, color=cmap((width - 1) / 14), label=str(width))
            bottoms = [b + s for b, s in zip(bottoms, shares, strict=True)]
    bottom.set_ylabel("share of entries")
    bottom.set_ylim(0, 1)
    if tensors:
        bottom.legend(title="bits", fontsize="small", ncol=2, bbox_to_anchor=(1.01, 1),
                      loc="upper left")
    else:
        top.text(0.5, 0.5, "no quantized tensors", ha="center", transform=top.transAxes)
    bottom.set_xticks(list(x), names, rotation=60, ha="right", fontsize="small")
    fig.tight_layout()
    try:
        fig.savefig(path, format="png", dpi=120, bbox_inches="tight")
    finally:
        plt.close(fig)
