"""A DiffQuantizer step on the multi-tensor path (Triton backend): what the per-tensor path
guaranteed still holds — micro-batches accumulate, tied weights share one noise draw, the
kernels and the eager backend agree in eval, unused weights get no gradient."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffq_triton
from diffq_triton.ops.dispatch import use_backend
from tests.conftest import DEVICE
from tests.models import TiedLM, mlp

pytest.importorskip("triton")


def _grads(q):
    return [p.grad.clone() for p in q.model.parameters() if p.grad is not None]


def test_micro_batches_accumulate_as_separate_steps():
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.no_optimizer()
    batches = [torch.randn(4, 32, device=DEVICE) for _ in range(2)]
    separate = []
    with use_backend("triton"):
        for seed, x in enumerate(batches):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(seed)
            (model(x).pow(2).mean() + 1e-3 * q.model_size()).backward()
            separate.append(_grads(q))
        model.zero_grad(set_to_none=True)
        for seed, x in enumerate(batches):
            torch.manual_seed(seed)
            (model(x).pow(2).mean() + 1e-3 * q.model_size()).backward()
    for total, first, second in zip(_grads(q), *separate, strict=True):
        assert torch.equal(total, first + second)


def test_tied_weights_share_one_noise_draw():
    torch.manual_seed(0)
    model = TiedLM().to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.no_optimizer()
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, _: seen.append(m.weight))
             for m in (model.emb, model.out)]
    with use_backend("triton"):
        model(torch.randint(0, 300, (2, 5), device=DEVICE)).sum().backward()
    for h in hooks:
        h.remove()
    assert seen[0] is seen[1]  # the same noisy tensor for both uses
    assert not torch.equal(seen[0], model.emb.weight)
    assert model.emb.weight.grad is not None and model.emb.weight_diffq.grad is not None


def test_unused_weight_gets_no_gradient():
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(8, 8), "unused": nn.Linear(8, 8)}).to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=4)
    q.no_optimizer()
    model.forward = lambda x: model["used"](x)
    with use_backend("triton"):
        model(torch.randn(3, 8, device=DEVICE)).sum().backward()
    assert model["used"].weight.grad is not None
    assert model["unused"].weight.grad is None and model["unused"].weight_diffq.grad is None


def test_triton_and_eager_agree_in_eval_after_training():
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.setup_optimizer(opt)
    x = torch.randn(4, 32, device=DEVICE)
    with use_backend("triton"):
        for _ in range(3):
            opt.zero_grad()
            (model(x).pow(2).mean() + 1e-2 * q.model_size()).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            out_triton = model(x)
        size_triton = q.true_model_size()
    for record in q._qparams:
        record.__dict__.pop("eval_cache", None)
    with use_backend("eager"), torch.no_grad():
        assert torch.equal(model(x), out_triton)
        assert q.true_model_size() == size_triton


def test_logits_of_two_dtypes_are_launched_apart():
    # A layer cast to bf16 after the quantizer: its logits are bf16, the other bf16 layer's
    # float32; one launch would read one kind as the other.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16, dtype=torch.bfloat16), nn.Linear(16, 16)).to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=4, init_bits=14)
    q.no_optimizer()
    model[1].to(torch.bfloat16)
    assert {r.logit.dtype for r in q._first_uses()} == {torch.float32, torch.bfloat16}
    seen = []
    hook = model[1].register_forward_hook(lambda m, i, o: seen.append(m.weight.detach()))
    with use_backend("triton"):
        model(torch.randn(2, 16, dtype=torch.bfloat16, device=DEVICE)).float().sum().backward()
    hook.remove()
    w = model[1].weight.detach().float()
    span = float(w.max() - w.min())
    # Gaussian noise of step r·u(14) / 2: beyond 6 of its steps is not noise of that width.
    assert (seen[0].float() - w).abs().max() <= 6 * span / (2**14 - 1)
    for record in q._first_uses():
        assert record.logit.grad.dtype == record.logit.dtype
        assert torch.isfinite(record.logit.grad).all()


def test_half_logits_size_matches_the_stored_widths():
    # Widths round in the logits' dtype: the size kernels (float32) step aside for fp16.
    # param="noise" widths go through exp and log2, where fp16 and fp32 round apart.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(37, 29), nn.ReLU(), nn.Linear(29, 3), nn.Linear(3, 1),
                          nn.Embedding(50, 40)).to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=1024, param="noise",
                                   init_bits=5)
    q.no_optimizer()
    with torch.no_grad():
        for record in q._first_uses():
            record.logit.copy_(torch.randn(record.logit.shape) * 3)
    model.half()
    with use_backend("triton"):
        on_triton = q.true_model_size()
    with use_backend("eager"):
        assert q.true_model_size() == on_triton


# ----------------------------------------------------------------------------- fused size
def _step_grads(model, q, x, size_first: bool, seed: int = 5):
    """Gradients of loss + 1e-2·model_size(); the size taken after the forward (from the
    noise's call, fused) or before it (its own kernels)."""
    model.zero_grad(set_to_none=True)
    size = q.model_size() if size_first else None
    torch.manual_seed(seed)
    out = model(x)
    size = q.model_size() if size is None else size
    (out.pow(2).mean() + 1e-2 * size).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("group_size", [0, 8, 2000], ids=lambda g: f"g{g}")
def test_size_from_the_noise_call_gives_the_same_gradients(group_size):
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=group_size, extra_bits=-0.4)
    q.no_optimizer()
    x = torch.randn(4, 32, device=DEVICE)
    with use_backend("triton"):
        fused = _step_grads(model, q, x, size_first=False)
        assert q._step_size is not None  # the size came from the noise's call
        separate = _step_grads(model, q, x, size_first=True)
    assert fused.keys() == separate.keys()
    for name in fused:
        # One float32 addition either way (a GPU may fuse it with the product: an ulp).
        torch.testing.assert_close(fused[name], separate[name], rtol=1e-6, atol=1e-9)


def test_step_size_is_reused_only_while_it_holds():
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.setup_optimizer(opt)
    x = torch.randn(4, 32, device=DEVICE)
    with use_backend("triton"):
        out = model(x)
        step_size = q._size_of_this_step()
        assert step_size is not None and q._size_of_this_step() is step_size
        first, second = q.model_size(), q.model_size()  # both from the noise call's output
        (out.sum() + first + second).backward()
        assert q._size_of_this_step() is None  # its graph was used: computed afresh
        after = q.model_size()
        torch.testing.assert_close(after, first.detach())
        opt.step()  # logits changed in place: the forward's size no longer holds
        model(x)
        with torch.no_grad():
            for record in q._first_uses():
                record.logit.add_(1.0)
        changed = q.model_size()
    with use_backend("eager"):
        torch.testing.assert_close(changed, q.model_size())


def test_fused_size_reaches_the_logits_of_unused_weights():
    # A weight whose output gets no gradient: its logits still get the size term, and the
    # other weights the same gradients as with the size computed apart.
    torch.manual_seed(0)
    model = nn.ModuleDict({"used": nn.Linear(8, 8), "unused": nn.Linear(8, 8)}).to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=4)
    q.no_optimizer()
    model.forward = lambda x: model["used"](x)
    x = torch.randn(3, 8, device=DEVICE)
    with use_backend("triton"):
        fused = _step_grads(model, q, x, size_first=False)
        separate = _step_grads(model, q, x, size_first=True)
    assert "unused.weight" not in fused and "unused.weight_diffq" in fused
    assert fused.keys() == separate.keys()
    for name in fused:
        torch.testing.assert_close(fused[name], separate[name], rtol=1e-6, atol=1e-9)


def test_a_forward_without_gradients_leaves_no_size_to_reuse():
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.no_optimizer()
    with use_backend("triton"):
        with torch.no_grad():
            model(torch.randn(2, 32, device=DEVICE))  # training mode, no gradients
        size = q.model_size()
    assert size.requires_grad  # computed afresh: the penalty still trains the logits
    size.backward()
    assert all(r.logit.grad is not None for r in q._first_uses())


@pytest.mark.parametrize("loss_first", [True, False], ids=["loss-then-size", "size-then-loss"])
def test_loss_and_size_backpropagated_apart(loss_first):
    # Two backward calls, one for the loss, one for the penalty: the noise call's node runs
    # once for each, and the gradients are those of the size computed apart.
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.no_optimizer()
    x = torch.randn(4, 32, device=DEVICE)
    results = []
    with use_backend("triton"):
        for size_first in (False, True):  # fused, then apart
            model.zero_grad(set_to_none=True)
            size = q.model_size() if size_first else None
            torch.manual_seed(5)
            loss = model(x).pow(2).mean()
            penalty = 1e-2 * (q.model_size() if size is None else size)
            for term in ((loss, penalty) if loss_first else (penalty, loss)):
                term.backward()
            results.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for name, grad in results[0].items():
        torch.testing.assert_close(grad, results[1][name], rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("backend", ["triton", "eager"])
def test_fused_adam_steps_refresh_what_was_derived_from_the_weights(backend):
    # Adam(fused=True) writes parameters without bumping their version counters: every
    # optimizer step tells the quantizer, so eval weights and the step's size follow.
    if not hasattr(torch.optim.Adam([torch.zeros(1, requires_grad=True)], fused=True), "step"):
        pytest.skip("no fused Adam")
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    opt = torch.optim.Adam(model.parameters(), lr=0.5, fused=True)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.setup_optimizer(opt)
    x = torch.randn(4, 32, device=DEVICE)
    with use_backend(backend):
        model.eval()
        with torch.no_grad():
            before = model(x)
        model.train()
        (model(x).pow(2).mean() + q.model_size()).backward()
        model(x)  # a forward, then a step before its size is asked for
        opt.step()
        size = q.model_size()
        model.eval()
        with torch.no_grad():
            after = model(x)
    assert not torch.equal(before, after)
    with use_backend("eager"):
        torch.testing.assert_close(size, q.model_size())


def test_backward_after_the_logits_moved():
    # FSDP2 frees a block's unsharded weights and logits after its forward and gathers them
    # again before its backward, maybe at another address: the backward must read them where
    # they are then, not where the forward's table pointed (there: poison).
    from diffq_triton import ops

    torch.manual_seed(0)
    weights = [torch.randn(37, 11, device=DEVICE, requires_grad=True) for _ in range(3)]
    logits = [nn.Parameter(torch.randn((37 * 11 + 7) // 8, device=DEVICE)) for _ in range(3)]
    seed = torch.tensor([123], device=DEVICE)
    kwargs = dict(group_size=8, min_bits=2, max_bits=8, param="bits", noise="gaussian",
                  seed=seed, streams=[0, 1, 2])
    with use_backend("triton"):
        expected = ops.pseudo_quantize_many(weights, logits, **kwargs)
        sum(n.sum() for n in expected).backward()
        want = [lg.grad.clone() for lg in logits] + [w.grad.clone() for w in weights]
        for p in weights + logits:
            p.grad = None
        noisy = ops.pseudo_quantize_many(weights, logits, **kwargs)
        for lg in logits:  # a new address, the old storage poisoned
            old = lg.data
            lg.data = old.clone()
            old.fill_(float("nan"))
        sum(n.sum() for n in noisy).backward()
    got = [lg.grad for lg in logits] + [w.grad for w in weights]
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)


def test_a_step_after_the_parameters_moved_reads_them_where_they_are():
    # Tables are kept by the tensors' addresses: once the weights and logits move (a .to()
    # round trip, load_state_dict into new storage), a step must not read the old storage
    # (kept alive here, poisoned). The same seed then gives the same numbers.
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.no_optimizer()
    x = torch.randn(4, 32, device=DEVICE)

    def step():
        model.zero_grad(set_to_none=True)
        torch.manual_seed(1)
        out = model(x)
        size = q.model_size()
        (out.pow(2).mean() + 1e-2 * size).backward()
        return [out.detach(), size.detach()] + _grads(q)

    with use_backend("triton"):
        before = step()
        model(x)  # a forward: its size serves model_size()...
        assert q._size_of_this_step() is not None
        old = [p.data for p in model.parameters()]
        for p in model.parameters():
            p.data = p.data.clone()
        for data in old:
            data.fill_(float("nan"))
        assert q._size_of_this_step() is None  # ...until the logits move
        after = step()
    assert len(after) == len(before) == 2 + 2 * len(list(q._first_uses()))
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("float16", [False, True], ids=["float32", "float16"])
def test_size_from_the_noise_call_is_the_figure_of_the_size_kernels_bit_for_bit(float16):
    # The noise call's kernel gives the size in MB, float parameters included, and takes
    # ∂L/∂MB: the same bits as bits / 2^23 + floats and its backward in torch.
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0.001, float16=float16, group_size=8,
                                   extra_bits=-0.4)  # the biases stay float: 10 + 64 entries
    q.no_optimizer()
    grads = []
    with use_backend("triton"):
        apart = q.model_size()  # no forward yet: the size kernels' own call
        model(torch.randn(4, 32, device=DEVICE))
        fused = q.model_size()
        assert q._size_of_this_step() is not None  # from the forward's noise call
        for size in (apart, fused):
            (7.5 * size).backward()
            grads.append([r.logit.grad.clone() for r in q._first_uses()])
            model.zero_grad(set_to_none=True)
    assert fused.shape == apart.shape == () and torch.equal(fused, apart)
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


def test_sizes_handed_out_in_one_step_stay_apart():
    # The step's first model_size() is the forward's tensor, later ones copies: a caller
    # scaling its size in place (penalty *= λ) changes no other, and a size asked for after
    # such a write is computed afresh.
    torch.manual_seed(0)
    model = mlp().to(DEVICE)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.no_optimizer()
    with use_backend("triton"):
        true = q.model_size()  # apart, before the forward
        (6 * true).backward()
        want = [r.logit.grad.clone() for r in q._first_uses()]
        model.zero_grad(set_to_none=True)
        model(torch.randn(4, 32, device=DEVICE))
        first, second = q.model_size(), q.model_size()
        first *= 2
        assert torch.equal(second, true)
        third = q.model_size()
        assert torch.equal(third, true) and torch.equal(first, 2 * true)
        second *= 3
        assert torch.equal(first, 2 * true) and torch.equal(third, true)
        (first + second + third).backward()
    for record, grad in zip(q._first_uses(), want, strict=True):
        torch.testing.assert_close(record.logit.grad, grad, rtol=1e-6, atol=0)
