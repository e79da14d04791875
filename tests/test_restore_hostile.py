"""In-memory restores of hostile states: one ValueError naming the tensor and the field, and
the model unchanged (every parameter bit for bit, no parameter added or removed).

``quantizer.restore_quantized_state(state)`` and ``diffq_triton.restore_quantized_state(model,
state)`` check a state with the rules files are read with, and convert every value before
they write the first parameter.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import diffq_triton
from tests.models import TiedLM


def small_lm() -> nn.Module:
    torch.manual_seed(0)
    return TiedLM(vocab=40, dim=16)


def make_state(klass: str, packed: bool, **kwargs) -> dict:
    """A genuine state of ``small_lm`` (DiffQuantizer: groups of 8 at mixed widths)."""
    model = small_lm()
    quantizer = getattr(diffq_triton, klass)(model, min_size=0.0005, **kwargs)
    if klass == "DiffQuantizer":
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in quantizer._trained_params():
                p.copy_(torch.randn(p.shape, generator=gen) * 4)
    state = quantizer.get_quantized_state(packed=packed)
    quantizer.detach()
    return state


STATES = {
    "diffq packed": make_state("DiffQuantizer", True, group_size=8),
    "diffq levels": make_state("DiffQuantizer", False, group_size=8),
    "lsq levels": make_state("LSQ", False, bits=3),
    "uniform levels": make_state("UniformQuantizer", False, bits=4),
}


def bitwise(model: nn.Module) -> dict:
    return {n: (p.dtype, p.shape, p.detach().clone().reshape(-1).view(torch.uint8))
            for n, p in model.named_parameters(remove_duplicate=False)}


def assert_same(before: dict, after: dict) -> None:
    assert after.keys() == before.keys()
    for name, (dtype, shape, data) in before.items():
        assert after[name][:2] == (dtype, shape) and torch.equal(after[name][2], data), name


def restore(api: str, model: nn.Module, state: dict, kwargs: dict):
    """Restore through ``api``; returns the parameters as they were just before."""
    if api == "module":
        before = bitwise(model)
        diffq_triton.restore_quantized_state(model, state)
        return before
    quantizer = getattr(diffq_triton, state["meta"]["klass"])(model, **kwargs)
    before = bitwise(model)  # with the quantizer's own parameters
    try:
        quantizer.restore_quantized_state(state)
    finally:
        after = bitwise(model)
        quantizer.detach()
        assert_same(before, after)
    return before


def entry(key, value, index=0):
    """Set field ``key`` of quantized entry ``index`` (a function of the old entry, or a value)."""
    def edit(s):
        e = s["quantized"][index]
        e[key] = value(e) if callable(value) else value
    return edit


def last_others(value):
    def edit(s):
        s["others"][-1] = value(s["others"][-1])
    return edit


CASES = [
    # (state, edit, match)
    ("diffq packed", entry("scheme", "bogus"), "'emb.weight': unknown scheme"),
    ("diffq packed", entry("scheme", "lsq"), "'emb.weight': lsq tensors have one group"),
    ("diffq levels", entry("levels", lambda e: torch.full_like(e["levels"], 30000)),
     "'emb.weight': a level lies outside"),
    ("diffq levels", entry("levels", lambda e: torch.full_like(e["levels"], -7)),
     "'emb.weight': a level lies outside"),
    ("diffq levels", entry("levels", lambda e: e["levels"].to(torch.int64) + 2**32),
     "'emb.weight': a level lies outside"),
    ("uniform levels", entry("levels", lambda e: torch.full_like(e["levels"], 16)),
     "a level lies outside"),
    ("lsq levels", entry("levels", lambda e: torch.full_like(e["levels"], 4)),
     "'emb.weight': lsq levels \\[4, 4\\] outside \\[-4, 3\\]"),
    ("diffq packed", lambda s: s["quantized"][0].update(min=5.0, max=-5.0),
     "'emb.weight': range min 5.0 exceeds max -5.0"),
    ("diffq packed", entry("group_size", 8.0), "'emb.weight': group_size must be an int"),
    ("diffq levels", entry("group_size", None), "group_size must be an int"),
    ("diffq packed", entry("min", None), "'emb.weight': min must be a real number"),
    ("diffq packed", lambda s: s["quantized"][0].pop("max"), "max must be a real number"),
    ("diffq packed", entry("min", 10**400), "'emb.weight': min is not a finite number"),
    ("lsq levels", entry("min", torch.tensor([1.0, 2.0])), "min must be a real number"),
    ("diffq packed", entry("bits", lambda e: torch.full(e["bits"].shape, 2**63 + 4,
                                                         dtype=torch.uint64)),
     "'emb.weight': widths .* outside \\[1, 15\\]"),
    ("uniform levels", entry("bits", lambda e: e["bits"].bool()), "widths must be an integer"),
    ("diffq packed", entry("packed", lambda e: e["packed"].tolist()),
     "'emb.weight': packed stream must be a tensor"),
    ("diffq packed", entry("packed", lambda e: e["packed"].float()),
     "packed stream must be 1-D uint8"),
    ("diffq packed", entry("packed", lambda e: e["packed"][:-1]), "bytes"),
    ("diffq levels", entry("levels", lambda e: e["levels"].float()),
     "'emb.weight': levels must be an integer tensor"),
    ("diffq levels", entry("levels", lambda e: e["levels"].tolist()), "levels must be a tensor"),
    ("diffq levels", entry("levels", lambda e: e["levels"][:-1], index=-1), "holds .* levels"),
    ("diffq packed", entry("shape", None), "'emb.weight': shape must be a list"),
    ("diffq packed", entry("shape", lambda e: [float(d) for d in e["shape"]]),
     "shape must be an int"),
    ("diffq packed", lambda s: s.pop("quantized"), "'quantized' must be a list"),
    ("diffq packed", lambda s: s.__setitem__("others", None), "'others' must be a list"),
    # The floats are checked and converted before anything is written: a tensor copy_
    # cannot take used to fail after the quantized weights were written.
    ("diffq packed", last_others(lambda t: torch.empty(t.shape, device="meta")),
     "others tensor for 'out.bias' must be a plain tensor with data, got a meta tensor"),
    ("diffq levels", last_others(lambda t: t.to_sparse()), "'out.bias'.*sparse_coo tensor"),
    ("uniform levels", last_others(lambda t: t.to(torch.int64)), "'out.bias' has dtype"),
    ("lsq levels", last_others(lambda t: t.to(torch.complex64)), "'out.bias' has dtype"),
    ("diffq packed", last_others(lambda t: t.tolist()), "'out.bias' must be a tensor"),
]


@pytest.mark.parametrize("api", ["method", "module"])
@pytest.mark.parametrize("base, edit, match", CASES, ids=[c[2][:50] for c in CASES])
def test_hostile_state_raises_one_value_error_and_keeps_the_model(api, base, edit, match):
    state = copy.deepcopy(STATES[base])
    kwargs = dict(state["meta"]["init_kwargs"])
    edit(state)
    model = small_lm()
    before = bitwise(model)
    with pytest.raises(ValueError, match=match):
        restore(api, model, state, kwargs)
    assert_same(before, bitwise(model))


@pytest.mark.parametrize("edit, match", [
    (lambda m: m["init_kwargs"].__setitem__("evil", 1), "unknown DiffQuantizer arguments"),
    (lambda m: m.pop("init_kwargs"), "init_kwargs must be a dict"),
    (lambda m: m.__setitem__("klass", "system"), "unknown quantizer 'system'"),
    (lambda m: m.__setitem__("klass", []), "unknown quantizer"),
    (lambda m: m["init_kwargs"].__setitem__("float16", torch.ones(2)), "'float16' must be a bool"),
    (lambda m: m["init_kwargs"].__setitem__("suffix", "_x.y"), "'suffix'"),
    (lambda m: m["init_kwargs"].__setitem__("min_size", 10**400), "'min_size' is not a finite"),
], ids=["unknown argument", "no init_kwargs", "unknown class", "unhashable class",
        "tensor flag", "dotted suffix", "huge min_size"])
def test_hostile_meta_raises_value_error(edit, match):
    state = copy.deepcopy(STATES["diffq packed"])
    edit(state["meta"])
    model = small_lm()
    before = bitwise(model)
    with pytest.raises(ValueError, match=match):
        diffq_triton.restore_quantized_state(model, state)
    assert_same(before, bitwise(model))


def test_a_constructor_failing_midway_leaves_no_parameter_behind():
    """A quantizer that raises after registering some logits (here on an integer parameter
    it would quantize) is a ValueError, and the logits it registered are removed."""
    model = small_lm()
    # Last in discovery order: emb.weight and the LSTM weights get their logits first.
    model.out.steps = nn.Parameter(torch.zeros(1000, dtype=torch.int64), requires_grad=False)
    state = copy.deepcopy(STATES["diffq packed"])
    before = bitwise(model)
    with pytest.raises(ValueError, match="cannot rebuild DiffQuantizer.*'out.steps'"):
        diffq_triton.restore_quantized_state(model, state)
    assert_same(before, bitwise(model))
    diffq_triton.DiffQuantizer(small_lm())  # and the model is free for a quantizer


@pytest.mark.parametrize("edit", [
    entry("bits", lambda e: e["bits"].to(torch.uint64)),
    entry("bits", lambda e: e["bits"].reshape(1, -1)),
    entry("packed", lambda e: torch.stack([e["packed"], e["packed"]], 1)[:, 0]),
    entry("min", lambda e: torch.tensor(e["min"])),
], ids=["uint64 widths", "2-D widths", "strided stream", "tensor min"])
@pytest.mark.parametrize("cpu_codec", ["native", "torch"], indirect=True)
def test_valid_variants_still_restore_the_same_weights(edit, cpu_codec):
    """The checks refuse what cannot be decoded, not every unusual but valid container."""
    expected = small_lm()
    diffq_triton.restore_quantized_state(expected, STATES["diffq packed"])
    state = copy.deepcopy(STATES["diffq packed"])
    edit(state)
    model = small_lm()
    diffq_triton.restore_quantized_state(model, state)
    assert_same(bitwise(expected), bitwise(model))


def test_state_saved_with_truthy_flags_restores():
    # The constructors take any truthy flag: a state they saved must restore.
    import numpy as np

    model = small_lm()
    quantizer = diffq_triton.UniformQuantizer(model, bits=4, min_size=0.0005, float16=1,
                                              detect_bound=np.True_)
    state = quantizer.get_quantized_state()
    quantizer.quantize()
    expected = {n: p.detach().clone() for n, p in model.named_parameters()}
    quantizer.detach()
    fresh = small_lm()
    diffq_triton.restore_quantized_state(fresh, state)
    for name, p in fresh.named_parameters():
        assert torch.equal(p, expected[name]), name
