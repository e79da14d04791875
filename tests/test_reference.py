"""The eager reference: gradients in float64, quantization round trips, sizes."""

import pytest
import torch

from diffq_triton.ops import reference


@pytest.mark.parametrize("param", reference.PARAMS)
@pytest.mark.parametrize("group_size", [0, 1, 3, 4])
def test_noisy_weight_gradcheck(param, group_size):
    torch.manual_seed(0)
    w = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    n = reference.num_groups(w.numel(), group_size)
    logits = torch.randn(n, dtype=torch.float64, requires_grad=True)
    xi = reference.draw_noise(w.shape, "gaussian", dtype=torch.float64)

    def f(w, logits):
        return reference.noisy_weight(w, logits, xi, group_size, 2, 15, param)

    assert torch.autograd.gradcheck(f, (w, logits))


def test_range_gradient_reaches_argmax_and_argmin():
    w = torch.tensor([0.0, 3.0, -1.0, 0.5], dtype=torch.float64, requires_grad=True)
    logits = torch.zeros(1, dtype=torch.float64)
    xi = torch.ones(4, dtype=torch.float64)
    reference.noisy_weight(w, logits, xi, 0, 2, 8).sum().backward()
    unit = reference.step_unit(reference.bits_from_logits(logits, 2, 8)).item()
    # d/dw of Σ (w + r·u·ξ) = 1 + (±4u at argmax/argmin)
    expected = torch.tensor([1.0, 1 + 4 * unit, 1 - 4 * unit, 1.0], dtype=torch.float64)
    torch.testing.assert_close(w.grad, expected)


def test_logit_gradient_matches_closed_form():
    torch.manual_seed(1)
    w = torch.randn(12, dtype=torch.float64)
    logits = torch.randn(3, dtype=torch.float64, requires_grad=True)
    xi = reference.draw_noise(w.shape, "uniform", dtype=torch.float64)
    g = torch.randn(12, dtype=torch.float64)
    (reference.noisy_weight(w, logits, xi, 4, 2, 15) * g).sum().backward()
    b = reference.bits_from_logits(logits.detach(), 2, 15)
    s = torch.sigmoid(logits.detach())
    du = -torch.log(torch.tensor(2.0, dtype=torch.float64)) * 2**b / (2**b - 1) ** 2
    r = w.max() - w.min()
    expected = (g * xi).view(3, 4).sum(1) * r * du * 13 * s * (1 - s)
    torch.testing.assert_close(logits.grad, expected)


@pytest.mark.parametrize("param", reference.PARAMS)
def test_initial_fraction_gives_init_bits(param):
    t = reference.initial_fraction(6, 2, 15, param)
    logit = torch.logit(torch.tensor(t, dtype=torch.float64))
    bits = reference.bits_from_logits(logit, 2, 15, param)
    assert abs(bits.item() - 6) < 1e-9


@pytest.mark.parametrize("group_size", [0, 1, 3, 8, 100])
def test_quantize_round_trip_within_half_step(group_size):
    torch.manual_seed(2)
    w = torch.randn(37, 3)
    n = reference.num_groups(w.numel(), group_size)
    bits = torch.randint(1, 16, (n,), dtype=torch.uint8)
    levels, mn, mx = reference.quantize(w, bits, group_size)
    top = reference.expand_groups(2 ** bits.long() - 1, w.numel(), group_size)
    assert (levels >= 0).all() and (levels.long() <= top).all()
    back = reference.dequantize(levels, bits, group_size, mn, mx)
    step = (mx - mn) / top
    assert ((back - w.reshape(-1)).abs() <= step / 2 * 1.001 + 1e-6).all()


def test_constant_tensor_round_trips_exactly():
    w = torch.full((4, 5), 0.25)
    bits = torch.tensor([4], dtype=torch.uint8)
    out = reference.fake_quantize(w, bits, 0)
    assert torch.equal(out, w)


def test_size_counts_short_last_group_exactly():
    bits = torch.tensor([4.0, 4.0, 2.0])
    size = reference.diffq_tensor_size_bits(bits, 10, 4, min_bits=2)
    # 4·4 + 4·4 + 2·2 payload, 64 range, 8 field width, 3 groups × ceil(log2(1 + 2)) = 2 bits
    assert size.item() == 16 + 16 + 4 + 64 + 8 + 3 * 2


def test_lsq_straight_through_and_step_gradient_scale():
    w = torch.tensor([0.3, -0.7, 1.2, 0.05], requires_grad=True)
    step = torch.tensor(0.25, requires_grad=True)
    w_q, index = reference.lsq_quantize(w, step, 3)
    torch.testing.assert_close(index.detach(), torch.tensor([1.0, -3.0, 3.0, 0.0]))
    torch.testing.assert_close(w_q.detach(), index.detach() * 0.25)
    w_q.sum().backward()
    # Inside the clamp range the rounding is straight-through: dw = 1; clamped: 0.
    torch.testing.assert_close(w.grad, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert step.grad is not None and torch.isfinite(step.grad)


@pytest.mark.parametrize("group_size", [0, 1, 8, 100], ids=lambda g: f"g{g}")
def test_sizes_of_many_tensors_equal_the_sum_of_each(group_size):
    # The vectorized model size (one set of ops for all tensors) against the per-tensor
    # formula, with widths below min_bits (negative extra_bits) and a shorter last group.
    numels = [1, 7, 300, 1001]
    gen = torch.Generator().manual_seed(0)
    bits = [torch.rand(reference.num_groups(n, group_size), generator=gen, dtype=torch.float64)
            * 14 + 0.6 for n in numels]
    expected = sum(reference.diffq_tensor_size_bits(b, n, group_size, 3)
                   for b, n in zip(bits, numels, strict=True))
    layout = reference.size_layout(numels, group_size, torch.device("cpu"))
    flat = torch.cat(bits).requires_grad_()
    got = reference.diffq_sizes_bits(flat, layout, 3)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-9)
    got.backward()
    assert torch.equal(flat.grad, layout[0].double())  # ∂size/∂b_s = len(s)
