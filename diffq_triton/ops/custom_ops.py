"""The ``diffq_triton::`` operators: one torch.library op per step of the math.

Each op is registered for every device (its body launches the Triton kernels or runs the
eager path, as the ``backend`` argument says), with a fake implementation for tracing and,
for the noise, autograd through a backward op; ``torch.compile(fullgraph=True)`` sees each as
one node. The backend is an argument, chosen by :mod:`diffq_triton.ops.dispatch` when the op is
called (at trace time under ``torch.compile``), so the fake and the real implementation
always agree on the outputs' shapes.

Ops:
    ``pseudo_quantize(w, logits, seed, ...) -> (w_hat, stats, xi)``
    ``pseudo_quantize_backward(grad, logits, seed, stats, xi, ...) -> (grad_w, grad_logits)``
    ``fake_quantize(w, bits, group_size, backend) -> Tensor``
    ``pseudo_quantize_many(weights, logits, seed, ...) -> (w_hats, stats, xis)`` and its
    backward: every weight of a model in one op (what ``torch.compile`` sees of a step).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import eager as eager_ops


def _kernels():
    # Imported on first use: the library must import without Triton.
    from ..kernels import noise, quantize

    return noise, quantize


def _contiguous_like(t: Tensor) -> Tensor:
    # What every implementation returns, whatever the input's strides (a channels_last
    # weight included): the fakes must say the same to torch.compile.
    return torch.empty_like(t, memory_format=torch.contiguous_format)


def _many_kernels():
    from ..kernels import noise_many

    return noise_many


@torch.library.custom_op("diffq_triton::pseudo_quantize", mutates_args=())
def pseudo_quantize(
    w: Tensor, logits: Tensor, seed: Tensor, group_size: int, min_bits: float,
    max_bits: float, param: str, noise: str, backend: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """Noisy weight ``ŵ = w + r·u(b_s)·ξ``; ``ξ`` a function of ``seed`` (int64 ``[1]``).

    Returns ``(w_hat, stats, xi)``: ``w_hat`` like ``w``; ``stats`` float64 ``[4]``
    (min, max, argmin, argmax); ``xi`` the float32 ``[d]`` noise on the eager backend (kept
    for the backward), empty on the Triton backend (regenerated from ``seed``).
    """
    if backend == "triton":
        noise_k, _ = _kernels()
        w_hat, stats = noise_k.noise_forward(w.contiguous(), logits.contiguous(), seed,
                                             group_size, min_bits, max_bits, param, noise)
        return w_hat, stats, w.new_empty(0, dtype=torch.float32)
    return eager_ops.noise_forward(w, logits, seed, group_size, min_bits, max_bits, param,
                                   noise)


@pseudo_quantize.register_fake
def _(w, logits, seed, group_size, min_bits, max_bits, param, noise, backend):
    xi_len = 0 if backend == "triton" else w.numel()
    return (_contiguous_like(w), w.new_empty(4, dtype=torch.float64),
            w.new_empty(xi_len, dtype=torch.float32))


@torch.library.custom_op("diffq_triton::pseudo_quantize_backward", mutates_args=())
def pseudo_quantize_backward(
    grad: Tensor, logits: Tensor, seed: Tensor, stats: Tensor, xi: Tensor, group_size: int,
    min_bits: float, max_bits: float, param: str, noise: str, backend: str,
) -> tuple[Tensor, Tensor]:
    """``(∂L/∂w, ∂L/∂logits)`` from ``grad = ∂L/∂ŵ`` (see :func:`pseudo_quantize`)."""
    if backend == "triton":
        noise_k, _ = _kernels()
        return noise_k.noise_backward(grad.contiguous(), logits.contiguous(), seed, stats,
                                      group_size, min_bits, max_bits, param, noise)
    return eager_ops.noise_backward(grad, logits, stats, xi, group_size, min_bits, max_bits,
                                    param)


@pseudo_quantize_backward.register_fake
def _(grad, logits, seed, stats, xi, group_size, min_bits, max_bits, param, noise, backend):
    return _contiguous_like(grad), _contiguous_like(logits)


def _setup_context(ctx, inputs, output):
    _, logits, seed, group_size, min_bits, max_bits, param, noise, backend = inputs
    _, stats, xi = output
    ctx.save_for_backward(logits, seed, stats, xi)
    ctx.config = (group_size, min_bits, max_bits, param, noise, backend)
    ctx.mark_non_differentiable(stats, xi)
    # stats and xi never get a gradient: do not fill a weight-sized zero tensor for xi.
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_w_hat, grad_stats, grad_xi):
    logits, seed, stats, xi = ctx.saved_tensors
    grad_w, grad_l = pseudo_quantize_backward(grad_w_hat.contiguous(), logits, seed, stats, xi,
                                              *ctx.config)
    return (grad_w, grad_l,
            None,  # seed: integer
            None, None, None,  # group_size, min_bits, max_bits: configuration
            None, None, None)  # param, noise, backend: strings


pseudo_quantize.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("diffq_triton::fake_quantize", mutates_args=())
def fake_quantize(w: Tensor, bits: Tensor, group_size: int, backend: str) -> Tensor:
    """Eval weight: quantized with per-group integer ``bits`` then dequantized, like ``w``."""
    if backend == "triton":
        _, quantize_k = _kernels()
        return quantize_k.fake_quantize(w.contiguous(), bits.contiguous(), group_size)
    return eager_ops.fake_quantize(w, bits, group_size)


@fake_quantize.register_fake
def _(w, bits, group_size, backend):
    return _contiguous_like(w)


# ----------------------------------------------------------------------------- many tensors
# Seeds of the eager path, one per tensor: the step's seed in the low bits, the tensor's
# position above them (seeds are drawn below 2^31).
_EAGER_SEED_STRIDE = 1 << 32


@torch.library.custom_op("diffq_triton::pseudo_quantize_many", mutates_args=())
def pseudo_quantize_many(
    weights: list[Tensor], logits: list[Tensor], seed: Tensor, group_size: int,
    min_bits: float, max_bits: float, param: str, noise: str, backend: str,
) -> tuple[list[Tensor], Tensor, list[Tensor]]:
    """:func:`pseudo_quantize` of ``T`` weights with one seed: ``(w_hats, stats, xis)``.

    ``stats`` is float64 ``[T, 4]``; ``xis[t]`` the eager path's ``ξ`` of weight ``t``
    (empty on the Triton backend). Weights are non-empty, of one dtype and device.
    """
    if backend == "triton":
        outputs = [torch.empty_like(w, memory_format=torch.contiguous_format) for w in weights]
        stats = _many_kernels().noise_forward_many(
            [w.contiguous() for w in weights], [lg.contiguous() for lg in logits], outputs,
            seed, group_size, min_bits, max_bits, param, noise)
        return outputs, stats, [w.new_empty(0, dtype=torch.float32) for w in weights]
    results = [eager_ops.noise_forward(w, lg, seed + t * _EAGER_SEED_STRIDE, group_size,
                                       min_bits, max_bits, param, noise)
               for t, (w, lg) in enumerate(zip(weights, logits, strict=True))]
    return ([r[0] for r in results], torch.stack([r[1] for r in results]),
            [r[2] for r in results])


@pseudo_quantize_many.register_fake
def _(weights, logits, seed, group_size, min_bits, max_bits, param, noise, backend):
    stats = weights[0].new_empty((len(weights), 4), dtype=torch.float64)
    xis = [w.new_empty(w.numel() if backend == "eager" else 0, dtype=torch.float32)
           for w in weights]
    return [_contiguous_like(w) for w in weights], stats, xis


@torch.library.custom_op("diffq_triton::pseudo_quantize_many_backward", mutates_args=())
def pseudo_quantize_many_backward(
    grads: list[Tensor], weights: list[Tensor], logits: list[Tensor], seed: Tensor,
    stats: Tensor, xis: list[Tensor], group_size: int, min_bits: float, max_bits: float,
    param: str, noise: str, backend: str,
) -> tuple[list[Tensor], list[Tensor]]:
    """``(∂L/∂w, ∂L/∂logits)`` per weight from ``grads = ∂L/∂ŵ`` (see
    :func:`pseudo_quantize_many`)."""
    if backend == "triton":
        kernels = _many_kernels()
        logits = [lg.contiguous() for lg in logits]
        table = kernels.table_for([w.contiguous() for w in weights], logits, group_size,
                                  kernels.BLOCKS)
        grads = [g.contiguous() for g in grads]
        grad_w = [torch.empty_like(g) for g in grads]
        grad_l = [torch.empty_like(lg) for lg in logits]
        kernels.noise_backward_many(table, grads, grad_w, grad_l, logits[0].dtype, seed,
                                    stats, min_bits, max_bits, param, noise)
        return grad_w, grad_l
    results = [eager_ops.noise_backward(g, lg, stats[t], xi, group_size, min_bits, max_bits,
                                        param)
               for t, (g, lg, xi) in enumerate(zip(grads, logits, xis, strict=True))]
    return [r[0] for r in results], [r[1] for r in results]


@pseudo_quantize_many_backward.register_fake
def _(grads, weights, logits, seed, stats, xis, group_size, min_bits, max_bits, param, noise,
      backend):
    return [_contiguous_like(g) for g in grads], [_contiguous_like(lg) for lg in logits]


def _setup_many_context(ctx, inputs, output):
    weights, logits, seed, group_size, min_bits, max_bits, param, noise, backend = inputs
    _, stats, xis = output
    ctx.save_for_backward(seed, stats, *weights, *logits, *xis)
    ctx.count = len(weights)
    ctx.config = (group_size, min_bits, max_bits, param, noise, backend)
    ctx.mark_non_differentiable(stats, *xis)


def _many_backward(ctx, grad_w_hats, grad_stats, grad_xis):
    seed, stats, *saved = ctx.saved_tensors
    n = ctx.count
    weights, logits, xis = saved[:n], saved[n:2 * n], saved[2 * n:]
    grad_w, grad_l = pseudo_quantize_many_backward(
        [g.contiguous() for g in grad_w_hats], weights, logits, seed, stats, xis, *ctx.config)
    return (grad_w, grad_l,
            None,  # seed: integer
            None, None, None,  # group_size, min_bits, max_bits: configuration
            None, None, None)  # param, noise, backend: strings


pseudo_quantize_many.register_autograd(_many_backward, setup_context=_setup_many_context)
