"""Bit packing and file save/load against diffq 0.2.4, side by side, on the CPU.

Three measurements, each row tagged with machine, versions and commit (bench/RESULTS.md):

1. fixed width (Uniform / LSQ tensors): ``bitpack.pack_levels`` / ``unpack_levels`` against
   diffq's Cython ``bitpack.pack`` / ``unpack`` on the same int16 levels, with a ceiling: a
   copy of the levels (read + write 2 bytes per entry);
2. mixed widths, group sizes 8 and 1 (DiffQuantizer): ours (levels + width fields) against diffq's
   own ``DiffQuantizer._bit_pack_param`` / ``_bit_unpack_param`` (Cython bitpack);
3. end to end, a model of 25M quantized weights (DiffQuantizer, group size 8):
   ``save_quantized`` + ``load_quantized`` (a file on disk) against diffq's
   ``get_quantized_state()`` + ``restore_quantized_state()`` (in memory), and our own
   ``get_quantized_state()`` + ``restore_quantized_state()`` against diffq's.

Each measurement runs with the native codec (``diffq_triton.codec.native``, the default when a C
compiler is present) and with the torch-only fallback (``DIFFQ_TRITON_NATIVE=0``): the
``codec`` column. Best of several runs; the end-to-end rows also give the first save + load
of the process (codec already built and cached on disk, memory not yet reused).
Run with ``python bench/bench_bitpack.py [millions of entries]`` or
``pytest bench/bench_bitpack.py`` (smaller sizes).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from diffq_triton import DiffQuantizer, serialization
from diffq_triton.codec import native
from diffq_triton.ops import bitpack

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results import record  # noqa: E402

try:
    import diffq
    from diffq import bitpack as diffq_bitpack
except ImportError:  # the comparison needs the original package
    diffq = diffq_bitpack = None


CODECS = ("native", "torch")


@contextmanager
def codec(name: str) -> Iterator[None]:
    """Run the block with the native codec (``"native"``) or the torch fallback."""
    before = os.environ.get("DIFFQ_TRITON_NATIVE")
    os.environ["DIFFQ_TRITON_NATIVE"] = "1" if name == "native" else "0"
    try:
        if name == "native" and native.library() is None:
            raise RuntimeError(f"native codec unavailable: {native.unavailable_reason()}")
        yield
    finally:
        if before is None:
            del os.environ["DIFFQ_TRITON_NATIVE"]
        else:
            os.environ["DIFFQ_TRITON_NATIVE"] = before


def best_of(fn, reps: int = 5) -> float:
    """Smallest wall time of ``reps`` calls, in seconds."""
    best = float("inf")
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def random_levels(numel: int, bits: torch.Tensor, group_size: int) -> torch.Tensor:
    per_entry = bits.to(torch.int64).repeat_interleave(group_size)[:numel] if group_size else (
        bits.to(torch.int64).expand(numel))
    top = (1 << per_entry) - 1
    return (torch.rand(numel, dtype=torch.float64) * (top + 1)).long().clamp(max=top).to(
        torch.int16)


def bench_fixed(numel: int, widths=(2, 3, 4, 8)) -> list[dict]:
    rows = []
    for width in widths:
        bits = torch.tensor([width], dtype=torch.uint8)
        levels = random_levels(numel, bits, 0)
        copy = torch.empty_like(levels)
        ceiling = best_of(lambda: copy.copy_(levels))  # noqa: B023
        packed = bitpack.pack_levels(levels, bits, 0)
        pack = best_of(lambda: bitpack.pack_levels(levels, bits, 0))  # noqa: B023
        unpack = best_of(lambda: bitpack.unpack_levels(packed, bits, 0, numel))  # noqa: B023
        row = {"case": f"fixed {width} bits", "entries (M)": numel / 1e6,
               "copy (M/s)": numel / ceiling / 1e6,
               "pack (M/s)": numel / pack / 1e6, "unpack (M/s)": numel / unpack / 1e6}
        if diffq_bitpack is not None:
            theirs = diffq_bitpack.pack(levels, width)
            dpack = best_of(lambda: diffq_bitpack.pack(levels, width))  # noqa: B023
            dunpack = best_of(lambda: diffq_bitpack.unpack(theirs, numel))  # noqa: B023
            row.update({"diffq pack (M/s)": numel / dpack / 1e6,
                        "diffq unpack (M/s)": numel / dunpack / 1e6,
                        "pack ×": dpack / pack, "unpack ×": dunpack / unpack})
        rows.append(row)
    return rows


def bench_mixed(numel: int, group_size: int = 8, min_bits: int = 2) -> list[dict]:
    numel -= numel % group_size
    n_groups = numel // group_size
    gen = torch.Generator().manual_seed(0)
    bits = torch.randint(min_bits, 9, (n_groups,), generator=gen).to(torch.uint8)
    levels = random_levels(numel, bits, group_size)

    def ours_pack():
        return bitpack.pack_levels(levels, bits, group_size), bitpack.pack_widths(bits, min_bits)

    (packed, (widths, field)) = ours_pack()

    def ours_unpack():
        return bitpack.unpack_levels(
            packed, bitpack.unpack_widths(widths, field, n_groups, min_bits), group_size, numel)

    pack, unpack = best_of(ours_pack, 3), best_of(ours_unpack, 3)
    row = {"case": f"mixed {min_bits}-8 bits, group {group_size}", "entries (M)": numel / 1e6,
           "pack (M/s)": numel / pack / 1e6, "unpack (M/s)": numel / unpack / 1e6}
    if diffq is not None:
        model = torch.nn.Linear(numel, 1, bias=False)
        quantizer = diffq.DiffQuantizer(model, group_size=group_size, min_size=0,
                                        min_bits=min_bits)
        qparam = quantizer._qparams[0]
        quantized = (levels.view(n_groups, group_size), (-1.0, 1.0), bits)
        theirs = quantizer._bit_pack_param(qparam, quantized, diffq_bitpack.pack)
        dpack = best_of(lambda: quantizer._bit_pack_param(qparam, quantized,
                                                          diffq_bitpack.pack), 3)
        dunpack = best_of(lambda: quantizer._bit_unpack_param(qparam, theirs,
                                                              diffq_bitpack.unpack), 3)
        quantizer.detach()
        row.update({"diffq pack (M/s)": numel / dpack / 1e6,
                    "diffq unpack (M/s)": numel / dunpack / 1e6,
                    "pack ×": dpack / pack, "unpack ×": dunpack / unpack})
    return [row]


def _model(dim: int, layers: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(*[torch.nn.Linear(dim, dim) for _ in range(layers)])


def _spread(model: torch.nn.Module) -> None:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("_diffq"):
                p.copy_(torch.rand(p.shape, generator=gen) * 4 - 3)  # widths ~3 to 11


def bench_end_to_end(numel: int, layers: int = 5) -> list[dict]:
    dim = int((numel / layers) ** 0.5)
    model = _model(dim, layers)
    quantizer = DiffQuantizer(model, group_size=8)
    _spread(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.safetensors"
        fresh = _model(dim, layers)
        start = time.perf_counter()
        serialization.save_quantized(quantizer, path)
        serialization.load_quantized(fresh, path)
        first = time.perf_counter() - start
        save = best_of(lambda: serialization.save_quantized(quantizer, path), 5)
        load = best_of(lambda: serialization.load_quantized(fresh, path), 5)
        size = path.stat().st_size
    # The diffq-compatible API on the same model: what a user who only changed the import runs.
    state = quantizer.get_quantized_state()
    get = best_of(quantizer.get_quantized_state, 5)
    restore = best_of(lambda: quantizer.restore_quantized_state(state), 5)
    row = {"case": f"save + load, {layers}×Linear({dim})", "weights (M)": layers * dim**2 / 1e6,
           "file (MB)": size / 2**20, "true size (MB)": quantizer.true_model_size(),
           "first save + load (s)": first, "save (s)": save, "load (s)": load,
           "get + restore (s)": get + restore}
    quantizer.detach()
    if diffq is not None:
        theirs_model = _model(dim, layers)
        theirs = diffq.DiffQuantizer(theirs_model, group_size=8)
        _spread(theirs_model)
        state = theirs.get_quantized_state()
        theirs_get = best_of(theirs.get_quantized_state, 5)
        theirs_restore = best_of(lambda: theirs.restore_quantized_state(state), 5)
        row.update({"diffq get (s)": theirs_get, "diffq restore (s)": theirs_restore,
                    "×": (theirs_get + theirs_restore) / (save + load),
                    "get + restore ×": (theirs_get + theirs_restore) / (get + restore)})
    return [row]


def run(millions: float = 16.0, e2e_millions: float = 25.0) -> None:
    numel = int(millions * 1e6)
    threads = torch.get_num_threads()
    note = (f"Best of 3-5 runs on the CPU, {threads} torch threads; M/s = million entries per "
            "second; × = diffq time / our time.")
    fixed, mixed, e2e = [], [], []
    for name in CODECS:
        with codec(name):
            fixed += [{"codec": name, **r} for r in bench_fixed(numel)]
            mixed += [{"codec": name, **r}
                      for r in bench_mixed(numel, 8) + bench_mixed(numel // 4, 1)]
            e2e += [{"codec": name, **r} for r in bench_end_to_end(int(e2e_millions * 1e6))]
    record("bitpack, fixed width, vs diffq 0.2.4 Cython bitpack", fixed, note)
    record("bitpack, mixed widths (DiffQuantizer layout) vs diffq 0.2.4", mixed, note)
    record("quantized model save + load vs diffq get_quantized_state + restore", e2e, note)


def test_bitpack_side_by_side():
    for name in CODECS:
        with codec(name):
            rows = bench_fixed(2_000_000, widths=(4,)) + bench_mixed(2_000_000)
            for row in rows:
                assert row["pack (M/s)"] > 0 and row["unpack (M/s)"] > 0
            e2e = bench_end_to_end(2_000_000, layers=2)
            assert e2e[0]["file (MB)"] <= e2e[0]["true size (MB)"] * 1.01 + 1 / 64


if __name__ == "__main__":
    run(*(float(a) for a in sys.argv[1:3]))
