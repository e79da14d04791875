"""The lean eager path behind the custom ops, against the reference given the same ξ."""

from __future__ import annotations

import pytest
import torch

from diffq_triton.ops import eager as eager_ops
from diffq_triton.ops import reference

N = 10007
GROUPS = [0, 1, 3, 4, 8, 16, 64, 100, 2000]


def _case(group_size, dtype=torch.float32, n=N):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, generator=gen)
    w[n // 3], w[n // 2] = 4.5, -4.25  # unique extremes (see test_kernels_noise)
    logits = torch.randn(reference.num_groups(n, group_size), generator=gen) * 2
    return w.to(dtype), logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("group_size", GROUPS, ids=[f"g{g}" for g in GROUPS])
def test_forward_and_backward_match_reference(group_size, dtype):
    w, logits = _case(group_size, dtype)
    out, stats, xi = eager_ops.noise_forward(w, logits, torch.tensor([5]), group_size,
                                             2.0, 15.0, "bits", "gaussian")
    w64, l64 = w.double().requires_grad_(), logits.double().requires_grad_()
    expected = reference.noisy_weight(w64, l64, xi.double(), group_size, 2.0, 15.0, "bits")
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, expected.to(dtype), **tol)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(2)).to(dtype)
    expected.backward(grad.double())
    grad_w, grad_l = eager_ops.noise_backward(grad, logits, stats, xi, group_size, 2.0, 15.0,
                                              "bits")
    torch.testing.assert_close(grad_l.double(), l64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), w64.grad.to(dtype).double(),
                               rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-4)


@pytest.mark.parametrize("n", [5, 2048, 5000, 40000])
def test_extremes_first_index_with_ties_and_tail(n):
    w = torch.randint(-3, 4, (n,)).float()  # many ties
    if n > 4100:
        w[4100], w[n - 1] = 10.0, 10.0  # tie between a body row and the tail
        w[n - 2] = -10.0  # minimum in the tail
    mn, mx, imn, imx = eager_ops._extremes(w)
    assert (mn.item(), mx.item()) == (w.min().item(), w.max().item())
    assert imx.item() == (w == w.max()).nonzero()[0].item()
    assert imn.item() == (w == w.min()).nonzero()[0].item()


def test_noise_depends_on_the_seed_only():
    n = 3 * eager_ops.NOISE_CHUNK + 17
    a = eager_ops.draw_noise(n, 9, "gaussian", torch.device("cpu"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        b = eager_ops.draw_noise(n, 9, "gaussian", torch.device("cpu"))
    finally:
        torch.set_num_threads(threads)
    c = eager_ops.draw_noise(n, 10, "gaussian", torch.device("cpu"))
    assert torch.equal(a, b)
    assert (a != c).float().mean() > 0.99
    # Chunks are independent streams: no repeated chunk.
    k = eager_ops.NOISE_CHUNK
    assert not torch.equal(a[:1000], a[k:k + 1000])


@pytest.mark.parametrize("noise,var", [("gaussian", 1 / 4), ("uniform", 1 / 12)])
def test_noise_statistics(noise, var):
    n = 200_000
    xi = eager_ops.draw_noise(n, 1, noise, torch.device("cpu"))
    assert abs(xi.mean().item()) < 5 * (var / n) ** 0.5
    assert abs(xi.var().item() - var) < 5 * var * (2 / n) ** 0.5
    if noise == "uniform":
        assert xi.min() >= -0.5 and xi.max() <= 0.5


@pytest.mark.parametrize("param,noise", [("noise", "gaussian"), ("bits", "uniform"),
                                         ("noise", "uniform")])
@pytest.mark.parametrize("group_size", [0, 1, 8, 100], ids=lambda g: f"g{g}")
def test_param_and_noise_variants(group_size, param, noise):
    w, logits = _case(group_size)
    out, stats, xi = eager_ops.noise_forward(w, logits, torch.tensor([5]), group_size,
                                             2.0, 15.0, param, noise)
    w64, l64 = w.double().requires_grad_(), logits.double().requires_grad_()
    expected = reference.noisy_weight(w64, l64, xi.double(), group_size, 2.0, 15.0, param)
    torch.testing.assert_close(out, expected.float(), rtol=1e-6, atol=1e-6)
    grad = torch.randn(N, generator=torch.Generator().manual_seed(3))
    expected.backward(grad.double())
    grad_w, grad_l = eager_ops.noise_backward(grad, logits, stats, xi, group_size, 2.0, 15.0,
                                              param)
    torch.testing.assert_close(grad_l.double(), l64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad_w.double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_buffer_pool_never_hands_out_a_buffer_in_use():
    pool = eager_ops._BufferPool()
    n = 1 << 16
    a = pool.take(n, torch.float32, torch.device("cpu"))
    b = pool.take(n, torch.float32, torch.device("cpu"))
    assert a.data_ptr() != b.data_ptr()
    ptr = a.data_ptr()
    del a
    c = pool.take(n, torch.float32, torch.device("cpu"))
    assert c.data_ptr() == ptr  # released, so reused
    keep = c.view(256, 256)  # a view still holds the storage
    del c
    d = pool.take(n, torch.float32, torch.device("cpu"))
    assert d.data_ptr() not in (ptr, b.data_ptr())
    assert keep.numel() == n


def test_retained_graph_backward_twice_gives_the_same_gradients():
    from diffq_triton.ops import custom_ops

    w = torch.randn(300, 200, requires_grad=True)
    logits = torch.randn(7500, requires_grad=True)
    out, _, _ = custom_ops.pseudo_quantize(w, logits, torch.tensor([4]), 8, 2.0, 15.0, "bits",
                                           "gaussian", "eager")
    grad = torch.randn_like(out)
    out.backward(grad, retain_graph=True)
    first = (w.grad.clone(), logits.grad.clone())
    # Fresh weight-sized work in between must not overwrite what the graph still holds.
    for _ in range(3):
        eager_ops.noise_forward(w.detach(), logits.detach(), torch.tensor([9]), 8, 2.0, 15.0,
                                "bits", "gaussian")
    w.grad, logits.grad = None, None
    out.backward(grad)
    assert torch.equal(w.grad, first[0]) and torch.equal(logits.grad, first[1])

