"""The quantized form of one tensor, as quantizers export it and files store it."""

from __future__ import annotations

import math

import torch

from .. import validation
from ..codec import native
from ..codec.bitpack_cpu import MAX_WIDTH
from ..codec.cpu_codec import quantize_cpu
from ..ops import bitpack, reference
from ..ops.dispatch import bitpack_on_triton

SCHEMES = ("minmax", "lsq")


def quantize_minmax(
    name: str, w: torch.Tensor, bits: torch.Tensor, group_size: int
) -> QuantizedTensor:
    """Quantize ``w`` (spec §1) with per-group widths into a record named ``name``.

    CPU weights are quantized and packed in one pass by the native codec (same levels as
    the reference; the record unpacks them only if asked), or else (float32) by the chunked
    torch codec; others by the reference, their stream packed on their device (by the
    Triton kernels where :func:`dispatch.bitpack_on_triton` says so).

    Raises:
        ValueError: ``w`` holds NaN or Inf (they show in its range).
    """
    dtype = w.dtype
    host = w.device.type == "cpu" and not bitpack_on_triton(w)
    lib = native.library() if host and w.is_floating_point() else None
    if lib is not None:
        # The reference computes in float32 (``w.float()``): so does the codec.
        w = w.detach() if w.dtype == torch.float32 else w.detach().float()
        mn, mx = native.value_range(w) if w.numel() else (0.0, 0.0)
        _check_range(name, mn, mx)
        # mx - mn in float32, as the reference computes the scale.
        scale = float(torch.tensor(mx, dtype=torch.float32) - torch.tensor(mn, dtype=torch.float32))
        safe = scale if scale > 0 else 1.0
        stream = native.quantize_pack(lib, w, bits, group_size, mn, safe)
        return QuantizedTensor(name, tuple(w.shape), dtype, "minmax", group_size, None,
                               bits.reshape(-1).to(torch.uint8), mn, mx, stream=stream)
    if host and w.dtype == torch.float32:
        levels, mn, mx = quantize_cpu(w, bits, group_size)
    else:
        levels, mn, mx = reference.quantize(w, bits, group_size)
    mn, mx = float(mn), float(mx)
    _check_range(name, mn, mx)
    return QuantizedTensor(name, tuple(w.shape), w.dtype, "minmax", group_size, levels,
                           bits, mn, mx)


def _check_range(name: str, mn: float, mx: float) -> None:
    if not (math.isfinite(mn) and math.isfinite(mx)):
        raise ValueError(f"parameter {name!r} holds NaN or Inf values; cannot quantize it")
    check_range_float32(f"parameter {name!r}", mn, mx)


def check_range_float32(what: str, mn: float, mx: float) -> None:
    """Raise ``ValueError`` unless ``mn``, ``mx`` and ``mx - mn`` are finite in float32.

    Levels and weights are computed in float32: a span that overflows would quantize
    every weight to one level, or decode every weight to inf.
    """
    low, high = torch.tensor([mn, mx], dtype=torch.float32)
    if not (math.isfinite(float(low)) and math.isfinite(float(high))
            and math.isfinite(float(high - low))):
        raise ValueError(f"{what}: range ({mn}, {mx}) is not finite in float32")


# ----------------------------------------------------------------------------- checks
# The rules every quantized record obeys, wherever it comes from (a file, a diffq 0.2.4
# state, an in-memory state dict): decoding a record that passed them cannot fail, so a
# restore checks every record with them before it writes the first parameter.
def check_scheme(what: str, scheme: object) -> str:
    """``scheme`` must be one this library decodes."""
    if not isinstance(scheme, str) or scheme not in SCHEMES:
        raise ValueError(f"{what}: unknown scheme {scheme!r:.40} (expected one of {SCHEMES})")
    return scheme


def check_record_range(what: str, scheme: str, mn: float, mx: float) -> None:
    """minmax ranges are ordered and, like lsq steps, finite in float32 (spec §2)."""
    check_range_float32(what, mn, mx)
    if scheme == "minmax" and mn > mx:
        raise ValueError(f"{what}: range min {mn} exceeds max {mx}")


def check_widths(what: str, bits: object, numel: int, group_size: int,
                 scheme: str) -> torch.Tensor:
    """The per-group widths of a record as ``[n_groups]`` uint8, checked before narrowing.

    The count comes first (a forged tensor is never converted whole), the range is read on
    int64 values (a cast to uint8 first would wrap 257 to a valid 1), and lsq tensors have
    one group (one step, one offset).
    """
    n_groups = reference.num_groups(numel, group_size)
    bits = validation.check_integer_tensor(f"{what}: widths", bits)
    if bits.numel() != n_groups:
        raise ValueError(f"{what}: {bits.numel()} widths for {n_groups} groups")
    if scheme == "lsq" and n_groups != 1:
        raise ValueError(f"{what}: lsq tensors have one group, got {n_groups}")
    # uint8 widths (what files decode to) are read as they are: no copy on the load path.
    flat = bits.reshape(-1) if bits.dtype == torch.uint8 else bits.reshape(-1).to(torch.int64)
    low, high = (int(v) for v in torch.aminmax(flat))  # n_groups >= 1
    if low < 1 or high > MAX_WIDTH:
        raise ValueError(f"{what}: widths [{low}, {high}] outside [1, {MAX_WIDTH}]")
    return flat.to(torch.uint8)


def check_levels(what: str, levels: torch.Tensor, bits: torch.Tensor, group_size: int,
                 scheme: str) -> None:
    """Every level fits its group's width: ``[0, 2^b)`` (minmax) or ``[-2^(b-1), 2^(b-1))``.

    Read on the original values (int64 where the dtype needs it), never after narrowing:
    a cast to int32 or int16 first would wrap an impossible level into a plausible one.
    """
    if not levels.numel():
        return
    wide = levels.dtype in (torch.int64, torch.uint32, torch.uint64)
    values = levels.reshape(-1).to(torch.int64 if wide else torch.int32)
    widths = bits.reshape(-1).to(values.dtype)
    if scheme == "lsq":
        half = 1 << (int(widths[0]) - 1)
        low, high = (int(v) for v in torch.aminmax(values))
        if low < -half or high >= half:
            raise ValueError(f"{what}: lsq levels [{low}, {high}] outside [{-half}, {half - 1}]")
        return
    top = reference.expand_groups((1 << widths) - 1, values.numel(), group_size)
    if int(values.min()) < 0 or bool((values > top).any()):
        raise ValueError(f"{what}: a level lies outside [0, 2^b) for its group's width b")


class QuantizedTensor:
    """One quantized parameter (counted once even when tied).

    Holds its levels, its packed stream, or both: each is computed from the other on first
    use (the native codec quantizes straight into the stream, files hold only the stream).

    Attributes:
        name: full parameter name of its first use (``"encoder.0.weight"``).
        tied_names: full names of the other uses of the same parameter.
        shape: the parameter's shape.
        dtype: the parameter's dtype (restored on load).
        scheme: ``"minmax"`` (DiffQ, Uniform: ``w ≈ mn + q·(mx - mn)/(2^b - 1)``, ``q ≥ 0``)
            or ``"lsq"`` (``w ≈ q·step`` with signed ``q``, stored offset by ``2^(b-1)``).
        group_size: entries per group (0: one group).
        levels: ``[numel]`` int16 levels (unsigned for minmax; signed for lsq).
        bits: ``[n_groups]`` uint8 widths in ``[1, 15]``.
        mn, mx: float32 range (minmax); ``mn`` holds the step for lsq, ``mx`` is unused (0).
    """

    def __init__(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, scheme: str,
                 group_size: int, levels: torch.Tensor | None, bits: torch.Tensor,
                 mn: float, mx: float, tied_names: list[str] | None = None, *,
                 stream: torch.Tensor | None = None):
        if levels is None and stream is None:
            raise ValueError(f"tensor {name!r}: a record needs its levels or its stream")
        self.name = name
        self.shape = tuple(shape)
        self.dtype = dtype
        self.scheme = scheme
        self.group_size = group_size
        self.bits = bits
        self.mn = mn
        self.mx = mx
        self.tied_names = list(tied_names or [])
        self._levels = levels
        self._stream = stream

    def __repr__(self) -> str:
        return (f"QuantizedTensor(name={self.name!r}, shape={self.shape}, "
                f"dtype={self.dtype}, scheme={self.scheme!r}, group_size={self.group_size})")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def offset(self) -> int:
        """What the stream adds to a level: ``2^(b-1)`` for lsq, 0 for minmax."""
        return 1 << (int(self.bits.reshape(-1)[0]) - 1) if self.scheme == "lsq" else 0

    @property
    def levels(self) -> torch.Tensor:
        """``[numel]`` int16 levels (unpacked from the stream on first use)."""
        if self._levels is None:
            levels = bitpack.unpack_levels(self._stream, self.bits.to(self._stream.device),
                                           self.group_size, self.numel)
            self._levels = levels - self.offset if self.offset else levels
        return self._levels

    @levels.setter
    def levels(self, value: torch.Tensor) -> None:
        self._levels, self._stream = value, None

    def stream(self) -> torch.Tensor:
        """The packed level stream of docs/format.md §1 (lsq levels offset), uint8."""
        if self._stream is None:
            levels = self._levels.reshape(-1)
            if self.offset:
                levels = levels.to(torch.int32) + self.offset
            self._stream = bitpack.pack_levels(levels, self.bits.to(levels.device),
                                               self.group_size)
        return self._stream

    def native_decodable(self, device: torch.device | str | None = None) -> bool:
        """Whether :meth:`dequantize` on ``device`` runs the native one-pass decoder.

        Raises:
            ValueError: it would, and the stream or the widths are malformed.
        """
        stream = self._stream
        on_cpu = (torch.device(device).type == "cpu" if device is not None
                  else (stream is not None and stream.device.type == "cpu"))
        lib = native.library() if self.scheme == "minmax" and stream is not None else None
        if lib is None or not on_cpu:
            return False
        native.check_stream(lib, stream.cpu(), self.bits.cpu(), self.group_size, self.numel)
        return True

    def dequantize(self, device: torch.device | str | None = None,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight this represents, of ``shape`` and ``dtype``, on ``device``.

        Args:
            out: a contiguous float32 CPU tensor of ``numel`` entries to decode into, used
                when the native decoder runs (:meth:`native_decodable`); then returned.
        """
        if self.native_decodable(device):  # one pass from the stream to the weights
            mn = torch.tensor(self.mn, dtype=torch.float32)
            span = torch.tensor(self.mx, dtype=torch.float32) - mn
            decoded = native.unpack_dequantize(native.library(), self._stream.cpu(),
                                               self.bits.cpu(), self.group_size, self.numel,
                                               float(mn), float(span), out)
            return decoded.view(self.shape).to(self.dtype)
        levels = self.levels.to(device) if device is not None else self.levels
        if self.scheme == "lsq":
            out = levels.float() * torch.tensor(self.mn, dtype=torch.float32, device=levels.device)
        else:
            bits = self.bits.to(levels.device)
            mn = torch.tensor(self.mn, dtype=torch.float32, device=levels.device)
            mx = torch.tensor(self.mx, dtype=torch.float32, device=levels.device)
            out = reference.dequantize(levels, bits, self.group_size, mn, mx)
        return out.view(self.shape).to(self.dtype)
