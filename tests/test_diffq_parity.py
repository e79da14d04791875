"""Same numbers as diffq 0.2.4 on the same models (skipped where diffq is not installed).

Each test runs on both of our backends: the eager path, and the Triton kernels (under the
interpreter on a CPU machine), which compute the sizes, the noise and the eval weights.
"""

import copy
import importlib.util
from collections import Counter

import pytest
import torch

import diffq_triton
from diffq_triton.ops.dispatch import use_backend
from tests.models import TiedLM, conv_net

diffq = pytest.importorskip("diffq")

CASES = {
    "conv": (conv_net, lambda: torch.randn(4, 3, 8, 8)),
    "tied-lstm": (TiedLM, lambda: torch.randint(0, 300, (2, 7))),
    # Every tensor a multiple of 8 entries: the tied LSTM at group_size 8 diffq can run.
    "tied-lstm-v304": (lambda: TiedLM(vocab=304), lambda: torch.randint(0, 304, (2, 7))),
}
# diffq 0.2.4 asserts `param.numel() % group_size == 0` (DiffQuantizer._register_param):
# out.bias has 300 entries, 300 % 8 == 4. Ours gives that tensor a shorter last group.
DIFFQ_ASSERTS = pytest.mark.xfail(
    raises=AssertionError, strict=True,
    reason="diffq 0.2.4 asserts that group_size divides every quantized tensor's numel "
           "(out.bias: 300 entries, group_size 8); diffq_triton gives a shorter last group")


class Backend:
    """The backend a test runs on, and the Triton launches seen (by kernel name)."""

    def __init__(self, name: str, launches: Counter):
        self.name, self.launches = name, launches

    def check(self):
        """Triton kernels ran on the Triton backend, none on the eager one."""
        ran = sum(self.launches.values())
        assert ran > 0 if self.name == "triton" else ran == 0, (self.name, self.launches)


@pytest.fixture(params=["eager", "triton"])
def backend(request):
    if importlib.util.find_spec("triton") is None:
        if request.param == "triton":
            pytest.skip("triton is not installed")
        with use_backend("eager"):
            yield Backend("eager", Counter())
        return
    from tests.test_launches import count_launches

    with use_backend(request.param), count_launches() as launches:
        yield Backend(request.param, launches)


def _twins(make, seed=0):
    torch.manual_seed(seed)
    model = make()
    return model, copy.deepcopy(model)


def _perturb_logits(m1, m2, suffix):
    torch.manual_seed(1)
    with torch.no_grad():
        for (n1, p1), (n2, p2) in zip(m1.named_parameters(), m2.named_parameters(), strict=True):
            assert n1 == n2
            if n1.endswith(suffix):
                assert torch.equal(p1, p2), f"initial {n1} differs"
                noise = 3 * torch.randn_like(p1)
                p1.add_(noise)
                p2.add_(noise)


@pytest.mark.parametrize("case, group_size", [
    *[(case, g) for case in ("conv", "tied-lstm") for g in (0, 1)],
    ("conv", 8),
    pytest.param("tied-lstm", 8, marks=DIFFQ_ASSERTS),
    ("tied-lstm-v304", 8),
], ids=lambda v: f"g{v}" if isinstance(v, int) else v)
@pytest.mark.parametrize("param", ["bits", "noise"])
def test_diffq_sizes_and_eval_outputs_match(case, group_size, param, backend):
    make, inputs = CASES[case]
    m_ref, m_ours = _twins(make)
    kwargs = dict(min_size=0.0001, group_size=group_size, param=param, extra_bits=0.3)
    q_ref = diffq.DiffQuantizer(m_ref, **kwargs)
    q_ours = diffq_triton.DiffQuantizer(m_ours, **kwargs)
    assert list(m_ref.state_dict()) == list(m_ours.state_dict())
    _perturb_logits(m_ref, m_ours, "_diffq")
    assert q_ours.model_size().item() == pytest.approx(q_ref.model_size().item(), rel=1e-6)
    assert q_ours.true_model_size() == pytest.approx(q_ref.true_model_size(), rel=1e-6)
    x = inputs()
    m_ref.eval()
    m_ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(m_ours(x), m_ref(x), rtol=0, atol=0)
    backend.check()


@pytest.mark.parametrize("case", ["conv", "tied-lstm"])
def test_uniform_and_lsq_match(case, backend):
    make, inputs = CASES[case]
    x = inputs()
    for ours_cls, ref_cls, kwargs in [
        (diffq_triton.UniformQuantizer, diffq.UniformQuantizer, dict(bits=5)),
        (diffq_triton.LSQ, diffq.LSQ, dict(bits=4)),
    ]:
        m_ref, m_ours = _twins(make)
        q_ref = ref_cls(m_ref, min_size=0.0001, **kwargs)
        q_ours = ours_cls(m_ours, min_size=0.0001, **kwargs)
        assert q_ours.true_model_size() == pytest.approx(q_ref.true_model_size(), rel=1e-6)
        assert list(m_ref.state_dict()) == list(m_ours.state_dict())
        m_ref.eval()
        m_ours.eval()
        with torch.no_grad():
            q_ref.quantize()
            q_ours.quantize()
            torch.testing.assert_close(m_ours(x), m_ref(x), rtol=0, atol=0)
    backend.check()


def test_noise_statistics_match_diffq_in_training(backend):
    """Same weights and logits: the noisy weights have the same spread as diffq's."""
    m_ref, m_ours = _twins(lambda: torch.nn.Linear(256, 256))
    q_ref = diffq.DiffQuantizer(m_ref, min_size=0, group_size=8, init_bits=4)
    q_ours = diffq_triton.DiffQuantizer(m_ours, min_size=0, group_size=8, init_bits=4)
    q_ref.no_optimizer()
    q_ours.no_optimizer()
    seen = {}

    def grab(key):
        return lambda mod, inp: seen.__setitem__(key, mod.weight.detach().clone())

    m_ref.register_forward_pre_hook(grab("ref"))
    m_ours.register_forward_pre_hook(grab("ours"))
    x = torch.randn(2, 256)
    m_ref(x)
    m_ours(x)
    w = m_ours.weight.detach()
    std_ref = (seen["ref"] - w).std()
    std_ours = (seen["ours"] - w).std()
    assert std_ours == pytest.approx(std_ref.item(), rel=0.05)
    backend.check()


def test_float16_small_parameters_match_in_eval_and_size(backend):
    m_ref, m_ours = _twins(conv_net)
    kwargs = dict(min_size=0.005, float16=True, group_size=4)
    q_ref = diffq.DiffQuantizer(m_ref, **kwargs)
    q_ours = diffq_triton.DiffQuantizer(m_ours, **kwargs)
    assert q_ours.true_model_size() == pytest.approx(q_ref.true_model_size(), rel=1e-6)
    x = torch.randn(2, 3, 8, 8)
    m_ref.eval()
    m_ours.eval()
    with torch.no_grad():
        torch.testing.assert_close(m_ours(x), m_ref(x), rtol=0, atol=0)
    backend.check()
