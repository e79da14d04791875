"""Migration from diffq 0.2.4 states: every layout restores exactly what diffq restores."""

from __future__ import annotations

import io
import pickle
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from diffq_triton.diffq_compat import load_diffq_state
from tests.fixtures.diffq_cases import CASES, small_mlp

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def no_diffq(monkeypatch):
    """Make ``import diffq`` fail: the migration must not need the package."""
    for name in [m for m in sys.modules if m == "diffq" or m.startswith("diffq.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "diffq", None)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_fixture_restores_diffq_weights(case, no_diffq):
    make_model = CASES[case][0]
    torch.manual_seed(123)  # weights differ from those saved: all must be overwritten
    model = make_model()
    load_diffq_state(model, FIXTURES / f"diffq024_{case}.th")
    expected = torch.load(FIXTURES / f"diffq024_{case}.expected.th", weights_only=True)
    names = [n for n, _ in model.named_parameters()]
    assert sorted(names) == sorted(expected)  # quantizer detached: no logits left
    for name, p in model.named_parameters():
        assert torch.equal(p, expected[name]), name


def test_refuses_code_in_pickle(tmp_path):
    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    path = tmp_path / "evil.th"
    torch.save({"quantized": [], "float16": [], "others": [], "meta": Evil()}, path)
    with pytest.raises(ValueError, match="not a loadable diffq state"):
        load_diffq_state(small_mlp(), path)
    assert not marker.exists()
    with open(path, "wb") as f:  # a legacy (non-zip) pickle
        pickle.dump(Evil(), f)
    with pytest.raises(ValueError, match="not a loadable diffq state"):
        load_diffq_state(small_mlp(), path)
    assert not marker.exists()


def test_refuses_other_classes(tmp_path):
    path = tmp_path / "other.th"
    torch.save({"quantized": [], "float16": [], "others": [],
                "meta": {"klass": torch.nn.Linear, "init_kwargs": {}}}, path)
    with pytest.raises(ValueError, match="not a loadable diffq state"):
        load_diffq_state(small_mlp(), path)


def test_truncated_and_garbage(tmp_path):
    data = (FIXTURES / "diffq024_diffq_g8_bitpack.th").read_bytes()
    for cut in (10, len(data) // 2, len(data) - 5):
        path = tmp_path / f"cut{cut}.th"
        path.write_bytes(data[:cut])
        with pytest.raises(ValueError):
            load_diffq_state(small_mlp(), path)


def test_wrong_model():
    model = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.ReLU(), torch.nn.Linear(48, 10))
    with pytest.raises(ValueError):
        load_diffq_state(model, FIXTURES / "diffq024_diffq_g8_bitpack.th")


def diffq_widths_at(excess: int, n_groups: int) -> torch.Tensor:
    """diffq's packed width field of ``n_groups`` groups, all at ``min_bits + excess``."""
    from diffq import bitpack

    return bitpack.pack(torch.full((n_groups,), excess, dtype=torch.int16))


def forged(tmp_path, case, edit):
    pytest.importorskip("diffq")  # re-saving the trusted fixture needs diffq's classes
    state = torch.load(FIXTURES / f"diffq024_{case}.th", weights_only=False)
    edit(state)
    path = tmp_path / "forged.th"
    torch.save(state, path)
    return path


@pytest.mark.parametrize(
    "case, edit, match",
    [
        ("diffq_g8_bitpack", lambda s: s["quantized"].__setitem__(0, (
            *s["quantized"][0][:2], diffq_widths_at(13, 512 // 8))),
         "15-bit groups"),
        ("diffq_g8_unpacked",
         lambda s: s["quantized"][0][2].fill_(0), "outside \\[1, 15\\]"),
        ("diffq_g8_unpacked",
         lambda s: s["quantized"].__setitem__(0, (s["quantized"][0][0],
                                                  (float("nan"), 1.0),
                                                  s["quantized"][0][2])), "not a finite"),
        ("diffq_g8_bitpack",
         lambda s: s["quantized"][0][0].__setitem__(2, None), "no stream"),
        ("diffq_g8_bitpack",
         lambda s: s["quantized"].pop(), "quantized tensors"),
        ("uniform4_bitpack",
         lambda s: s["meta"]["init_kwargs"].__setitem__("evil", 1), "unknown"),
        ("lsq4_bitpack",
         lambda s: s["quantized"].__setitem__(0, (torch.zeros(3, 4), s["quantized"][0][1])),
         "integer tensor"),
    ],
)
def test_forged_states(tmp_path, case, edit, match):
    path = forged(tmp_path, case, edit)
    model = small_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=match):
        load_diffq_state(model, path)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert sorted(n for n, _ in model.named_parameters()) == sorted(before)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutations=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1,
                          max_size=3), cut=st.one_of(st.none(), st.integers(0, 10**6)))
def test_fuzz_mutated_states(mutations, cut):
    data = bytearray((FIXTURES / "diffq024_diffq_g8_torchpack.th").read_bytes())
    for position, value in mutations:
        data[position % len(data)] = value
    if cut is not None:
        del data[cut % len(data):]
    model = small_mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    try:
        load_diffq_state(model, io.BytesIO(bytes(data)))
    except ValueError:
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
