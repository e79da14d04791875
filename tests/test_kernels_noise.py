"""Noise forward/backward kernels (interpreter) against the eager reference, same noise.

The forward's debug output ``xi_out`` hands the ``ξ`` it drew to the reference, so every
entry is compared; gradients come from autograd through the reference in float64.
"""

from __future__ import annotations

import pytest
import torch

from diffq_triton.ops import reference
from tests.conftest import DEVICE, poisoned_empty

pytest.importorskip("triton")
from diffq_triton.kernels import noise as noise_k  # noqa: E402

# 10007 entries: prime, so every group size leaves a short last group, and more than one
# program runs in each kernel (blocks of 8192 under the interpreter).
N = 10007
GROUPS = [0, 1, 3, 4, 8, 16, 64, 100, 2000, N + 5]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MIN_BITS, MAX_BITS = 2.0, 15.0


def _seed(value):
    return torch.tensor([value], device=DEVICE)


def _weight(dtype, n=N, seed=0):
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, generator=gen)
    # A unique max and min even after rounding to 16 bits: the reference splits the range
    # gradient between tied extremes, the kernel gives it to the first one.
    w[n // 3], w[n // 2] = 4.5, -4.25
    return w.to(dtype).to(DEVICE)


def _logits(n, group_size, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(reference.num_groups(n, group_size), generator=gen) * 2).to(DEVICE)


def _forward(w, logits, group_size, param="bits", noise="gaussian", seed=123):
    xi = torch.full((w.numel(),), float("nan"), device=DEVICE)
    with poisoned_empty():
        out, stats = noise_k.noise_forward(w, logits, _seed(seed), group_size,
                                           MIN_BITS, MAX_BITS, param, noise, xi_out=xi)
    return out, stats, xi


def _reference(w, logits, xi, group_size, param):
    w64 = w.double().requires_grad_()
    l64 = logits.double().requires_grad_()
    out = reference.noisy_weight(w64, l64, xi.double(), group_size, MIN_BITS, MAX_BITS, param)
    return w64, l64, out


def _ids(values, name):
    return [f"{name}{v}" for v in values]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUPS, ids=_ids(GROUPS, "g"))
def test_forward_matches_reference(group_size, dtype):
    w, logits = _weight(dtype), _logits(N, group_size)
    out, stats, xi = _forward(w, logits, group_size)
    assert out.dtype == dtype and out.shape == w.shape
    assert not xi.isnan().any() and not out.isnan().any()
    _, _, expected = _reference(w, logits, xi, group_size, "bits")
    # float32: the kernel rounds once per operation, the float64 reference not at all.
    # 16-bit: the rounding of the result differs by at most one unit in the last place.
    tol = {} if dtype != torch.float32 else dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out, expected.to(dtype), **tol)
    w32 = w.float()
    assert stats.tolist() == [w32.min().item(), w32.max().item(),
                              w32.argmin().item(), w32.argmax().item()]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUPS, ids=_ids(GROUPS, "g"))
def test_backward_matches_reference_gradients(group_size, dtype):
    w, logits = _weight(dtype), _logits(N, group_size)
    _, stats, xi = _forward(w, logits, group_size)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(5)).to(dtype).to(DEVICE)
    w64, l64, expected = _reference(w, logits, xi, group_size, "bits")
    expected.backward(grad.double())
    dr = torch.full((1,), float("nan"), device=DEVICE)
    with poisoned_empty():
        grad_w, grad_l = noise_k.noise_backward(grad, logits, _seed(123), stats,
                                                group_size, MIN_BITS, MAX_BITS, "bits",
                                                "gaussian", dr_out=dr)
    assert grad_w.dtype == dtype and grad_l.dtype == logits.dtype
    # ∂L/∂w is g itself except at the argmax and argmin, where the range terms land.
    ends = [int(stats[2]), int(stats[3])]
    mask = torch.ones(N, dtype=torch.bool, device=DEVICE)
    mask[ends] = False
    assert torch.equal(grad_w[mask], grad[mask])
    # The range terms are float32 sums of d products (the reference sums in float64).
    torch.testing.assert_close(grad_w[ends].double(), w64.grad[ends].to(dtype).double(),
                               rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-4)
    torch.testing.assert_close(grad_l.double(), l64.grad, rtol=1e-4, atol=1e-5)
    assert torch.isfinite(dr).all()


@pytest.mark.parametrize("param,noise", [("noise", "gaussian"), ("bits", "uniform"),
                                         ("noise", "uniform")])
@pytest.mark.parametrize("group_size", [0, 8, 100], ids=_ids([0, 8, 100], "g"))
def test_param_and_noise_variants(group_size, param, noise):
    w, logits = _weight(torch.float32), _logits(N, group_size)
    out, stats, xi = _forward(w, logits, group_size, param, noise)
    w64, l64, expected = _reference(w, logits, xi, group_size, param)
    torch.testing.assert_close(out, expected.float(), rtol=1e-6, atol=1e-6)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    expected.backward(grad.double())
    grad_w, grad_l = noise_k.noise_backward(grad, logits, _seed(123), stats,
                                            group_size, MIN_BITS, MAX_BITS, param, noise)
    torch.testing.assert_close(grad_l.double(), l64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), w64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("noise,var", [("gaussian", 1 / 4), ("uniform", 1 / 12)])
def test_noise_statistics(noise, var):
    n = 20000
    zeros = torch.zeros(n, device=DEVICE)
    _, _, xi = _forward(zeros, torch.zeros(1, device=DEVICE), 0, noise=noise, seed=7)
    # Mean within 5 standard errors; variance within 5 of its standard errors (≈ var·√(2/n)
    # for the gaussian, smaller for the uniform).
    assert abs(xi.mean().item()) < 5 * (var / n) ** 0.5
    assert abs(xi.var().item() - var) < 5 * var * (2 / n) ** 0.5
    if noise == "uniform":
        assert xi.min() >= -0.5 and xi.max() < 0.5
    # Entries are independent: neighbours uncorrelated.
    corr = torch.corrcoef(torch.stack([xi[:-1], xi[1:]]))[0, 1]
    assert abs(corr.item()) < 5 / n**0.5


def test_same_seed_same_bits_other_seed_fresh_noise():
    w, logits = _weight(torch.float32), _logits(N, 8)
    a, _, xi_a = _forward(w, logits, 8, seed=11)
    b, _, xi_b = _forward(w, logits, 8, seed=11)
    c, _, xi_c = _forward(w, logits, 8, seed=12)
    assert torch.equal(a, b) and torch.equal(xi_a, xi_b)
    assert (xi_a != xi_c).float().mean() > 0.99


@pytest.mark.parametrize("group_size", [0, 8, 100], ids=_ids([0, 8, 100], "g"))
def test_backward_is_bit_reproducible(group_size):
    w, logits = _weight(torch.float32), _logits(N, group_size)
    _, stats, _ = _forward(w, logits, group_size)
    grad = torch.randn(N).to(DEVICE)
    seed = _seed(123)
    runs = [noise_k.noise_backward(grad, logits, seed, stats, group_size, MIN_BITS, MAX_BITS,
                                   "bits", "gaussian") for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("group_size", [0, 8], ids=_ids([0, 8], "g"))
def test_constant_tensor_has_no_noise_and_finite_gradients(group_size):
    w = torch.full((1000,), 0.75, device=DEVICE)
    logits = _logits(1000, group_size)
    out, stats, _ = _forward(w, logits, group_size)
    assert torch.equal(out, w)
    grad = torch.randn(1000).to(DEVICE)
    grad_w, grad_l = noise_k.noise_backward(grad, logits, _seed(123),
                                            stats, group_size, MIN_BITS, MAX_BITS, "bits",
                                            "gaussian")
    assert torch.equal(grad_w, grad)
    assert torch.equal(grad_l, torch.zeros_like(grad_l))
