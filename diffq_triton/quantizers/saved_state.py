"""What a quantizer saves and restores: exported records, states, their sizes.

:class:`QuantizerState` is a base of :class:`~diffq_triton.BaseQuantizer`; it holds the
methods that turn the quantizer's parameters into records (:class:`QuantizedTensor`) and
states, and back, using the file format's checks. It reads the quantizer's attributes
(``_first_uses()``, ``_float16``, ``_others``, ``_export_bits``, ``_quantize_record``...).
"""

from __future__ import annotations

import copy
import zlib

import torch
from torch import nn

from ..codec.cpu_pool import cpu_threads, run_calls
from ..serialization.restore import checked_record, converted_float, state_lists, write_weight
from ..serialization.save_load import file_bytes
from ..serialization.tensor_record import QuantizedTensor
from . import sharding


class QuantizerState:
    """Export, state and size methods shared by every quantizer (see the module docstring)."""

    def packed_model_size(self) -> float:
        """Size in MB of the file :func:`diffq_triton.save_quantized` writes."""
        return len(file_bytes(self)) / 2**20

    def compressed_model_size(self, compress_level: int = -1, num_workers: int = 8) -> float:
        """zlib-compressed size in MB of the quantized state (levels unpacked, as diffq).

        Args:
            compress_level: zlib level (-1: zlib's default).
            num_workers: kept for diffq compatibility; compression runs on one thread.
        """
        compressor = zlib.compressobj(compress_level)
        total = 0
        for qt in self.export_quantized():
            levels = qt.levels.cpu()
            levels = levels.to(torch.uint8) if int(qt.bits.max()) <= 8 else levels
            for chunk in (levels.numpy().tobytes(), qt.bits.cpu().numpy().tobytes()):
                total += len(compressor.compress(chunk))
        for _, tensor, as_half in self.export_float():
            data = tensor.detach().cpu().to(torch.float16 if as_half else torch.float32)
            total += len(compressor.compress(data.numpy().tobytes()))
        total += len(compressor.flush())
        return total / 2**20

    def export_quantized(self) -> list[QuantizedTensor]:
        """The quantized form of every quantized parameter, each counted once (ties named).

        Raises:
            ValueError: a weight holds NaN or Inf.
        """
        records = list(self._first_uses())
        if getattr(self, "_sharded", False):
            return [self._export_gathered(record) for record in records]
        # The widths of all tensors first: inside save_quantized (torch on one thread) their
        # small torch ops run several at once on the pool threads, as torch releases the GIL.
        widths = run_calls([(self._export_bits, (r,)) for r in records])
        out = []
        for record, bits in zip(records, widths, strict=True):
            qt = self._quantize_record(record, bits)
            qt.tied_names = [use.full_name for use in record.tied]
            out.append(qt)
        return out

    def _export_gathered(self, record) -> QuantizedTensor:
        """The record of a sharded parameter, from its whole tensors gathered for it alone
        (a collective: every rank calls it, in the same order)."""
        whole = copy.copy(record)
        with torch.no_grad():
            whole.param = sharding.full(record.param.detach())
            if self._own_attr is not None:
                setattr(whole, self._own_attr, sharding.full(getattr(record, self._own_attr)))
        qt = self._quantize_record(whole, self._export_bits(whole))
        qt.tied_names = [use.full_name for use in record.tied]
        return qt

    def export_float(self) -> list[tuple[str, torch.Tensor, bool]]:
        """The parameters kept in floating point: ``(full name, tensor, stored as float16)``
        (whole: gathered on a sharded model)."""
        half = [(n, sharding.full(p.detach()), True) for n, p in self._float16]
        return half + [(n, sharding.full(p.detach()), False) for n, p in self._others]

    def get_quantized_state(self, packed: bool = True, torch_pack: bool = False) -> dict:
        """The quantized weights and the other parameters, enough to rebuild the model.

        Args:
            packed: bit-pack the levels (the stream of docs/format.md §1).
            torch_pack: accepted for diffq compatibility; the packing is the same.

        Returns:
            A dict of tensors, numbers and strings (no classes: loadable with
            ``torch.load(weights_only=True)``) for :meth:`restore_quantized_state`.
        """
        quantized = []
        # Torch on one thread while the codec's threads quantize (as in save_quantized).
        with cpu_threads():
            exported = self.export_quantized()
        for qt in exported:
            entry = {
                "shape": list(qt.shape),
                "scheme": qt.scheme,
                "group_size": qt.group_size,
                "bits": qt.bits.cpu(),
                "min": qt.mn,
                "max": qt.mx,
            }
            if packed:
                entry["packed"] = qt.stream().cpu()
            else:
                entry["levels"] = qt.levels.cpu()
            quantized.append(entry)
        return {
            "quantized": quantized,
            "float16": [p.half().cpu() for _, p, half in self.export_float() if half],
            "others": [p.clone().cpu() for _, p, half in self.export_float() if not half],
            "meta": {
                "init_kwargs": self._init_kwargs(),
                "klass": type(self).__name__,
                "packed": packed,
                "torch_pack": torch_pack,
            },
        }

    def restore_quantized_state(self, state: dict) -> None:
        """Load the weights of a state from :meth:`get_quantized_state` into the model.

        Every entry is checked with the rules files are read with (docs/format.md) and
        converted before the first parameter is written: on failure the model is unchanged.

        Raises:
            ValueError: the state is malformed or does not match this model (counts,
                shapes, schemes, widths, ranges, levels); the message names the tensor.
        """
        quantized, float16, others = state_lists(state)
        firsts = list(self._first_uses())
        if len(quantized) != len(firsts):
            raise ValueError(
                f"state holds {len(quantized)} quantized tensors, the model has {len(firsts)}"
            )
        floats = self._restored_floats(float16, others)
        weights = [self._restored_weight(record, entry)
                   for record, entry in zip(firsts, quantized, strict=True)]
        self._restore_params()
        self.unquantize()
        with torch.no_grad():
            for record, weight in zip(firsts, weights, strict=True):
                write_weight(record.param, weight)
            for p, value in floats:
                p.copy_(value)
        self._fix_rnns()

    def _restored_floats(self, float16: list, others: list
                         ) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Each float parameter with its value from the state, checked and converted."""
        out = []
        for kind, params, saved in (("float16", self._float16, float16),
                                    ("others", self._others, others)):
            if len(params) != len(saved):
                raise ValueError(f"state holds {len(saved)} {kind} tensors, model {len(params)}")
            out += [(p, converted_float(kind, name, p, value))
                    for (name, p), value in zip(params, saved, strict=True)]
        return out

    def _restored_weight(self, record, entry: dict
                         ) -> QuantizedTensor | torch.Tensor:
        """The checked record of ``entry``, or its weight already decoded.

        float32 CPU weights are decoded straight into the parameter once every tensor is
        checked (decoding a checked stream cannot fail); the others are decoded here, so
        that a failure leaves the model untouched.
        """
        qt = checked_record(record.full_name, record.param, entry)
        p = record.param
        direct = (p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous()
                  and qt.native_decodable(p.device))
        return qt if direct else qt.dequantize(p.device)
