"""Each saved DiffQ model loaded packed: resident memory next to the file, and its perplexity."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

import diffq_triton

from .model import CharTransformer, ModelConfig
from .train import perplexity


@dataclass
class PackedCheck:
    """A saved DiffQ model loaded with ``packed=True`` into a model built on ``meta``."""

    method: str
    file_mb: float
    resident_mb: float  # parameters + buffers of the packed model (spec: <= 1.1 x file)
    float_params: int  # quantized parameters no packed layer holds (loaded as float)
    packed_ppl: float
    reloaded_ppl: float  # the float-loaded model's

    @property
    def equal(self) -> bool:
        # On the CPU the packed layers decode the float model's weights and call the same
        # F.* ops: the perplexities are equal.
        return self.packed_ppl == self.reloaded_ppl

    @property
    def verdict(self) -> str:
        """``identical``; ``within float32 rounding`` (on CUDA the fused packed kernels sum
        a Linear's products in another order: relative difference ≤ 1e-4); else
        ``DIFFERENT``."""
        if self.equal:
            return "identical"
        if abs(self.packed_ppl - self.reloaded_ppl) <= 1e-4 * abs(self.reloaded_ppl):
            return "within float32 rounding"
        return "DIFFERENT"


def packed_checks(reloads: Sequence, model_config: ModelConfig, windows: torch.Tensor,
                  device: str) -> list[PackedCheck]:
    """One :class:`PackedCheck` per reload check (``runner.ReloadCheck``: method, path,
    file_mb, reloaded_ppl)."""
    out = []
    for check in reloads:
        with torch.device("meta"):
            model = CharTransformer(model_config)
        with warnings.catch_warnings():  # the count of float parameters is printed instead
            warnings.simplefilter("ignore")
            report = diffq_triton.load_quantized(model, Path(check.path), packed=True)
        model = model.to(device)
        with torch.no_grad():  # the scratch buffer is reused when autograd records nothing
            ppl = perplexity(model, windows, device)
        out.append(PackedCheck(check.method, check.file_mb,
                               diffq_triton.resident_bytes(model) / 2**20,
                               len(report.float_params), ppl, check.reloaded_ppl))
    return out


def describe(check: PackedCheck) -> str:
    """One line of the demo's output."""
    verdict = check.verdict
    return (f"{check.method}: packed in memory {check.resident_mb:.3f} MB (file "
            f"{check.file_mb:.3f} MB, {check.float_params} quantized parameters kept float); "
            f"ppl {check.packed_ppl:.4f} vs reloaded {check.reloaded_ppl:.4f} ({verdict})")
