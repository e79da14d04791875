"""The core formulas of spec.md against an oracle written here, in float64.

Production code takes its math from :mod:`diffq_triton.ops.reference`, and most tests compare
to it: a mistake there would pass them all. The oracle below is written from spec.md and the
paper alone (Python floats and float64 tensors, nothing imported from the library) and checks
the reference, the eager ops, the Triton ops (under the interpreter on a CPU machine), the
quantizer's sizes and the file codec.
"""

from __future__ import annotations

import math

import pytest
import torch

import diffq_triton
from diffq_triton import ops
from diffq_triton.ops import reference
from diffq_triton.ops.dispatch import use_backend
from diffq_triton.serialization.tensor_record import quantize_minmax

F32_EPS = torch.finfo(torch.float32).eps
MIN_BITS, MAX_BITS = 2, 15


# ----------------------------------------------------------------------------- the oracle
def o_sigmoid(x: torch.Tensor) -> torch.Tensor:
    return 1 / (1 + torch.exp(-x.double()))


def o_bits(logits: torch.Tensor, min_bits: float, max_bits: float, param: str) -> torch.Tensor:
    """spec §2: ``b = min + σ(l)(max - min)``; ``param="noise"``: log-linear noise scale."""
    t = o_sigmoid(logits)
    if param == "bits":
        return min_bits + t * (max_bits - min_bits)
    scale = torch.exp(t * math.log(1 / (2**max_bits - 1))
                      + (1 - t) * math.log(1 / (2**min_bits - 1)))
    return torch.log2(1 + 1 / scale)


def o_unit(bits: torch.Tensor) -> torch.Tensor:
    """spec §2: the noise scale (quantization step over the range) ``u(b) = 1/(2^b - 1)``."""
    return 1 / (2 ** bits.double() - 1)


def o_group_lengths(numel: int, group_size: int) -> list[int]:
    """Runs of ``group_size`` consecutive entries (a shorter last one); 0: one group."""
    if group_size == 0:
        return [numel]
    return [min(group_size, numel - start) for start in range(0, numel, group_size)]


def o_per_entry(values: torch.Tensor, numel: int, group_size: int) -> torch.Tensor:
    lengths = o_group_lengths(numel, group_size)
    return torch.cat([values[s].reshape(1).expand(n) for s, n in enumerate(lengths)])


def o_tensor_size_bits(bits: torch.Tensor, numel: int, group_size: int,
                       min_bits: float) -> float:
    """spec §3: ``g·Σ b_s + 2·32 + 8 + n_groups·ceil(log2(1 + round(max b) - min_bits))``,
    each group counted at its own length."""
    lengths = torch.tensor(o_group_lengths(numel, group_size), dtype=torch.float64)
    field = math.ceil(math.log2(1 + round(float(bits.max())) - min_bits))
    return float((lengths * bits.double()).sum()) + 2 * 32 + 8 + len(lengths) * field


def o_quantize(w: torch.Tensor, bits: torch.Tensor, group_size: int):
    """spec §1: per-tensor min-max; levels ``round((w - mn)/(mx - mn)·(2^b - 1))`` (exact
    value before rounding returned too, to tell ties apart)."""
    flat = w.double().reshape(-1)
    mn, mx = float(flat.min()), float(flat.max())
    top = o_per_entry(2 ** bits.double() - 1, flat.numel(), group_size)
    exact = (flat - mn) / (mx - mn) * top
    return exact.round(), exact, mn, mx


def o_dequantize(levels: torch.Tensor, bits: torch.Tensor, group_size: int, mn: float,
                 mx: float) -> torch.Tensor:
    """spec §1: ``mn + q/(2^b - 1)·(mx - mn)``."""
    top = o_per_entry(2 ** bits.double() - 1, levels.numel(), group_size)
    return mn + levels.double() / top * (mx - mn)


# ----------------------------------------------------------------------------- inputs
SHAPES = [(37,), (5, 7), (300,), (24, 16)]
GROUPS = [0, 1, 5, 8]
BACKENDS = ["eager", "triton"]


def _weights(shape, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) * 0.7 + 0.1


def _logits(n: int, seed=1, dtype=torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 3).to(dtype)


def _int_bits(n: int, seed=2) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 16, (n,), generator=g, dtype=torch.uint8)


def _n_groups(numel: int, group_size: int) -> int:
    return len(o_group_lengths(numel, group_size))


@pytest.fixture(params=BACKENDS)
def backend(request):
    if request.param == "triton":
        pytest.importorskip("triton")
    with use_backend(request.param):
        yield request.param


# ----------------------------------------------------------------------------- bits from logits
@pytest.mark.parametrize("param", ["bits", "noise"])
@pytest.mark.parametrize("min_bits, max_bits", [(2, 15), (2.3, 9.6), (1, 4)])
def test_bits_from_logits(param, min_bits, max_bits):
    logits = torch.cat([torch.linspace(-12, 12, 101, dtype=torch.float64),
                        _logits(50).double()])
    expected = o_bits(logits, min_bits, max_bits, param)
    got = reference.bits_from_logits(logits, min_bits, max_bits, param)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)  # both float64
    q = diffq_triton.DiffQuantizer(torch.nn.Linear(4, 4), min_size=0, param=param,
                                   min_bits=min_bits, max_bits=max_bits,
                                   init_bits=(min_bits + max_bits) / 2)
    torch.testing.assert_close(q.get_bits(logits), expected, rtol=1e-12, atol=0)
    assert float(expected.min()) >= min_bits - 1e-9 and float(expected.max()) <= max_bits + 1e-9


@pytest.mark.parametrize("param", ["bits", "noise"])
@pytest.mark.parametrize("init_bits", [3, 8, 11.5])
def test_logits_start_at_init_bits(param, init_bits):
    model = torch.nn.Linear(16, 8)
    diffq_triton.DiffQuantizer(model, min_size=0, group_size=4, param=param,
                               init_bits=init_bits)
    bits = o_bits(model.weight_diffq.detach(), MIN_BITS, MAX_BITS, param)
    # float32 logits: the width they give is init_bits up to the logit's rounding.
    torch.testing.assert_close(bits, torch.full_like(bits, init_bits), rtol=1e-5, atol=0)


def test_noise_scale_from_bits():
    bits = torch.tensor([1.0, 2.0, 3.5, 8.0, 15.0], dtype=torch.float64)
    torch.testing.assert_close(reference.step_unit(bits), o_unit(bits), rtol=1e-15, atol=0)
    assert o_unit(bits)[0] == 1 and o_unit(bits)[3] == 1 / 255  # the oracle itself
    logits = _logits(40).double()
    torch.testing.assert_close(
        reference.noise_scale_from_logits(logits, 2, 12),
        o_unit(o_bits(logits, 2, 12, "noise")), rtol=1e-12, atol=0)


# ----------------------------------------------------------------------------- model size
def _o_size_bits(weights, logits, group_size, extra_bits, param, exact=False) -> float:
    total = 0.0
    for w, lg in zip(weights, logits, strict=True):
        bits = extra_bits + o_bits(lg, MIN_BITS, MAX_BITS, param)
        if exact:
            bits = bits.round().clamp(1, 15)
        total += o_tensor_size_bits(bits, w.numel(), group_size, MIN_BITS)
    return total


@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("param", ["bits", "noise"])
@pytest.mark.parametrize("extra_bits", [0, 0.3])
def test_size_bits_of_the_reference(group_size, param, extra_bits):
    weights = [_weights(s) for s in SHAPES]
    logits = [_logits(_n_groups(w.numel(), group_size), seed=t).double()
              for t, w in enumerate(weights)]
    expected = _o_size_bits(weights, logits, group_size, extra_bits, param)
    each = sum(float(reference.diffq_tensor_size_bits(
        extra_bits + reference.bits_from_logits(lg, MIN_BITS, MAX_BITS, param), w.numel(),
        group_size, MIN_BITS)) for w, lg in zip(weights, logits, strict=True))
    assert each == pytest.approx(expected, rel=1e-12)
    bits = extra_bits + reference.bits_from_logits(torch.cat(logits), MIN_BITS, MAX_BITS, param)
    layout = reference.size_layout([w.numel() for w in weights], group_size, bits.device)
    many = float(reference.diffq_sizes_bits(bits, layout, MIN_BITS))
    # The layout's group lengths are float32, exact for these sizes.
    assert many == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("param", ["bits", "noise"])
def test_model_size_of_the_quantizer(group_size, param, backend):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(24, 16), torch.nn.Linear(16, 5))
    q = diffq_triton.DiffQuantizer(model, min_size=1e-4, group_size=group_size, param=param,
                                   extra_bits=0.3)
    with torch.no_grad():
        for t, logit in enumerate(q._logits()):
            logit.copy_(_logits(logit.numel(), seed=10 + t))
    quantized = [model[0].weight, model[1].weight]  # the biases: at most 26 entries, float
    logits = [model[0].weight_diffq.detach(), model[1].weight_diffq.detach()]
    floats_bits = 32 * (model[0].bias.numel() + model[1].bias.numel())
    for exact in (False, True):
        expected = (_o_size_bits(quantized, logits, group_size, 0.3, param, exact)
                    + floats_bits) / 2**23
        # float32 logits and sums of a few hundred float32 terms.
        assert float(q.model_size(exact=exact).detach()) == pytest.approx(expected, rel=1e-6)
    assert q.true_model_size() == pytest.approx(expected, rel=1e-6)
    if backend == "triton":
        size = ops.diffq_size_bits(quantized, logits, group_size=group_size, extra_bits=0.3,
                                   min_bits=MIN_BITS, max_bits=MAX_BITS, param=param,
                                   exact=False)
        assert size is not None, "the size kernels ran"
        expected = _o_size_bits(quantized, logits, group_size, 0.3, param)
        assert float(size.detach()) == pytest.approx(expected, rel=1e-6)


# ----------------------------------------------------------------------------- quantization
def _ties(exact: torch.Tensor) -> torch.Tensor:
    """Entries whose exact level sits so near a half that float32 arithmetic may round it
    either way (float32 relative error ~1e-7 times at most 2^15 levels: 0.01 is ample)."""
    return ((exact - exact.floor()) - 0.5).abs() < 1e-2


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: f"g{g}")
def test_quantize_and_dequantize_of_the_reference(shape, group_size):
    w = _weights(shape)
    bits = _int_bits(_n_groups(w.numel(), group_size))
    levels, exact, mn, mx = o_quantize(w, bits, group_size)
    got, got_mn, got_mx = reference.quantize(w, bits, group_size)
    assert (float(got_mn), float(got_mx)) == (mn, mx)  # float32 ends, exactly
    diff = got.double() - levels
    ties = _ties(exact)
    assert torch.equal(diff[~ties], torch.zeros_like(diff[~ties]))
    assert diff.abs().max() <= 1 and int(ties.sum()) <= max(2, w.numel() // 20)
    top = o_per_entry(2 ** bits.double() - 1, w.numel(), group_size)
    assert float(levels.min()) == 0 and bool((levels <= top).all())
    # Dequantize: three float32 operations on values within |mn| + |mx|.
    tol = 4 * F32_EPS * (abs(mn) + abs(mx))
    deq = reference.dequantize(got, bits, group_size, got_mn, got_mx).double()
    assert (deq - o_dequantize(got, bits, group_size, mn, mx)).abs().max() <= tol
    # The round trip is within half a step of every weight.
    step = o_per_entry(o_unit(bits.double()), w.numel(), group_size) * (mx - mn)
    assert bool(((deq - w.double().reshape(-1)).abs() <= step / 2 + tol).all())


@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: f"g{g}")
def test_eval_weights_of_the_ops(group_size, backend):
    weights = [_weights(s, seed=t) for t, s in enumerate(SHAPES)]
    bits = [_int_bits(_n_groups(w.numel(), group_size), seed=t) for t, w in enumerate(weights)]
    one = [ops.quantized_weight(w, b, group_size) for w, b in zip(weights, bits, strict=True)]
    many = ops.quantized_weight_many(weights, bits, group_size)
    for w, b, a, m in zip(weights, bits, one, many, strict=True):
        levels, exact, mn, mx = o_quantize(w, b, group_size)
        expected = o_dequantize(levels, b, group_size, mn, mx)
        step = o_per_entry(o_unit(b.double()), w.numel(), group_size) * (mx - mn)
        tol = 4 * F32_EPS * (abs(mn) + abs(mx))  # float32 dequantize, as above
        ties = _ties(exact)
        for got in (a, m):
            assert got.shape == w.shape and got.dtype == w.dtype
            err = (got.double().reshape(-1) - expected).abs()
            assert err[~ties].max() <= tol
            assert bool((err[ties] <= step[ties] + tol).all())  # one level off at a tie


@pytest.mark.parametrize("group_size", GROUPS, ids=lambda g: f"g{g}")
def test_levels_of_the_file_codec(group_size, cpu_codec):
    w = _weights((24, 16))
    bits = _int_bits(_n_groups(w.numel(), group_size))
    record = quantize_minmax("w", w, bits, group_size)
    levels, exact, mn, mx = o_quantize(w, bits, group_size)
    assert (record.mn, record.mx) == (mn, mx)
    ties = _ties(exact)
    got = record.levels.double().reshape(-1)
    assert torch.equal(got[~ties], levels[~ties])
    assert (got - levels).abs().max() <= 1
    expected = o_dequantize(record.levels.reshape(-1), bits, group_size, mn, mx)
    tol = 4 * F32_EPS * (abs(mn) + abs(mx))
    assert (record.dequantize().double().reshape(-1) - expected).abs().max() <= tol


def test_constant_tensor_round_trips():
    # spec §1: mx == mn round-trips exactly (the oracle's formula divides by zero there).
    w = torch.full((5, 3), -0.25)
    for b in (1, 8, 15):
        bits = torch.full((1,), b, dtype=torch.uint8)
        assert torch.equal(reference.fake_quantize(w, bits, 0), w)
        assert torch.equal(ops.quantized_weight(w, bits, 0), w)


# ----------------------------------------------------------------------------- the noise
def _noisy(path: str, w, logits, **config) -> torch.Tensor:
    if path == "one":
        return ops.pseudo_quantize(w, logits, **config)
    # The training step's call: every weight at once, with the size.
    noisy, _, _ = ops.pseudo_quantize_many_with_size([w], [logits], extra_bits=0, **config)
    return noisy[0]


@pytest.mark.parametrize("group_size", [0, 1, 8, 5], ids=lambda g: f"g{g}")
@pytest.mark.parametrize("param", ["bits", "noise"])
@pytest.mark.parametrize("noise", ["gaussian", "uniform"])
@pytest.mark.parametrize("path", ["one", "many"])
def test_noisy_weight_scale_and_gradients(path, group_size, param, noise, backend):
    """``ŵ = w + (mx - mn)·u(b_s)·ξ`` (spec §2): ``ξ`` recovered from the op's output has the
    law the spec gives, and the gradients follow the spec's closed forms with that ``ξ``."""
    torch.manual_seed(3)
    w = _weights((96, 100), seed=4).requires_grad_()
    n_groups = _n_groups(w.numel(), group_size)
    # Widths 2 to 9 bits: the noise stays far above w's float32 rounding, so ξ is recovered
    # to ~1e-4 relative.
    logits = (torch.rand(n_groups) * 4 - 3).requires_grad_()
    w_hat = _noisy(path, w, logits, group_size=group_size, min_bits=MIN_BITS,
                   max_bits=MAX_BITS, param=param, noise=noise)
    g = torch.randn_like(w)
    (w_hat * g).sum().backward()

    w64, g64 = w.detach().double().reshape(-1), g.double().reshape(-1)
    mn, mx = float(w64.min()), float(w64.max())
    bits = o_bits(logits.detach(), MIN_BITS, MAX_BITS, param)
    unit = o_per_entry(o_unit(bits), w.numel(), group_size)
    xi = (w_hat.detach().double().reshape(-1) - w64) / ((mx - mn) * unit)
    n = xi.numel()
    if noise == "uniform":
        assert float(xi.abs().max()) <= 0.5 + 1e-3  # U[-1/2, 1/2], up to the recovery
        assert float(xi.abs().max()) >= 0.49
        expected_std = 1 / math.sqrt(12)
    else:
        expected_std = 0.5  # N(0, 1)/2
    # 9600 draws: the sample std's relative spread is 1/sqrt(2n) = 0.7% (Gaussian; less for
    # the uniform): 4% is over 5 sigma, and a scale off by a bit is off by 2x.
    assert float(xi.std()) == pytest.approx(expected_std, rel=0.04)
    assert abs(float(xi.mean())) <= 5 * expected_std / math.sqrt(n)

    # ∂L/∂l_s = Σ_{i∈s} g_i (mx - mn) ξ_i du_s/dl_s; du/dl from the oracle by autograd.
    l64 = logits.detach().double().requires_grad_()
    u = o_unit(o_bits(l64, MIN_BITS, MAX_BITS, param))
    du = torch.autograd.grad(u.sum(), l64)[0]
    sums = torch.zeros(n_groups, dtype=torch.float64)
    lengths = o_group_lengths(n, group_size)
    sums.index_add_(0, torch.repeat_interleave(torch.arange(n_groups),
                                               torch.tensor(lengths)), g64 * xi)
    expected_l = (mx - mn) * sums * du
    # ξ recovered from float32 outputs (~1e-4 relative) and sums of float32 products.
    torch.testing.assert_close(logits.grad.double(), expected_l, rtol=2e-3,
                               atol=2e-3 * float(expected_l.abs().max()))
    # ∂L/∂w = g + (Σ_i g_i u(b_i) ξ_i)·(e_argmax - e_argmin): the range is not detached.
    d_range = float((g64 * unit * xi).sum())
    expected_w = g64.clone()
    expected_w[int(w64.argmax())] += d_range
    expected_w[int(w64.argmin())] -= d_range
    torch.testing.assert_close(w.grad.double().reshape(-1), expected_w, rtol=1e-3,
                               atol=1e-3 * abs(d_range) + 1e-6)
