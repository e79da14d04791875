"""Packed layers: Linear, Embedding, Conv1d, Conv2d and GPT-2's Conv1D with packed weights.

Each holds its weight as a :class:`~.layout.PackedTensor` submodule (``weight_packed``,
shared by tied uses) and its bias as the float parameter it was. On CUDA, in inference
(nothing requiring grad, no autocast), ``Linear`` runs a fused kernel that decodes the weight
in registers (``kernels.packed.linear``: GEMV for ≤ 16 rows, GEMM above; F.linear's values
within float32 rounding) and ``Embedding`` gathers the looked-up rows from their bits (bit
for bit). Otherwise, and for the convolutions and GPT-2's ``Conv1D``, the forward decodes the
weight just in time and calls the same ``torch.nn.functional`` op as the float layer, so the
output is the float-loaded model's, bit for bit. The decode is the native codec's on the
CPU, one launch of the Triton dequantize kernel (``kernels/packed.py``) on CUDA; it goes into
a scratch buffer per thread, reused by every packed layer (its size is the largest layer's), when
autograd records nothing (``torch.no_grad()`` / ``torch.inference_mode()``, or nothing in
the call requiring grad); otherwise each call decodes into a fresh tensor that autograd may
keep.
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import dispatch
from .layout import PackedTensor

_SCRATCH = threading.local()


def _scratch(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``[numel]`` of this thread's scratch buffer ``(slot, dtype, device)``, grown on need.

    Made outside inference mode: an inference tensor could not be written to later in
    plain no-grad mode.
    """
    pool = getattr(_SCRATCH, "buffers", None)
    if pool is None:
        pool = _SCRATCH.buffers = {}
    key = (slot, dtype, device)
    buf = pool.get(key)
    if buf is None or buf.numel() < numel:
        pool.pop(key, None)  # freed before the larger one is made
        with torch.inference_mode(False):
            buf = pool[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf[:numel]


def release_scratch() -> None:
    """Free this thread's scratch buffers (the next packed forward makes them again)."""
    _SCRATCH.buffers = {}


def _records_grad(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


class _TracedKernels:
    """``kernels.packed``'s fused entry points as the custom ops that ``torch.compile`` and
    ``torch.export`` trace (``ops/packed_op.py``)."""

    @staticmethod
    def linear(x: torch.Tensor, pt: PackedTensor, bias: torch.Tensor | None) -> torch.Tensor:
        return pt.linear_op(x, bias)

    @staticmethod
    def embedding(ids: torch.Tensor, pt: PackedTensor) -> torch.Tensor:
        return pt.embedding_op(ids)


class PackedModule(nn.Module):
    """Base of the packed layers: the packed weight and its just-in-time decode."""

    weight_packed: PackedTensor

    def _set_weight(self, packed: PackedTensor) -> None:
        self.weight_packed = packed

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight, a fresh tensor (for code that reads ``layer.weight``)."""
        return self.weight_packed.dequantize()

    def _fused_kernels(self, *inputs: torch.Tensor | None):
        """``kernels.packed`` when this call may run a fused kernel (GEMV/GEMM, gather)
        instead of decode-then-op, else None.

        Fused: on the Triton backend, nothing requiring grad (the kernels have no backward),
        no autocast (it would change the op's dtypes), inputs of the weight's dtype; traced
        (``torch.compile``, ``torch.export``), the kernels' custom ops. Otherwise the layer
        decodes the weight and runs the float layer's op.
        """
        pt = self.weight_packed
        if _records_grad(*inputs, *self.parameters()):
            return None
        if any(t is not None and t.is_floating_point() and t.dtype != pt.dtype
               for t in (*inputs, *self.parameters())):
            return None
        if torch.is_autocast_enabled(pt.device.type):
            return None
        if not dispatch.packed_on_triton(torch.empty(0, dtype=pt.dtype, device=pt.device)):
            return None
        if torch.compiler.is_compiling():  # one custom-op node per layer (fake: shapes)
            return _TracedKernels
        from ..kernels import packed as packed_kernels  # imports Triton: only where it runs

        return packed_kernels

    def _decoded(self, *inputs: torch.Tensor | None) -> torch.Tensor:
        """The weight of this call, in the scratch buffers when autograd records nothing.

        On CUDA (where the backend choice says Triton) one launch of the packed dequantize
        kernel; on the CPU the native codec. Traced (``torch.compile``, ``torch.export``):
        the same decode as the custom op ``diffq_triton::packed_dequantize``, a fresh tensor
        (the compiler plans its memory; the scratch buffers are eager mode's).
        """
        pt = self.weight_packed
        on_triton = dispatch.packed_on_triton(torch.empty(0, dtype=pt.dtype, device=pt.device))
        if torch.compiler.is_compiling():  # torch.compile, torch.export: one op node
            return pt.dequantize_op("triton" if on_triton else "eager")
        fresh = _records_grad(*inputs, *self.parameters())
        if on_triton:
            from ..kernels import packed as packed_kernels  # imports Triton: only where it runs

            out = None if fresh else _scratch("cast", pt.numel, pt.dtype, pt.device)
            return packed_kernels.dequantize(pt, out=out).view(pt.shape)
        if pt.device.type != "cpu" or fresh:
            return pt.dequantize()
        w = pt.decode_into(_scratch("float32", pt.numel, torch.float32, pt.device))
        if pt.dtype == torch.float32 and pt.record_dtype == torch.float32:
            return w
        out = _scratch("cast", pt.numel, pt.dtype, pt.device).view(pt.shape)
        return pt.cast(w, out)


class PackedLinear(PackedModule):
    """``nn.Linear`` with a packed weight: ``y = x Ŵᵀ + b`` (``F.linear``).

    Input ``[..., in_features]``, output ``[..., out_features]``, of the input's dtype.
    """

    def __init__(self, linear: nn.Linear, packed: PackedTensor):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._set_weight(packed)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kernels = self._fused_kernels(x)
        if kernels is not None and x.device == self.weight_packed.device:
            # GEMV for ≤ 16 rows, GEMM above: F.linear's values within float32 rounding
            # (kernels.packed.gemv states the bound); the weight is never written out.
            return kernels.linear(x, self.weight_packed, self.bias)
        return F.linear(x, self._decoded(x), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}")


class PackedEmbedding(PackedModule):
    """``nn.Embedding`` with a packed weight (``F.embedding``; ``max_norm`` is not
    supported: it rewrites the weight's rows, such layers load as float)."""

    def __init__(self, embedding: nn.Embedding, packed: PackedTensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = embedding.num_embeddings, embedding.embedding_dim
        self.padding_idx = embedding.padding_idx
        self.scale_grad_by_freq, self.sparse = embedding.scale_grad_by_freq, embedding.sparse
        self._set_weight(packed)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        kernels = self._fused_kernels()
        if (kernels is not None and ids.device == self.weight_packed.device
                and ids.dtype in (torch.int32, torch.int64)):
            # The looked-up rows decoded from their bits: F.embedding's values, bit for bit.
            return kernels.embedding(ids, self.weight_packed)
        return F.embedding(ids, self._decoded(), self.padding_idx, None, 2.0,
                           self.scale_grad_by_freq, self.sparse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}"


class _PackedConv(PackedModule):
    """Shared by the packed convolutions: the float layer's own ``_conv_forward`` runs with
    this module's copy of its hyper-parameters (padding modes included)."""

    _float_class: type[nn.Module]
    _ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation",
              "groups", "padding_mode", "_reversed_padding_repeated_twice")

    def __init__(self, conv: nn.Module, packed: PackedTensor):
        super().__init__()
        for name in self._ATTRS:
            setattr(self, name, getattr(conv, name))
        self._set_weight(packed)
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._float_class._conv_forward(self, x, self._decoded(x), self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, padding={self.padding}, groups={self.groups}")


class PackedConv1d(_PackedConv):
    """``nn.Conv1d`` with a packed weight (``F.conv1d``)."""

    _float_class = nn.Conv1d


class PackedConv2d(_PackedConv):
    """``nn.Conv2d`` with a packed weight (``F.conv2d``)."""

    _float_class = nn.Conv2d


class PackedConv1D(PackedModule):
    """transformers' GPT-2 ``Conv1D`` (a Linear whose weight is stored ``[in, out]``) with a
    packed weight: ``y = addmm(b, x, W)`` as that layer computes it.

    Input ``[..., nx]``, output ``[..., nf]``.
    """

    def __init__(self, conv: nn.Module, packed: PackedTensor):
        super().__init__()
        self.nf, self.nx = conv.nf, packed.shape[0]
        self._set_weight(packed)
        self.bias = conv.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = x.size()[:-1] + (self.nf,)
        x = torch.addmm(self.bias, x.view(-1, x.size(-1)), self._decoded(x))
        return x.view(size_out)

    def extra_repr(self) -> str:
        return f"nf={self.nf}, nx={self.nx}"


def is_gpt2_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` looks like transformers' ``Conv1D`` (duck typing: no import of
    transformers): class name ``Conv1D``, an int ``nf``, a ``[nx, nf]`` weight and an
    ``[nf]`` bias, and no forward hooks of its own that a replacement would drop."""
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    nf = getattr(module, "nf", None)
    return (type(module).__name__ == "Conv1D" and isinstance(nf, int)
            and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and weight.shape[1] == nf and isinstance(bias, torch.Tensor)
            and tuple(bias.shape) == (nf,))


def packed_class(module: nn.Module) -> type[PackedModule] | None:
    """The packed layer replacing ``module`` (whose ``weight`` is quantized), or None.

    Exact classes only: a subclass may compute something else with its weight (e.g.
    ``MultiheadAttention``'s ``out_proj`` reads it directly), so it stays float.
    """
    kind = type(module)
    if kind is nn.Linear:
        return PackedLinear
    if kind is nn.Embedding:
        return PackedEmbedding if module.max_norm is None else None
    if kind is nn.Conv1d:
        return PackedConv1d
    if kind is nn.Conv2d:
        return PackedConv2d
    if is_gpt2_conv1d(module):
        return PackedConv1D
    return None
