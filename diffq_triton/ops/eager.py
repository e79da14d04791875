"""Lean eager (PyTorch) implementations behind the custom ops, for CPUs and as a fallback.

Same math as :mod:`diffq_triton.ops.reference` (the oracle), laid out to touch each weight-sized
tensor as few times as possible: a training step draws ``ξ`` once, keeps it for the
backward (4 bytes per entry; diffq 0.2.4 keeps 9.2) and never expands per-group values to
per-entry tensors when the group size divides the tensor.
"""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from ..codec.cpu_pool import ForkSafePool
from . import reference

# ξ is drawn in fixed chunks, each from its own generator seeded by (seed, chunk), so the
# values depend on the seed only; chunks run on a thread pool (torch's normal_ is serial).
NOISE_CHUNK = 1 << 18


class _BufferPool:
    """Weight-sized CPU buffers reused across training steps.

    Every step needs fresh weight-sized tensors (ξ, ŵ, ∂L/∂w) that die before the next
    step; on a CPU each new one costs as much in page faults as the arithmetic that fills
    it. A buffer is handed out again once nothing but the pool references its storage
    (callers get a view, so their references count). Holds at most what one step needed at
    its peak; :func:`clear_buffers` frees it.
    """

    def __init__(self) -> None:
        self._free: dict[tuple[int, torch.dtype], list[torch.Tensor]] = {}
        self._lock = threading.Lock()

    def take(self, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """An uninitialised ``[numel]`` tensor of ``dtype`` on ``device``."""
        if device.type != "cpu" or numel < _POOL_MIN:
            return torch.empty(numel, dtype=dtype, device=device)
        with self._lock:
            bufs = self._free.setdefault((numel, dtype), [])
            for buf in bufs:
                # 2: the pool's tensor and the temporary storage object of this call.
                if torch._C._storage_Use_Count(buf.untyped_storage()._cdata) == 2:
                    return buf.view(numel)
            buf = torch.empty(numel, dtype=dtype, device=device)
            bufs.append(buf)
            return buf.view(numel)

    def clear(self) -> None:
        with self._lock:
            self._free.clear()


# Tensors smaller than this come from malloc's own free lists anyway (no page faults).
_POOL_MIN = 1 << 15
_BUFFERS = _BufferPool()


def clear_buffers() -> None:
    """Free the CPU buffers the eager path keeps for reuse between training steps."""
    _BUFFERS.clear()


_POOL = ForkSafePool(lambda: max(1, torch.get_num_threads()), "diffq_triton_noise")


def _pool() -> ThreadPoolExecutor:
    return _POOL.get()


def _fill_chunk(out: torch.Tensor, seed: int, index: int, noise: str) -> None:
    gen = torch.Generator(device=out.device)
    gen.manual_seed((seed * 1_000_003 + index) & 0x7FFF_FFFF_FFFF_FFFF)
    if noise == "gaussian":
        out.normal_(0.0, 0.5, generator=gen)
    else:
        out.uniform_(-0.5, 0.5, generator=gen)


def draw_noise(numel: int, seed: int, noise: str, device: torch.device) -> torch.Tensor:
    """``[numel]`` float32 ``ξ`` (``N(0,1)/2`` or ``U[-1/2, 1/2)``), a function of ``seed``.

    Args:
        numel: entries.
        seed: integer seed.
        noise: ``"gaussian"`` or ``"uniform"``.
        device: where to draw.
    """
    out = _BUFFERS.take(numel, torch.float32, device)
    chunks = [out[i:i + NOISE_CHUNK] for i in range(0, numel, NOISE_CHUNK)]
    if len(chunks) > 1 and device.type == "cpu" and torch.get_num_threads() > 1:
        futures = [_pool().submit(_fill_chunk, c, seed, i, noise) for i, c in enumerate(chunks)]
        for f in futures:
            f.result()
    else:
        for i, c in enumerate(chunks):
            _fill_chunk(c, seed, i, noise)
    return out


# Rows of this many entries for the range: per-row max/min are vectorised reductions (an
# order of magnitude faster than torch's max(dim) with indices), then one row is searched.
_ROW = 1024


def _extremes(flat: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``(min, max, argmin, argmax)`` of a 1-D tensor as 0-dim tensors, first index on ties."""
    n = flat.numel()
    rows = n // _ROW
    if rows < 2:
        mn, imn = flat.min(0)
        mx, imx = flat.max(0)
        return mn, mx, imn, imx
    body = flat[: rows * _ROW].view(rows, _ROW)
    r_mx = body.amax(1).argmax()  # first row holding the maximum
    r_mn = body.amin(1).argmin()
    imx = r_mx * _ROW + body[r_mx].argmax()
    imn = r_mn * _ROW + body[r_mn].argmin()
    if rows * _ROW < n:
        tail = flat[rows * _ROW:]
        t_mx, t_imx = tail.max(0)
        t_mn, t_imn = tail.min(0)
        # Strict comparisons: on a tie the earlier entry (in the body) stays.
        imx = torch.where(t_mx > flat[imx], rows * _ROW + t_imx, imx)
        imn = torch.where(t_mn < flat[imn], rows * _ROW + t_imn, imn)
    return flat[imn], flat[imx], imn, imx


def _unit_and_slope(
    logits: torch.Tensor, min_bits: float, max_bits: float, param: str, slope: bool = True
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``u(b(l))`` and (if ``slope``) ``du/dl`` per group, float32.

    Formulas as in kernels/common.py; with ``p = 2^b``, ``p·u = 1 + u`` shortens the slope
    of ``param="bits"`` to ``-ln2·(max - min)·u·(1 + u)·σ(1-σ)``. In-place chains: these
    run on every group at every step.
    """
    t = torch.sigmoid(logits.float())
    if param == "noise":
        lo = math.log(1 / (2**max_bits - 1))
        hi = math.log(1 / (2**min_bits - 1))
        u = (t * (lo - hi)).add_(hi).exp_()
        if not slope:
            return u, None
        return u, u * (lo - hi) * t * (1 - t)
    u = (t * (max_bits - min_bits)).add_(min_bits).exp2_().sub_(1).reciprocal_()
    if not slope:
        return u, None
    du = (1 - t).mul_(t).mul_(u).mul_(u + 1).mul_(-math.log(2) * (max_bits - min_bits))
    return u, du


def _per_entry(values: torch.Tensor, numel: int, group_size: int) -> torch.Tensor:
    """Per-group values broadcastable against the weight as laid out by :func:`_grouped`."""
    if group_size == 0 or group_size >= numel:
        return values.reshape(1, 1)
    if group_size == 1:
        return values.reshape(1, -1)
    if numel % group_size == 0:
        return values[:, None]
    return reference.expand_groups(values, numel, group_size)


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """``x`` flat, viewed as ``[n_groups, g]`` when ``g`` divides it, as one row ``[1, d]``
    for ``g = 1`` or one group (a column of size one broadcasts slowly), else flat."""
    flat = x.reshape(-1)
    n = flat.numel()
    if group_size == 0 or group_size >= n:
        return flat[None, :]
    if group_size == 1:
        return flat[None, :]  # one row: per-group values broadcast as a row too
    if n % group_size == 0:
        return flat.view(-1, group_size)
    return flat


def noise_forward(
    w: torch.Tensor,
    logits: torch.Tensor,
    seed: torch.Tensor,
    group_size: int,
    min_bits: float,
    max_bits: float,
    param: str,
    noise: str,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eager ``ŵ = w + r·u(b_s)·ξ``.

    Returns:
        ``(w_hat, stats, xi)``: ``w_hat`` of ``w``'s shape and dtype; ``stats`` float64
        ``[4]`` = (min, max, argmin, argmax); ``xi`` the ``[d]`` float32 noise drawn.
    """
    flat = w.reshape(-1)
    n = flat.numel()
    xi = draw_noise(n, int(seed.reshape(-1)[0]), noise, w.device)
    if n == 0:
        return w.clone(), torch.zeros(4, dtype=torch.float64, device=w.device), xi
    mn, mx, imn, imx = _extremes(flat)
    stats = torch.stack([mn.double(), mx.double(), imn.double(), imx.double()])
    u, _ = _unit_and_slope(logits, min_bits, max_bits, param, slope=False)
    scale = (mx.float() - mn.float()) * u
    grouped = _grouped(xi, group_size)
    if w.dtype == torch.float32:
        base = _grouped(flat, group_size)
        out = _BUFFERS.take(n, w.dtype, w.device).view(base.shape)
        torch.addcmul(base, grouped, _per_entry(scale, n, group_size), out=out)
    else:
        out = (_grouped(flat, group_size).float() + grouped * _per_entry(scale, n, group_size))
    return out.to(w.dtype).view(w.shape), stats, xi


def noise_backward(
    grad: torch.Tensor,
    logits: torch.Tensor,
    stats: torch.Tensor,
    xi: torch.Tensor,
    group_size: int,
    min_bits: float,
    max_bits: float,
    param: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager backward of :func:`noise_forward`: ``(∂L/∂w, ∂L/∂l)``.

    ``S_s = Σ_{i∈s} g_i ξ_i``, ``∂L/∂l_s = r·S_s·du_s/dl_s``, ``∂L/∂r = Σ_s u_s S_s``,
    ``∂L/∂w = g + ∂L/∂r·(e_argmax - e_argmin)``.
    """
    n = grad.numel()
    if n == 0:
        return grad.clone(), torch.zeros_like(logits)
    u, du = _unit_and_slope(logits, min_bits, max_bits, param)
    g_grouped = _grouped(grad, group_size)
    prod = _BUFFERS.take(n, torch.float32, grad.device).view(g_grouped.shape)
    torch.mul(g_grouped, _grouped(xi, group_size), out=prod)
    per_entry = group_size == 1 and n > 1
    if per_entry:
        sums = prod.reshape(-1)
    elif prod.dim() == 2:
        # A matrix-vector product sums rows of a few entries far faster than sum(1).
        sums = prod.mv(torch.ones(prod.shape[1], dtype=prod.dtype, device=prod.device))
    else:
        ids = torch.arange(n, device=grad.device) // group_size
        sums = torch.zeros(u.numel(), device=grad.device).index_add_(0, ids, prod)
    if grad.dtype == torch.float32 and not per_entry:
        # The product is no longer needed: its buffer becomes ∂L/∂w (a fresh weight-sized
        # buffer costs about as much in page faults as the copy itself).
        grad_w = prod.view(grad.shape).copy_(grad)
    else:
        grad_w = grad.clone()
    r = (stats[1] - stats[0]).float()
    grad_l = (r * sums * du).to(logits.dtype)
    dr = (u * sums).sum()
    imn, imx = stats[2].long(), stats[3].long()
    flat = grad_w.view(-1)
    # Same entry for both (constant tensor): the two range terms cancel.
    delta = torch.where(imn == imx, torch.zeros_like(dr), dr)
    ends = torch.stack([imx, imn])
    # Added in float32 and rounded once, as the kernel does (16-bit dtypes).
    flat[ends] = (flat[ends].float() + torch.stack([delta, -delta])).to(grad.dtype)
    return grad_w, grad_l


def fake_quantize(w: torch.Tensor, bits_int: torch.Tensor, group_size: int) -> torch.Tensor:
    """Eager eval quantize → dequantize (the reference itself)."""
    return reference.fake_quantize(w, bits_int, group_size)
