"""The diffq_triton:: custom ops: opcheck, autograd, torch.compile, both backends."""

from __future__ import annotations

import pytest
import torch

import diffq_triton
from diffq_triton import ops
from diffq_triton.ops import custom_ops, reference
from diffq_triton.ops.dispatch import use_backend
from tests.conftest import DEVICE, INDUCTOR
from tests.models import mlp

pytest.importorskip("triton")

BACKENDS = ["triton", "eager"]
N = 1003  # odd: a short last group


def _inputs(backend, group_size=8, dtype=torch.float32, grad=True):
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(17, 59, generator=gen).to(dtype).to(DEVICE).requires_grad_(grad)
    logits = torch.randn(reference.num_groups(w.numel(), group_size), generator=gen).to(DEVICE)
    logits.requires_grad_(grad)
    seed = torch.tensor([42], device=DEVICE)
    return w, logits, seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [0, 1, 8, 100], ids=lambda g: f"g{g}")
def test_opcheck_pseudo_quantize(backend, group_size):
    w, logits, seed = _inputs(backend, group_size)
    args = (w, logits, seed, group_size, 2.0, 15.0, "bits", "gaussian", backend)
    torch.library.opcheck(custom_ops.pseudo_quantize, args)
    _, stats, xi = custom_ops.pseudo_quantize(*args)
    grad = torch.randn_like(w)
    torch.library.opcheck(
        custom_ops.pseudo_quantize_backward,
        (grad, logits.detach(), seed, stats, xi, group_size, 2.0, 15.0, "bits", "gaussian",
         backend),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck_fake_quantize(backend):
    w, _, _ = _inputs(backend, grad=False)
    bits = torch.randint(1, 16, (reference.num_groups(w.numel(), 8),), dtype=torch.uint8,
                         device=DEVICE)
    torch.library.opcheck(custom_ops.fake_quantize, (w, bits, 8, backend))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_op_gradients_match_reference_given_its_noise(backend, dtype):
    """The op's autograd against autograd through the reference, fed the op's own ξ."""
    w, logits, seed = _inputs(backend, 8, dtype)
    if backend == "triton":
        # The Triton path keeps no ξ: ask the kernel for it with the same seed.
        from diffq_triton.kernels import noise as noise_k

        xi = torch.empty(w.numel(), device=DEVICE)
        noise_k.noise_forward(w.detach(), logits.detach(), seed, 8, 2.0, 15.0, "bits",
                              "gaussian", xi_out=xi)
    out, _, xi_eager = custom_ops.pseudo_quantize(w, logits, seed, 8, 2.0, 15.0, "bits",
                                                  "gaussian", backend)
    if backend == "eager":
        xi = xi_eager
    grad = torch.randn_like(out)
    out.backward(grad)
    w64 = w.detach().double().requires_grad_()
    l64 = logits.detach().double().requires_grad_()
    expected = reference.noisy_weight(w64, l64, xi.double(), 8, 2.0, 15.0, "bits")
    expected.backward(grad.double())
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    torch.testing.assert_close(out, expected.to(dtype), **tol)
    torch.testing.assert_close(logits.grad.double(), l64.grad, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), w64.grad.to(dtype).double(),
                               **(tol or dict(rtol=1e-2, atol=1e-2)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_fresh_noise_per_call_and_seeded_reproducibility(backend):
    w, logits, _ = _inputs(backend, grad=False)
    kwargs = dict(group_size=8, min_bits=2, max_bits=15, param="bits", noise="gaussian")
    with use_backend(backend):
        torch.manual_seed(3)
        a, b = ops.pseudo_quantize(w, logits, **kwargs), ops.pseudo_quantize(w, logits, **kwargs)
        torch.manual_seed(3)
        c = ops.pseudo_quantize(w, logits, **kwargs)
    assert not torch.equal(a, b)
    assert torch.equal(a, c)


def _step(fn, w, logits):
    out = fn(w, logits)
    (out.pow(2).sum()).backward()
    return out


def _noisy(w, logits):
    return ops.pseudo_quantize(w, logits, group_size=8, min_bits=2, max_bits=15, param="bits",
                               noise="gaussian")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("compiler", ["aot_eager", INDUCTOR])
def test_compile_fullgraph_sees_one_op(backend, compiler):
    w, logits, _ = _inputs(backend)
    torch._dynamo.reset()
    with use_backend(backend):
        explanation = torch._dynamo.explain(_noisy)(w, logits)
        assert explanation.graph_break_count == 0
        compiled = torch.compile(_noisy, fullgraph=True, backend=compiler)
        out = _step(compiled, w, logits)
    assert out.shape == w.shape and torch.isfinite(out).all()
    assert torch.isfinite(w.grad).all() and logits.grad.abs().sum() > 0
    ops_in_graph = [str(n.target) for g in explanation.graphs for n in g.graph.nodes
                    if n.op == "call_function"]
    assert sum("diffq_triton.pseudo_quantize" in t for t in ops_in_graph) == 1


def test_quantizer_under_triton_trains_and_evaluates_like_eager():
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8, init_bits=4)
    q.setup_optimizer(opt)
    x = torch.randn(4, 32, device=DEVICE)
    with use_backend("triton"):
        model.train()
        (model(x).pow(2).mean() + 1e-3 * q.model_size()).backward()
        assert model[0].weight_diffq.grad.abs().sum() > 0
        assert torch.isfinite(model[0].weight.grad).all()
        model.eval()
        with torch.no_grad():
            out_triton = model(x)
    # Eval weights are bit-exact across backends, so are the outputs (cache cleared).
    with use_backend("eager"):
        for record in q._qparams:
            record.__dict__.pop("eval_cache", None)
        with torch.no_grad():
            out_eager = model(x)
    assert torch.equal(out_triton, out_eager)


# ----------------------------------------------------------------------------- many tensors
def _many_inputs(group_size=8, grad=True):
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(shape, generator=gen).to(DEVICE).requires_grad_(grad)
               for shape in ((17, 59), (3,), (301,))]
    logits = [torch.randn(reference.num_groups(w.numel(), group_size), generator=gen)
              .to(DEVICE).requires_grad_(grad) for w in weights]
    return weights, logits, torch.tensor([42], device=DEVICE)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("group_size", [0, 8, 2000], ids=lambda g: f"g{g}")
def test_opcheck_pseudo_quantize_many(backend, group_size):
    weights, logits, seed = _many_inputs(group_size)
    config = (group_size, 2.0, 15.0, "bits", "gaussian", backend)
    args = (weights, logits, seed, *config)
    torch.library.opcheck(custom_ops.pseudo_quantize_many, args)
    _, stats, xis = custom_ops.pseudo_quantize_many(*args)
    grads = [torch.randn_like(w) for w in weights]
    torch.library.opcheck(
        custom_ops.pseudo_quantize_many_backward,
        (grads, [w.detach() for w in weights], [lg.detach() for lg in logits], seed, stats, xis,
         *config),
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_fullgraph_sees_one_op_for_all_weights(backend):
    # A quantized model's training forward under torch.compile: one op for every weight.
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.no_optimizer()
    x = torch.randn(4, 32, device=DEVICE)
    torch._dynamo.reset()
    with use_backend(backend):
        explanation = torch._dynamo.explain(model)(x)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        (compiled(x).pow(2).mean() + 1e-3 * q.model_size()).backward()
    assert explanation.graph_break_count == 0
    targets = [str(n.target) for g in explanation.graphs for n in g.graph.nodes
               if n.op == "call_function"]
    assert sum("pseudo_quantize_many" in t for t in targets) == 1
    assert not any(t.endswith("pseudo_quantize.default") for t in targets)
    for record in q._first_uses():
        assert record.logit.grad is not None and record.logit.grad.abs().sum() > 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_fakes_match_channels_last_weights(backend):
    # The ops return contiguous tensors whatever the weight's strides; so must the fakes.
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 3, 5, 5, generator=gen).to(DEVICE).to(memory_format=torch.channels_last)
    logits = torch.randn(reference.num_groups(w.numel(), 8), generator=gen).to(DEVICE)
    seed = torch.tensor([42], device=DEVICE)
    torch.library.opcheck(custom_ops.pseudo_quantize_many,
                          ([w], [logits], seed, 8, 2.0, 15.0, "bits", "gaussian", backend))
    torch.library.opcheck(custom_ops.pseudo_quantize,
                          (w, logits, seed, 8, 2.0, 15.0, "bits", "gaussian", backend))
    bits = torch.full((logits.numel(),), 4, dtype=torch.uint8, device=DEVICE)
    torch.library.opcheck(custom_ops.fake_quantize, (w, bits, 8, backend))
