"""Size budget against a fixed-λ sweep, on the demo's task (character LM on stdlib sources).

The usual way to reach a size with DiffQ is a sweep: one full training per λ, keep the run
that landed nearest. Here each fixed-λ run of the sweep sets a target (its own final
``true_model_size()``), and one :class:`~diffq_triton.SizeBudget` run is trained to
that target with everything else equal (model, data order, noise seed, optimizer, steps).
A row compares the two: size reached and validation perplexity (lower is better).

Run with ``pytest bench/bench_budget.py`` or ``python bench/bench_budget.py [steps]``; rows
go to bench/RESULTS.md.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

import diffq_triton
from diffq_triton import SizeBudget
from diffq_triton.demo.data import VOCAB_SIZE, eval_windows, load_corpus, random_batch
from diffq_triton.demo.model import CharTransformer, ModelConfig, lm_loss
from diffq_triton.demo.train import perplexity

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import record  # noqa: E402

# The demo's own settings (diffq_triton/demo/methods.py: QuantSettings, default penalties).
PENALTIES = (0.5, 2.0, 5.0)
GROUP_SIZE = 8
INIT_BITS = 8.0
BITS_LR = 0.05
MODEL = ModelConfig(vocab=VOCAB_SIZE, context=64, dim=64, layers=2, heads=4)
BATCH = 16
LR = 3e-3
STEPS = 300
SEED = 0
EVAL_WINDOWS = 256


@dataclass
class Run:
    mode: str
    penalty: float  # fixed λ, or the λ the budget ended with
    target_mb: float | None
    size_mb: float
    val_ppl: float
    seconds: float
    unrounded_mb: float  # true_model_size() before finalize() (plain rounding of the widths)


def train(corpus, steps: int, penalty: float | None = None, target_mb: float | None = None) -> Run:
    """One run: fixed ``penalty`` (λ·model_size()) or a budget at ``target_mb``."""
    start = time.perf_counter()
    torch.manual_seed(SEED)
    model = CharTransformer(MODEL)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    quantizer = diffq_triton.DiffQuantizer(model, group_size=GROUP_SIZE, init_bits=INIT_BITS)
    quantizer.setup_optimizer(optimizer, lr=BITS_LR)
    budget = SizeBudget(quantizer, target_mb) if target_mb is not None else None
    batches = torch.Generator().manual_seed(SEED)
    torch.manual_seed(SEED + 1)  # the noise
    model.train()
    for _ in range(steps):
        inputs, targets = random_batch(corpus.train, BATCH, MODEL.context, batches)
        loss = lm_loss(model(inputs), targets)
        extra = budget.penalty() if budget else penalty * quantizer.model_size()
        optimizer.zero_grad(set_to_none=True)
        (loss + extra).backward()
        optimizer.step()
    unrounded = quantizer.true_model_size()
    if budget is not None:
        budget.finalize()
    windows = eval_windows(corpus.val, MODEL.context, EVAL_WINDOWS)
    ppl = perplexity(model, windows, "cpu")
    return Run(
        "budget" if budget else "fixed λ",
        float(budget.lam) if budget else penalty,
        target_mb,
        quantizer.true_model_size(),
        ppl,
        time.perf_counter() - start,
        unrounded,
    )


def compare(steps: int = STEPS) -> list[dict]:
    """The sweep, then one budget run per size the sweep reached; rows for RESULTS.md."""
    corpus = load_corpus(max_train_chars=400_000, max_val_chars=40_000)
    rows = []
    for penalty in PENALTIES:
        fixed = train(corpus, steps, penalty=penalty)
        budget = train(corpus, steps, target_mb=fixed.size_mb)
        for run in (fixed, budget):
            rows.append({
                "task": f"char LM dim {MODEL.dim}, {steps} steps",
                "mode": run.mode,
                "λ": run.penalty,
                "target MB": "" if run.target_mb is None else run.target_mb,
                "MB": run.size_mb,
                "size vs target": "" if run.target_mb is None
                else f"{100 * (run.size_mb / run.target_mb - 1):+.3f}%",
                "MB before finalize": "" if run.target_mb is None else run.unrounded_mb,
                "val ppl": run.val_ppl,
                "s": run.seconds,
            })
        print(f"λ={penalty:g}: fixed {fixed.size_mb:.4f} MB ppl {fixed.val_ppl:.3f} | budget "
              f"{budget.size_mb:.4f} MB ppl {budget.val_ppl:.3f} (λ found {budget.penalty:.3g})",
              flush=True)
    return rows


def penalty_overhead(reps: int = 200) -> dict:
    """Median time of forward+backward of the penalty term alone: fixed λ vs budget (µs)."""
    torch.manual_seed(SEED)
    model = CharTransformer(MODEL)
    quantizer = diffq_triton.DiffQuantizer(model, group_size=GROUP_SIZE, init_bits=INIT_BITS)
    quantizer.no_optimizer()
    budget = SizeBudget(quantizer, float(quantizer.model_size().detach()) * 0.6)
    terms = {"fixed λ": lambda: 2.0 * quantizer.model_size(), "budget": budget.penalty}
    times: dict[str, list[float]] = {name: [] for name in terms}
    for _ in range(reps):
        for name, term in terms.items():  # interleaved: load changes hit both alike
            start = time.perf_counter()
            term().backward()
            times[name].append(time.perf_counter() - start)
    fixed, ours = (statistics.median(times[n]) * 1e6 for n in terms)
    return {"model": f"char LM dim {MODEL.dim}", "groups": sum(
        p.numel() for p in quantizer._logits()), "fixed λ µs": fixed, "budget µs": ours,
        "extra µs": ours - fixed}


def test_penalty_overhead():
    row = penalty_overhead()
    print(row, flush=True)
    record("size budget: cost of the penalty term per step", [row],
           note="Median wall time of building the penalty and its backward on the logits, "
           "fixed λ·model_size() vs SizeBudget.penalty() (a few extra 0-dim ops, no sync).")


def test_budget_matches_the_sweep():
    rows = compare()
    record(
        "size budget vs fixed-λ sweep",
        rows,
        note="Each fixed-λ run sets the target of a budget run trained identically otherwise; "
        "the budget run needs no sweep. val ppl: exp(validation loss) with the quantized "
        "weights (lower is better). λ for budget rows: the value it ended with.",
    )
    for budget in rows[1::2]:
        assert budget["MB"] <= budget["target MB"] * (1 + 1e-9)
        assert budget["MB"] >= 0.98 * budget["target MB"]
        assert math.isfinite(budget["val ppl"])


if __name__ == "__main__":
    steps = int(sys.argv[1]) if len(sys.argv) > 1 else STEPS
    torch.set_num_threads(max(1, torch.get_num_threads()))
    test_penalty_overhead()
    test_rows = compare(steps)
    record("size budget vs fixed-λ sweep", test_rows,
           note="Each fixed-λ run sets the target of a budget run trained identically "
           "otherwise. val ppl with the quantized weights (lower is better).")
