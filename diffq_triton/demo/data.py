"""Text that ships with every Python install: the standard library's own sources, as tokens.

Files are chosen deterministically (sorted top-level ``*.py`` of the stdlib directory); every
``val_every``-th file goes to validation, so the two splits share no file.
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path

import torch

# Tab, newline and printable ASCII; everything else maps to one "unknown" id. A fixed table
# (not one learnt from the files) keeps ids identical on every machine and Python version.
_ALPHABET = "\t\n" + "".join(chr(c) for c in range(32, 127))
_UNKNOWN = len(_ALPHABET)
VOCAB_SIZE = len(_ALPHABET) + 1
_INDEX = {ch: i for i, ch in enumerate(_ALPHABET)}


def encode(text: str) -> torch.Tensor:
    """Token ids of ``text``: int64 tensor of shape (len(text),), values in [0, VOCAB_SIZE)."""
    return torch.tensor([_INDEX.get(ch, _UNKNOWN) for ch in text], dtype=torch.int64)


def decode(ids: torch.Tensor) -> str:
    """Inverse of :func:`encode` (unknown ids become ``"?"``); ids: 1-D integer tensor."""
    return "".join(_ALPHABET[i] if i < _UNKNOWN else "?" for i in ids.tolist())


def stdlib_dir() -> Path:
    """Directory of this interpreter's standard library sources."""
    return Path(sysconfig.get_paths()["stdlib"])


@dataclass
class Corpus:
    """Train and validation token streams (1-D int64 tensors) and where they came from."""

    train: torch.Tensor
    val: torch.Tensor
    train_files: list[str]
    val_files: list[str]
    source: str


def load_corpus(
    root: Path | str | None = None,
    max_train_chars: int = 2_000_000,
    max_val_chars: int = 200_000,
    val_every: int = 10,
) -> Corpus:
    """Read the corpus from ``root`` (the stdlib directory by default).

    Args:
        root: a directory of ``*.py`` files (only its top level is read).
        max_train_chars: stop adding training files past this many characters.
        max_val_chars: stop adding validation files past this many characters.
        val_every: every ``val_every``-th file (in sorted order) is a validation file.

    Returns:
        a :class:`Corpus`; raises ``ValueError`` when ``root`` yields too little text.
    """
    if not isinstance(val_every, int) or val_every < 2:
        raise ValueError(f"val_every must be an integer >= 2, got {val_every!r}")
    for name, value in (("max_train_chars", max_train_chars), ("max_val_chars", max_val_chars)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    root = Path(root) if root is not None else stdlib_dir()
    files = sorted(p for p in root.glob("*.py") if p.is_file())
    splits: dict[str, tuple[list[str], list[str]]] = {"train": ([], []), "val": ([], [])}
    limits = {"train": max_train_chars, "val": max_val_chars}
    sizes = {"train": 0, "val": 0}
    for index, path in enumerate(files):
        split = "val" if index % val_every == val_every - 1 else "train"
        if sizes[split] >= limits[split]:
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        texts, names = splits[split]
        texts.append(text)
        names.append(path.name)
        sizes[split] += len(text)
    train_text = "".join(splits["train"][0])[:max_train_chars]
    val_text = "".join(splits["val"][0])[:max_val_chars]
    if len(train_text) < 10_000 or len(val_text) < 1_000:
        raise ValueError(
            f"root {str(root)!r} holds too little Python source for the demo "
            f"({len(train_text)} train and {len(val_text)} validation characters)"
        )
    return Corpus(
        encode(train_text), encode(val_text), splits["train"][1], splits["val"][1], str(root)
    )


def random_batch(
    stream: torch.Tensor, batch: int, length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch`` random windows of ``stream``: inputs and next-token targets, each (batch, length).

    The generator alone fixes the windows, so every method sees the same batches.
    """
    starts = torch.randint(0, stream.numel() - length - 1, (batch,), generator=generator)
    offsets = starts[:, None] + torch.arange(length + 1)
    windows = stream[offsets]
    return windows[:, :-1], windows[:, 1:]


def eval_windows(stream: torch.Tensor, length: int, max_windows: int) -> torch.Tensor:
    """Up to ``max_windows`` consecutive, non-overlapping windows of ``length + 1`` tokens.

    Returns an int64 tensor of shape (n, length + 1); window i starts at ``i * length`` so
    every token but the first is predicted exactly once.
    """
    count = min(max_windows, (stream.numel() - 1) // length)
    offsets = torch.arange(count)[:, None] * length + torch.arange(length + 1)
    return stream[offsets]
