"""SizeBudget: training to a target size with a self-tuning λ, rounding to the budget."""

import functools
import math
import warnings

import pytest
import torch
from torch import nn

import diffq_triton
from diffq_triton.quantizers.budget import SizeBudget, _logits_for_widths, size_range
from tests.models import mlp


@functools.cache
def _task(n: int = 1024, d: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and labels of a random teacher network (learnable to ~98%)."""
    with torch.random.fork_rng():
        torch.manual_seed(1)
        teacher = nn.Sequential(nn.Linear(d, 64), nn.Tanh(), nn.Linear(64, 10))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)
    with torch.no_grad():
        y = teacher(x).argmax(1)
    return x, y


def _setup(group_size: int = 8, **kwargs):
    torch.manual_seed(0)
    model = mlp(32, 96, 10)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=group_size, **kwargs)
    q.setup_optimizer(opt, lr=5e-2)
    return model, q, opt


def _train(model, opt, budget, steps, data, loss_scale=1.0, start=0):
    x, y = data
    g = torch.Generator().manual_seed(1000 + start)
    lams = []
    for _ in range(steps):
        i = torch.randint(0, len(x), (64,), generator=g)
        loss = loss_scale * nn.functional.cross_entropy(model(x[i]), y[i])
        (loss + budget.penalty()).backward()
        opt.step()
        opt.zero_grad()
        lams.append(budget.lam.clone())
    return lams


def _fraction_of_range(q, fraction: float) -> float:
    low, high = size_range(q)
    return low + fraction * (high - low)


@pytest.mark.parametrize("fraction", [0.15, 0.35], ids=["target15pct", "target35pct"])
def test_training_lands_within_2pct_of_target(fraction):
    model, q, opt = _setup()
    target = _fraction_of_range(q, fraction)
    budget = SizeBudget(q, target)
    _train(model, opt, budget, 300, _task())
    # The controller alone brings the differentiable size near the target (measured: 0.8%
    # and 1.1% above), to the README's 2%...
    soft = float(q.model_size().detach())
    assert abs(soft - target) <= 0.02 * target, (soft, target)
    # ...and rounding to the budget lands the stored size on it, never above, within the 2%
    # the README promises (measured: 0.03% under).
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # finalize warns when it misses the 2%
        final = budget.finalize()
    assert final == q.true_model_size()
    assert 0.98 * target <= final <= target
    model.eval()
    x, y = _task()
    with torch.no_grad():
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.85, "quality kept while squeezing the model"


@pytest.mark.slow  # two more training runs
def test_lambda_finds_its_scale_whatever_the_loss_units():
    # The same task with the loss in units 100 times larger needs a λ ~100 times larger:
    # nothing to retune, the multiplier finds it.
    finals = {}
    for scale in (1.0, 100.0):
        model, q, opt = _setup()
        target = _fraction_of_range(q, 0.25)
        budget = SizeBudget(q, target)
        _train(model, opt, budget, 300, _task(), loss_scale=scale)
        finals[scale] = float(budget.lam)
        assert abs(float(q.model_size().detach()) - target) <= 0.05 * target
    assert finals[100.0] > 30 * finals[1.0]


@pytest.mark.parametrize("group_size", [1, 8, 0], ids=["g1", "g8", "g0"])
@pytest.mark.parametrize("fraction", [0.2, 0.55], ids=["t20", "t55"])
def test_finalize_fits_budget_from_identical_widths(group_size, fraction):
    # Fresh logits: every group at init_bits, all tied. Rounding to the budget must split
    # the tie to land close, which plain rounding (all groups alike) cannot.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=group_size, init_bits=5.3)
    target = _fraction_of_range(q, fraction)
    with warnings.catch_warnings():
        # One width per tensor (group_size 0): a few sizes exist, 2% may be out of reach.
        warnings.simplefilter("ignore" if group_size == 0 else "error")
        size = SizeBudget(q, target).finalize()
    assert size == q.true_model_size() <= target
    if group_size:
        assert size >= 0.99 * target


@pytest.mark.parametrize("param", ["bits", "noise"])
@pytest.mark.parametrize("extra_bits", [0, 1])
@pytest.mark.parametrize("min_bits,max_bits", [(2, 15), (2.3, 9.6), (1, 4)])
def test_logits_for_widths_round_to_the_width(param, extra_bits, min_bits, max_bits):
    model = nn.Linear(16, 16)
    init = (min_bits + max_bits) / 2
    q = diffq_triton.DiffQuantizer(model, min_size=0, min_bits=min_bits, max_bits=max_bits,
                                   init_bits=init, param=param, extra_bits=extra_bits)
    low = min(max(round(min_bits + extra_bits), 1), 15)
    high = min(max(round(max_bits + extra_bits), 1), 15)
    widths = torch.arange(low, high + 1, dtype=torch.float64)
    logits = _logits_for_widths(q, widths)
    assert torch.isfinite(logits).all()
    rounded = (extra_bits + q.get_bits(logits)).round().clamp(1, 15)
    torch.testing.assert_close(rounded, widths.float(), rtol=0, atol=0)


def test_finalize_rewrites_only_groups_whose_rounding_changes():
    model, q, opt = _setup()
    target = _fraction_of_range(q, 0.3)
    budget = SizeBudget(q, target)
    _train(model, opt, budget, 60, _task())
    logits = [p.detach().clone() for p in q._logits()]
    widths = [q._int_bits(r).clone() for r in q._first_uses()]
    budget.finalize()
    for before, after, w_before, r in zip(logits, q._logits(), widths, q._first_uses(),
                                          strict=True):
        w_after = q._int_bits(r)
        same = w_before == w_after
        torch.testing.assert_close(after.detach()[same], before[same], rtol=0, atol=0)
        assert (w_after.int() - w_before.int()).abs().max() <= 2


def test_size_range_matches_true_size_at_the_extremes():
    model, q, _ = _setup(min_bits=3, max_bits=12, extra_bits=1)
    low, high = size_range(q)
    with torch.no_grad():
        for value, expected in ((-30.0, low), (30.0, high)):
            for logit in q._logits():
                logit.fill_(value)
            assert q.true_model_size() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("bad", [0.0, 1e-9, 1e3, float("nan"), float("inf")])
def test_unreachable_target_is_an_error_up_front(bad):
    _, q, _ = _setup()
    with pytest.raises(ValueError, match="target_mb"):
        SizeBudget(q, bad)


def test_wrong_types_are_type_errors():
    _, q, _ = _setup()
    with pytest.raises(TypeError, match="target_mb"):
        SizeBudget(q, "5")
    with pytest.raises(TypeError, match="quantizer"):
        SizeBudget(diffq_triton.UniformQuantizer(nn.Linear(8, 8), min_size=0), 0.001)


def test_observables_are_device_tensors_and_update_false_keeps_state():
    model, q, opt = _setup()
    budget = SizeBudget(q, _fraction_of_range(q, 0.3))
    assert math.isnan(float(budget.size))
    budget.penalty().backward()
    assert budget.lam.shape == () and budget.size.shape == ()
    assert budget.lam.device == q._logits()[0].device
    state = budget.state_dict()
    lam = budget.lam.clone()
    budget.penalty(update=False)
    budget(update=False)
    after = budget.state_dict()
    assert torch.equal(after["log_lambda"], state["log_lambda"])
    assert torch.equal(after["step"], state["step"])
    assert torch.equal(budget.lam, lam)


def test_resumed_run_continues_identically(tmp_path):
    data = _task()
    model, q, opt = _setup()
    target = _fraction_of_range(q, 0.25)
    budget = SizeBudget(q, target)
    _train(model, opt, budget, 40, data)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(),
                "budget": budget.state_dict(), "rng": torch.get_rng_state()},
               tmp_path / "ckpt.pt")
    uninterrupted = _train(model, opt, budget, 30, data, start=40)

    model2, q2, opt2 = _setup()
    ckpt = torch.load(tmp_path / "ckpt.pt")
    model2.load_state_dict(ckpt["model"])
    opt2.load_state_dict(ckpt["opt"])
    budget2 = SizeBudget(q2, 2 * target)  # the saved target wins
    budget2.load_state_dict(ckpt["budget"])
    assert budget2.target_mb == target
    torch.set_rng_state(ckpt["rng"])
    resumed = _train(model2, opt2, budget2, 30, data, start=40)
    for a, b in zip(uninterrupted, resumed, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(q._logits(), q2._logits(), strict=True):
        assert torch.equal(a, b)


def test_load_state_dict_rejects_incomplete_state():
    _, q, _ = _setup()
    budget = SizeBudget(q, _fraction_of_range(q, 0.3))
    with pytest.raises(ValueError, match="missing"):
        budget.load_state_dict({"target_mb": 0.001})


def test_penalty_compiles_fullgraph_and_matches_eager():
    # fullgraph=True fails on any .item() or data-dependent branch: no host sync per step.
    results = []
    for compiled in (False, True):
        model, q, opt = _setup()
        budget = SizeBudget(q, _fraction_of_range(q, 0.3))
        penalty = torch.compile(budget.penalty, fullgraph=True, backend="aot_eager") \
            if compiled else budget.penalty
        x, y = _task()
        torch.manual_seed(5)
        lams = []
        for _ in range(4):
            loss = nn.functional.cross_entropy(model(x[:64]), y[:64])
            (loss + penalty()).backward()
            opt.step()
            opt.zero_grad()
            lams.append(budget.lam.clone())
        results.append(torch.stack(lams))
        assert budget.state_dict()["step"] == 4
    torch.testing.assert_close(results[1], results[0])


def _ddp_worker(rank: int, world: int, port: int, out_dir: str) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        model, q, opt = _setup()  # same seed: same initial weights on every rank
        budget = SizeBudget(q, _fraction_of_range(q, 0.3))
        ddp = nn.parallel.DistributedDataParallel(model)
        torch.manual_seed(100 + rank)  # different data and noise per rank
        lams = []
        for _ in range(5):
            loss = ddp(torch.randn(8, 32)).pow(2).mean()
            opt.zero_grad()
            (loss + budget.penalty()).backward()
            opt.step()
            lams.append(budget.lam.clone())
        torch.save({"lams": torch.stack(lams), **budget.state_dict()},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # two spawned processes importing torch: ~10 s unloaded
def test_ddp_ranks_hold_the_same_lambda(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert len(torch.unique(r0["lams"])) > 1, "λ moved"
    for key in ("lams", "log_lambda", "step", "last_gap"):
        torch.testing.assert_close(r0[key], r1[key], rtol=0, atol=0, msg=key)


def test_size_penalty_method_keeps_one_budget_per_target():
    import diffq_triton
    from tests.models import mlp

    model = mlp()
    quantizer = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    low, high = diffq_triton.size_range(quantizer)
    target = low + 0.3 * (high - low)
    first = quantizer.size_penalty(target)
    first.backward()
    budget = quantizer.budget
    quantizer.size_penalty(target)
    assert quantizer.budget is budget
    assert budget.target_mb == target
    with pytest.raises(ValueError):
        quantizer.size_penalty(10 * high)
