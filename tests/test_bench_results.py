"""bench/results.py: each benchmark's section is rewritten in place, never appended twice."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "results.py"
_SPEC = importlib.util.spec_from_file_location("bench_results", _PATH)
results = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(results)


def test_a_second_record_replaces_the_section(tmp_path):
    path = tmp_path / "RESULTS.md"
    results.record("step", [{"model": "mlp", "ms": 3.0}], "first note", path=path)
    results.record("other", [{"x": 1}], path=path)
    results.record("step", [{"model": "mlp", "ms": 2.5}], "second note", path=path)
    text = path.read_text()
    device = results.environment()["device"]
    assert text.count(f"## step ({device})") == 1
    assert "second note" in text and "first note" not in text
    assert "| mlp | 2.5 |" in text and "| mlp | 3 |" not in text
    # Sections keep their order; the replaced one is whole, the other untouched.
    assert text.index("## step") < text.index("## other") and "| 1 |" in text
    assert text.startswith("# Benchmark results")
    assert results.environment()["commit"] in text


def test_replace_section_keeps_neighbours():
    text = "# T\n\nintro\n\n## a\n\nold a\n\n## b\n\nold b\n"
    assert results.replace_section(text, "## a", "new a") == (
        "# T\n\nintro\n\n## a\n\nnew a\n\n## b\n\nold b\n")
    assert results.replace_section(text, "## b", "new b") == (
        "# T\n\nintro\n\n## a\n\nold a\n\n## b\n\nnew b\n")
    assert results.replace_section(text, "## c", "c") == text + "\n## c\n\nc\n"


def test_bad_title_or_rows_refused(tmp_path):
    with pytest.raises(ValueError, match="title"):
        results.record("two\nlines", [{"x": 1}], path=tmp_path / "r.md")
    with pytest.raises(ValueError, match="rows"):
        results.record("t", [], path=tmp_path / "r.md")
