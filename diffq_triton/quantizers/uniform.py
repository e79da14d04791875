"""UniformQuantizer: per-tensor min-max quantization at a fixed width, post-training or QAT."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .. import ops, validation
from ..ops import reference
from ..serialization.restore import register_quantizer
from ..serialization.tensor_record import QuantizedTensor, quantize_minmax
from .base import MEGABYTE_BITS, BaseQuantizer, QuantizedParam


@register_quantizer
class UniformQuantizer(BaseQuantizer):
    """Quantizes every weight tensor to ``bits`` bits between its min and max.

    Args:
        model: the model to quantize.
        bits: width of every quantized entry, a whole number in ``[1, 15]``.
        min_size: parameters of at most ``min_size`` MB (float32) are kept in float.
        float16: keep the non-quantized parameters as float16.
        qat: quantization-aware training: training forwards use the quantized weights with
            a straight-through gradient.
        exclude: fnmatch patterns of parameter names not to quantize.
        detect_bound: treat a tied parameter once.
    """

    def __init__(
        self,
        model: nn.Module,
        bits: float = 8.0,
        min_size: float = 0.01,
        float16: bool = False,
        qat: bool = False,
        exclude: Sequence[str] | None = None,
        detect_bound: bool = True,
    ):
        self.bits = float(validation.check_bit_width("bits", bits))
        self.qat = bool(qat)
        self._kwargs = dict(
            bits=bits, min_size=min_size, float16=float16, qat=qat,
            exclude=list(exclude or []), detect_bound=detect_bound,
        )
        super().__init__(model, min_size, float16, exclude, detect_bound)

    def _int_bits(self, record: QuantizedParam) -> torch.Tensor:
        return torch.full((1,), int(self.bits), dtype=torch.uint8, device=record.param.device)

    def _train_weights(self, records: list[QuantizedParam] | None = None,
                       seed: torch.Tensor | None = None, streams: list[int] | None = None
                       ) -> list[torch.Tensor] | None:
        """Straight-through quantized weights of ``records`` (default: every first use) with
        ``qat``, else None (training sees the float weights)."""
        if not self.qat:
            return None
        records = list(self._first_uses()) if records is None else records
        quantized = self._quantized_weights(records)
        return [reference.straight_through(record.param, q)
                for record, q in zip(records, quantized, strict=True)]

    def _quantized_weight(self, record: QuantizedParam) -> torch.Tensor:
        return ops.quantized_weight(record.param, self._int_bits(record), 0)

    def _quantized_weights(self, records: list[QuantizedParam]) -> list[torch.Tensor]:
        return ops.quantized_weight_many([r.param for r in records],
                                         [self._int_bits(r) for r in records], 0)

    def _export_bits(self, record: QuantizedParam) -> torch.Tensor:
        return self._int_bits(record)

    def _quantize_record(self, record: QuantizedParam, bits: torch.Tensor | None
                         ) -> QuantizedTensor:
        bits = self._int_bits(record) if bits is None else bits
        return quantize_minmax(record.full_name, record.param.detach(), bits, 0)

    def model_size(self) -> torch.Tensor:
        """Size in MB: ``bits·d + 64`` bits per quantized tensor plus the float parameters."""
        quantized = sum(self.bits * r.param.numel() + 64 for r in self._first_uses())
        return super().model_size() + quantized / MEGABYTE_BITS
