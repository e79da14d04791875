"""Write benchmark tables, tagged with machine, versions and commit, to ``bench/RESULTS.md``.

Usage from any benchmark::

    from results import record
    record("training step", [{"model": "mlp", "ms": 3.2, "vs plain": 1.4}])

Each benchmark owns one Markdown section per device (``## training step (cpu)``): a call
rewrites that section in place, so the file shows the current figure of each benchmark once
(earlier figures live in git history). Every row carries the machine, device, torch and
triton versions and the git commit, so rows stay comparable after they are copied elsewhere.
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from functools import cache
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"

_HEADER = (
    "# Benchmark results\n\n"
    "The current figures of each benchmark in `bench/` (`make bench`), one section per "
    "benchmark and device; a benchmark rewrites its own section when it runs, and git keeps "
    "the earlier figures. Each row names the machine, the device, the torch and triton "
    "versions and the git commit it was measured at.\n"
)


@cache
def environment() -> dict[str, str]:
    """machine, device, torch, triton, commit: columns added to every row (with threads)."""
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "absent"
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device = "cpu (triton interpreter)"
    else:
        device = "cpu"
    return {
        "machine": f"{platform.machine()} {os.cpu_count()} cpu",
        "device": device,
        "torch": torch.__version__,
        "triton": triton_version,
        "commit": _commit(),
    }


def _threads() -> int:
    import torch

    return torch.get_num_threads()


def _commit() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
            capture_output=True, text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{sha}+dirty" if dirty else sha


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def format_rows(rows: Sequence[Mapping[str, object]]) -> str:
    """A Markdown table of ``rows`` followed by the environment columns.

    Columns are the union of the rows' keys in first-seen order; a missing value is blank.
    """
    columns: list[str] = []
    for row in rows:
        columns += [key for key in row if key not in columns]
    env = {**environment(), "threads": _threads()}
    columns += [key for key in env if key not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        merged = {**env, **row}
        lines.append("| " + " | ".join(_cell(merged.get(c, "")) for c in columns) + " |")
    return "\n".join(lines)


def record(
    title: str,
    rows: Sequence[Mapping[str, object]],
    note: str = "",
    path: Path | str | None = None,
) -> Path:
    """Write the section ``title`` (on this device) with a table of ``rows``, replacing it.

    Args:
        title: what was measured, e.g. ``"training step, eager"``.
        rows: one mapping per row, column name to value (floats shown with 4 digits).
        note: a sentence under the title (method, units, what the ratio is against).
        path: the file to write (``bench/RESULTS.md`` by default).

    Returns:
        the path written.
    """
    if not isinstance(title, str) or not title or "\n" in title:
        raise ValueError(f"title must be a non-empty one-line string, got {title!r}")
    if not rows:
        raise ValueError("rows must hold at least one row")
    target = Path(path) if path is not None else RESULTS
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    heading = f"## {title} ({environment()['device']})"
    body = [f"Measured {stamp}."]
    if note:
        body.append(note)
    body.append(format_rows(rows))
    text = target.read_text(encoding="utf-8") if target.exists() else _HEADER
    target.write_text(replace_section(text, heading, "\n\n".join(body)), encoding="utf-8")
    return target


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the section under the line ``heading`` (up to the next ``## `` line)
    replaced by ``body``, or the section appended when no line is ``heading``."""
    lines = text.rstrip("\n").split("\n")
    section = [heading, "", *body.split("\n")]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")),
                   len(lines))
        lines[start:end] = [*section, ""] if end < len(lines) else section
    else:
        lines += ["", *section]
    return "\n".join(lines) + "\n"
