"""Eval quantize→dequantize kernel (interpreter): bit-exact with the eager reference."""

from __future__ import annotations

import pytest
import torch

from diffq_triton.ops import reference
from tests.conftest import DEVICE, poisoned_empty

pytest.importorskip("triton")
from diffq_triton.kernels import quantize as quantize_k  # noqa: E402

N = 10007
GROUPS = [0, 1, 3, 4, 8, 16, 64, 100, 2000]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _case(n, group_size, dtype, low=1, high=15, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, generator=gen) * 0.3 + 0.1).to(dtype)
    bits = torch.randint(low, high + 1, (reference.num_groups(n, group_size),), generator=gen)
    return w.to(DEVICE), bits.to(torch.uint8).to(DEVICE)


def _run(w, bits, group_size):
    with poisoned_empty():
        return quantize_k.fake_quantize(w, bits, group_size)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUPS, ids=[f"g{g}" for g in GROUPS])
def test_bit_exact_with_reference(group_size, dtype):
    w, bits = _case(N, group_size, dtype)
    out = _run(w, bits, group_size)
    assert out.dtype == dtype
    assert torch.equal(out, reference.fake_quantize(w, bits, group_size))


@pytest.mark.parametrize("width", [1, 2, 8, 15])
def test_extreme_widths(width):
    w, _ = _case(N, 8, torch.float32)
    bits = torch.full((reference.num_groups(N, 8),), width, dtype=torch.uint8, device=DEVICE)
    out = _run(w, bits, 8)
    assert torch.equal(out, reference.fake_quantize(w, bits, 8))
    assert out.unique().numel() <= 2**width


def test_constant_tensor_round_trips():
    w = torch.full((300,), -1.25, device=DEVICE)
    bits = torch.full((38,), 4, dtype=torch.uint8, device=DEVICE)
    assert torch.equal(_run(w, bits, 8), w)


def test_shape_is_kept():
    w, bits = _case(24 * 35, 8, torch.float32)
    w = w.view(24, 5, 7)
    out = _run(w, bits, 8)
    assert out.shape == w.shape
    assert torch.equal(out, reference.fake_quantize(w, bits, 8))


# ----------------------------------------------------------------------------- many tensors
# Odd sizes (one smaller than a group, one spanning two blocks of 8192), a constant tensor,
# and one tensor that is a view 4 bytes into its storage (not 16-byte aligned).
MANY_SIZES = [1, 7, 300, 9001]


@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "offset"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", [0, 1, 3, 8, 2000], ids=lambda g: f"g{g}")
def test_many_bit_exact_with_reference(group_size, dtype, aligned):
    cases = [_case(n, group_size, dtype, seed=i) for i, n in enumerate(MANY_SIZES)]
    weights = [w for w, _ in cases] + [torch.full((50,), 0.75, dtype=dtype, device=DEVICE)]
    bits = [b for _, b in cases] + [torch.full((reference.num_groups(50, group_size),), 3,
                                               dtype=torch.uint8, device=DEVICE)]
    if not aligned:
        weights = [torch.cat([w[:1], w])[1:] for w in weights]
    outputs = [torch.full_like(w, float("nan")) for w in weights]
    with poisoned_empty():
        quantize_k.fake_quantize_many(weights, bits, outputs, group_size)
    for w, b, out in zip(weights, bits, outputs, strict=True):
        assert torch.equal(out, reference.fake_quantize(w, b, group_size))
    assert torch.equal(outputs[-1], weights[-1])  # a constant tensor maps to itself
