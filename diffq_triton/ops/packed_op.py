"""The ``diffq_triton::packed_dequantize`` op: one packed weight (docs/packed.md) to dense.

A packed layer's weight as one graph node, so that ``torch.compile(fullgraph=True)`` and
``torch.export`` trace a packed model: the op takes the layout's buffers as plain tensors and
its integers as arguments (this layer knows nothing of ``diffq_triton.packed``), with a fake
implementation giving the weight's shape, dtype and device. In inference on the Triton
backend, ``diffq_triton::packed_linear`` and ``diffq_triton::packed_embedding`` run the fused
kernels instead (the weight is never written out). Its real implementation is the
packed layers' decode, so its output is theirs bit for bit: one launch of the Triton
dequantize kernel (``kernels/packed.py``) on the ``triton`` backend; otherwise the native
codec's one-pass unpack-and-dequantize on the CPU (``minmax``), or the library's unpack and
the reference's float math (:func:`decode_into`, which :class:`PackedTensor` uses too).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from torch import Tensor

from ..codec import native
from ..codec.cpu_pool import cpu_threads
from . import bitpack, reference


def group_widths(widths: Tensor, n_groups: int, base: int, field_bits: int,
                 device: torch.device) -> Tensor:
    """``[n_groups]`` uint8 widths from a padded width stream (``base`` when ``field_bits``
    is 0, and ``widths`` is then never read)."""
    if not field_bits:
        return torch.full((n_groups,), base, dtype=torch.uint8, device=device)
    nbytes = (n_groups * field_bits + 7) // 8
    return bitpack.unpack_widths(widths[:nbytes], field_bits, n_groups, base)


def decode_into(out: Tensor, levels: Tensor, widths: Tensor, scale: Tensor, numel: int,
                group_size: int, scheme: str, base: int, field_bits: int,
                level_bytes: int) -> Tensor:
    """The float32 decode of a packed weight into ``out`` (``numel`` entries, contiguous).

    ``minmax`` on the CPU with the native codec: its one pass (``b/8`` bytes read and 4
    written per weight). Otherwise the library's unpack of the level stream, then
    ``levels·step`` (``lsq``: ``scale = (step, 0)``, levels stored offset by ``2^(b-1)``) or
    :func:`reference.dequantize` (``minmax``), as a file record decodes. Returns ``out``
    flattened.
    """
    flat = out.view(-1)
    n_groups = reference.num_groups(numel, group_size)
    bits = group_widths(widths, n_groups, base, field_bits, levels.device)
    stream = levels[:level_bytes]
    with cpu_threads():
        lib = native.library() if scheme == "minmax" else None
        if lib is not None and levels.device.type == "cpu":
            mn = scale[0]
            span = float(scale[1] - mn)  # in float32, as the file loader
            native.unpack_dequantize(lib, stream, bits, group_size, numel, float(mn), span,
                                     flat)
            return flat
        q = bitpack.unpack_levels(stream, bits, group_size, numel)
        mn, mx = (torch.tensor(v, dtype=torch.float32, device=levels.device)
                  for v in scale.tolist())
        if scheme == "lsq":
            w = (q - (1 << (int(bits[0]) - 1))).float() * mn
        else:
            w = reference.dequantize(q, bits, group_size, mn, mx)
    return flat.copy_(w.reshape(-1))


def cast(weight: Tensor, record_dtype: torch.dtype, dtype: torch.dtype,
         out: Tensor | None = None) -> Tensor:
    """The float32 decode rounded as the float model's parameter is: to the record's dtype
    (what ``load_quantized`` decodes), then to ``dtype`` (into ``out`` when given)."""
    if record_dtype != torch.float32:
        weight = weight.to(record_dtype)
    if weight.dtype == dtype:
        return weight
    if out is None:
        return weight.to(dtype)
    return out.copy_(weight)


def _layout(levels: Tensor, widths: Tensor, tile_offsets: Tensor, scale: Tensor,
            shape: list[int], group_size: int, scheme: str, base: int, field_bits: int,
            tile_groups: int, record_dtype: torch.dtype, dtype: torch.dtype) -> SimpleNamespace:
    """The packed weight as the kernels read it (``kernels.packed`` takes any object with
    :class:`~diffq_triton.packed.PackedTensor`'s buffers and attributes)."""
    numel = 1
    for n in shape:
        numel *= n
    return SimpleNamespace(
        levels=levels, widths=widths, tile_offsets=tile_offsets, scale=scale,
        shape=tuple(shape), numel=numel, group_size=group_size,
        n_groups=reference.num_groups(numel, group_size), base=base, field_bits=field_bits,
        scheme=scheme, tile_groups=tile_groups, record_dtype=record_dtype, dtype=dtype,
        device=levels.device)


@torch.library.custom_op("diffq_triton::packed_dequantize", mutates_args=())
def packed_dequantize(
    levels: Tensor, widths: Tensor, tile_offsets: Tensor, scale: Tensor, shape: list[int],
    group_size: int, scheme: str, base: int, field_bits: int, level_bytes: int,
    tile_groups: int, record_dtype: torch.dtype, dtype: torch.dtype, backend: str,
) -> Tensor:
    """The dense weight ``[*shape]`` of ``dtype`` from its packed buffers.

    Args:
        levels: padded uint8 level stream; ``widths``: padded uint8 width stream (any tensor,
            e.g. empty, when ``field_bits`` is 0); ``tile_offsets``: int64 bit offset of
            each tile of ``tile_groups`` groups; ``scale``: float32 ``[2]`` range.
        shape, group_size, scheme, base, field_bits, level_bytes, record_dtype: the layout
            (:class:`diffq_triton.packed.PackedTensor`'s attributes of the same names).
        dtype: the weight's dtype (rounded to ``record_dtype`` first).
        backend: ``"triton"`` (the packed dequantize kernel) or ``"eager"``.
    """
    numel = 1
    for n in shape:
        numel *= n
    if backend == "triton":
        from ..kernels import packed as packed_kernels  # imports Triton: only where it runs

        pt = _layout(levels, widths, tile_offsets, scale, shape, group_size, scheme, base,
                     field_bits, tile_groups, record_dtype, dtype)
        return packed_kernels.dequantize(pt).view(shape)
    w = torch.empty(numel, dtype=torch.float32, device=levels.device)
    decode_into(w, levels, widths, scale, numel, group_size, scheme, base, field_bits,
                level_bytes)
    return cast(w.view(shape), record_dtype, dtype)


@packed_dequantize.register_fake
def _(levels, widths, tile_offsets, scale, shape, group_size, scheme, base, field_bits,
      level_bytes, tile_groups, record_dtype, dtype, backend):
    return levels.new_empty(shape, dtype=dtype)


@torch.library.custom_op("diffq_triton::packed_linear", mutates_args=())
def packed_linear(
    x: Tensor, bias: Tensor | None, levels: Tensor, widths: Tensor, tile_offsets: Tensor,
    scale: Tensor, shape: list[int], group_size: int, scheme: str, base: int,
    field_bits: int, tile_groups: int, record_dtype: torch.dtype, dtype: torch.dtype,
) -> Tensor:
    """``x Wᵀ + bias`` on a packed ``[N, K]`` weight by the fused kernels
    (``kernels.packed.linear``: GEMV for ≤ 16 rows, GEMM above), the weight never written.

    ``x``: ``[..., K]`` of ``dtype``; returns ``[..., N]`` of ``dtype``. The layout arguments
    are :func:`packed_dequantize`'s. Inference only: the op has no autograd formula (the
    packed layers call it only when nothing requires grad).
    """
    from ..kernels import packed as packed_kernels  # imports Triton: only where it runs

    pt = _layout(levels, widths, tile_offsets, scale, shape, group_size, scheme, base,
                 field_bits, tile_groups, record_dtype, dtype)
    return packed_kernels.linear(x, pt, bias)


@packed_linear.register_fake
def _(x, bias, levels, widths, tile_offsets, scale, shape, group_size, scheme, base,
      field_bits, tile_groups, record_dtype, dtype):
    return x.new_empty(*x.shape[:-1], shape[0])


@torch.library.custom_op("diffq_triton::packed_embedding", mutates_args=())
def packed_embedding(
    ids: Tensor, levels: Tensor, widths: Tensor, tile_offsets: Tensor, scale: Tensor,
    shape: list[int], group_size: int, scheme: str, base: int, field_bits: int,
    tile_groups: int, record_dtype: torch.dtype, dtype: torch.dtype,
) -> Tensor:
    """Rows ``ids`` of a packed ``[V, D]`` table by the gather kernel
    (``kernels.packed.embedding``): ``[*ids.shape, D]`` of ``dtype``, bit for bit the float
    model's ``F.embedding``."""
    from ..kernels import packed as packed_kernels  # imports Triton: only where it runs

    pt = _layout(levels, widths, tile_offsets, scale, shape, group_size, scheme, base,
                 field_bits, tile_groups, record_dtype, dtype)
    return packed_kernels.embedding(ids, pt)


@packed_embedding.register_fake
def _(ids, levels, widths, tile_offsets, scale, shape, group_size, scheme, base, field_bits,
      tile_groups, record_dtype, dtype):
    return levels.new_empty(*ids.shape, shape[1], dtype=dtype)
