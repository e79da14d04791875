"""The whole demo: train every method, print the table, plot, save and reload DiffQ models."""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import torch

from . import checkpoint, packed_check, report
from .data import VOCAB_SIZE, load_corpus
from .methods import Method, QuantSettings, default_methods, resolve_budget
from .model import ModelConfig
from .train import (
    RunResult,
    TrainConfig,
    build_model,
    eval_windows,
    perplexity,
    train_method,
)


@dataclass
class DemoConfig:
    """Everything one demo run needs.

    Args:
        out: directory for ``results.json``, ``results.md``, the plot and the saved models.
        methods: the rows of the table; the first must be the float baseline.
        model: shape of the language model.
        train: steps, batch, device, seed.
        quant: quantizer settings shared by the methods.
        max_train_chars: characters of standard-library source to train on.
    """

    out: Path = Path("diffq_demo_out")
    methods: Sequence[Method] = field(default_factory=default_methods)
    model: ModelConfig = field(default_factory=lambda: ModelConfig(vocab=VOCAB_SIZE))
    train: TrainConfig = field(default_factory=TrainConfig)
    quant: QuantSettings = field(default_factory=QuantSettings)
    max_train_chars: int = 2_000_000


@dataclass
class ReloadCheck:
    """A saved DiffQ model reloaded into a freshly initialised one."""

    method: str
    path: Path
    file_mb: float
    quantized_ppl: float
    reloaded_ppl: float

    @property
    def equal(self) -> bool:
        # Both evaluate the same dequantized weights through the same float ops.
        return self.quantized_ppl == self.reloaded_ppl


def check_device(device: str) -> None:
    """Raise ``ValueError`` naming ``device`` when torch cannot use it."""
    try:
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as err:
        raise ValueError(f"device {device!r} is not usable here: {err}") from None


def run_demo(config: DemoConfig, stream: TextIO | None = None) -> dict:
    """Run the demo, printing to ``stream`` (stdout by default; progress bars go to stderr).

    Returns:
        ``{"results": [RunResult...], "reload": [ReloadCheck...], "packed": [PackedCheck...],
        "plot": Path | None}``.
    """
    out = stream if stream is not None else sys.stdout
    if not config.methods or config.methods[0].kind != "float":
        raise ValueError("methods must start with the float baseline (kind 'float')")
    check_device(config.train.device)
    config.out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    corpus = load_corpus(max_train_chars=config.max_train_chars)
    print(
        f"data: {corpus.train.numel():,} training / {corpus.val.numel():,} validation characters "
        f"from {len(corpus.train_files)} + {len(corpus.val_files)} files of {corpus.source}",
        file=out,
    )
    print(
        f"model: {config.model.layers}-layer Transformer, width {config.model.dim}, context "
        f"{config.model.context}; {config.train.steps} steps of {config.train.batch} windows "
        f"on {config.train.device}",
        file=out, flush=True,
    )
    results: list[RunResult] = []
    for method in config.methods:
        qat_sizes = {r.method.bits: r.size_mb for r in results if r.method.kind == "qat"}
        relative = method.paired_qat_bits is not None and not method.target_mb > 0
        try:
            method = resolve_budget(method, qat_sizes)
            results.append(
                train_method(method, corpus, config.model, config.train, config.quant)
            )
        except ValueError as err:
            if not relative:
                raise
            # A budget derived from QAT's size can fall outside what DiffQ reaches on a tiny
            # model (e.g. nothing large enough to quantize): the row is left out, not the demo.
            print(f"{method.name}: skipped: {err}", file=out, flush=True)

    print("\n" + report.format_table(results) + "\n", file=out)
    for line in report.comparison(results):
        print(line, file=out)
    checks = _save_and_reload(results, corpus.val, config)
    for check in checks:
        verdict = "equal" if check.equal else "DIFFERENT"
        print(
            f"{check.method}: saved {check.path.name} ({check.file_mb:.3f} MB); reloaded into a "
            f"fresh model: ppl {check.reloaded_ppl:.4f} vs quantized {check.quantized_ppl:.4f} "
            f"({verdict})",
            file=out,
        )
    packed = packed_check.packed_checks(
        checks, config.model,
        eval_windows(corpus.val, config.model.context, config.train.eval_windows),
        config.train.device)
    for line in map(packed_check.describe, packed):
        print(line, file=out)
    plot_path = config.out / "size_vs_ppl.png"
    problem = report.plot_size_vs_ppl(results, plot_path)
    print(problem if problem else f"plot: {plot_path}", file=out)
    extra = {
        "config": {
            "model": asdict(config.model), "train": asdict(config.train),
            "quant": asdict(config.quant), "max_train_chars": config.max_train_chars,
            "data": corpus.source, "torch": torch.__version__,
        },
        "comparison": report.comparison(results),
        "reload": [
            {"method": c.method, "file": c.path.name, "file_mb": c.file_mb,
             "quantized_ppl": c.quantized_ppl, "reloaded_ppl": c.reloaded_ppl}
            for c in checks
        ],
        "packed": [asdict(p) for p in packed],
    }
    report.write_json(config.out / "results.json", results, extra)
    (config.out / "results.md").write_text(report.format_table(results, markdown=True) + "\n")
    print(
        f"results: {config.out / 'results.json'}, {config.out / 'results.md'} "
        f"({time.perf_counter() - started:.0f} s in all)",
        file=out,
    )
    return {"results": results, "reload": checks, "packed": packed,
            "plot": None if problem else plot_path}


def _save_and_reload(
    results: Sequence[RunResult], val: torch.Tensor, config: DemoConfig
) -> list[ReloadCheck]:
    windows = eval_windows(val, config.model.context, config.train.eval_windows)
    checks = []
    for result in results:
        if result.method.kind == "diffq":
            path = config.out / f"diffq_penalty_{result.method.penalty:g}.safetensors"
        elif result.method.paired_qat_bits is not None:
            # Named by the QAT twin: two twins of equal size must not share one file.
            path = config.out / f"diffq_at_qat{result.method.paired_qat_bits}_size.safetensors"
        elif result.method.kind == "budget":
            path = config.out / f"diffq_target_{result.method.target_mb:.4g}mb.safetensors"
        else:
            continue
        checkpoint.save(result.quantizer, path)
        # A different seed: the reloaded weights must come from the file, not the init.
        fresh = build_model(config.model, config.train.seed + 1000, config.train.device)
        checkpoint.load(fresh, path)
        checks.append(ReloadCheck(
            result.method.name, path, path.stat().st_size / 2**20, result.val_ppl,
            perplexity(fresh, windows, config.train.device),
        ))
    return checks
