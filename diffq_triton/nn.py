"""Layers that carry their own DiffQ bit logits, for models that declare quantization.

``DiffQLinear``, ``DiffQConv1d``, ``DiffQConv2d`` and ``DiffQEmbedding`` hold the float weight
and one bit logit per group (``weight_diffq``, the name :class:`DiffQuantizer` gives them, so
state dicts are interchangeable), and call the same operations as the quantizer: noisy
weights in training, quantized weights (cached until the weight or bits change) in eval.
Biases stay in float32. ``from_float()`` / ``to_float()`` convert from and to the plain layers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import ops, validation
from .ops import reference
from .ops.reference import MEGABYTE_BITS


@dataclass(frozen=True)
class DiffQConfig:
    """Quantization settings of a layer (the :class:`DiffQuantizer` arguments of the same name).

    Raises:
        ValueError, TypeError: an argument out of range, named in the message.
    """

    group_size: int = 8
    min_bits: float = 2
    max_bits: float = 15
    init_bits: float = 8
    extra_bits: float = 0
    param: str = "bits"
    noise: str = "gaussian"

    def __post_init__(self) -> None:
        validation.check_group_size(self.group_size)
        low = validation.check_number("min_bits", self.min_bits, low=1, high=15)
        high = validation.check_number("max_bits", self.max_bits, low=1, high=15)
        init = validation.check_number("init_bits", self.init_bits, low=1, high=15)
        if not low < init < high:
            raise ValueError(
                f"need min_bits < init_bits < max_bits, got {self.min_bits}, {self.init_bits}, "
                f"{self.max_bits}"
            )
        validation.check_choice("param", self.param, reference.PARAMS)
        validation.check_choice("noise", self.noise, reference.NOISES)


class _DiffQWeight:
    """Mixin: the logits of ``self.weight`` and the weight a forward should use."""

    weight: nn.Parameter
    config: DiffQConfig

    def _init_logits(self, config: DiffQConfig) -> None:
        self.config = config
        n = reference.num_groups(self.weight.numel(), config.group_size)
        self.weight_diffq = nn.Parameter(torch.full((n,), self._initial_logit(),
                                                    device=self.weight.device))
        self._eval_cache: tuple | None = None
        # Made on the meta device: once to_empty() gives the logits memory, they hold
        # garbage until reset_parameters() (or a state dict holding them) sets them.
        self._logits_pending = self.weight.is_meta

    def _initial_logit(self) -> float:
        c = self.config
        t = reference.initial_fraction(c.init_bits, c.min_bits, c.max_bits, c.param)
        # On the CPU whatever the default device (a layer built under torch.device("meta")).
        return torch.logit(torch.tensor(float(t), device="cpu")).item()

    def reset_parameters(self) -> None:
        """The float layer's initialisation, then the logits' (at ``config.init_bits``):
        what a model built on the ``meta`` device calls after ``to_empty()``."""
        super().reset_parameters()
        logits = self.__dict__.get("_parameters", {}).get("weight_diffq")
        if logits is not None:  # None while the float layer's __init__ runs
            with torch.no_grad():
                logits.fill_(self._initial_logit())
            self._logits_pending = False
            self._eval_cache = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if prefix + "weight_diffq" in state_dict:
            self._logits_pending = False
            self._eval_cache = None

    def _check_logits(self) -> None:
        if self._logits_pending and not self.weight_diffq.is_meta:
            raise validation.UsageError(
                f"{type(self).__name__}: built on the meta device, its bit logits were given "
                "memory (to_empty) but never set: call reset_parameters() on the layer (or "
                "load a state dict holding weight_diffq) before using it")

    def bits(self) -> torch.Tensor:
        """Current widths ``[n_groups]`` (float, differentiable)."""
        c = self.config
        return reference.bits_from_logits(self.weight_diffq, c.min_bits, c.max_bits, c.param)

    def _int_bits(self) -> torch.Tensor:
        return reference.round_bits(self.config.extra_bits + self.bits().detach())

    def quantized_weight(self) -> torch.Tensor:
        """The weight as stored: quantized with rounded widths, then dequantized."""
        return ops.quantized_weight(self.weight, self._int_bits(), self.config.group_size)

    def effective_weight(self) -> torch.Tensor:
        """Noisy weight in training, quantized weight (cached) in eval."""
        c = self.config
        self._check_logits()
        if self.training:
            return ops.pseudo_quantize(
                self.weight, self.weight_diffq, group_size=c.group_size, min_bits=c.min_bits,
                max_bits=c.max_bits, param=c.param, noise=c.noise,
            )
        if torch.compiler.is_compiling():
            return self.quantized_weight()
        w = self.weight
        key = (w._version, w.data_ptr(), self.weight_diffq._version, w.dtype, w.device)
        if self._eval_cache is None or self._eval_cache[0] != key:
            validation.check_finite("weight", w.detach())
            with torch.no_grad():
                self._eval_cache = (key, self.quantized_weight())
        return self._eval_cache[1]

    def size_bits(self, exact: bool = False) -> torch.Tensor:
        """Size of the layer in bits: quantized weight (spec §3) plus 32 bits per float entry.

        On a layer sharded by ``fully_shard`` the logits are gathered first (a collective,
        differentiable): every rank gets the whole layer's size."""
        self._check_logits()
        logits = self.weight_diffq
        if hasattr(logits, "full_tensor"):  # a DTensor shard
            logits = logits.full_tensor()
        c = self.config
        bits = c.extra_bits + reference.bits_from_logits(logits, c.min_bits, c.max_bits, c.param)
        if exact:
            bits = bits.detach().round().clamp(1, 15)
        size = reference.diffq_tensor_size_bits(
            bits, self.weight.numel(), self.config.group_size, self.config.min_bits
        )
        others = sum(p.numel() for n, p in self.named_parameters()
                     if n not in ("weight", "weight_diffq"))
        return size + 32 * others

    def _float_kwargs(self) -> dict:
        return asdict(self.config)


class DiffQLinear(_DiffQWeight, nn.Linear):
    """``nn.Linear`` whose weight is DiffQ-quantized. Input ``[*, in]`` → ``[*, out]``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 config: DiffQConfig | None = None, device=None, dtype=None):
        nn.Linear.__init__(self, in_features, out_features, bias, device=device, dtype=dtype)
        self._init_logits(config or DiffQConfig())

    @classmethod
    def from_float(cls, layer: nn.Linear, config: DiffQConfig | None = None) -> DiffQLinear:
        """A DiffQLinear sharing ``layer``'s weight and bias values (copied)."""
        out = cls(layer.in_features, layer.out_features, layer.bias is not None, config,
                  device=layer.weight.device, dtype=layer.weight.dtype)
        _copy_params(layer, out)
        return out

    def to_float(self) -> nn.Linear:
        """A plain ``nn.Linear`` holding the quantized weight."""
        out = nn.Linear(self.in_features, self.out_features, self.bias is not None,
                        device=self.weight.device, dtype=self.weight.dtype)
        return _export_params(self, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.effective_weight(), self.bias)


class _DiffQConvNd(_DiffQWeight):
    _float_cls: type[nn.Module]

    @classmethod
    def from_float(cls, layer, config: DiffQConfig | None = None):
        """A quantized copy of a plain convolution (same arguments, weights copied)."""
        out = cls(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                  layer.padding, layer.dilation, layer.groups, layer.bias is not None,
                  layer.padding_mode, config=config, device=layer.weight.device,
                  dtype=layer.weight.dtype)
        _copy_params(layer, out)
        return out

    def to_float(self):
        """A plain convolution holding the quantized weight."""
        out = self._float_cls(self.in_channels, self.out_channels, self.kernel_size, self.stride,
                              self.padding, self.dilation, self.groups, self.bias is not None,
                              self.padding_mode, device=self.weight.device,
                              dtype=self.weight.dtype)
        return _export_params(self, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.effective_weight(), self.bias)


class DiffQConv1d(_DiffQConvNd, nn.Conv1d):
    """``nn.Conv1d`` whose weight is DiffQ-quantized. Input ``[N, C_in, L]``."""

    _float_cls = nn.Conv1d

    def __init__(self, *args, config: DiffQConfig | None = None, **kwargs):
        nn.Conv1d.__init__(self, *args, **kwargs)
        self._init_logits(config or DiffQConfig())


class DiffQConv2d(_DiffQConvNd, nn.Conv2d):
    """``nn.Conv2d`` whose weight is DiffQ-quantized. Input ``[N, C_in, H, W]``."""

    _float_cls = nn.Conv2d

    def __init__(self, *args, config: DiffQConfig | None = None, **kwargs):
        nn.Conv2d.__init__(self, *args, **kwargs)
        self._init_logits(config or DiffQConfig())


class DiffQEmbedding(_DiffQWeight, nn.Embedding):
    """``nn.Embedding`` whose table is DiffQ-quantized. Input int64 ``[*]`` → ``[*, dim]``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *args,
                 config: DiffQConfig | None = None, **kwargs):
        nn.Embedding.__init__(self, num_embeddings, embedding_dim, *args, **kwargs)
        self._init_logits(config or DiffQConfig())

    @classmethod
    def from_float(cls, layer: nn.Embedding, config: DiffQConfig | None = None) -> DiffQEmbedding:
        """A quantized copy of a plain embedding."""
        out = cls(layer.num_embeddings, layer.embedding_dim, layer.padding_idx, layer.max_norm,
                  layer.norm_type, layer.scale_grad_by_freq, layer.sparse, config=config,
                  device=layer.weight.device, dtype=layer.weight.dtype)
        _copy_params(layer, out)
        return out

    def to_float(self) -> nn.Embedding:
        """A plain ``nn.Embedding`` holding the quantized table."""
        out = nn.Embedding(self.num_embeddings, self.embedding_dim, self.padding_idx,
                           self.max_norm, self.norm_type, self.scale_grad_by_freq, self.sparse,
                           device=self.weight.device, dtype=self.weight.dtype)
        return _export_params(self, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.embedding(x, self.effective_weight(), self.padding_idx, self.max_norm,
                           self.norm_type, self.scale_grad_by_freq, self.sparse)


QUANTIZED_LAYERS = (DiffQLinear, DiffQConv1d, DiffQConv2d, DiffQEmbedding)


def _copy_params(src: nn.Module, dst: nn.Module) -> None:
    with torch.no_grad():
        dst.weight.copy_(src.weight)
        if getattr(src, "bias", None) is not None:
            dst.bias.copy_(src.bias)


def _export_params(src: _DiffQWeight, dst: nn.Module) -> nn.Module:
    with torch.no_grad():
        dst.weight.copy_(src.quantized_weight())
        if getattr(src, "bias", None) is not None:
            dst.bias.copy_(src.bias)
    return dst


def model_size(model: nn.Module, exact: bool = False) -> torch.Tensor:
    """Size in MB of a model built from DiffQ layers (other parameters at 32 bits each).

    Differentiable in the logits unless ``exact`` (widths rounded as stored).
    """
    total = torch.zeros(())
    counted = set()
    for module in model.modules():
        if isinstance(module, QUANTIZED_LAYERS):
            total = total.to(module.weight_diffq.device) + module.size_bits(exact)
            counted.update(id(p) for p in module.parameters(recurse=False))
    others = sum(p.numel() for p in model.parameters() if id(p) not in counted)
    return (total + 32 * others) / MEGABYTE_BITS


def quantize_model(model: nn.Module, config: DiffQConfig | None = None) -> nn.Module:
    """Replace, in place, every Linear/Conv1d/Conv2d/Embedding by its DiffQ layer."""
    pairs = {nn.Linear: DiffQLinear, nn.Conv1d: DiffQConv1d, nn.Conv2d: DiffQConv2d,
             nn.Embedding: DiffQEmbedding}
    for name, child in model.named_children():
        target = pairs.get(type(child))
        if target is not None:
            setattr(model, name, target.from_float(child, config))
        else:
            quantize_model(child, config)
    return model
