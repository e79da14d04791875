"""One quantized tensor kept packed in memory: the layout of docs/packed.md, as buffers.

A :class:`PackedTensor` holds the level stream of docs/format.md §1 and the width stream of
§2 (each followed by :data:`PAD_BYTES` zero bytes, so that a kernel may read an 8-byte window
starting at any byte of the stream), the bit offset of the first level of every tile of
:data:`TILE_GROUPS` groups, and the float32 range. It is built once from a file's record
(:meth:`PackedTensor.from_record`) and decoded just in time on the CPU with the native codec
(:meth:`PackedTensor.decode_into`); :mod:`.reference` is the torch decoder kernels are
tested against.
"""

from __future__ import annotations

import torch
from torch import nn

from ..ops import bitpack, packed_op, reference
from ..serialization.tensor_record import QuantizedTensor

# Groups per tile. A tile offset costs 64 bits, so 64/(TILE_GROUPS·g) bits per weight: at
# 128, 0.5 bit per weight at g = 1 and 0.0625 at g = 8 (64 groups would double that), while
# a kernel program's prefix sum of 128 widths is one tl.cumsum over a 128-entry block.
TILE_GROUPS = 128
# Zero bytes after each stream: a kernel reading 8 bytes from the byte of any level or
# width stays inside the buffer (and past the stream it reads zeros).
PAD_BYTES = 8
# Version of the layout in a packed module's state_dict (its extra state).
LAYOUT_VERSION = 1
_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


def tile_bit_offsets(bits: torch.Tensor, group_size: int, numel: int,
                     tile_groups: int = TILE_GROUPS) -> torch.Tensor:
    """Stream bit offset of the first level of every tile of ``tile_groups`` groups.

    Args:
        bits: ``[n_groups]`` uint8 widths (CPU).
        group_size: entries per group (0: one group of ``numel``).
        numel: entries of the tensor.

    Returns:
        ``[ceil(n_groups / tile_groups)]`` int64: ``offsets[t] = Σ_{s < t·T} b_s·len_s``.
        Only the last group may be shorter than ``group_size``, and it never precedes a tile
        start, so ``len_s = group_size`` in every sum. Computed tile chunk by tile chunk:
        no int64 temporary of ``n_groups`` entries (8 bytes per weight at ``g = 1``).
    """
    n_groups = bits.numel()
    n_tiles = -(-n_groups // tile_groups)
    out = torch.zeros(n_tiles, dtype=torch.int64)
    if n_tiles <= 1:
        return out
    sums = torch.empty(n_tiles, dtype=torch.int64)
    chunk = 1 << 13  # tiles per step: 1M groups, 8 MiB of int64 at most
    full = n_groups // tile_groups
    for t0 in range(0, full, chunk):
        t1 = min(full, t0 + chunk)
        block = bits[t0 * tile_groups : t1 * tile_groups].view(t1 - t0, tile_groups)
        sums[t0:t1] = block.sum(dim=1, dtype=torch.int64)
    if full < n_tiles:  # the last, partial tile (its sum is never used as an offset)
        sums[full] = bits[full * tile_groups :].sum(dtype=torch.int64)
    torch.cumsum(sums[:-1], 0, out=out[1:])
    return out.mul_(max(group_size, 1))


def _padded(stream: torch.Tensor) -> torch.Tensor:
    """A fresh ``[n + PAD_BYTES]`` uint8 copy of ``stream`` (never a view of the file)."""
    out = torch.zeros(stream.numel() + PAD_BYTES, dtype=torch.uint8)
    out[: stream.numel()] = stream.cpu()
    return out


class PackedTensor(nn.Module):
    """One quantized weight in the packed layout (docs/packed.md), as registered buffers.

    Buffers (moved by ``.to(device)``, never converted by ``.to(dtype)`` / ``.half()``: a
    dtype change only sets the dtype the weight is decoded to, as it would the float
    parameter's):

    - ``levels``: ``[level_bytes + 8]`` uint8, the level stream (docs/format.md §1).
    - ``widths``: ``[ceil(n_groups·field_bits / 8) + 8]`` uint8, the width stream (§2,
      ``width = base + field``); registered only when ``field_bits > 0``.
    - ``tile_offsets``: ``[n_tiles]`` int64, bit offset of each tile's first level.
    - ``scale``: ``[2]`` float32, ``(min, max)`` of ``minmax``; ``(step, 0)`` of ``lsq``.

    Attributes (in the module's extra state): ``shape``, ``numel``, ``group_size``,
    ``n_groups``, ``scheme``, ``base``, ``field_bits``, ``level_bytes``, ``tile_groups``,
    ``record_dtype`` (the saved parameter's dtype, which the decode rounds to first) and
    ``dtype`` (the dtype the weight is decoded to, the float model's parameter dtype).
    """

    def __init__(self, shape: tuple[int, ...], scheme: str, group_size: int, base: int,
                 field_bits: int, level_bytes: int, record_dtype: torch.dtype,
                 dtype: torch.dtype, tile_groups: int = TILE_GROUPS):
        super().__init__()
        self.shape = tuple(shape)
        self.numel = 1
        for n in self.shape:
            self.numel *= n
        self.group_size = group_size
        self.n_groups = reference.num_groups(self.numel, group_size)
        self.scheme = scheme
        self.base = base
        self.field_bits = field_bits
        self.level_bytes = level_bytes
        self.tile_groups = tile_groups
        self.record_dtype = record_dtype
        self.dtype = dtype

    @classmethod
    def from_record(cls, qt: QuantizedTensor, dtype: torch.dtype | None = None,
                    device: torch.device | str = "cpu") -> PackedTensor:
        """The packed form of a checked record (a file's, or a quantizer's export).

        Args:
            qt: the record; its stream and widths are copied (not kept as views).
            dtype: the dtype the weight decodes to (default: the record's).
            device: where the buffers live.
        """
        stream = qt.stream().cpu()
        bits = qt.bits.reshape(-1).to("cpu", torch.uint8).contiguous()
        base = int(bits.min())
        widths, field = bitpack.pack_widths(bits, base)
        pt = cls(qt.shape, qt.scheme, qt.group_size, base, field, stream.numel(), qt.dtype,
                 dtype or qt.dtype)
        pt.register_buffer("levels", _padded(stream).to(device))
        if field:
            pt.register_buffer("widths", _padded(widths).to(device))
        pt.register_buffer("tile_offsets",
                           tile_bit_offsets(bits, qt.group_size, pt.numel).to(device))
        pt.register_buffer("scale", torch.tensor([qt.mn, qt.mx], dtype=torch.float32,
                                                 device=device))
        return pt

    # ----------------------------------------------------------------- state
    def get_extra_state(self) -> dict:
        return {"layout": LAYOUT_VERSION, "shape": list(self.shape), "scheme": self.scheme,
                "group_size": self.group_size, "base": self.base,
                "field_bits": self.field_bits, "level_bytes": self.level_bytes,
                "tile_groups": self.tile_groups, "record_dtype": str(self.record_dtype),
                "dtype": str(self.dtype)}

    def set_extra_state(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("layout") != LAYOUT_VERSION:
            raise ValueError(f"packed tensor state of an unknown layout: {state!r:.80}")
        mine = self.get_extra_state()
        fixed = [k for k in mine if k != "dtype" and state.get(k) != mine[k]]
        if fixed:  # buffers sized by these would not fit this module
            raise ValueError(f"packed tensor state differs in {fixed}: load it into a model "
                             "packed from the same file")
        self.dtype = _DTYPES[state["dtype"]]

    def _apply(self, fn, recurse=True):
        # Buffers follow the device only: the range stays float32 and the streams bytes. A
        # dtype conversion (model.half()) sets the decoded weight's dtype, as it would set
        # the float parameter's. A tied tensor is reached from each of its modules: moving
        # twice is a no-op.
        probe = fn(torch.empty(0, dtype=self.dtype, device=self.levels.device))
        if probe.is_floating_point():
            self.dtype = probe.dtype
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(probe.device)
        return self

    def extra_repr(self) -> str:
        return (f"shape={self.shape}, scheme={self.scheme!r}, group_size={self.group_size}, "
                f"widths={self.base}+{self.field_bits} bits, dtype={self.dtype}")

    # ----------------------------------------------------------------- decoding
    @property
    def device(self) -> torch.device:
        return self.levels.device

    def group_widths(self) -> torch.Tensor:
        """``[n_groups]`` uint8 widths, unpacked from the width stream (on its device)."""
        return packed_op.group_widths(self._widths(), self.n_groups, self.base,
                                      self.field_bits, self.device)

    def _widths(self) -> torch.Tensor:
        # The width stream, or an empty tensor when every group has width ``base``.
        return self.widths if self.field_bits else self.levels.new_empty(0)

    def record(self) -> QuantizedTensor:
        """This tensor as a record of the file format (streams as views, no copy)."""
        mn, mx = self.scale.tolist()
        return QuantizedTensor("packed", self.shape, torch.float32, self.scheme,
                               self.group_size, None, self.group_widths(), mn, mx,
                               stream=self.levels[: self.level_bytes])

    def decode_into(self, out: torch.Tensor) -> torch.Tensor:
        """Dequantize into ``out`` (float32, ``numel`` entries, contiguous, same device).

        On the CPU the native codec unpacks and dequantizes in one pass (``b/8`` bytes read
        and 4 written per weight), with the float operations of the reference, as
        ``load_quantized`` decodes; elsewhere, or for ``lsq``, the library's unpack and the
        reference's float math, as a record decodes (:func:`diffq_triton.ops.packed_op.
        decode_into`). Returns ``out`` viewed as ``shape``.
        """
        packed_op.decode_into(out, self.levels, self._widths(), self.scale, self.numel,
                              self.group_size, self.scheme, self.base, self.field_bits,
                              self.level_bytes)
        return out.view(self.shape)

    def cast(self, weight: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The float32 decode ``weight`` rounded as the float model's parameter is: to the
        record's dtype (what ``load_quantized`` decodes), then to :attr:`dtype`.

        Args:
            out: optional tensor of :attr:`dtype` and ``shape`` to write into.
        """
        return packed_op.cast(weight, self.record_dtype, self.dtype, out)

    def dequantize(self) -> torch.Tensor:
        """The weight, a fresh tensor of ``shape`` and :attr:`dtype` (equal to what
        ``load_quantized(model, path)`` puts in the float parameter)."""
        w = torch.empty(self.numel, dtype=torch.float32, device=self.device)
        return self.cast(self.decode_into(w))

    def dequantize_op(self, backend: str) -> torch.Tensor:
        """:meth:`dequantize` as one ``diffq_triton::packed_dequantize`` node (what
        ``torch.compile`` and ``torch.export`` trace); ``backend``: ``"triton"`` (the packed
        dequantize kernel) or ``"eager"``."""
        return packed_op.packed_dequantize(
            self.levels, self._widths(), self.tile_offsets, self.scale, list(self.shape),
            self.group_size, self.scheme, self.base, self.field_bits, self.level_bytes,
            self.tile_groups, self.record_dtype, self.dtype, backend)

    def _op_layout(self) -> tuple:
        return (self.levels, self._widths(), self.tile_offsets, self.scale, list(self.shape),
                self.group_size, self.scheme, self.base, self.field_bits, self.tile_groups,
                self.record_dtype, self.dtype)

    def linear_op(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """``x Wᵀ + bias`` by the fused kernels as one ``diffq_triton::packed_linear`` node
        (inference; what ``torch.compile`` and ``torch.export`` trace on the Triton backend)."""
        return packed_op.packed_linear(x, bias, *self._op_layout())

    def embedding_op(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` by the gather kernel as one ``diffq_triton::packed_embedding`` node."""
        return packed_op.packed_embedding(ids, *self._op_layout())

    def nbytes(self) -> int:
        """Bytes of this tensor's buffers."""
        return sum(b.numel() * b.element_size() for b in self._buffers.values())
