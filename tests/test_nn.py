"""DiffQ layers: same sizes and eval outputs as DiffQuantizer, conversions, compile."""

import copy

import pytest
import torch
from torch import nn

import diffq_triton
from diffq_triton import nn as qnn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 24)
        self.conv1 = nn.Conv1d(24, 16, 3)
        self.conv2 = nn.Conv2d(1, 4, 3, padding=1)
        self.fc = nn.Linear(16 * 4, 7)

    def forward(self, tokens):
        h = self.conv1(self.emb(tokens).transpose(1, 2))  # [N, 16, L-2]
        h = self.conv2(h[:, None]).mean(-1)  # [N, 4, 16]
        return self.fc(h.flatten(1))


@pytest.mark.parametrize("group_size", [0, 1, 5, 8])
def test_layers_match_diffquantizer(group_size):
    torch.manual_seed(0)
    plain = Net()
    reference_model = copy.deepcopy(plain)
    config = qnn.DiffQConfig(group_size=group_size, init_bits=4, extra_bits=0.2)
    layered = qnn.quantize_model(copy.deepcopy(plain), config)
    # Quantize weights only (biases stay float in the layers): exclude them.
    q = diffq_triton.DiffQuantizer(reference_model, min_size=0, group_size=group_size,
                                   init_bits=4, extra_bits=0.2, exclude=["bias"])
    assert list(layered.state_dict()) == list(reference_model.state_dict())
    torch.manual_seed(1)
    with torch.no_grad():
        for (n, a), (_, b) in zip(layered.named_parameters(), reference_model.named_parameters(),
                                  strict=True):
            if n.endswith("_diffq"):
                delta = torch.randn_like(a)
                a.add_(delta)
                b.add_(delta)
    assert qnn.model_size(layered).item() == pytest.approx(q.model_size().item(), rel=1e-6)
    assert qnn.model_size(layered, exact=True).item() == pytest.approx(q.true_model_size(),
                                                                        rel=1e-6)
    tokens = torch.randint(0, 50, (3, 9))
    layered.eval()
    reference_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(layered(tokens), reference_model(tokens), rtol=0, atol=0)


def test_from_float_to_float_round_trip():
    torch.manual_seed(0)
    linear = nn.Linear(20, 6)
    q = qnn.DiffQLinear.from_float(linear, qnn.DiffQConfig(group_size=4, init_bits=3))
    assert torch.equal(q.weight, linear.weight) and torch.equal(q.bias, linear.bias)
    plain = q.to_float()
    assert type(plain) is nn.Linear
    x = torch.randn(2, 20)
    q.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(x), q(x))
        assert not torch.equal(plain.weight, linear.weight)


def test_training_grads_reach_weight_and_logits():
    layer = qnn.DiffQConv2d(3, 5, 3, config=qnn.DiffQConfig(group_size=9, init_bits=3))
    out = layer(torch.randn(2, 3, 6, 6))
    (out.pow(2).mean() + 1e-2 * qnn.model_size(layer)).backward()
    assert layer.weight.grad is not None and layer.weight_diffq.grad.abs().sum() > 0
    assert layer.weight_diffq.shape == (15,)  # 5·3·3·3 = 135 weights in groups of 9


def test_layers_compile_fullgraph():
    torch.manual_seed(0)
    model = qnn.quantize_model(Net(), qnn.DiffQConfig(group_size=8))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    tokens = torch.randint(0, 50, (2, 9))
    compiled(tokens).sum().backward()
    assert model.fc.weight_diffq.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(tokens), model(tokens))


def test_bad_config_names_argument():
    with pytest.raises(ValueError, match="init_bits"):
        qnn.DiffQConfig(min_bits=4, init_bits=3)
    with pytest.raises(ValueError, match="noise"):
        qnn.DiffQConfig(noise="pink")


def _meta_layers() -> nn.Module:
    return nn.Sequential(qnn.DiffQEmbedding(20, 12), qnn.DiffQLinear(12, 16),
                         qnn.DiffQConv1d(16, 8, 3), qnn.DiffQConv2d(8, 4, 1))


def test_layers_built_on_meta_refuse_until_their_logits_are_set():
    # Built on the meta device then given memory by to_empty(): the logits hold garbage
    # until reset_parameters() (or a state dict) sets them; every use refuses until then.
    with torch.device("meta"):
        model = _meta_layers()
    model.to_empty(device="cpu")
    for layer in model:
        with pytest.raises(diffq_triton.validation.UsageError, match="reset_parameters"):
            layer.size_bits()
        layer.eval()
        with pytest.raises(diffq_triton.validation.UsageError, match="meta device"):
            layer.effective_weight()
    for layer in model:
        layer.reset_parameters()
    torch.manual_seed(0)
    reference_model = _meta_layers()
    for (name, got), (_, want) in zip(model.named_parameters(),
                                      reference_model.named_parameters(), strict=True):
        if name.endswith("_diffq"):
            assert torch.equal(got, want), name
    assert torch.equal(qnn.model_size(model), qnn.model_size(reference_model))


def test_layers_built_on_meta_take_their_logits_from_a_state_dict():
    torch.manual_seed(0)
    trained = _meta_layers()
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.25)
    with torch.device("meta"):
        model = _meta_layers()
    model.to_empty(device="cpu")
    model.load_state_dict(trained.state_dict())
    model.eval(), trained.eval()
    ids = torch.tensor([[1, 5, 7]])
    assert torch.equal(model[1](model[0](ids)), trained[1](trained[0](ids)))
