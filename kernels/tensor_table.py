"""The device table of a multi-tensor launch: where each tensor is and how it is cut.

One launch covers every quantized weight of a model (apex's ``multi_tensor_apply`` and
Triton's grouped-GEMM tutorial load pointers from a table the same way). Programs find their
work through two int64 tables built on the host once and cached while the parameters stay
where they are:

- ``rows``: ``[T, NCOLS]``, one row per tensor: its data pointer, its logits' pointer, its
  length and its group layout, and the offsets of its slots in the shared scratch buffers
  (range partials, backward partial sums, flat outputs of the tests' ``ξ``);
- a program map per kernel: entry ``p`` is ``t << 32 | j``, program ``p`` works on piece
  ``j`` of tensor ``t`` (a block of entries, a range span, a tile of groups or a chunk).

Pointers that change every call (outputs, incoming gradients) are passed in separate
``[T]`` tables built per call (:func:`pointer_table`).
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from dataclasses import dataclass
from functools import reduce
from operator import or_

import torch
import triton
import triton.language as tl

# Columns of ``rows``.
(W_PTR, L_PTR, N, W_OFF, L_OFF, N_GROUPS, GROUP_LEN, P_OFF, P_NUM, SPAN, B_OFF, B_NUM,
 XI_ID) = range(13)
NCOLS = 13
# The same columns as constants the kernels read them by.
(C_W_PTR, C_L_PTR, C_N, C_W_OFF, C_L_OFF, C_N_GROUPS, C_GROUP_LEN, C_P_OFF, C_P_NUM, C_SPAN,
 C_B_OFF, C_B_NUM, C_XI_ID) = (tl.constexpr(c) for c in range(NCOLS))
C_NCOLS = tl.constexpr(NCOLS)
# Tensors of at most 2^32 blocks and a table of at most 2^31 tensors: a map entry is
# ``t << 32 | j``.
_LOCAL_BITS = 32
# Bytes of a 128-bit vector access: the kernels' alignment hints need pointers aligned so.
ALIGNMENT = 16
# Tables kept per process (a model's training and eval layouts, a few models).
_CACHE_SIZE = 16
_DATA_PTR, _NUMEL = torch.Tensor.data_ptr, torch.Tensor.numel


@triton.jit
def program_piece(p_map, p_rows):
    """``(t, j, row)`` of this program: its tensor, the piece of it (map entry
    ``t << 32 | j``) and the address of the tensor's row in ``rows``."""
    code = tl.load(p_map + tl.program_id(0))
    t = code >> 32
    return t, code & 0xFFFFFFFF, p_rows + t * C_NCOLS


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


@dataclass(frozen=True)
class Blocks:
    """How the kernels of one launch cut the tensors (block sizes are the kernels')."""

    fwd: int  # entries per forward / eval program
    range_block: int  # entries per iteration of a range program
    max_partials: int  # range partials per tensor, at most (a power of two)
    tile: int  # entries per backward tile (whole groups of ≤ MAX_TILE_G)
    chunk: int  # entries per backward chunk (groups larger than MAX_TILE_G, or one group)
    max_tile_g: int


class TensorTable:
    """Layout of ``T`` tensors (same dtype, same device) for the multi-tensor kernels.

    Args:
        weights: the contiguous tensors, non-empty, in launch order.
        logits: ``[n_groups_t]`` per tensor (float, contiguous), or None (eval: no logits).
        group_size: entries per group, shared by all tensors (0: one group per tensor).
        blocks: the kernels' block sizes.
        stream_ids: per tensor, the index that keys its noise stream (default: its
            position); a launch over a subset of a step's tensors keeps their noise.

    Attributes:
        rows: int64 ``[T, NCOLS]`` on the tensors' device.
        range_map, fwd_map, bwd_map: int64 program maps (see the module docstring).
        numels, n_groups: per tensor, host ints. total: Σ numel; total_groups: Σ n_groups.
        partials: Σ range partials; bwd_parts: Σ backward partial sums.
        tiled: backward by tiles of whole groups (``1 ≤ group_size ≤ max_tile_g``), else
            by chunks.
        G: the group size the kernels see (0: one group per tensor).
        aligned: every weight is 16-byte aligned.
    """

    def __init__(self, weights: list[torch.Tensor], logits: list[torch.Tensor] | None,
                 group_size: int, blocks: Blocks, stream_ids: list[int] | None = None):
        device = weights[0].device
        self.blocks = blocks
        self.G = group_size
        self.tiled = 1 <= group_size <= blocks.max_tile_g
        self.numels = [w.numel() for w in weights]
        self.n_groups = [1 if group_size == 0 else cdiv(n, group_size) for n in self.numels]
        self.g_pad = next_pow2(group_size) if self.tiled else 0
        per_tile = blocks.tile // self.g_pad if self.tiled else 0
        rows = []
        range_map, fwd_map, bwd_map = [], [], []
        w_off = l_off = p_off = b_off = 0
        for t, (w, n, n_groups) in enumerate(zip(weights, self.numels, self.n_groups,
                                                  strict=True)):
            range_blocks = cdiv(n, blocks.range_block)
            p_num = min(next_pow2(range_blocks), blocks.max_partials)
            span = cdiv(range_blocks, p_num) * blocks.range_block
            group_len = n if group_size == 0 or n <= group_size else group_size
            if self.tiled:
                b_num = cdiv(n_groups, per_tile)  # one partial per tile
                bwd_local = range(b_num)
            else:
                b_num = cdiv(group_len, blocks.chunk)  # chunks per group
                bwd_local = range(n_groups * b_num)
            base = t << _LOCAL_BITS
            range_map += [base | j for j in range(p_num)]
            fwd_map += [base | j for j in range(cdiv(n, blocks.fwd))]
            bwd_map += [base | j for j in bwd_local]
            l_ptr = logits[t].data_ptr() if logits is not None else 0
            xi_id = t if stream_ids is None else stream_ids[t]
            rows.append([w.data_ptr(), l_ptr, n, w_off, l_off, n_groups, group_len, p_off,
                         p_num, span, b_off, b_num, xi_id])
            w_off += n
            l_off += n_groups
            p_off += p_num
            b_off += len(bwd_local) if not self.tiled else b_num
        self.aligned = all(row[W_PTR] % ALIGNMENT == 0 for row in rows)
        self.total, self.total_groups = w_off, l_off
        self.partials, self.bwd_parts = p_off, b_off
        self.rows = _device_ints(rows, device).view(len(weights), NCOLS)
        self.range_map = _device_ints(range_map, device)
        self.fwd_map = _device_ints(fwd_map, device)
        self.bwd_map = _device_ints(bwd_map, device)
        self.max_partials = next_pow2(max(row[P_NUM] for row in rows))
        self._group_bytes: dict[int, torch.Tensor] = {}  # group_pointers' offsets by item size

    def __len__(self) -> int:
        return len(self.numels)

    def group_pointers(self, flat: torch.Tensor) -> torch.Tensor:
        """int64 ``[T]``: where each tensor's groups start in ``flat``, a contiguous
        ``[total_groups]`` buffer in the table's group order (the ``L_OFF`` column). One op
        on the table's device: no host table to build and copy, as
        :func:`pointer_table` would for the pieces."""
        size = flat.element_size()
        offsets = self._group_bytes.get(size)
        if offsets is None:
            offsets = self._group_bytes[size] = self.rows[:, L_OFF] * size
        return offsets + flat.data_ptr()


def _device_ints(values: list, device: torch.device) -> torch.Tensor:
    host = torch.tensor(values, dtype=torch.int64).reshape(-1)
    return host.to(device) if device.type != "cpu" else host


def pointer_table(tensors: list[torch.Tensor], device: torch.device
                  ) -> tuple[torch.Tensor, bool]:
    """int64 ``[T]`` data pointers of ``tensors`` on ``device``, without a host sync, and
    whether every one is 16-byte aligned (the kernels then move 128 bits at a time).

    On CUDA the host copy is pinned, so the copy to the device is asynchronous (a pageable
    source would make the host wait for the stream).
    """
    # C-level loops (map, reduce) and an int64 array (torch.tensor reads a sequence of
    # Python ints ~4× slower): a step builds up to three such tables.
    pointers = array("q", map(_DATA_PTR, tensors))
    aligned = reduce(or_, pointers, 0) % ALIGNMENT == 0  # no pointer has a low bit set
    host = (torch.frombuffer(pointers, dtype=torch.int64) if pointers
            else torch.zeros(0, dtype=torch.int64))
    if device.type == "cpu":
        return host, aligned
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True), aligned


_TABLES: OrderedDict[tuple, TensorTable] = OrderedDict()


def table_for(weights: list[torch.Tensor], logits: list[torch.Tensor] | None,
              group_size: int, blocks: Blocks, stream_ids: list[int] | None = None
              ) -> TensorTable:
    """The cached :class:`TensorTable` of these tensors, rebuilt when a pointer, a length,
    the dtype or the layout changes (an optimizer's in-place step changes none)."""
    key = (tuple(map(_DATA_PTR, weights)), tuple(map(_NUMEL, weights)),
           None if logits is None else tuple(map(_DATA_PTR, logits)),
           weights[0].dtype, weights[0].device, group_size, blocks,
           None if stream_ids is None else tuple(stream_ids))
    table = _TABLES.get(key)
    if table is None:
        table = TensorTable(weights, logits, group_size, blocks, stream_ids)
        _TABLES[key] = table
        if len(_TABLES) > _CACHE_SIZE:
            _TABLES.popitem(last=False)
    else:
        _TABLES.move_to_end(key)
    return table
