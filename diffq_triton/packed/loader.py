"""Loading a model with its quantized layers kept packed: ``load_quantized(..., packed=True)``.

The file is read and checked whole first (:func:`~diffq_triton.serialization.file_records.
read_checked`, every check of docs/format.md §4, the model untouched on failure). Then the
float parameters and buffers are written (into a model built on the ``meta`` device they are
made, one tensor at a time), quantized parameters that no packed layer can hold are decoded
to float as ``load_quantized`` does, and each quantized ``Linear``, ``Embedding``, ``Conv1d``,
``Conv2d`` and GPT-2 ``Conv1D`` is replaced by its packed layer (:mod:`.modules`) built from
the file's streams (:mod:`.layout`). No float copy of a packed weight is ever made.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass, field
from typing import BinaryIO

import torch
from torch import nn

from ..codec.cpu_pool import cpu_threads
from ..serialization import save_load
from ..serialization.file_records import Plan, read_checked
from .layout import PackedTensor
from .modules import PackedModule, packed_class

_Use = tuple[str, nn.Module, str]  # (module name, module, local tensor name)


@dataclass
class PackReport:
    """What :func:`load_quantized` with ``packed=True`` (or :func:`pack_model`) did.

    Attributes:
        packed: module name -> packed layer class name, for every name of a packed layer.
        float_params: quantized parameter name -> why it was loaded as float instead.
        packed_bytes: bytes of the packed weights' buffers (a tied weight counted once).
    """

    packed: dict[str, str] = field(default_factory=dict)
    float_params: dict[str, str] = field(default_factory=dict)
    packed_bytes: int = 0

    def __str__(self) -> str:
        text = (f"{len(self.packed)} packed layers ({self.packed_bytes / 2**20:.3f} MB); "
                f"{len(self.float_params)} quantized parameters loaded as float")
        return text + "".join(f"\n  {n}: {why}" for n, why in self.float_params.items())


def load_quantized(model: nn.Module, path: str | os.PathLike | BinaryIO | bytes,
                   packed: bool = False) -> PackReport | None:
    """Restore ``model`` from a file of :func:`~diffq_triton.save_quantized`.

    Args:
        model: the plain model the file was saved from (same architecture), with no
            quantizer. With ``packed=True`` it may be built on the ``meta`` device
            (``with torch.device("meta"): model = make_model()``): then no float weight is
            ever allocated for a packed layer, and the others are made from the file.
        path: file name, binary file object or bytes.
        packed: False (default): every weight is dequantized into its float parameter
            (:func:`diffq_triton.serialization.load_quantized`, unchanged). True: each
            quantized ``nn.Linear``, ``nn.Embedding``, ``nn.Conv1d``, ``nn.Conv2d`` (exact
            classes) and transformers' GPT-2 ``Conv1D`` (recognised by name and
            attributes) is replaced in ``model`` by a packed layer whose weight stays at its
            trained widths (docs/packed.md); tied weights share one packed tensor; other
            quantized parameters (RNNs, subclasses, ``Embedding(max_norm=...)``) load as
            float and are listed in the report and in a warning.

    Returns:
        None with ``packed=False``; a :class:`PackReport` with ``packed=True``.

    Raises:
        ValueError: the file is malformed, corrupted or does not match the model (the
            model is then unchanged); a ``meta`` model has non-persistent buffers, which
            no file holds.
    """
    if not isinstance(packed, bool):
        raise TypeError(f"packed must be a bool, got {type(packed).__name__}")
    if not packed:
        save_load.load_quantized(model, path)
        return None
    return _load_packed(model, path)


def pack_model(quantizer, model: nn.Module) -> PackReport:
    """Fill ``model`` with ``quantizer``'s quantized state, its layers packed, without a file
    on disk: what ``save_quantized`` then ``load_quantized(model, path, packed=True)`` give.

    Args:
        quantizer: a live :class:`~diffq_triton.DiffQuantizer`, ``UniformQuantizer`` or
            ``LSQ`` (its widths and weights as they are now).
        model: a plain model of the same architecture, not the quantizer's own (it holds
            the quantizer's parameters and hooks); may be built on the ``meta`` device.

    Returns:
        the :class:`PackReport`.
    """
    if model is getattr(quantizer, "model", None):
        raise ValueError("model must be a fresh model of the same architecture, not the "
                         "quantizer's own (build one, on the meta device to save memory)")
    # The file's bytes in memory (the quantized size), checked as a file would be.
    return _load_packed(model, save_load.file_bytes(quantizer))


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the storages of ``model``'s parameters and buffers, each storage once."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        storage = t.untyped_storage()
        if t.device.type != "meta" and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total += storage.nbytes()
    return total


# ============================================================================ loading
def _uses(model: nn.Module, kind: str) -> dict[int, list[_Use]]:
    """id of each parameter (``kind="_parameters"``) or buffer -> every place it is used."""
    out: dict[int, list[_Use]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for local, t in getattr(module, kind).items():
            if t is not None:
                out.setdefault(id(t), []).append((module_name, module, local))
    return out


def _full(use: _Use) -> str:
    return f"{use[0]}.{use[2]}" if use[0] else use[2]


def _why_float(uses: list[_Use], model: nn.Module) -> str | None:
    """Why a quantized parameter used at ``uses`` cannot be packed (None: it can)."""
    for _, module, local in uses:
        kind = type(module).__name__
        if module is model:
            return "the model itself is the layer (it cannot be replaced in place)"
        if packed_class(module) is None:
            return f"used by a {kind}, which has no packed layer"
        if local != "weight":
            return f"it is the {local!r} of a {kind}, not its weight"
    return None


def _refuse_meta_leftovers(model: nn.Module) -> None:
    for name, buf in model.named_buffers(remove_duplicate=False):
        if buf.device.type == "meta":
            owner, _, local = name.rpartition(".")
            module = model.get_submodule(owner)
            if local in module._non_persistent_buffers_set:
                raise ValueError(f"buffer {name!r} is on the meta device and not persistent: "
                                 "no file holds it; build the model on the CPU")


def _assign(target: torch.Tensor, value: torch.Tensor, uses: list[_Use], is_param: bool
            ) -> None:
    """Give ``target`` (a parameter or buffer) ``value``: in place, or, on the meta device,
    as a new tensor put at every use (tied uses stay one tensor)."""
    if target.device.type != "meta":
        target.copy_(value.to(target.device))
        return
    fresh = torch.empty(target.shape, dtype=target.dtype).copy_(value)  # never a file view
    if is_param:
        fresh = nn.Parameter(fresh, requires_grad=target.requires_grad)
    for _, module, local in uses:
        # setattr, not the dict: an RNN keeps its own list of its weights up to date.
        setattr(module, local, fresh)


def _decode_float(plan: Plan, param: torch.Tensor, uses: list[_Use]) -> None:
    """A quantized parameter kept float: decoded as ``load_quantized`` decodes it (one
    layer's float weight at a time)."""
    device = torch.device("cpu") if param.device.type == "meta" else param.device
    _assign(param, save_load.decode_plan(plan, device), uses, is_param=True)


def _parents(model: nn.Module) -> dict[int, list[tuple[nn.Module, str]]]:
    out: dict[int, list[tuple[nn.Module, str]]] = {}
    for _, parent in model.named_modules(remove_duplicate=False):
        for name, child in parent._modules.items():
            if child is not None:
                out.setdefault(id(child), []).append((parent, name))
    return out


def _pack_layers(model: nn.Module, to_pack: list[tuple[Plan, torch.Tensor]],
                 param_uses: dict[int, list[_Use]], report: PackReport) -> None:
    parents = _parents(model)
    replaced: dict[int, PackedModule] = {}
    for plan, param in to_pack:
        device = torch.device("cpu") if param.device.type == "meta" else param.device
        tensor = PackedTensor.from_record(plan.qt, param.dtype, device)
        report.packed_bytes += tensor.nbytes()
        for module_name, module, _ in param_uses[id(param)]:
            if id(module) not in replaced:
                layer = packed_class(module)(module, tensor)
                layer.train(module.training)
                # The float layer's hooks go on running around the packed one.
                for hooks in ("_forward_pre_hooks", "_forward_hooks",
                              "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                              "_forward_pre_hooks_with_kwargs"):
                    setattr(layer, hooks, getattr(module, hooks))
                replaced[id(module)] = layer
                for parent, name in parents[id(module)]:
                    parent._modules[name] = layer
            report.packed[module_name] = type(replaced[id(module)]).__name__


def _load_packed(model: nn.Module, source) -> PackReport:
    report = PackReport()
    with cpu_threads(), torch.no_grad():
        plans = read_checked(model, source)
        _refuse_meta_leftovers(model)
        param_uses, buffer_uses = _uses(model, "_parameters"), _uses(model, "_buffers")
        to_pack = []
        notable = []  # float weights worth a warning (a packed layer's bias is not one)
        # Floats first: a packed layer takes its module's bias as it is then.
        for plan in plans:
            for target in plan.params:
                if plan.buffer:
                    _assign(target, plan.floats, buffer_uses[id(target)], is_param=False)
                    continue
                uses = param_uses[id(target)]
                if plan.qt is None:
                    _assign(target, plan.floats, uses, is_param=True)
                    continue
                why = _why_float(uses, model)
                if why is None:
                    to_pack.append((plan, target))
                    continue
                _decode_float(plan, target, uses)
                for use in uses:
                    report.float_params[_full(use)] = why
                    if use[2] == "weight" or packed_class(use[1]) is None:
                        notable.append(_full(use))
        _pack_layers(model, to_pack, param_uses, report)
    if notable:
        warnings.warn(f"{len(notable)} quantized parameters loaded as float, not packed: "
                      f"{notable[:4]}{' ...' if len(notable) > 4 else ''} ({notable[0]}: "
                      f"{report.float_params[notable[0]]}); see the returned PackReport",
                      UserWarning, stacklevel=3)
    return report
