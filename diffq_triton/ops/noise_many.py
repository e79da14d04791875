"""Autograd of the multi-tensor noise on the Triton backend: a constant step cost.

A quantizer's training forward calls :func:`diffq_triton.ops.pseudo_quantize_many` once
with all its weights, which comes here for the Triton backend outside ``torch.compile``:
2 launches forward and 2 backward for all weights of one dtype
(:mod:`diffq_triton.kernels.noise_many`), and a host cost that barely grows with the number
of tensors: one autograd node, device tables cached while the parameters stay in place.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _kernels():
    # Imported on first use: the library must import without Triton.
    from ..kernels import noise_many

    return noise_many


class SizeToken:
    """Marks the size output of one :class:`NoiseMany` call: ``used`` once its backward ran
    (its graph is then freed; a later size needs a fresh computation)."""

    used = False


def _kernels_size():
    from ..kernels import size_many

    return size_many


class NoiseMany(torch.autograd.Function):
    """Autograd of the Triton multi-tensor noise (eager mode: no custom-op dispatch).

    Outputs the noisy weights and, when ``size_config = (extra_bits, token, mb_plus)`` is
    given, the model size of the same tensors (2 more launches): in bits (one-entry
    float32), or with ``mb_plus`` not None in MB plus ``mb_plus`` (0-dim, the figure of
    ``bits / 2^23 + mb_plus``). Its gradient is then added to the logits' gradients inside
    the noise backward, so each logit receives one gradient per step instead of one from
    the noise and one from the size (a tensor addition each on the host).
    """

    @staticmethod
    def forward(ctx, config: tuple, size_config: tuple | None, seed: torch.Tensor,
                *tensors: torch.Tensor):
        group_size, min_bits, max_bits, param, noise = config[:5]
        streams = config[5] if len(config) > 5 else None
        count = len(tensors) // 2
        weights = [w.contiguous() for w in tensors[:count]]
        logits = [lg.contiguous() for lg in tensors[count:]]
        # One allocation per output: each noisy weight is freed as soon as its layer
        # no longer needs it, as with one op per tensor.
        outputs = [torch.empty_like(w) for w in weights]
        kernels = _kernels()
        # The layout (cached by the tensors' pointers): the backward of a step in which
        # every weight gets a gradient reuses it as it is.
        ctx.table = kernels.table_for(weights, logits, group_size, kernels.BLOCKS, streams)
        stats = kernels.noise_forward_many(weights, logits, outputs, seed, group_size,
                                           min_bits, max_bits, param, noise, table=ctx.table)
        # Attributes, not saved tensors: a backward that reaches only the size (its own
        # backward call, after or before the loss's) runs this node once more, which saved
        # tensors, freed by the first backward, would refuse. Both are small; the seed is
        # never written in place.
        ctx.seed, ctx.stats = seed, stats
        # The weights and logits themselves are parameters (no copy is kept): the backward
        # reads the logits and finds the cached table by the weights' pointers.
        ctx.weights, ctx.logits, ctx.config, ctx.size_config = weights, logits, config, size_config
        # A weight no loss reached gets no gradient (None), as with one op per tensor.
        ctx.set_materialize_grads(False)
        if size_config is None:
            return tuple(outputs)
        size = _kernels_size().sizes_forward(ctx.table, logits[0].dtype, size_config[0],
                                             min_bits, max_bits, param, exact=False,
                                             mb_plus=size_config[2])
        return (*outputs, size)

    @staticmethod
    @once_differentiable  # the kernels' gradients are not differentiable again
    def backward(ctx, *grads: torch.Tensor | None):
        seed, stats = ctx.seed, ctx.stats
        group_size, min_bits, max_bits, param, noise = ctx.config[:5]
        streams = ctx.config[5] if len(ctx.config) > 5 else None
        weights, logits = ctx.weights, ctx.logits
        count = len(weights)
        kernels = _kernels()
        table = ctx.table
        if streams is not None:
            # A module-wise call (FSDP2, checkpointing): the backward reads the logits through
            # the table's pointers, and FSDP2 frees a block's unsharded logits after its
            # forward and gathers them again before its backward, maybe elsewhere. The table
            # is found again by the pointers they have now (a whole-model call keeps its
            # own: its parameters do not move).
            table = kernels.table_for(weights, logits, group_size, kernels.BLOCKS, streams)
        extra = None
        if ctx.size_config is not None:
            ctx.size_config[1].used = True
            if grads[count] is not None:  # ∂L/∂l of the size term, every group of every tensor
                extra = _kernels_size().sizes_backward(table, grads[count].contiguous(),
                                                       logits[0].dtype, min_bits, max_bits,
                                                       param,
                                                       in_mb=ctx.size_config[2] is not None)
        grads = grads[:count]
        if all(g is not None for g in grads):  # every weight reached: the usual step
            some_grads = [g.contiguous() for g in grads]
            dws = [torch.empty_like(g) for g in some_grads]
            # Every logit's gradient in one flat buffer, in the table's group order: the
            # size term's own when there is one (the kernels add the noise term in place,
            # each entry read then written by the same program), else a fresh one. Its
            # pieces are the gradients: one call instead of one allocation per tensor
            # (host time per step; unsafe_split: no view bookkeeping, the pieces are only
            # handed to autograd).
            flat = extra if extra is not None else torch.empty(
                table.total_groups, dtype=logits[0].dtype, device=logits[0].device)
            dls = flat.unsafe_split_with_sizes(table.n_groups)
            if set(map(torch.Tensor.dim, logits)) != {1}:  # logits of another shape
                dls = [piece.view(lg.shape) for piece, lg in zip(dls, logits, strict=True)]
            kernels.noise_backward_many(table, some_grads, dws, flat, logits[0].dtype, seed,
                                        stats, min_bits, max_bits, param, noise, extra=extra)
            return (None, None, None, *dws, *dls)
        present = [t for t, g in enumerate(grads) if g is not None]
        grad_w: list[torch.Tensor | None] = [None] * count
        grad_l: list[torch.Tensor | None] = [None] * count
        if extra is not None:  # the size term alone where no noise gradient comes
            sizes = list(extra.split([lg.numel() for lg in logits]))
            grad_l = [part.view(lg.shape) for part, lg in zip(sizes, logits, strict=True)]
        if present:
            # A subset (some weight got no gradient): a table of its own, whose group
            # order differs from the size term's, added here.
            table = kernels.table_for(
                [weights[t] for t in present], [logits[t] for t in present], group_size,
                kernels.BLOCKS, present if streams is None else [streams[t] for t in present])
            some_grads = [grads[t].contiguous() for t in present]
            dws = [torch.empty_like(g) for g in some_grads]
            dls = [torch.empty_like(logits[t]) for t in present]
            kernels.noise_backward_many(table, some_grads, dws, dls, logits[0].dtype, seed,
                                        stats[present], min_bits, max_bits, param, noise)
            for t, dw, dl in zip(present, dws, dls, strict=True):
                grad_w[t] = dw
                grad_l[t] = dl if extra is None else dl + grad_l[t]
        return (None,  # config: Python values
                None,  # size_config: Python values
                None,  # seed: integer
                *grad_w, *grad_l)


# torch's Function.apply first hands every argument to functorch's unwrap_dead_wrappers (a
# Python pass over the 2T + 3 arguments: ~30 µs for a 62-tensor model, every step), which
# swaps in the tensor under a wrapper that a finished functorch transform left behind.
# The whole-model call passes the model's parameters and a seed drawn for it, never such
# wrappers: outside functorch transforms it calls the C++ apply directly, as
# Function.apply does after that pass; under a transform, torch's own path.
_C_APPLY = super(torch.autograd.Function, NoiseMany).apply


def apply_noise_many(*args: object) -> tuple:
    """``NoiseMany.apply(*args)`` for arguments that hold no functorch wrapper."""
    if torch._C._are_functorch_transforms_active():
        return NoiseMany.apply(*args)
    return _C_APPLY(*args)
