"""Models built on the meta device: quantizer, ``to_empty``, weight init, ``reset_parameters``.

torchtitan's flow builds the model on ``meta``, creates the quantizer there (it must come
before ``fully_shard``), then materialises with ``model.to_empty(device=...)`` and its own
weight init. ``to_empty`` puts new tensors in place of the parameters the quantizer
recorded and leaves its own (logits, steps) as uninitialised memory: every entry point must
refuse until ``reset_parameters()``, after which the quantizer must be the one a creation on
the materialised model gives, bit for bit. (Under FSDP2: tests/test_fsdp.py.)
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import diffq_triton
from diffq_triton.validation import UsageError

VOCAB, DIM = 40, 16


class Tied(nn.Module):
    """An embedding tied to the head, as language models are, and a Linear between."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.mid = nn.Linear(DIM, DIM)
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.tie()

    def tie(self) -> None:
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.mid(self.emb(idx))))


QUANTIZERS = {
    "diffq": (diffq_triton.DiffQuantizer, dict(min_size=0, group_size=8)),
    # Float parameters too, stored as float16 (eval rounds them at each use).
    "diffq-float16": (diffq_triton.DiffQuantizer,
                      dict(min_size=0, group_size=8, float16=True, exclude=["*.bias"])),
    "lsq": (diffq_triton.LSQ, dict(min_size=0, bits=3)),
    "uniform": (diffq_triton.UniformQuantizer, dict(min_size=0, bits=3, qat=True)),
}


def _init(model: nn.Module, seed: int = 0) -> None:
    """The user's weight init (each module's own, from one seed)."""
    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()


def _on_meta(kind: str):
    """Model and quantizer created on the meta device; not yet materialised."""
    cls, kwargs = QUANTIZERS[kind]
    with torch.device("meta"):
        model = Tied()
    return model, cls(model, **kwargs)


def _materialised(kind: str):
    """The documented flow: meta, quantizer, to_empty, re-tie, init, reset_parameters."""
    model, q = _on_meta(kind)
    model.to_empty(device="cpu")
    model.tie()  # to_empty gives each module its own tensor
    _init(model)
    q.reset_parameters()
    return model, q


def _reference(kind: str):
    """The same model and weights, quantized where they are (the non-meta flow)."""
    cls, kwargs = QUANTIZERS[kind]
    model = Tied()
    _init(model)
    return model, cls(model, **kwargs)


def _optimizer(model, q, kind, created_after: bool) -> torch.optim.Optimizer:
    if created_after:  # over model.parameters(): setup_optimizer moves the quantizer's
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    else:  # the non-meta flow's order: optimizer, quantizer, setup_optimizer
        opt = torch.optim.Adam([p for n, p in model.named_parameters()
                                if not n.endswith(("_diffq", "_lsq"))], lr=1e-2)
    if kind != "uniform":
        q.setup_optimizer(opt)
    return opt


def _step(model, q, opt, seed: int = 7) -> tuple[dict, dict]:
    """One training step with the size penalty; the gradients and the parameters after."""
    model.train()
    torch.manual_seed(seed)  # DiffQ's noise
    idx = torch.randint(0, VOCAB, (3, 5), generator=torch.Generator().manual_seed(1))
    loss = model(idx).pow(2).mean()
    if isinstance(q, diffq_triton.DiffQuantizer):
        loss = loss + 1e-3 * q.model_size()
    opt.zero_grad()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return grads, {n: p.detach().clone() for n, p in model.named_parameters()}


def _eval(model) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(torch.arange(VOCAB).reshape(4, -1))


@pytest.mark.parametrize("kind", list(QUANTIZERS))
def test_reset_parameters_gives_the_quantizer_created_on_the_materialised_model(kind):
    model, q = _materialised(kind)
    ref_model, ref = _reference(kind)
    ref_opt = _optimizer(ref_model, ref, kind, created_after=False)
    opt = _optimizer(model, q, kind, created_after=True)
    assert [len(g["params"]) for g in opt.param_groups] == \
        [len(g["params"]) for g in ref_opt.param_groups]
    state, ref_state = model.state_dict(), ref_model.state_dict()
    assert state.keys() == ref_state.keys()
    for name, value in ref_state.items():  # weights, logits, steps
        assert torch.equal(state[name], value), name
    assert model.head.weight is model.emb.weight
    assert torch.equal(q.model_size(), ref.model_size())
    assert q.true_model_size() == ref.true_model_size()
    assert torch.equal(_eval(model), _eval(ref_model))
    grads, after = _step(model, q, opt)
    ref_grads, ref_after = _step(ref_model, ref, ref_opt)
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        assert torch.equal(grads[name], grad), name
    for name, value in ref_after.items():
        assert torch.equal(after[name], value), name
    assert torch.equal(_eval(model), _eval(ref_model))


def _entry_points(model, q, kind) -> dict:
    """Every entry point that reads the records, as a callable."""
    idx = torch.zeros(2, 3, dtype=torch.long)

    def train_forward():
        model.train()
        model(idx)

    def eval_forward():
        model.eval()
        with torch.no_grad():
            model(idx)

    calls = {
        "train forward": train_forward,
        "eval forward": eval_forward,
        "model_size": q.model_size,
        "true_model_size": q.true_model_size,
        "get_quantized_state": q.get_quantized_state,
        "save_quantized": lambda: diffq_triton.save_quantized(q, "never-written.safetensors"),
        "quantize": q.quantize,
        "restore_quantized_state":
            lambda: q.restore_quantized_state(_reference(kind)[1].get_quantized_state()),
    }
    if kind != "uniform":
        calls["setup_optimizer"] = lambda: q.setup_optimizer(torch.optim.SGD([nn.Parameter(
            torch.zeros(1))], lr=0.1))
    if kind.startswith("diffq"):
        calls["SizeBudget"] = lambda: diffq_triton.SizeBudget(q, 0.001)
        calls["size_penalty"] = lambda: q.size_penalty(0.001)
    return calls


@pytest.mark.parametrize("kind", list(QUANTIZERS))
@pytest.mark.parametrize("materialised", [False, True], ids=["still-meta", "to_empty"])
def test_every_entry_point_refuses_until_reset(kind, materialised, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, q = _on_meta(kind)
    if materialised:
        model.to_empty(device="cpu")
        model.tie()
        _init(model)
    for name, call in _entry_points(model, q, kind).items():
        with pytest.raises(UsageError) as info:
            call()
        message = str(info.value)
        assert "meta device when the quantizer was created" in message, name
        assert "reset_parameters()" in message, name
        assert ("still on the meta device" in message) == (not materialised), name
    assert not (tmp_path / "never-written.safetensors").exists()
    if materialised:  # the refusals left nothing behind: the flow goes on as documented
        q.reset_parameters()
        ref_model, ref = _reference(kind)
        assert torch.equal(_eval(model), _eval(ref_model))


def test_reset_parameters_on_weights_still_on_meta_says_materialise():
    model, q = _on_meta("diffq")
    with pytest.raises(UsageError, match="still on the meta device: materialise"):
        q.reset_parameters()
    with pytest.raises(UsageError, match="reset_parameters"):  # still refused after
        q.model_size()


@pytest.mark.parametrize("kind", ["diffq", "lsq"])
def test_ties_undone_by_to_empty_are_refused_until_tied_again(kind):
    model, q = _on_meta(kind)
    model.to_empty(device="cpu")
    assert model.head.weight is not model.emb.weight
    _init(model)
    with pytest.raises(UsageError, match="tied.*tie them again") as info:
        q.reset_parameters()
    assert "model.head.weight = model.emb.weight" in str(info.value)
    with pytest.raises(UsageError, match="reset_parameters"):
        q.model_size()
    model.tie()
    _init(model)
    q.reset_parameters()
    ref_model, ref = _reference(kind)
    assert torch.equal(_eval(model), _eval(ref_model))


def test_swapped_parameters_keep_their_identity_and_still_need_reset():
    # torch.__future__'s swap_tensors conversion keeps the Parameter objects (and the tie):
    # the records are not stale, but the logits hold no values all the same.
    previous = torch.__future__.get_swap_module_params_on_conversion()
    torch.__future__.set_swap_module_params_on_conversion(True)
    try:
        model, q = _on_meta("diffq")
        weight = model.mid.weight
        model.to_empty(device="cpu")
    finally:
        torch.__future__.set_swap_module_params_on_conversion(previous)
    assert model.mid.weight is weight and model.head.weight is model.emb.weight
    _init(model)
    with pytest.raises(UsageError, match="reset_parameters"):
        q.model_size()
    q.reset_parameters()
    ref_model, ref = _reference("diffq")
    assert torch.equal(q.model_size(), ref.model_size())
    assert torch.equal(_eval(model), _eval(ref_model))


def test_an_optimizer_created_before_to_empty_is_refused():
    model, q = _on_meta("diffq")
    early = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.to_empty(device="cpu")
    model.tie()
    _init(model)
    q.reset_parameters()
    with pytest.raises(UsageError, match="create the optimizer after"):
        q.setup_optimizer(early)


def test_detach_before_reset_removes_the_quantizers_parameters():
    model, q = _on_meta("lsq")
    model.to_empty(device="cpu")
    q.detach()
    assert not [n for n, _ in model.named_parameters() if n.endswith("_lsq")]
    model.tie()
    diffq_triton.LSQ(model, min_size=0, bits=3)  # a new quantizer may attach


def test_a_quantizer_created_off_meta_resets_in_place():
    # Not only for meta: after re-initialising the weights, the quantizer's parameters
    # start again from them (the Parameter objects stay, as the optimizer holds them).
    model, q = _reference("lsq")
    step = model.mid.weight_lsq
    with torch.no_grad():
        model.mid.weight.mul_(3)
        step.zero_()
    q.reset_parameters()
    assert model.mid.weight_lsq is step
    fresh = Tied()
    _init(fresh)
    with torch.no_grad():
        fresh.mid.weight.mul_(3)
    diffq_triton.LSQ(fresh, min_size=0, bits=3)
    assert torch.equal(step, fresh.mid.weight_lsq)


def test_a_compiled_forward_refuses_too():
    model, q = _on_meta("diffq")
    model.to_empty(device="cpu")
    model.tie()
    q.no_optimizer()
    compiled = torch.compile(model, backend="aot_eager")
    for mode in ("train", "eval"):
        getattr(model, mode)()
        with pytest.raises(UsageError, match="reset_parameters"):
            compiled(torch.zeros(2, 3, dtype=torch.long))


@pytest.mark.parametrize("kind", ["diffq", "lsq"])
def test_a_full_load_state_dict_stands_in_for_reset(kind):
    # Resuming: to_empty, then the quantized model's checkpoint (logits or steps included).
    ref_model, ref = _reference(kind)
    _step(ref_model, ref, _optimizer(ref_model, ref, kind, created_after=False))
    model, q = _on_meta(kind)
    model.to_empty(device="cpu")
    model.tie()
    model.load_state_dict(ref_model.state_dict())
    assert torch.equal(q.model_size(), ref.model_size())
    assert torch.equal(_eval(model), _eval(ref_model))
    opt = _optimizer(model, q, kind, created_after=True)
    assert [len(g["params"]) for g in opt.param_groups] == [3, 3]  # weights, own


def test_a_partial_load_state_dict_does_not():
    ref_model, _ = _reference("diffq")
    model, q = _on_meta("diffq")
    model.to_empty(device="cpu")
    model.tie()
    weights = {k: v for k, v in ref_model.state_dict().items() if not k.endswith("_diffq")}
    model.load_state_dict(weights, strict=False)
    with pytest.raises(UsageError, match="reset_parameters"):
        q.model_size()
    q.reset_parameters()
    assert torch.equal(_eval(model), _eval(ref_model))


def test_a_full_load_into_untied_weights_is_refused():
    ref_model, _ = _reference("diffq")
    model, q = _on_meta("diffq")
    model.to_empty(device="cpu")
    with pytest.raises(UsageError, match="tie them again"):
        model.load_state_dict(ref_model.state_dict())
