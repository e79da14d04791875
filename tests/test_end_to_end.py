"""One model trained, saved and reloaded on the Triton path (interpreted on a CPU machine).

Training forward and backward (noise, size), eval weights, packing the file and unpacking it
all run the kernels here; each phase's launches are counted, so a silent fall-back to the
eager path fails the test. The result must equal what the eager path and the CPU codec make
of the same trained state, bit for bit.
"""

from __future__ import annotations

import pytest
import torch

import diffq_triton
from diffq_triton import serialization
from diffq_triton.ops.dispatch import use_backend
from tests.models import TiedLM

pytest.importorskip("triton")
from tests.test_launches import count_launches  # noqa: E402


def _tied_lm() -> TiedLM:
    torch.manual_seed(0)
    return TiedLM(vocab=40, dim=16)


def _state(model) -> dict[str, torch.Tensor]:
    tensors = dict(model.named_parameters(remove_duplicate=False))
    return {n: t.detach().clone() for n, t in tensors.items() if not n.endswith("_diffq")}


def test_train_save_reload_on_triton(tmp_path):
    model = _tied_lm()
    start = _state(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=8)
    q.setup_optimizer(opt, lr=0.5)
    logits0 = [lg.detach().clone() for lg in q._logits()]
    g = torch.Generator().manual_seed(0)
    with use_backend("triton"), count_launches() as train:
        for _ in range(3):
            x = torch.randint(0, 40, (2, 7), generator=g)
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
            (loss + 1e-2 * q.model_size()).backward()
            opt.step()
            opt.zero_grad()
    # The fused noise and size kernels ran at every step, forward and backward.
    for kernel in ("noise_many_fwd_kernel", "noise_many_bwd_kernel", "size_many_fwd_kernel",
                   "size_many_bwd_kernel"):
        assert train[kernel] == 3, train
    assert all(not torch.equal(a, b.detach()) for a, b in zip(logits0, q._logits(),
                                                              strict=True))
    assert not torch.equal(start["lstm.weight_hh_l0"], model.lstm.weight_hh_l0)

    model.eval()
    x = torch.randint(0, 40, (3, 5), generator=g)
    with use_backend("triton"), count_launches() as eval_launches, torch.no_grad():
        expected_out = model(x)
        q.quantize()
        expected = _state(model)
        q.unquantize()
    assert eval_launches["fake_quant_many_kernel"] > 0, eval_launches
    with use_backend("eager"), torch.no_grad():  # the eager path's eval weights agree
        q.quantize()
        for name, t in _state(model).items():
            assert torch.equal(t, expected[name]), name
        q.unquantize()

    path = tmp_path / "model.safetensors"
    with use_backend("triton"), count_launches() as save:
        serialization.save_quantized(q, path)
    assert save["bitpack_fwd_kernel"] > 0, save
    # The CPU codec writes the same bytes from the same state.
    assert serialization.file_bytes(q) == path.read_bytes()

    for backend in ("triton", "eager"):
        fresh = _tied_lm()
        with use_backend(backend), count_launches() as load:
            serialization.load_quantized(fresh, path)
        assert (load["bitunpack_fwd_kernel"] > 0) == (backend == "triton"), load
        reloaded = _state(fresh)
        assert reloaded.keys() == expected.keys()
        for name, t in reloaded.items():
            assert torch.equal(t, expected[name]), (backend, name)
        assert fresh.out.weight is fresh.emb.weight
        fresh.eval()
        with torch.no_grad():
            assert torch.equal(fresh(x), expected_out)
