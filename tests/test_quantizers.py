"""Quantizer behaviour: training and eval forwards, ties, state round trips, RNNs, errors."""

import math

import pytest
import torch
from torch import nn

import diffq_triton
from diffq_triton import ops
from tests.models import TiedLM, conv_net, mlp


def _train_step(model, quantizer, opt, x, penalty=1e-3):
    model.train()
    out = model(x)
    loss = out.float().pow(2).mean()
    if isinstance(quantizer, diffq_triton.DiffQuantizer):
        loss = loss + penalty * quantizer.model_size()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss


def test_training_reaches_weights_and_logits_and_restores_parameters():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=4)
    q.setup_optimizer(opt)
    before = [p.detach().clone() for p in model.parameters()]
    _train_step(model, q, opt, torch.randn(8, 32))
    for (name, p), b in zip(model.named_parameters(), before, strict=True):
        assert isinstance(model.get_parameter(name), nn.Parameter)
        assert not torch.equal(p, b), f"{name} did not move"
    assert set(model.state_dict()) == {
        "0.weight", "0.bias", "2.weight", "2.bias",
        "0.weight_diffq", "0.bias_diffq", "2.weight_diffq", "2.bias_diffq",
    }


def test_training_without_optimizer_setup_is_an_error():
    model = mlp()
    diffq_triton.DiffQuantizer(model, min_size=0)
    with pytest.raises(RuntimeError, match="setup_optimizer"):
        model(torch.randn(2, 32))


def test_fresh_noise_every_forward_and_floats_untouched():
    model = nn.Linear(16, 16)
    q = diffq_triton.DiffQuantizer(model, min_size=0, init_bits=3)
    q.no_optimizer()
    x = torch.randn(2, 16)
    assert not torch.equal(model(x), model(x))
    w = model.weight.detach().clone()
    model(x)
    assert torch.equal(model.weight, w)


def test_eval_uses_quantized_weights_and_caches_them(monkeypatch):
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8, init_bits=3)
    q.no_optimizer()
    model.eval()
    x = torch.randn(4, 32)
    calls = []
    real = ops.quantized_weight
    monkeypatch.setattr(ops, "quantized_weight", lambda *a, **k: calls.append(1) or real(*a, **k))
    with torch.no_grad():
        out = model(x)
        assert len(calls) == 4
        model(x)
        assert len(calls) == 4, "nothing changed: the cached quantized weights are reused"
        with q.enter_quantize():
            torch.testing.assert_close(model(x), out, rtol=0, atol=0)
        assert len(calls) == 8
        model(x)  # quantize() and unquantize() wrote the weights: re-quantized once
        model(x)
        assert len(calls) == 12
        model[0].weight.add_(1.0)  # one weight changed: only it is re-quantized
        model(x)
        assert len(calls) == 13
        model[2].weight_diffq.add_(1.0)  # its bits changed
        model(x)
        assert len(calls) == 14


def test_tied_parameters_share_logits_noise_and_survive_round_trip():
    torch.manual_seed(0)
    model = TiedLM()
    opt = torch.optim.Adam(model.parameters())
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.setup_optimizer(opt)
    logits = opt.param_groups[1]["params"]
    assert len(logits) == len({id(p) for p in logits}), "duplicate logits in the optimizer"
    assert not hasattr(model.out, "weight_diffq")
    seen = {}
    model.emb.register_forward_pre_hook(lambda m, i: seen.__setitem__("emb", m.weight))
    model.out.register_forward_pre_hook(lambda m, i: seen.__setitem__("out", m.weight))
    x = torch.randint(0, 300, (2, 5))
    _train_step(model, q, opt, x)
    assert seen["emb"] is seen["out"], "one noise draw per forward for every use"
    state = q.get_quantized_state(packed=False)
    q.detach()
    assert not hasattr(model.emb, "weight_diffq")
    fresh = TiedLM()
    diffq_triton.restore_quantized_state(fresh, state)
    assert fresh.out.weight is fresh.emb.weight
    assert not any(n.endswith("_diffq") for n, _ in fresh.named_parameters())


@pytest.mark.parametrize("group_size", [0, 1, 3, 8])
@pytest.mark.parametrize("packed", [False, True])
def test_state_round_trip_equals_eval_weights(group_size, packed):
    if packed:
        pytest.importorskip("diffq_triton.ops.bitpack")
    torch.manual_seed(0)
    model = conv_net()
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=group_size, init_bits=5)
    with torch.no_grad():
        for p in q._logits():
            p.add_(torch.randn_like(p))
    state = q.get_quantized_state(packed=packed)
    model.eval()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected = model(x)
    q.detach()
    fresh = conv_net()
    diffq_triton.restore_quantized_state(fresh, state)
    fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), expected, rtol=0, atol=0)


def test_size_not_multiple_of_group_size_is_counted_exactly():
    model = nn.Linear(10, 1)  # weight 10 entries, bias 1
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=4, init_bits=4)
    assert model.weight_diffq.shape == (3,)
    # weight: 10·4 + 64 + 8 + 3 groups·ceil(log2(1 + 4 - 2)); bias: 4 + 64 + 8 + 2
    expected = (40 + 64 + 8 + 3 * 2) + (4 + 64 + 8 + 2)
    assert q.true_model_size() == pytest.approx(expected / 2**23)


def test_constant_weight_quantizes_without_nan():
    model = nn.Linear(8, 8)
    with torch.no_grad():
        model.weight.fill_(0.5)
    q = diffq_triton.DiffQuantizer(model, min_size=0)
    q.quantize()
    assert torch.equal(model.weight, torch.full((8, 8), 0.5))


def test_model_size_is_differentiable_and_exact_rounds():
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8, init_bits=5.4)
    size = q.model_size()
    size.backward()
    assert all(p.grad is not None for p in q._logits())
    bits = 5 * sum(p.numel() for p in model.parameters() if p.dim() == 2)
    assert q.true_model_size() < q.model_size().item()
    assert q.true_model_size() > bits / 2**23


def test_model_size_compiles_without_host_sync():
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    compiled = torch.compile(lambda: q.model_size(), fullgraph=True, backend="eager")
    assert compiled().item() == pytest.approx(q.model_size().item())


@pytest.mark.parametrize("rnn_cls", [nn.LSTM, nn.GRU])
def test_rnns_train_and_eval(rnn_cls):
    torch.manual_seed(0)
    model = rnn_cls(8, 16, num_layers=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=4, init_bits=3)
    q.setup_optimizer(opt)
    x = torch.randn(5, 2, 8)
    model.train()
    out, _ = model(x)
    out.pow(2).mean().backward()
    assert model.weight_hh_l0.grad is not None and model.weight_hh_l0_diffq.grad is not None
    model.eval()
    with torch.no_grad():
        quantized, _ = model(x)
        q.quantize()
        assert model._flat_weights[0] is model.weight_ih_l0
        inplace, _ = model(x)
        q.unquantize()
        floats, _ = model.__class__.forward(model, x)
    torch.testing.assert_close(quantized, inplace, rtol=0, atol=0)
    assert not torch.equal(quantized, floats)


def test_uniform_qat_straight_through():
    torch.manual_seed(0)
    model = mlp()
    q = diffq_triton.UniformQuantizer(model, bits=3, min_size=0, qat=True)
    x = torch.randn(4, 32)
    model.train()
    out_train = model(x)
    out_train.sum().backward()
    assert model[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), out_train.detach())
    assert q.true_model_size() == pytest.approx(
        (3 * (32 * 64 + 64 + 64 * 10 + 10) + 4 * 64) / 2**23
    )


def test_lsq_trains_step_and_sizes():
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    q = diffq_triton.LSQ(model, bits=4, min_size=0)
    q.setup_optimizer(opt)
    assert opt.param_groups[1]["lr"] == 0.1
    step0 = model[0].weight_lsq.detach().clone()
    w = model[0].weight.detach()
    assert step0.item() == pytest.approx(2 * w.abs().mean().item() / math.sqrt(8), rel=1e-6)
    _train_step(model, q, opt, torch.randn(4, 32))
    assert not torch.equal(model[0].weight_lsq, step0)
    assert q.true_model_size() == pytest.approx((4 * (2048 + 64 + 640 + 10) + 4 * 32) / 2**23)


def test_min_size_float16_and_exclude():
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 4))
    q = diffq_triton.DiffQuantizer(model, float16=True, exclude=["1.*"])
    quantized = [r.full_name for r in q._qparams]
    assert quantized == ["0.weight"]
    half = [n for n, _, h in q.export_float() if h]
    assert half == ["0.bias", "1.weight", "1.bias"]


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(min_bits=8, max_bits=4, init_bits=6), ValueError, "min_bits"),
        (dict(max_bits=16), ValueError, "max_bits"),
        (dict(min_bits=0), ValueError, "min_bits"),
        (dict(init_bits=15), ValueError, "init_bits"),
        (dict(noise="laplace"), ValueError, "noise"),
        (dict(param="scale"), ValueError, "param"),
        (dict(group_size=-1), ValueError, "group_size"),
        (dict(group_size=2.5), TypeError, "group_size"),
        (dict(min_bits=10**400), ValueError, "min_bits"),  # float() would overflow
        (dict(min_size=-(10**400)), ValueError, "min_size"),
    ],
)
def test_bad_arguments_name_the_parameter(kwargs, error, match):
    with pytest.raises(error, match=match):
        diffq_triton.DiffQuantizer(mlp(), **kwargs)


def test_uniform_bits_out_of_range():
    with pytest.raises(ValueError, match="bits"):
        diffq_triton.UniformQuantizer(mlp(), bits=16)
    with pytest.raises(ValueError, match="bits"):
        diffq_triton.LSQ(mlp(), bits=0)


def test_second_quantizer_is_an_error_until_detached():
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0)
    with pytest.raises(ValueError, match="second quantizer|already has"):
        diffq_triton.UniformQuantizer(model, min_size=0)
    q.detach()
    diffq_triton.UniformQuantizer(model, min_size=0)


def test_non_float_parameter_is_a_type_error():
    model = nn.Module()
    model.table = nn.Parameter(torch.arange(100000), requires_grad=False)
    with pytest.raises(TypeError, match="table"):
        diffq_triton.DiffQuantizer(model, min_size=0)


def test_nan_weights_when_quantizing_name_the_parameter():
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0)
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="2.weight"):
        q.get_quantized_state()
    model.eval()
    with pytest.raises(ValueError, match="2.weight"):
        model(torch.randn(1, 32))


def test_optimizer_holding_logits_is_an_error():
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0)
    opt = torch.optim.Adam(model.parameters())
    with pytest.raises(ValueError, match="before the quantizer"):
        q.setup_optimizer(opt)
    q.clear_optimizer(opt)
    assert sum(len(g["params"]) for g in opt.param_groups) == 4
    q.setup_optimizer(opt)
    assert opt.param_groups[-1]["weight_decay"] == 0


def test_forward_that_raises_does_not_leave_noisy_weights():
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0)
    q.no_optimizer()
    with pytest.raises(RuntimeError):
        model(torch.randn(2, 5))  # wrong input width
    assert isinstance(model[0]._parameters["weight"], nn.Parameter)


def test_restoring_a_foreign_state_points_to_the_migration_path():
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0)
    state = q.get_quantized_state(packed=False)
    state["quantized"] = [(torch.zeros(3), (0.0, 1.0), torch.ones(1))] * len(state["quantized"])
    with pytest.raises(ValueError, match="load_diffq_state"):
        q.restore_quantized_state(state)


@pytest.mark.parametrize("extra_bits", [0, 0.3, -0.7, 1])
@pytest.mark.parametrize("bounds", [(2, 15, 8), (1, 8, 4), (3, 12, 5)], ids=str)
def test_int_bits_equal_rounded_get_bits(extra_bits, bounds):
    """The in-place widths of _int_bits are round_bits(extra_bits + get_bits(logit)), exactly."""
    from diffq_triton.ops import reference

    min_bits, max_bits, init_bits = bounds
    q = diffq_triton.DiffQuantizer(torch.nn.Linear(97, 31), group_size=8, min_bits=min_bits,
                                   max_bits=max_bits, init_bits=init_bits,
                                   extra_bits=extra_bits)
    record = next(iter(q._first_uses()))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        record.logit.copy_(torch.randn(record.logit.shape, generator=gen) * 4)
        record.logit[:9] = torch.tensor([0.0, -0.0, 1e-8, -50, 50, float("inf"),
                                         -float("inf"), 0.5, -0.5])
    expected = reference.round_bits(q.extra_bits + q.get_bits(record.logit.detach()))
    assert torch.equal(q._int_bits(record), expected)


@pytest.mark.parametrize("cpu_codec", ["native", "torch"], indirect=True)
def test_restore_with_a_corrupt_stream_leaves_the_model_unchanged(cpu_codec):
    """Every tensor is checked before any is written, on both CPU decoders."""
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    state = q.get_quantized_state()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # the model now differs from the state
    before = [p.detach().clone() for p in model.parameters()]
    state["quantized"][-1]["packed"] = state["quantized"][-1]["packed"][:-1]  # truncated
    with pytest.raises(ValueError, match="bytes"):
        q.restore_quantized_state(state)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    state = q.get_quantized_state()
    q.restore_quantized_state(state)  # still usable afterwards


@pytest.mark.parametrize("edit, match", [
    (lambda e: e.update(bits=e["bits"].to(torch.int64) + 256), "widths"),  # would wrap to uint8
    (lambda e: e.update(bits=e["bits"].float() + 0.5), "widths must be"),
    (lambda e: e.update(min=float("nan")), "min is not a finite number"),
    (lambda e: e.update(min=-3e38, max=3.4e38), "not finite in float32"),
], ids=["wrapping widths", "float widths", "nan range", "span overflow"])
def test_restore_refuses_bad_widths_and_ranges(edit, match):
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    state = q.get_quantized_state()
    before = [p.detach().clone() for p in model.parameters()]
    edit(state["quantized"][-1])
    with pytest.raises(ValueError, match=match):
        q.restore_quantized_state(state)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))


def test_export_refuses_a_range_that_overflows_float32():
    model = nn.Linear(4, 3, bias=False)
    with torch.no_grad():
        model.weight[0, 0], model.weight[0, 1] = -3e38, 3e38
    q = diffq_triton.UniformQuantizer(model, bits=8, min_size=0)
    with pytest.raises(ValueError, match="not finite in float32"):
        q.export_quantized()


def test_lsq_state_dicts_of_diffq_shape_load():
    # Steps are one-entry tensors (FSDP2 refuses scalar parameters); diffq 0.2.4's are 0-dim.
    torch.manual_seed(0)
    model = mlp()
    diffq_triton.LSQ(model, bits=4, min_size=0)
    state = {k: (v.reshape(()) if k.endswith("_lsq") else v)
             for k, v in model.state_dict().items()}
    assert any(k.endswith("_lsq") and v.dim() == 0 for k, v in state.items())
    fresh = mlp()
    diffq_triton.LSQ(fresh, bits=4, min_size=0)
    fresh.load_state_dict(state)
    for (name, a), b in zip(model.state_dict().items(), fresh.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name
    diffq = pytest.importorskip("diffq")
    theirs = mlp()
    diffq.LSQ(theirs, bits=4, min_size=0)
    ours = mlp()
    diffq_triton.LSQ(ours, bits=4, min_size=0)
    ours.load_state_dict(theirs.state_dict())
    for (name, a), b in zip(theirs.state_dict().items(), ours.state_dict().values(),
                            strict=True):
        assert torch.equal(a.reshape(b.shape), b), name


def test_float_parameters_are_counted_again_when_their_lists_are_made_anew():
    # model_size() counts the float parameters once per set of lists: rebind (after
    # fully_shard) makes new lists, counted afresh; moving the parameters keeps sizes.
    model = mlp()
    q = diffq_triton.DiffQuantizer(model, min_size=0.001)  # the biases stay float
    assert [name for name, _ in q._others] == ["0.bias", "2.bias"]
    size = q.model_size().item()
    model.to(torch.float64).to(torch.float32)
    assert q.model_size().item() == size
    q._others = q._others[:1]  # a new list, as rebind makes: without "2.bias" (10 entries)
    assert q.model_size().item() == pytest.approx(size - 10 * 32 / 2**23, rel=1e-6)
