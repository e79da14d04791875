"""Host time of the quantizer per training step on a GPT-2-small-sized model, no GPU needed.

On a GPU the quantizer's kernels take about 1 ms of a GPT-2-small step; what made a step
2.7× the plain one was the host: Python, autograd and launch overhead per quantized tensor,
which the GPU waits for. This benchmark measures that host side without a GPU, on the CPU:
the Triton launches are recorded instead of run (their arguments are built, nothing
executes), and the model has GPT-2-small's structure (12 blocks, the same 62 quantized
tensors and the same ops per step) at 1/16 of its width, so that the torch ops on the
logits cost no more than their dispatch, as they do on a GPU, where they run asynchronously.
What is timed is everything the quantizer does on the host in one training step: the noisy
weights of every quantized tensor (the pre-forward hook's work), the size penalty, and the
backward of both. Two paths side by side, interleaved round-robin:

- ``many``: the multi-tensor path (one launch per kernel for all weights, one autograd node);
- ``per tensor``: one op per tensor (:func:`diffq_triton.ops.pseudo_quantize`, the path of
  every DiffQuantizer step up to the multi-tensor change, and its per-tensor size formula).

Not included: the cost of each launch inside Triton's launcher and the CUDA driver (about
20-40 µs per launch on a GPU host), reported as the launch count.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
from unittest import mock

import torch
from gpt import GPT, GPTConfig
from results import record

import diffq_triton
from diffq_triton import ops
from diffq_triton.ops import dispatch, reference
from diffq_triton.ops.reference import MEGABYTE_BITS

GROUP_SIZE = 8
ROUNDS = 30
# GPT-2 small at 1/16 of its width; what the default min_size leaves in float at full size
# is excluded by name, so the same 62 tensors are quantized.
SCALED = GPTConfig(width=48, heads=12, context=64, vocab=3144)
FLOAT_AT_FULL_SIZE = ["*ln*", "*.qkv.bias", "*.proj.bias", "*.fc_out.bias"]


@contextlib.contextmanager
def recorded_launches() -> Iterator[list[str]]:
    """Triton launches become records of the kernel's name (one per launch, not per config)
    and the Triton backend is taken for CPU tensors (nothing runs on them)."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    names: list[str] = []

    def jit_run(self, *args, **kwargs):
        names.append(self.__name__)

    def tuner_run(self, *args, **kwargs):
        names.append(self.fn.__name__)

    with mock.patch.object(JITFunction, "run", jit_run), \
            mock.patch.object(Autotuner, "run", tuner_run), \
            mock.patch.object(dispatch, "_interpreting", lambda: True), \
            dispatch.use_backend("triton"):
        yield names


def _per_tensor_size(q: diffq_triton.DiffQuantizer) -> torch.Tensor:
    """The size penalty as one formula per tensor (the path before the vectorized one)."""
    total = torch.zeros(())
    for use in q._first_uses():
        bits = q.extra_bits + q.get_bits(use.logit)
        total = total + reference.diffq_tensor_size_bits(bits, use.param.numel(),
                                                         q.group_size, q.min_bits)
    return total / MEGABYTE_BITS


def _per_tensor_weights(q: diffq_triton.DiffQuantizer) -> list[torch.Tensor]:
    return [ops.pseudo_quantize(r.param, r.logit, group_size=q.group_size, min_bits=q.min_bits,
                                max_bits=q.max_bits, param=q.param, noise=q.noise)
            for r in q._first_uses()]


def _step(q: diffq_triton.DiffQuantizer, weights: Callable, size: Callable,
          grads: list[torch.Tensor]) -> float:
    """Host seconds of one step's quantizer work: noisy weights, penalty, backward."""
    for p in q.model.parameters():
        p.grad = None  # as zero_grad(set_to_none=True): the new gradients are taken, not added
    start = time.perf_counter()
    noisy = weights(q)
    penalty = size(q)
    if penalty.requires_grad:
        noisy, grads = [*noisy, penalty], [*grads, torch.ones_like(penalty)]
    torch.autograd.backward(noisy, grads)
    return time.perf_counter() - start


def test_quantizer_host_time_per_step():
    torch.manual_seed(0)
    model = GPT(SCALED)
    q = diffq_triton.DiffQuantizer(model, group_size=GROUP_SIZE, min_size=0,
                                   exclude=FLOAT_AT_FULL_SIZE)
    q.no_optimizer()
    records = list(q._first_uses())
    # Incoming gradients of the noisy weights (their values do not matter: nothing runs).
    grads = [torch.empty_like(r.param) for r in records]
    paths = {
        "many": (lambda q: q._train_weights(), lambda q: q.model_size()),
        "per tensor": (_per_tensor_weights, _per_tensor_size),
        # No quantizer: the same gradients reach the weights themselves (what a plain
        # model's backward spends on them anyway).
        "plain": (lambda q: [use.param for use in records], lambda q: torch.zeros(())),
    }
    times: dict[str, list[float]] = {name: [] for name in paths}
    launches: dict[str, int] = {}
    with recorded_launches() as names:
        # One training forward first, as a run's first step: the quantizer checks the weight
        # swap during the first forwards only (every record, every call), later steps not.
        model(torch.zeros((1, 4), dtype=torch.long))
        for round_ in range(ROUNDS + 3):
            for name, (weights, size) in paths.items():
                before = len(names)
                seconds = _step(q, weights, size, grads)
                launches[name] = len(names) - before
                if round_ >= 3:  # the first rounds build tables and caches
                    times[name].append(seconds)
    median = {name: statistics.median(times[name]) for name in paths}
    rows = [{"model": "GPT-2-small structure at 1/16 width, fp32",
             "quantized tensors": len(records), "path": name,
             "host ms per step": 1e3 * median[name],
             "ms over plain": 1e3 * (median[name] - median["plain"]),
             "Triton launches per step": launches[name]}
            for name in paths]
    record(
        "Quantizer host time per training step (launches recorded, not run)",
        rows,
        note=(f"Median of {ROUNDS} steps, paths interleaved: noisy weights of every quantized "
              "tensor, the size penalty, and the backward of both, each Triton launch "
              "recorded instead of run (add about 20-40 µs per launch on a GPU host). "
              "'plain': the same gradients accumulated into the weights, no quantizer. "
              f"DiffQuantizer group_size {GROUP_SIZE}, min_size 0.01."),
    )
    assert len(records) == 62
    assert launches["many"] == 7
    assert launches["per tensor"] == 4 * len(records)
