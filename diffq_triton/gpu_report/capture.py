"""Capture of kernel launches for the GPU report: what every launcher would launch.

The launchers of ``diffq_triton.kernels`` run on CPU tensors while ``JITFunction.run`` and
``Autotuner.run`` are replaced by recorders; :func:`capture_launches` runs the workloads (calls
that reach every kernel and its variants) and returns the recorded launches (:class:`Launch`),
and the modelled traffic of the packed kernels' workloads (:mod:`.packed_workloads`).
:func:`discover_kernels` lists the kernels that exist, so uncovered ones can be reported.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import pkgutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .packed_workloads import TrafficModel, packed_workloads

# 2^21 entries: 1024 blocks of 2048, so the range reduction runs with its largest partial
# count (P = 1024), the register-heaviest case of the consumers of the range.
N_LARGE = 1 << 21
DTYPE_NAMES = ("float32", "bfloat16", "float16")


@dataclass
class Launch:
    """One captured kernel launch: the JIT function, its arguments and launch options."""

    fn: Any
    args: tuple
    kwargs: dict
    label: str


@dataclass
class Capture:
    """Launches recorded while the launchers ran, and the configs kept per autotuner."""

    quick: bool
    label: str = ""
    launches: list[Launch] = field(default_factory=list)


def _configs(tuner: Any, quick: bool, args: tuple = (), kwargs: dict | None = None) -> list:
    """The autotune configs to compile, after the tuner's own ``early_config_prune`` (the
    ones it would benchmark for these arguments); ``quick`` keeps the first config per warp
    count."""
    configs = list(tuner.configs)
    if getattr(tuner, "early_config_prune", None) is not None:
        configs = tuner.early_config_prune(configs, dict(zip(tuner.arg_names, args, strict=False)),
                                           **(kwargs or {}))
    if not quick:
        return configs
    seen: dict[int, Any] = {}
    for cfg in configs:
        seen.setdefault(cfg.num_warps, cfg)
    return list(seen.values())


@contextlib.contextmanager
def capturing(quick: bool) -> Iterator[Capture]:
    """Replace kernel launches by recorders for the duration of the block.

    Autotuned kernels record one launch per config (what the autotuner would benchmark);
    heuristics wrappers run unchanged and reach the recorder through ``JITFunction.run``.
    """
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction

    cap = Capture(quick)
    saved = JITFunction.run, Autotuner.run

    def jit_run(self, *args, grid, warmup, **kwargs):
        cap.launches.append(Launch(self, args, kwargs, cap.label))

    def tuner_run(self, *args, **kwargs):
        kwargs.pop("warmup", None)
        grid = kwargs.pop("grid", None)
        for cfg in _configs(self, cap.quick, args, kwargs):
            self.fn.run(*args, grid=grid, warmup=False, **kwargs, **cfg.all_kwargs())

    JITFunction.run, Autotuner.run = jit_run, tuner_run
    try:
        yield cap
    finally:
        JITFunction.run, Autotuner.run = saved


# --- Workloads: calls of the launchers that reach every kernel and its variants ---------------
#
# Group sizes cover the variant classes of the issue: one group (0), g = 1, powers of two
# (tiles reduced in registers; 1024 is the largest tile), another g (padded rows), and groups
# larger than a tile (chunked backward).

def _workloads(quick: bool) -> list[tuple[str, Callable[[], TrafficModel | None]]]:
    """``(label, thunk)`` pairs; each thunk calls one launcher on CPU tensors."""
    import torch

    from ..kernels import bitpack, noise, noise_many, quantize, size_many

    seed = torch.zeros(1, dtype=torch.int64)
    stats = torch.zeros(4, dtype=torch.float64)
    fwd_groups = (0, 1, 8, 100)
    bwd_groups = (0, 1, 8, 100, 1024, 4096)
    flags = [("bits", "gaussian"), ("bits", "uniform"), ("noise", "gaussian"),
             ("noise", "uniform")]
    # Quick: every group class in float32, bfloat16 (the 16-bit type whose store rounds by
    # hand) at one group size, default flags. Full: every dtype at every group class.
    plan: list[tuple[str, int, str, str, int]] = []
    for name in DTYPE_NAMES:
        if quick and name == "float16":
            continue
        every = not quick or name == "float32"
        for g in (fwd_groups if every else (8,)):
            plan.append(("fwd", g, name, "bits/gaussian", N_LARGE))
            plan.append(("quant", g, name, "", N_LARGE))
        for g in (bwd_groups if every else (8,)):
            if not (quick and g == 4096):  # same chunked kernel as g = 0
                plan.append(("bwd", g, name, "bits/gaussian", N_LARGE))
    if not quick:
        for p, z in flags[1:]:
            plan.append(("fwd", 8, "float32", f"{p}/{z}", N_LARGE))
            plan.append(("bwd", 8, "float32", f"{p}/{z}", N_LARGE))
            plan.append(("bwd", 0, "float32", f"{p}/{z}", N_LARGE))
        # A length not divisible by 16 loses the divisibility hint: shows its cost.
        plan.append(("fwd", 8, "float32", "bits/gaussian", N_LARGE + 3))
        plan.append(("quant", 8, "float32", "", N_LARGE + 3))
        # Small tensors: few range partials (P = 2).
        plan.append(("fwd", 8, "float32", "bits/gaussian", 4096))

    def launch(op: str, g: int, name: str, pz: str, n: int) -> None:
        # Tensors are made when the workload runs, so only one set is alive at a time.
        n_groups = 1 if g == 0 else -(-n // g)
        w = torch.empty(n, dtype=getattr(torch, name))
        if op == "quant":
            quantize.fake_quantize(w, torch.full((n_groups,), 4, dtype=torch.uint8), g)
            return
        param, kind = pz.split("/")
        logits = torch.zeros(n_groups)
        if op == "fwd":
            noise.noise_forward(w, logits, seed, g, 2.0, 15.0, param, kind)
        else:
            noise.noise_backward(w, logits, seed, stats, g, 2.0, 15.0, param, kind)

    def launch_many(op: str, g: int, name: str, pz: str) -> None:
        # Three tensors in one launch: two large ones, one of a length not divisible by 16.
        sizes = (N_LARGE, N_LARGE // 2, 4099)
        weights = [torch.empty(n, dtype=getattr(torch, name)) for n in sizes]
        logits = [torch.zeros(1 if g == 0 else -(-n // g)) for n in sizes]
        param, kind = pz.split("/")
        if op == "size_many":
            table = noise_many.table_for(weights, logits, g, noise_many.BLOCKS)
            for exact in (False, True):
                size_many.sizes_forward(table, logits[0].dtype, 0.0, 2.0, 15.0, pz.split("/")[0],
                                        exact)
            size_many.sizes_backward(table, seed.float(), logits[0].dtype, 2.0, 15.0,
                                     pz.split("/")[0])
            return
        if op == "quant_many":
            bits = [torch.full((lg.numel(),), 4, dtype=torch.uint8) for lg in logits]
            quantize.fake_quantize_many(weights, bits, weights, g)
            return
        if op == "fwd_many":
            noise_many.noise_forward_many(weights, logits, weights, seed, g, 2.0, 15.0, param,
                                          kind)
            return
        table = noise_many.table_for(weights, logits, g, noise_many.BLOCKS)
        # With the size penalty's gradient joined in (the fused step), as a training step.
        extra = torch.zeros(table.total_groups)
        noise_many.noise_backward_many(table, weights, weights, logits, logits[0].dtype, seed,
                                       torch.zeros((3, 4), dtype=torch.float64), 2.0, 15.0,
                                       param, kind, extra=extra)

    def pack(g: int, n: int) -> None:
        bits = torch.full((-(-n // g),), 4, dtype=torch.uint8)
        bitpack.pack(torch.zeros(n, dtype=torch.int16), bits, g)
        bitpack.unpack(torch.zeros(n // 2, dtype=torch.uint8), bits, g, n)

    out: list[tuple[str, Callable[[], TrafficModel | None]]] = [
        (f"{op} {name} g={g} n={n}" + (f" {pz}" if pz else ""),
         functools.partial(launch, op, g, name, pz, n))
        for op, g, name, pz, n in plan
    ]
    # The multi-tensor kernels: tiles (8, 100: padded rows) and chunks (0, 4096).
    many = [("fwd_many", 8, "float32"), ("bwd_many", 8, "float32"), ("bwd_many", 0, "float32"),
            ("fwd_many", 8, "bfloat16"), ("bwd_many", 8, "bfloat16"), ("quant_many", 8, "float32"),
            ("quant_many", 0, "bfloat16"), ("size_many", 8, "float32")]
    if not quick:
        many += [(op, g, name) for name in DTYPE_NAMES
                 for op in ("fwd_many", "bwd_many", "quant_many")
                 for g in (0, 1, 100, 1024, 4096)]
    for op, g, name in many:
        out.append((f"{op} {name} g={g}",
                    functools.partial(launch_many, op, g, name, "bits/gaussian")))
    # In the quick set too: the interpreter runs what the compiler refuses (a global read
    # as a plain float on this branch only, once), so only a compile shows it.
    out.append(("size_many float32 g=8 noise",
                functools.partial(launch_many, "size_many", 8, "float32", "noise/gaussian")))
    # group_size is a runtime argument of the bitpack kernels: 64 carries a divisibility hint.
    for g in (8,) if quick else (8, 64, 100):
        out.append((f"pack/unpack g={g} n=65536", functools.partial(pack, g, 1 << 16)))
    out += packed_workloads(quick)
    return out


def _named(launch: Launch) -> dict:
    """A launch's arguments by parameter name (constexprs included)."""
    return {**dict(zip(launch.fn.arg_names, launch.args, strict=False)), **launch.kwargs}


def capture_launches(quick: bool, traffic: dict | None = None
                     ) -> tuple[list[Launch], list[str]]:
    """Run every workload under :func:`capturing`; returns launches and workload errors.

    Args:
        traffic: if a dict, the modelled traffic of each workload that returns a model
            (the packed kernels: :mod:`.packed_workloads`) is stored under its label, as
            the rows its model gives for the launches it made.
    """
    errors: list[str] = []
    with capturing(quick) as cap:
        for label, thunk in _workloads(quick):
            cap.label = label
            first = len(cap.launches)
            try:
                model: TrafficModel | None = thunk()
                if traffic is not None and model is not None:
                    traffic[label] = model([_named(x) for x in cap.launches[first:]])
            except Exception as exc:  # report every broken workload, not only the first
                errors.append(f"{label}: {type(exc).__name__}: {exc}")
    return cap.launches, errors


def discover_kernels() -> list[str]:
    """``module.name`` of every ``*_kernel`` JIT function defined in ``diffq_triton.kernels``."""
    from triton.runtime.jit import JITFunction

    from .. import kernels

    found = set()
    for info in pkgutil.iter_modules(kernels.__path__):
        mod = importlib.import_module(f"{kernels.__name__}.{info.name}")
        for value in vars(mod).values():
            fn = value
            while not isinstance(fn, JITFunction) and hasattr(fn, "fn"):
                fn = fn.fn
            if (isinstance(fn, JITFunction) and fn.module == mod.__name__
                    and fn.__name__.endswith("_kernel")):
                found.add(f"{fn.module}.{fn.__name__}")
    return sorted(found)

