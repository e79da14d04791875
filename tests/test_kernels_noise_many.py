"""Multi-tensor noise kernels (interpreter) against the eager reference, same noise.

One launch covers several tensors of odd sizes; the forward's ``xi_out`` hands every ``ξ``
it drew to the reference, and gradients come from autograd through the reference in
float64, tensor by tensor.
"""

from __future__ import annotations

import pytest
import torch

from diffq_triton import ops
from diffq_triton.ops import custom_ops, reference
from diffq_triton.ops.dispatch import use_backend
from tests.conftest import DEVICE, poisoned_empty

pytest.importorskip("triton")
from diffq_triton.kernels import noise_many  # noqa: E402

# Odd sizes: a short last group everywhere, a tensor smaller than a group, one spanning
# two forward blocks (8192 entries under the interpreter), one of a single entry.
SIZES = [1, 7, 300, 1001, 9001]
GROUPS = [0, 1, 3, 8, 100, 2000]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
MIN_BITS, MAX_BITS = 2.0, 15.0


def _seed(value):
    return torch.tensor([value], device=DEVICE)


def _randn(n):
    return torch.randn(n).to(DEVICE)


def _weights(dtype, sizes=SIZES, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(sizes):
        w = torch.randn(n, generator=gen)
        if n > 2:  # unique extremes after rounding to 16 bits (see test_kernels_noise)
            w[n // 3], w[n // 2] = 4.5 + i, -4.25 - i
        out.append(w.to(dtype).to(DEVICE))
    return out


def _logits(weights, group_size, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(reference.num_groups(w.numel(), group_size), generator=gen) * 2)
            .to(DEVICE) for w in weights]


def _forward(weights, logits, group_size, param="bits", noise="gaussian", seed=123):
    xi = torch.full((sum(w.numel() for w in weights),), float("nan"), device=DEVICE)
    outputs = [torch.full_like(w, float("nan")) for w in weights]
    with poisoned_empty():
        stats = noise_many.noise_forward_many(weights, logits, outputs, _seed(seed),
                                              group_size, MIN_BITS, MAX_BITS, param, noise,
                                              xi_out=xi)
    return outputs, stats, list(xi.split([w.numel() for w in weights]))


def _reference(w, logits, xi, group_size, param):
    w64 = w.double().requires_grad_()
    l64 = logits.double().requires_grad_()
    out = reference.noisy_weight(w64, l64, xi.double(), group_size, MIN_BITS, MAX_BITS, param)
    return w64, l64, out


def _backward(weights, logits, grads, stats, group_size, param="bits", noise="gaussian"):
    table = noise_many.table_for(weights, logits, group_size, noise_many.BLOCKS)
    grad_w = [torch.full_like(g, float("nan")) for g in grads]
    grad_l = [torch.full_like(lg, float("nan")) for lg in logits]
    dr = torch.full((len(weights),), float("nan"), device=DEVICE)
    with poisoned_empty():
        noise_many.noise_backward_many(table, grads, grad_w, grad_l, logits[0].dtype,
                                       _seed(123), stats, MIN_BITS, MAX_BITS, param,
                                       noise, dr_out=dr)
    assert torch.isfinite(dr).all()
    return grad_w, grad_l


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: f"g{g}")
def test_forward_and_backward_match_reference(group_size, dtype):
    weights = _weights(dtype)
    logits = _logits(weights, group_size)
    outputs, stats, xis = _forward(weights, logits, group_size)
    gen = torch.Generator().manual_seed(5)
    grads = [torch.randn(w.numel(), generator=gen).to(dtype).to(DEVICE) for w in weights]
    grad_w, grad_l = _backward(weights, logits, grads, stats, group_size)
    for t, w in enumerate(weights):
        w64, l64, expected = _reference(w, logits[t], xis[t], group_size, "bits")
        # float32: one rounding per operation against none; 16-bit: one ulp of the result.
        tol = {} if dtype != torch.float32 else dict(rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(outputs[t], expected.to(dtype), **tol)
        w32 = w.float()
        assert stats[t].tolist() == [w32.min().item(), w32.max().item(),
                                     w32.argmin().item(), w32.argmax().item()]
        expected.backward(grads[t].double())
        ends = sorted({int(stats[t, 2]), int(stats[t, 3])})
        mask = torch.ones(w.numel(), dtype=torch.bool, device=DEVICE)
        mask[ends] = False
        assert torch.equal(grad_w[t][mask], grads[t][mask])
        # The range terms are float32 sums of d products (the reference sums in float64).
        torch.testing.assert_close(grad_w[t][ends].double(), w64.grad[ends].to(dtype).double(),
                                   rtol=1e-4 if dtype == torch.float32 else 1e-2, atol=1e-4)
        torch.testing.assert_close(grad_l[t].double(), l64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("group_size", [0, 8, 100], ids=lambda g: f"g{g}")
def test_unaligned_views_match_reference(group_size):
    # Views 4 bytes into their storage: the kernels take the masked (unhinted) path.
    weights = [torch.cat([w[:1], w])[1:] for w in _weights(torch.float32, [9001, 300])]
    assert all(w.data_ptr() % 16 for w in weights)
    logits = _logits(weights, group_size)
    outputs, stats, xis = _forward(weights, logits, group_size)
    grads = [torch.cat([g[:1], g])[1:] for g in (_randn(9001), _randn(300))]
    grad_w, grad_l = _backward(weights, logits, grads, stats, group_size)
    for t, w in enumerate(weights):
        w64, l64, expected = _reference(w, logits[t], xis[t], group_size, "bits")
        torch.testing.assert_close(outputs[t], expected.float(), rtol=1e-6, atol=1e-6)
        expected.backward(grads[t].double())
        torch.testing.assert_close(grad_w[t].double(), w64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_l[t].double(), l64.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("param,noise", [("noise", "gaussian"), ("bits", "uniform"),
                                         ("noise", "uniform")])
@pytest.mark.parametrize("group_size", [0, 8, 2000], ids=lambda g: f"g{g}")
def test_param_and_noise_variants(group_size, param, noise):
    weights = _weights(torch.float32, [300, 5001])
    logits = _logits(weights, group_size)
    outputs, stats, xis = _forward(weights, logits, group_size, param, noise)
    grads = [_randn(w.numel()) for w in weights]
    grad_w, grad_l = _backward(weights, logits, grads, stats, group_size, param, noise)
    for t, w in enumerate(weights):
        w64, l64, expected = _reference(w, logits[t], xis[t], group_size, param)
        torch.testing.assert_close(outputs[t], expected.float(), rtol=1e-6, atol=1e-6)
        expected.backward(grads[t].double())
        torch.testing.assert_close(grad_l[t].double(), l64.grad, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(grad_w[t].double(), w64.grad, rtol=1e-4, atol=1e-5)


def test_each_tensor_draws_its_own_noise_and_backward_is_bit_reproducible():
    weights = _weights(torch.float32, [4000, 4000])
    logits = _logits(weights, 8)
    _, stats, xis = _forward(weights, logits, 8)
    assert (xis[0] != xis[1]).float().mean() > 0.99
    _, _, again = _forward(weights, logits, 8)
    assert all(torch.equal(a, b) for a, b in zip(xis, again, strict=True))
    grads = [_randn(4000), _randn(4000)]
    first = _backward(weights, logits, grads, stats, 8)
    second = _backward(weights, logits, grads, stats, 8)
    for a, b in zip(first[0] + first[1], second[0] + second[1], strict=True):
        assert torch.equal(a, b)


def _op_inputs(dtype=torch.float32):
    torch.manual_seed(3)
    weights = [w.view(-1, 1).requires_grad_() for w in _weights(dtype, [300, 1001, 9001])]
    logits = [lg.requires_grad_() for lg in _logits(weights, 8)]
    return weights, logits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_autograd_function_equals_custom_op(dtype):
    # Eager mode takes the autograd.Function, torch.compile the custom op: same kernels,
    # same seed, same noise, the same numbers.
    weights, logits = _op_inputs(dtype)
    config = (8, MIN_BITS, MAX_BITS, "bits", "gaussian")
    seed = _seed(77)
    with use_backend("triton"):
        by_function = ops.NoiseMany.apply(config, None, seed, *weights, *logits)
        by_op = custom_ops.pseudo_quantize_many(weights, logits, seed, *config, "triton")[0]
    grads = [torch.randn_like(o) for o in by_op]
    first = torch.autograd.grad(by_function, weights + logits, grads)
    second = torch.autograd.grad(by_op, weights + logits, grads)
    for a, b, c, d in zip(by_function, by_op, first, second, strict=False):
        assert torch.equal(a, b)
        assert torch.equal(c, d)


def test_a_weight_without_gradient_gets_none_and_the_others_keep_their_noise():
    weights, logits = _op_inputs()
    seed = _seed(9)
    config = (8, MIN_BITS, MAX_BITS, "bits", "gaussian")
    with use_backend("triton"):
        outs = ops.NoiseMany.apply(config, None, seed, *weights, *logits)
        (outs[0].sum() + outs[2].pow(2).sum()).backward()
        partial = [w.grad.clone() for w in (weights[0], weights[2])]
        partial_l = [lg.grad.clone() for lg in (logits[0], logits[2])]
        assert weights[1].grad is None and logits[1].grad is None
        for p in weights + logits:
            p.grad = None
        outs = ops.NoiseMany.apply(config, None, seed, *weights, *logits)
        (outs[0].sum() + outs[1].sum() * 0 + outs[2].pow(2).sum()).backward()
    # With every gradient present (the middle one zero), the same numbers for the others.
    assert torch.equal(weights[0].grad, partial[0]) and torch.equal(weights[2].grad, partial[1])
    assert torch.equal(logits[0].grad, partial_l[0]) and torch.equal(logits[2].grad, partial_l[1])


def test_pseudo_quantize_many_groups_dtypes_and_keeps_order():
    torch.manual_seed(0)
    weights = [torch.randn(40, 3, dtype=dt, device=DEVICE, requires_grad=True)
               for dt in (torch.float32, torch.bfloat16, torch.float32, torch.float16)]
    logits = [torch.zeros(15, device=DEVICE, requires_grad=True) for _ in weights]
    with use_backend("triton"):
        outs = ops.pseudo_quantize_many(weights, logits, group_size=8, min_bits=2,
                                        max_bits=15, param="bits", noise="gaussian")
        sum(o.float().sum() for o in outs).backward()
    for w, o, lg in zip(weights, outs, logits, strict=True):
        assert o.dtype == w.dtype and o.shape == w.shape
        assert not torch.equal(o, w) and (o.float() - w.float()).abs().max() < 0.1
        assert w.grad is not None and lg.grad is not None


@pytest.mark.parametrize("group_size", [0, 8, 2000], ids=lambda g: f"g{g}")
def test_logit_gradients_into_one_flat_buffer(group_size):
    # The quantizer's step hands the kernels one [Σ n_groups] buffer (the size term's own,
    # which the kernels then add to in place) instead of a tensor per logit: the same bits.
    weights = _weights(torch.float32)
    logits = _logits(weights, group_size)
    _, stats, _ = _forward(weights, logits, group_size)
    grads = [_randn(w.numel()) for w in weights]
    table = noise_many.table_for(weights, logits, group_size, noise_many.BLOCKS)
    n_groups = [lg.numel() for lg in logits]
    extra = _randn(sum(n_groups))
    for with_extra in (False, True):
        by_list = [torch.full_like(lg, float("nan")) for lg in logits]
        flat = extra.clone() if with_extra else torch.full_like(extra, float("nan"))
        for grad_l in (by_list, flat):
            grad_w = [torch.empty_like(g) for g in grads]
            with poisoned_empty():
                noise_many.noise_backward_many(table, grads, grad_w, grad_l, torch.float32,
                                               _seed(123), stats, MIN_BITS, MAX_BITS, "bits",
                                               "gaussian", extra=flat if with_extra else None)
        for a, b in zip(by_list, flat.split(n_groups), strict=True):
            assert torch.equal(a, b)


def test_pointer_table_holds_the_pointers_and_their_alignment():
    from diffq_triton.kernels.tensor_table import pointer_table

    tensors = [torch.empty(n, device=DEVICE) for n in (3, 40, 7)]
    table, aligned = pointer_table(tensors, DEVICE)
    assert table.dtype == torch.int64 and table.tolist() == [t.data_ptr() for t in tensors]
    assert aligned is all(t.data_ptr() % 16 == 0 for t in tensors)
    unaligned = [tensors[1], torch.empty(9, device=DEVICE)[1:]]
    table, aligned = pointer_table(unaligned, DEVICE)
    assert table.tolist() == [t.data_ptr() for t in unaligned] and aligned is False
    assert pointer_table([], DEVICE)[0].numel() == 0


def test_group_pointers_are_those_of_the_pieces():
    weights = _weights(torch.float32)
    logits = _logits(weights, 8)
    table = noise_many.table_for(weights, logits, 8, noise_many.BLOCKS)
    for dtype in (torch.float32, torch.bfloat16):
        flat = torch.empty(table.total_groups, dtype=dtype, device=DEVICE)
        pieces = flat.split([lg.numel() for lg in logits])
        assert table.group_pointers(flat).tolist() == [p.data_ptr() for p in pieces]
    other = torch.empty(table.total_groups, device=DEVICE)  # another buffer, its own
    assert table.group_pointers(other)[0].item() == other.data_ptr()
