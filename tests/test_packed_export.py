"""A packed model traced for deployment: the ``diffq_triton::packed_dequantize`` op (opcheck,
equal to the packed layers' decode), the fused ``packed_linear`` / ``packed_embedding`` ops
of the Triton backend, ``torch.compile(fullgraph=True)`` and ``torch.export``.

The eager packed model is the oracle: a traced model runs the same decode and the same
``F.*`` calls, so every comparison is ``torch.equal``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import diffq_triton as dq
from diffq_triton.ops import packed_op
from diffq_triton.ops.dispatch import HAS_TRITON, use_backend
from diffq_triton.packed import PackedTensor
from tests.conftest import DEVICE, INDUCTOR
from tests.test_packed import file_of, float_and_packed, random_record, spread_widths

# (numel, group size, scheme): several groups with a width stream, one group, lsq.
RECORDS = [(5003, 7, "minmax"), (1000, 0, "minmax"), (777, 0, "lsq")]


def _op_args(pt: PackedTensor, backend: str) -> tuple:
    return (pt.levels, pt._widths(), pt.tile_offsets, pt.scale, list(pt.shape),
            pt.group_size, pt.scheme, pt.base, pt.field_bits, pt.level_bytes, pt.tile_groups,
            pt.record_dtype, pt.dtype, backend)


def _backends() -> list:
    triton = pytest.param("triton", marks=pytest.mark.skipif(
        not HAS_TRITON, reason="Triton is not installed"))
    return ["eager", triton]


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("case", RECORDS, ids=lambda c: f"n{c[0]}-g{c[1]}-{c[2]}")
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32),
                                    (torch.bfloat16, torch.float16)],
                         ids=["f32", "bf16-record-f16"])
def test_op_is_the_layers_decode(backend, case, dtypes):
    numel, group_size, scheme = case
    record_dtype, dtype = dtypes
    pt = PackedTensor.from_record(random_record(numel, group_size, scheme, record_dtype),
                                  dtype=dtype).to(DEVICE)
    args = _op_args(pt, backend)
    with use_backend(backend):
        torch.library.opcheck(packed_op.packed_dequantize, args)
        out = packed_op.packed_dequantize(*args)
    assert out.shape == pt.shape and out.dtype == dtype and out.device == pt.device
    assert torch.equal(out, pt.dequantize())


class Small(nn.Module):
    """Embedding, Linear and Conv1d at odd sizes (every packed layer of a deployed LM)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(97, 19, padding_idx=0)
        self.lin = nn.Linear(19, 33)
        self.conv = nn.Conv1d(33, 11, 3, padding=1)

    def forward(self, ids):
        x = F.gelu(self.lin(self.emb(ids)))
        return self.conv(x.transpose(1, 2))


def _packed_small() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    q = dq.DiffQuantizer(Small(), group_size=8, min_size=0.001, min_bits=1)
    spread_widths(q)
    _, packed, report = float_and_packed(Small, file_of(q))
    assert set(report.packed) == {"emb", "lin", "conv"}
    assert packed.lin.weight_packed.field_bits > 0  # widths spread: a width stream is read
    ids = torch.randint(0, 97, (2, 13), device=DEVICE)
    return packed.to(DEVICE), ids


@pytest.mark.parametrize("backend", _backends())
def test_compiled_fullgraph_equals_eager(backend):
    packed, ids = _packed_small()
    with use_backend(backend):
        expected = packed(ids)  # the bias requires grad: the decode, then F.*
        with torch.no_grad():  # on the Triton backend: the fused Linear and gather
            expected_no_grad = packed(ids)
        torch._dynamo.reset()  # the backend is fixed at trace time
        compiled = torch.compile(packed, fullgraph=True, backend="aot_eager")
        assert torch.equal(compiled(ids), expected)
        with torch.no_grad():
            assert torch.equal(compiled(ids), expected_no_grad)


def test_export_equals_eager():
    packed, ids = _packed_small()
    with torch.no_grad():
        expected = packed(ids)
    program = torch.export.export(packed, (ids,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.diffq_triton.packed_dequantize.default) == 3
    assert torch.equal(program.module()(ids), expected)


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_fused_ops_pass_opcheck_and_equal_the_kernels():
    from diffq_triton.kernels import packed as packed_k

    packed, ids = _packed_small()
    lin, emb = packed.lin.weight_packed, packed.emb.weight_packed
    x = torch.randn(5, 19, device=DEVICE)
    torch.library.opcheck(packed_op.packed_linear, (x, packed.lin.bias.detach(),
                                                    *lin._op_layout()))
    torch.library.opcheck(packed_op.packed_embedding, (ids, *emb._op_layout()))
    with torch.no_grad():
        bias = packed.lin.bias
        assert torch.equal(lin.linear_op(x, bias), packed_k.linear(x, lin, bias))
        assert torch.equal(emb.embedding_op(ids), packed_k.embedding(ids, emb))


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_export_on_the_triton_backend_keeps_the_fused_kernels():
    # Exported for inference on the Triton backend: the Linear and the Embedding are the
    # fused ops (the weight is never written out), the Conv1d the decode op.
    packed, ids = _packed_small()
    with torch.no_grad(), use_backend("triton"):
        expected = packed(ids)
        program = torch.export.export(packed, (ids,))
    targets = [n.target for n in program.graph.nodes if n.op == "call_function"]
    ops = torch.ops.diffq_triton
    assert targets.count(ops.packed_linear.default) == 1
    assert targets.count(ops.packed_embedding.default) == 1
    assert targets.count(ops.packed_dequantize.default) == 1
    with torch.no_grad():
        assert torch.equal(program.module()(ids), expected)


@pytest.mark.parametrize("compiler", [INDUCTOR])
def test_inductor_equals_eager(compiler):
    packed, ids = _packed_small()
    with torch.no_grad():
        expected = packed(ids)
        torch._dynamo.reset()
        compiled = torch.compile(packed, fullgraph=True, backend=compiler)
        # Inductor may fuse the layers' float math differently: the weights are bit-equal,
        # the outputs within float32 rounding.
        torch.testing.assert_close(compiled(ids), expected)
