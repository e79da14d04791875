"""Misuses that diffq 0.2.4 refuses raise an exception of diffq's type here too, so code
written against diffq catches ours; ours stay ValueErrors as this library documents them."""

from __future__ import annotations

import importlib.util

import pytest
import torch

import diffq_triton
from tests.models import mlp

HAS_DIFFQ = importlib.util.find_spec("diffq") is not None


def _libraries():
    libs = [diffq_triton]
    if HAS_DIFFQ:
        import diffq

        libs.append(diffq)
    return libs


def _bad_init(kwargs):
    return lambda lib: lib.DiffQuantizer(mlp(), **kwargs)


def _second_quantizer(lib):
    model = mlp()
    lib.DiffQuantizer(model, min_size=0)
    lib.DiffQuantizer(model, min_size=0)


def _optimizer_after_quantizer(lib):
    model = mlp()
    q = lib.DiffQuantizer(model, min_size=0)
    q.setup_optimizer(torch.optim.Adam(model.parameters()))


def _setup_twice(lib):
    model = mlp()
    opt = torch.optim.Adam(model.parameters())
    q = lib.DiffQuantizer(model, min_size=0)
    q.setup_optimizer(opt)
    q.setup_optimizer(opt)


def _train_without_setup(lib):
    model = mlp()
    lib.DiffQuantizer(model, min_size=0)
    model(torch.randn(2, 32))


def _lsq_optimizer_after(lib):
    model = mlp()
    q = lib.LSQ(model, min_size=0)
    q.setup_optimizer(torch.optim.Adam(model.parameters()))


def _lsq_second(lib):
    model = mlp()
    lib.LSQ(model, min_size=0)
    lib.LSQ(model, min_size=0)


def _restore_without_meta(lib):
    lib.restore_quantized_state(mlp(), {"quantized": [], "float16": [], "others": []})


# (misuse, diffq's exception type, whether ours is also a ValueError)
CASES = {
    "init_bits outside (min, max)": (_bad_init(dict(init_bits=16)), AssertionError, True),
    "min_bits >= max_bits": (_bad_init(dict(min_bits=8, max_bits=4, init_bits=6)),
                             AssertionError, True),
    "negative group_size": (_bad_init(dict(group_size=-1)), AssertionError, True),
    "unknown noise": (_bad_init(dict(noise="laplace")), AssertionError, True),
    "second DiffQuantizer": (_second_quantizer, RuntimeError, True),
    "optimizer created after": (_optimizer_after_quantizer, RuntimeError, True),
    "setup_optimizer twice": (_setup_twice, AssertionError, True),
    "training without setup_optimizer": (_train_without_setup, RuntimeError, False),
    "LSQ optimizer created after": (_lsq_optimizer_after, RuntimeError, True),
    "second LSQ": (_lsq_second, RuntimeError, True),
    "restore without meta": (_restore_without_meta, AssertionError, True),
}


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("lib", _libraries(), ids=lambda m: m.__name__)
def test_same_exception_type_as_diffq(lib, case):
    misuse, expected, also_value_error = CASES[case]
    with pytest.raises(expected) as raised:
        misuse(lib)
    if lib is diffq_triton and also_value_error:
        assert isinstance(raised.value, ValueError)
