"""Per-tensor range kernel (interpreter): min, max and first indices of each."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import DEVICE, poisoned_empty

pytest.importorskip("triton")
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from diffq_triton.kernels import range as range_k  # noqa: E402


@triton.jit
def _reduce_test_kernel(p_part_v, p_part_i, p_out, P: tl.constexpr):
    mn, mx, imn, imx = range_k.reduce_range(p_part_v, p_part_i, P)
    tl.store(p_out, mn.to(tl.float64))
    tl.store(p_out + 1, mx.to(tl.float64))
    tl.store(p_out + 2, imn.to(tl.float64))
    tl.store(p_out + 3, imx.to(tl.float64))


def _range(w):
    with poisoned_empty():
        part_v, part_i, P = range_k.range_partials(w)
        out = torch.empty(4, dtype=torch.float64, device=DEVICE)
        _reduce_test_kernel[(1,)](part_v, part_i, out, P=P)
    return out.tolist(), P


# 1: one entry; 8191/8193: around one interpreter block; 40000: several partials.
@pytest.mark.parametrize("n", [1, 8191, 8193, 40000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_range_and_first_indices(n, dtype):
    w = torch.randn(n, generator=torch.Generator().manual_seed(n)).to(dtype).to(DEVICE)
    (mn, mx, imn, imx), P = _range(w)
    w32 = w.float()
    assert (mn, mx) == (w32.min().item(), w32.max().item())
    # Ties (likely in 16-bit dtypes) resolve to the first occurrence.
    assert imn == (w32 == w32.min()).nonzero()[0].item()
    assert imx == (w32 == w32.max()).nonzero()[0].item()
    assert P & (P - 1) == 0 and P <= range_k.MAX_PARTIALS


def test_ties_across_programs_keep_the_first():
    w = torch.zeros(40000, device=DEVICE)
    w[[30000, 9000, 20000]] = 2.0
    w[[35000, 17000]] = -3.0
    (mn, mx, imn, imx), _ = _range(w)
    assert (mn, mx, imn, imx) == (-3.0, 2.0, 17000, 9000)


def test_constant_tensor():
    (mn, mx, imn, imx), _ = _range(torch.full((5000,), 1.5, device=DEVICE))
    assert (mn, mx, imn, imx) == (1.5, 1.5, 0, 0)
