"""Multi-tensor model size kernels (interpreter) against the reference formula."""

from __future__ import annotations

import pytest
import torch

from diffq_triton.ops import reference
from tests.conftest import DEVICE, poisoned_empty

pytest.importorskip("triton")
from diffq_triton.kernels import noise_many, size_many  # noqa: E402

# A tensor of one entry, one smaller than a group, odd lengths, and more groups than one
# program's block (8192 under the interpreter) at g = 1.
SIZES = [1, 7, 300, 9001]
MIN_BITS, MAX_BITS = 2.0, 15.0


def _case(group_size, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weights = [torch.empty(n, device=DEVICE) for n in SIZES]
    logits = [(torch.randn(reference.num_groups(n, group_size), generator=gen) * 3).to(DEVICE)
              for n in SIZES]
    return weights, logits


def _expected(logits, group_size, extra_bits, param, exact):
    flat = torch.cat(logits).double().requires_grad_()
    bits = extra_bits + reference.bits_from_logits(flat, MIN_BITS, MAX_BITS, param)
    if exact:
        bits = bits.detach().round().clamp(1, 15)
    layout = reference.size_layout(SIZES, group_size, DEVICE)
    return flat, reference.diffq_sizes_bits(bits, layout, MIN_BITS)


@pytest.mark.parametrize("exact", [False, True], ids=["soft", "exact"])
@pytest.mark.parametrize("param", ["bits", "noise"])
@pytest.mark.parametrize("extra_bits", [-0.7, 0.0, 1.3], ids=lambda e: f"extra{e}")
@pytest.mark.parametrize("group_size", [0, 1, 3, 8, 100, 2000], ids=lambda g: f"g{g}")
def test_size_and_gradient_match_reference(group_size, extra_bits, param, exact):
    weights, logits = _case(group_size)
    table = noise_many.table_for(weights, logits, group_size, noise_many.BLOCKS)
    with poisoned_empty():
        got = size_many.sizes_forward(table, torch.float32, extra_bits, MIN_BITS, MAX_BITS,
                                      param, exact)
    flat, expected = _expected(logits, group_size, extra_bits, param, exact)
    # float32 widths (the reference here is float64): a few ulp per group, summed.
    torch.testing.assert_close(got.double().reshape(()), expected.detach(), rtol=1e-5, atol=0.5)
    if exact:
        # Rounded widths: every term is an integer; the sum is exact in float64 partials.
        assert got.item() == expected.item()
        return
    expected.backward()
    with poisoned_empty():
        half = torch.tensor([0.5], device=DEVICE)
        grad = size_many.sizes_backward(table, half, torch.float32, MIN_BITS, MAX_BITS, param)
    # σ(1 - σ) in float32 loses relative precision where σ is near 0 or 1: the absolute
    # error stays within float32's epsilon times len(s)·(max_bits - min_bits) ≤ 2000·13.
    torch.testing.assert_close(grad.double(), 0.5 * flat.grad, rtol=1e-5, atol=1e-7 * 2000 * 13)
