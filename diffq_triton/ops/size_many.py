"""Autograd of the multi-tensor model size on the Triton backend (3 launches per step).

:meth:`DiffQuantizer.model_size` comes here for the Triton backend outside
``torch.compile``: the size of every tensor is computed from its logits in 2 launches
(:mod:`diffq_triton.kernels.size_many`) and its gradient in 1, instead of a few dozen small
torch ops and one gradient per logit tensor through a concatenation.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable


def _kernels():
    # Imported on first use: the library must import without Triton.
    from ..kernels import noise_many, size_many

    return noise_many, size_many


class SizeMany(torch.autograd.Function):
    """``Σ_t size_t`` in bits (a one-entry float32 tensor) of the quantized tensors."""

    @staticmethod
    def forward(ctx, config: tuple, *tensors: torch.Tensor) -> torch.Tensor:
        group_size, extra_bits, min_bits, max_bits, param, exact = config
        count = len(tensors) // 2
        weights, logits = tensors[:count], [lg.contiguous() for lg in tensors[count:]]
        noise_many, size_many = _kernels()
        # The noise's table: the same tensors, so the same cached layout.
        table = noise_many.table_for([w.contiguous() for w in weights], logits, group_size,
                                     noise_many.BLOCKS)
        ctx.table, ctx.config = table, config
        ctx.logit_dtype = logits[0].dtype
        ctx.numels = [lg.numel() for lg in logits]
        ctx.shapes = [lg.shape for lg in logits]
        out = size_many.sizes_forward(table, logits[0].dtype, extra_bits, min_bits, max_bits,
                                      param, exact)
        if exact:  # rounded widths: no gradient, as the reference's detached rounding
            ctx.mark_non_differentiable(out)
        return out

    @staticmethod
    @once_differentiable  # the kernels' gradients are not differentiable again
    def backward(ctx, grad: torch.Tensor):
        group_size, extra_bits, min_bits, max_bits, param, exact = ctx.config
        count = len(ctx.numels)
        if exact:
            return (None, *([None] * (2 * count)))
        _, size_many = _kernels()
        flat = size_many.sizes_backward(ctx.table, grad.contiguous(), ctx.logit_dtype,
                                        min_bits, max_bits, param)
        grads = [g.view(shape) for g, shape in zip(flat.split(ctx.numels), ctx.shapes,
                                                    strict=True)]
        return (None,  # config: Python values
                *([None] * count),  # weights: the size does not depend on their values
                *grads)
