"""torch.compile(fullgraph=True) on quantized models: training and eval, no graph break."""

import pytest
import torch

import diffq_triton
from tests.conftest import INDUCTOR
from tests.models import mlp


def _quantized_mlp(cls=diffq_triton.DiffQuantizer, **kwargs):
    torch.manual_seed(0)
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    q = cls(model, min_size=0, **kwargs)
    q.setup_optimizer(opt) if hasattr(q, "setup_optimizer") else None
    return model, q, opt


@pytest.mark.parametrize("backend", ["aot_eager", INDUCTOR])
def test_diffq_train_and_eval_compile_fullgraph(backend):
    model, q, opt = _quantized_mlp(group_size=8, init_bits=4)
    compiled = torch.compile(model, fullgraph=True, backend=backend)
    x = torch.randn(4, 32)
    model.train()
    out1 = compiled(x)
    (out1.pow(2).mean() + 1e-3 * q.model_size()).backward()
    assert model[0].weight.grad is not None
    assert model[0].weight_diffq.grad is not None and model[0].weight_diffq.grad.abs().sum() > 0
    assert not torch.equal(compiled(x), out1), "fresh noise every compiled call"
    assert isinstance(model[0]._parameters["weight"], torch.nn.Parameter)
    model.eval()
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(compiled(x), expected)


def test_no_graph_breaks_in_train_or_eval():
    model, q, opt = _quantized_mlp(group_size=4)
    x = torch.randn(4, 32)
    for mode in (model.train, model.eval):
        mode()
        explanation = torch._dynamo.explain(model)(x)
        assert explanation.graph_break_count == 0, explanation.break_reasons


def test_uniform_qat_and_lsq_compile_fullgraph():
    x = torch.randn(4, 32)
    for cls, kwargs in [(diffq_triton.UniformQuantizer, dict(bits=4, qat=True)),
                        (diffq_triton.LSQ, dict(bits=4))]:
        model, q, _ = _quantized_mlp(cls, **kwargs)
        compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
        compiled(x).sum().backward()
        assert model[0].weight.grad is not None
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(compiled(x), model(x))
