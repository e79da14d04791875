"""Save a quantized model to one ``.safetensors`` file and load it back, safely and fast.

This module maps a quantizer's tensors to payloads and metadata (docs/format.md) and checked
records back onto a model; :mod:`.file_records` checks a file's records,
:mod:`.container` reads and writes the safetensors container itself, and
:mod:`.atomic_file` replaces the file on disk.
"""

from __future__ import annotations

import io
import json
import math
import os
import warnings
import zlib
from typing import BinaryIO

import numpy as np
import torch
from torch import nn

from ..codec import cpu_codec, native
from ..codec.cpu_pool import cpu_threads
from ..ops import bitpack, dispatch
from . import atomic_file, container
from .file_records import (
    DTYPE_NAMES,
    FORMAT,
    META_KEY,
    STREAMS,
    VERSION,
    Plan,
    persistent_buffers,
    read_checked,
)
from .tensor_record import QuantizedTensor


# ============================================================================ writing
def save_quantized(quantizer, path: str | os.PathLike | BinaryIO) -> None:
    """Write the quantized model held by ``quantizer`` to one ``.safetensors`` file.

    Quantized weights are stored bit-packed (:mod:`diffq_triton.ops.bitpack`) with their
    per-group widths; the other parameters as float16 when the quantizer keeps them so,
    else as float32 (float64 ones as float64); the model's persistent buffers (BatchNorm
    statistics...) as they are, but for complex128 ones, a dtype safetensors lacks (left
    out, with a warning). Every payload and the metadata carry a CRC-32.

    Args:
        quantizer: a :class:`DiffQuantizer`, :class:`UniformQuantizer` or :class:`LSQ`
            (anything with ``export_quantized()`` and ``export_float()``). On a model sharded
            by ``fully_shard`` every rank must call it (each tensor is gathered in turn);
            rank 0 writes the file, then every rank learns whether it could (the other
            ranks raise ``RuntimeError`` when it could not).
        path: file name, or a writable binary file object.
    """
    # Torch on one thread inside, the codec on the cpu_pool threads: torch's OpenMP threads, still
    # spinning after each small op (widths from logits), would take the pool's CPUs
    # (measured: packing half as fast).
    model = getattr(quantizer, "model", None)
    with cpu_threads():
        quantized, floats = quantizer.export_quantized(), quantizer.export_float()
    # A sharded model: every rank took part in gathering the tensors; rank 0 writes, then
    # tells every rank whether it could (so that none goes on without the file).
    share = getattr(quantizer, "_share_write_outcome", None)
    if share is None or not getattr(quantizer, "_sharded", False):
        _write(model, quantized, floats, path)
        return
    if not quantizer._writes_files:
        share(None)  # raises if rank 0's write failed
        return
    try:
        _write(model, quantized, floats, path)
    except BaseException as exc:
        share(exc)
        raise
    share(None)


def _write(model: nn.Module | None, quantized: list, floats: list,
           path: str | os.PathLike | BinaryIO) -> None:
    with cpu_threads():
        entries, meta = _encode(quantized, floats, _other_names(model), _buffers_to_save(model))
    chunks = container.chunks(entries, {
        "format": FORMAT, META_KEY: meta, "crc32": str(zlib.crc32(meta.encode())),
    })
    if isinstance(path, (str, os.PathLike)):
        atomic_file.write_atomic(path, chunks)
    else:
        path.writelines(chunks)


def _other_names(model: nn.Module | None) -> dict[str, list[str]]:
    """For each parameter name of ``model``, the other names of the same (tied) parameter."""
    if model is None:
        return {}
    names: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(name)
    return {n: [m for m in group if m != n] for group in names.values() for n in group}


def _buffers_to_save(model: nn.Module | None) -> dict[str, torch.Tensor]:
    """:func:`persistent_buffers`, with a warning naming those left out."""
    kept = persistent_buffers(model)
    left_out = [name for name in persistent_buffers(model, storable_only=False)
                if name not in kept]
    if left_out:
        warnings.warn(f"buffers of dtypes this format does not store are not saved: "
                      f"{left_out[:3]}", RuntimeWarning, stacklevel=3)
    return kept


def _new_aliases(name: str, other_names: dict[str, list[str]], stored: set[str]) -> list[str]:
    """The other names of ``name``'s parameter that no record stores yet, now taken (each
    name goes to one record: a second one would make the file load nowhere)."""
    aliases = [n for n in other_names.get(name, []) if n not in stored]
    stored.update(aliases)
    return aliases


def _encode(exported: list[QuantizedTensor], float_params: list,
            other_names: dict[str, list[str]], buffers: dict[str, torch.Tensor]
            ) -> tuple[list, str]:
    """Payloads ``(key, dtype, shape, bytes)`` in file order, and the metadata JSON.

    A payload's bytes are a uint8 tensor, or a list of them written back to back (the
    streams of every quantized tensor form one payload, sparing a header entry each).
    """
    entries: list[tuple[str, str, list[int], torch.Tensor | list[torch.Tensor]]] = []
    restored: dict[str, str] = {}
    for name, tensor, as_half in float_params:
        # float64 stays float64: narrowing it would change the model the file restores.
        stored = "F16" if as_half else "F64" if tensor.dtype == torch.float64 else "F32"
        data = tensor.detach().to(container.STORED[stored]).contiguous().cpu()
        entries.append((name, stored, list(tensor.shape), data.reshape(-1).view(torch.uint8)))
        if tensor.dtype != container.STORED[stored]:
            restored[name] = _dtype_name(tensor.dtype)
    buffer_entries = []
    for name, buf in buffers.items():
        if name == STREAMS:
            raise ValueError(f"buffer name {STREAMS!r} is reserved by the file format")
        data = buf.detach().contiguous().cpu().reshape(-1).view(torch.uint8)
        buffer_entries.append((name, container.CODES[buf.dtype], list(buf.shape), data))
    # Widest dtype first: from an 8-aligned data start every payload stays aligned. (A
    # stable sort: the floats keep among themselves the order of their checksum list.)
    entries.sort(key=lambda e: -container.ITEMSIZE[e[1]])
    floats: dict = {"crc": [raw for *_, raw in entries]}
    if restored:
        floats["dtype"] = restored
    # Every other name of a parameter goes into its record's tied names (a module
    # registered under two names is not a tie the quantizer sees), but for names stored
    # by a record of their own (detect_bound=False stores a tied parameter once per name).
    stored = ({qt.name for qt in exported} | {n for qt in exported for n in qt.tied_names}
              | {name for name, *_ in entries})
    tied = {name: aliases for name, *_ in entries
            if (aliases := _new_aliases(name, other_names, stored))}
    if tied:
        floats["tied"] = tied
    records, streams = [], []
    for qt in exported:
        record, widths, levels = _encode_quantized(qt, _new_aliases(qt.name, other_names,
                                                                     stored))
        records.append(record)
        if widths is not None:
            record["widths_crc"] = widths
            streams.append(widths)
        record["crc"] = levels
        streams.append(levels)
    entries = sorted(entries + buffer_entries, key=lambda e: -container.ITEMSIZE[e[1]])
    buffer_crcs = {name: raw for name, _, _, raw in buffer_entries}
    if streams:
        entries.append((STREAMS, "U8", [sum(p.numel() for p in streams)], streams))
    # Checksums last, all at once (in parallel): records hold their bytes where they go.
    slots = [(floats["crc"], i) for i in range(len(floats["crc"]))]
    slots += [(buffer_crcs, name) for name in buffer_crcs]
    slots += [(r, k) for r in records for k in ("widths_crc", "crc") if k in r]
    sums = container.payload_crcs([holder[key] for holder, key in slots])
    for (holder, key), crc in zip(slots, sums, strict=True):
        holder[key] = crc
    body = {"version": VERSION, "quantized": records, "float": floats}
    if buffer_crcs:
        body["buffers"] = buffer_crcs
    meta = json.dumps(body, separators=(",", ":"), allow_nan=False)
    return entries, meta


def _encode_quantized(qt: QuantizedTensor, aliases: list[str]
                      ) -> tuple[dict, torch.Tensor | None, torch.Tensor]:
    """A quantized tensor's record (defaults left out, ``aliases`` added to its tied names),
    its width stream (``None`` when every group has the same width) and its level stream."""
    bits = qt.bits.reshape(-1).to(torch.uint8).cpu()
    base = int(bits.min())
    widths, field = bitpack.pack_widths(bits, base)
    record: dict = {"name": qt.name}
    if qt.tied_names or aliases:
        record["tied"] = list(qt.tied_names) + aliases
    record["shape"] = list(qt.shape)
    if qt.dtype != torch.float32:
        record["dtype"] = _dtype_name(qt.dtype)
    if qt.scheme != "minmax":
        record["scheme"] = qt.scheme
    record.update(group_size=qt.group_size, min=_float32_number(qt.mn, qt.name),
                  max=_float32_number(qt.mx, qt.name), min_bits=base, field_bits=field)
    return record, widths.cpu() if field else None, qt.stream().cpu()


def _dtype_name(dtype: torch.dtype) -> str:
    if dtype not in DTYPE_NAMES:
        raise TypeError(f"cannot store parameters of dtype {dtype}")
    return DTYPE_NAMES[dtype]


def _float32_number(value: float, name: str) -> float:
    """``value`` (a float32) as the double with the shortest text that reads back to it."""
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"tensor {name!r}: range {value} is not finite; cannot save it")
    # str of a float32 has at most 9 digits, where repr of the double may take 17, and
    # reads back to the same float32 (loaders compute ranges in float32).
    return float(str(np.float32(value)))


def _on_host(plan: Plan, device: torch.device) -> bool:
    """Whether a quantized record decodes with the CPU codecs (else with the kernels)."""
    return device.type == "cpu" and not dispatch.bitpack_on_triton(plan.packed)


def decode_plan(plan: Plan, device: torch.device, out: torch.Tensor | None = None
                ) -> torch.Tensor:
    """The weight of a checked record, on ``device`` (the float value ``load_quantized``
    gives its parameters; the packed loader decodes the layers it keeps float with it).

    Args:
        out: a contiguous float32 CPU tensor of the weight's size, written in place when
            the record decodes on the host (:func:`_on_host`).
    """
    if plan.qt is None:
        return plan.floats.to(device)
    qt = plan.qt
    host = _on_host(plan, device)
    lib = native.library() if host and qt.scheme == "minmax" else None
    if lib is not None:
        # One pass from the stream to the weights, into the parameter when given.
        mn = torch.tensor(qt.mn, dtype=torch.float32)
        span = torch.tensor(qt.mx, dtype=torch.float32) - mn
        flat = out.view(-1) if out is not None else None
        weight = native.unpack_dequantize(lib, plan.packed, qt.bits, qt.group_size, qt.numel,
                                          float(mn), float(span), flat)
        return weight.view(qt.shape).to(qt.dtype)
    packed, bits = plan.packed.to(device), qt.bits.to(device)
    levels = bitpack.unpack_levels(packed, bits, qt.group_size, qt.numel)
    if qt.scheme == "lsq":
        levels = levels - (1 << (int(qt.bits[0]) - 1))
    if host:
        return cpu_codec.dequantize_cpu(levels, bits, qt, out).view(qt.shape).to(qt.dtype)
    decoded = QuantizedTensor(qt.name, qt.shape, qt.dtype, qt.scheme, qt.group_size, levels,
                              bits, qt.mn, qt.mx)
    return decoded.dequantize(device)


def load_quantized(model: nn.Module, path: str | os.PathLike | BinaryIO | bytes) -> None:
    """Restore the weights and persistent buffers of a plain ``model`` from a file of
    :func:`save_quantized`.

    No quantizer is needed and nothing is unpickled. Every check (format, version,
    checksums, names, shapes, widths, ranges) runs before the first parameter is written:
    on failure the model is unchanged. Decoding a checked record cannot fail, so float32
    CPU weights are dequantized straight into the parameter. Tied parameters receive the
    same weight. Weights are unpacked and dequantized on each parameter's device.

    Raises:
        ValueError: the file is malformed, corrupted, or does not match the model; the
            message names the tensor and the problem.
    """
    # One torch thread for the many group-sized ops, the cpu_pool threads for the big ones.
    with cpu_threads(), torch.no_grad():
        plans = read_checked(model, path)
        for plan in plans:
            first = plan.params[0]
            # Straight into a float32 parameter only from a float32 record: a bf16 record
            # must reach every use rounded to bf16, as its tied copies receive it.
            direct = (plan.qt is not None and plan.qt.dtype == torch.float32
                      and _on_host(plan, first.device) and first.dtype == torch.float32
                      and first.is_contiguous())
            value = decode_plan(plan, first.device, first.data if direct else None)
            for p in plan.params[0 if not direct else 1 :]:
                p.copy_(value.to(p.device))


def file_bytes(quantizer) -> bytes:
    """The bytes :func:`save_quantized` would write (for sizes and tests)."""
    buffer = io.BytesIO()
    save_quantized(quantizer, buffer)
    return buffer.getvalue()
