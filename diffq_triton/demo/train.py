"""Training and evaluation of one demo method."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import TextIO

import torch
from torch import nn

from .data import Corpus, eval_windows, random_batch
from .methods import Method, QuantSettings, attach
from .model import CharTransformer, ModelConfig, lm_loss
from .progress import ProgressBar

MEGABYTE_BITS = 8 * 2**20


@dataclass(frozen=True)
class TrainConfig:
    """How every method is trained and evaluated.

    Args:
        steps: optimizer steps per method.
        batch: windows per step.
        lr: AdamW peak learning rate of the weights (linear warm-up, cosine decay to 10%).
        warmup: warm-up steps.
        eval_windows: validation windows of ``model.context`` tokens (fixed, in order).
        device: where to train (``"cpu"``, ``"cuda"``...).
        seed: fixes the initial weights, the batches and the noise.
    """

    steps: int = 400
    batch: int = 32
    lr: float = 3e-3
    warmup: int = 20
    eval_windows: int = 256
    device: str = "cpu"
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "batch", "eval_windows"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")


@dataclass
class RunResult:
    """What one method produced: the trained model, its quantizer and its numbers."""

    method: Method
    model: nn.Module
    quantizer: object | None
    params: int
    size_mb: float
    val_ppl: float
    seconds: float
    history: list[float] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per parameter (quantized or not), ranges and bit widths included."""
        return self.size_mb * MEGABYTE_BITS / self.params


def _schedule(step: int, config: TrainConfig) -> float:
    if step < config.warmup:
        return (step + 1) / config.warmup
    progress = (step - config.warmup) / max(1, config.steps - config.warmup)
    return 0.1 + 0.45 * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, device: str, batch: int = 64) -> float:
    """exp(mean next-token loss) over ``windows`` (n, T + 1) int64, model in eval mode.

    A quantizer on the model makes eval forwards use the quantized weights.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for start in range(0, windows.shape[0], batch):
        chunk = windows[start:start + batch].to(device)
        logits = model(chunk[:, :-1])
        total += float(lm_loss(logits, chunk[:, 1:])) * chunk[:, 1:].numel()
        count += chunk[:, 1:].numel()
    model.train(was_training)
    return math.exp(total / count)


def build_model(model_config: ModelConfig, seed: int, device: str) -> CharTransformer:
    """A freshly initialised model; the same seed gives the same weights for every method."""
    torch.manual_seed(seed)
    return CharTransformer(model_config).to(device)


def model_size_mb(model: nn.Module, quantizer: object | None) -> float:
    """Stored size in MB: the quantizer's ``true_model_size()``, or float32 everywhere."""
    if quantizer is not None:
        return float(quantizer.true_model_size())
    return sum(p.numel() for p in model.parameters()) * 32 / MEGABYTE_BITS


def train_method(
    method: Method,
    corpus: Corpus,
    model_config: ModelConfig,
    config: TrainConfig,
    settings: QuantSettings,
    stream: TextIO | None = None,
) -> RunResult:
    """Train a fresh model with ``method`` for ``config.steps`` steps and evaluate it.

    Progress goes to ``stream`` (stderr by default). Returns a :class:`RunResult` with the
    model in eval mode.
    """
    start = time.perf_counter()
    model = build_model(model_config, config.seed, config.device)
    weights = list(model.parameters())
    optimizer = torch.optim.AdamW(weights, lr=config.lr, weight_decay=0.01)
    attached = attach(method, model, optimizer, settings)
    quantizer, penalty = attached.quantizer, attached.penalty
    base_lrs = [group["lr"] for group in optimizer.param_groups]
    batches = torch.Generator().manual_seed(config.seed)
    # The noise of DiffQ draws from the global generator: seed it per method too.
    torch.manual_seed(config.seed + 1)
    train = corpus.train.to(config.device)
    history = []
    model.train()
    with ProgressBar(config.steps, f"{method.name:<18}", stream) as bar:
        for step in range(config.steps):
            scale = _schedule(step, config)
            for group, lr in zip(optimizer.param_groups, base_lrs, strict=True):
                group["lr"] = lr * scale
            inputs, targets = random_batch(train, config.batch, model_config.context, batches)
            loss = lm_loss(model(inputs), targets)
            total = loss if penalty is None else loss + penalty()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            # Clip the weights only: the size penalty's gradient on the bit logits must not
            # shrink the task gradient.
            torch.nn.utils.clip_grad_norm_(weights, 1.0)
            optimizer.step()
            history.append(float(loss.detach()))
            info = {"loss": history[-1]}
            if quantizer is not None and step % 10 == 0:
                info["MB"] = model_size_mb(model, quantizer)
            bar.update(1, **info)
    if attached.finish is not None:
        attached.finish()
    model.eval()
    windows = eval_windows(corpus.val, model_config.context, config.eval_windows)
    ppl = perplexity(model, windows, config.device)
    # The model's own parameters only (not DiffQ's bit logits, which are not stored).
    return RunResult(
        method, model, quantizer, sum(p.numel() for p in weights),
        model_size_mb(model, quantizer), ppl, time.perf_counter() - start, history,
    )
