"""Quantize and dequantize on the CPU in cache-sized chunks, bit-identical to the reference.

:func:`diffq_triton.ops.reference.quantize` / ``dequantize`` make several whole-tensor passes
with int64 temporaries; these run the same float32 operations in the same order on chunks
that stay in cache, on the threads of cpu_pool, so the results are identical and a 25M
weight model quantizes or dequantizes in a fraction of the time.
"""

from __future__ import annotations

from typing import Protocol

import torch

from . import bitpack_fixed
from .cpu_pool import cpu_threads, run_chunks


class RangedRecord(Protocol):
    """What a decode needs of a record (a ``QuantizedTensor`` of the file format)."""

    scheme: str  # "minmax" or "lsq"
    group_size: int
    mn: float  # the range's minimum, or the lsq step
    mx: float


def dequantize_cpu(levels: torch.Tensor, bits: torch.Tensor, qt: RangedRecord,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """``QuantizedTensor.dequantize`` on the CPU, chunk by chunk in cache, same bits.

    The float32 operations and their order are the reference's (``q·u(b)·(mx - mn) + mn``,
    ``u(b) = 1/(2^b - 1)``; ``q·step`` for lsq), so the values are identical.

    Args:
        levels: ``[numel]`` int16 levels (signed for lsq).
        bits: ``[n_groups]`` uint8 widths.
        qt: the record giving scheme, group size and range.
        out: optional contiguous float32 tensor of ``numel`` entries to write into.

    Returns:
        ``[numel]`` float32 (``out`` flattened when given).
    """
    numel = levels.numel()
    out = torch.empty(numel, dtype=torch.float32) if out is None else out.view(-1)
    group = qt.group_size if bits.numel() > 1 else 0
    unit = 1 / ((1 << bits.to(torch.int64)) - 1)
    mn = torch.tensor(qt.mn, dtype=torch.float32)
    span = torch.tensor(qt.mx, dtype=torch.float32) - mn
    step = torch.tensor(qt.mn, dtype=torch.float32)
    chunk = _chunk_size() if not group else max(group, _chunk_size() // group * group)

    def work(starts: list[int]) -> None:
        for start in starts:
            stop = min(start + chunk, numel)
            o = out[start:stop]
            o.copy_(levels[start:stop])
            if qt.scheme == "lsq":
                o.mul_(step)
                continue
            if group:
                full = (stop - start) // group * group
                first = start // group
                o[:full].view(-1, group).mul_(unit[first : first + full // group, None])
                if full < stop - start:
                    o[full:].mul_(unit[first + full // group])
            else:
                o.mul_(unit[0])
            o.mul_(span).add_(mn)

    with cpu_threads():
        run_chunks(numel, chunk, work)
    return out


def quantize_cpu(w: torch.Tensor, bits: torch.Tensor, group_size: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`reference.quantize` on the CPU, chunk by chunk in cache, same levels.

    The same float32 operations in the same order (``round(((w - mn)/r)/u(b))``), so the
    levels are identical to the reference's; a quantizer may call this for CPU weights.

    Args:
        w: weight, any shape, floating dtype, on the CPU.
        bits: ``[n_groups]`` integer widths in ``[1, 15]``.
        group_size: entries per group (0: one group).

    Returns:
        ``(levels, mn, mx)``: ``[numel]`` int16 and 0-dim float32 range.
    """
    flat = w.detach().reshape(-1)
    numel = flat.numel()
    out = torch.empty(numel, dtype=torch.int16)
    with cpu_threads():
        mn, mx = (v.float() for v in torch.aminmax(flat))
        scale = mx - mn
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        unit = 1 / ((1 << bits.reshape(-1).to(torch.int64)) - 1)
        group = group_size if unit.numel() > 1 else 0
        chunk = _chunk_size() if not group else max(group, _chunk_size() // group * group)

        def work(starts: list[int]) -> None:
            buf = torch.empty(chunk, dtype=torch.float32)
            for start in starts:
                stop = min(start + chunk, numel)
                t = buf[: stop - start]
                torch.sub(flat[start:stop], mn, out=t)
                t.div_(safe)
                if group:
                    full = (stop - start) // group * group
                    first = start // group
                    t[:full].view(-1, group).div_(unit[first : first + full // group, None])
                    if full < stop - start:
                        t[full:].div_(unit[first + full // group])
                else:
                    t.div_(unit[0])
                out[start:stop].copy_(t.round_())

        run_chunks(numel, chunk, work)
    return out, mn, mx


def _chunk_size() -> int:
    # Read at each call: tests shrink the chunk to cover its edges.
    return bitpack_fixed.CHUNK
