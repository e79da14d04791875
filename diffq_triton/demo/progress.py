"""A tiny text progress bar (no third-party dependency)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressBar:
    """Draws ``label [#####.....] step/total  key=value  rate`` on one line.

    On a terminal the line is redrawn in place at most ``refresh`` times a second; on a pipe
    or file (logs, tests) only the final line is written, so logs stay readable.

    Args:
        total: number of steps, >= 1.
        label: text before the bar.
        stream: where to draw (stderr by default).
        width: characters inside the brackets.
        refresh: redraws per second on a terminal.
    """

    def __init__(
        self,
        total: int,
        label: str = "",
        stream: TextIO | None = None,
        width: int = 24,
        refresh: float = 10.0,
    ):
        if not isinstance(total, int) or total < 1:
            raise ValueError(f"total must be a positive integer, got {total!r}")
        self.total = total
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self.width = width
        self.interval = 1.0 / refresh
        self.done = 0
        self.info = ""
        self.start = time.perf_counter()
        self._last_draw = -float("inf")
        self._live = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, steps: int = 1, **info: object) -> None:
        """Advance by ``steps`` and show ``info`` (floats printed with 3 significant digits)."""
        self.done = min(self.total, self.done + steps)
        if info:
            self.info = "  ".join(
                f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in info.items()
            )
        now = time.perf_counter()
        if self._live and (now - self._last_draw >= self.interval or self.done == self.total):
            self._last_draw = now
            self.stream.write("\r" + self.render() + "\033[K")
            self.stream.flush()

    def render(self) -> str:
        """The bar as one line of text (no newline)."""
        filled = self.width * self.done // self.total
        elapsed = time.perf_counter() - self.start
        rate = f"{self.done / elapsed:.1f} it/s" if elapsed > 0 and self.done else ""
        bar = "#" * filled + "." * (self.width - filled)
        parts = [self.label, f"[{bar}]", f"{self.done}/{self.total}", self.info, rate]
        return "  ".join(p for p in parts if p)

    def close(self) -> None:
        """End the line (on a pipe: write the final state once)."""
        if self._live:
            self.stream.write("\r" + self.render() + "\033[K\n")
        else:
            self.stream.write(self.render() + "\n")
        self.stream.flush()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
