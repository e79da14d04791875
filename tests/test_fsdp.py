"""FSDP2 (``fully_shard``) over 2 CPU ranks, gloo on loopback: quantized training that is
what the same model trains to under DDP, sizes agreeing on every rank, saving from shards.

One spawn runs every scenario (a spawn costs seconds): each rank writes what it saw, the
tests read it. Order of use, as documented: quantizer, ``fully_shard`` per block then the
root, optimizer over ``model.parameters()``, ``setup_optimizer``.
"""

from __future__ import annotations

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import diffq_triton

WORLD = 2
DEADLINE_S = 240
STEPS = 3
GROUP = 8
VOCAB, DIM, HIDDEN = 51, 15, 37  # odd sizes: uneven shards, a short last group


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(DIM, HIDDEN)
        self.down = nn.Linear(HIDDEN, DIM)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.down(torch.relu(self.up(h)))


class Net(nn.Module):
    """Embedding tied to the head (both in the root's FSDP unit), two blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(DIM, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        h = self.emb(idx)
        for block in self.blocks:
            h = block(h)
        return self.head(h)


def _build(seed: int = 0) -> tuple[Net, diffq_triton.DiffQuantizer]:
    torch.manual_seed(seed)
    model = Net()
    return model, diffq_triton.DiffQuantizer(model, min_size=0, group_size=GROUP)


def _ddp() -> tuple:
    """The DDP reference, in its documented order: optimizer, quantizer, setup_optimizer,
    DistributedDataParallel."""
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=GROUP)
    q.setup_optimizer(opt)
    return model, q, opt, nn.parallel.DistributedDataParallel(model)


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's half of the step's global batch."""
    g = torch.Generator().manual_seed(1000 + step)
    idx = torch.randint(0, VOCAB, (2 * WORLD, 7), generator=g)
    return idx[2 * rank: 2 * rank + 2, :-1], idx[2 * rank: 2 * rank + 2, 1:]


def _used_weights(model: nn.Module) -> tuple[dict, list]:
    """Forward hooks recording the weight each Linear/Embedding computes with."""
    seen: dict[str, torch.Tensor] = {}

    def hook(name):
        def record(module, inputs, output):
            seen[name] = module.weight.detach().clone()
        return record

    # First among the forward hooks: before any hook puts the parameters back.
    handles = [m.register_forward_hook(hook(n), prepend=True) for n, m in model.named_modules()
               if isinstance(m, (nn.Linear, nn.Embedding))]
    return seen, handles


def _full_state(model: nn.Module) -> dict[str, torch.Tensor]:
    from diffq_triton.quantizers.sharding import full

    return {n: full(p.detach()).clone()
            for n, p in model.named_parameters(remove_duplicate=False)}


def _train(model, quantizer, opt, rank, forward, seen=None) -> list[dict]:
    """STEPS steps of cross-entropy + the size budget's penalty; per step what the ranks
    must agree on."""
    torch.manual_seed(1234 + rank)  # each rank its own noise, the same in both runs
    log = []
    for step in range(STEPS):
        x, y = _batch(step, rank)
        logits = forward(x)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), y.reshape(-1))
        loss = loss + quantizer.size_penalty(0.004)
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.append({"size": float(quantizer.model_size()),
                    "lam": float(quantizer.budget.lam),
                    "true_size": quantizer.true_model_size()})
        if seen is not None and step == 0:
            log[0]["used"] = {k: v.clone() for k, v in seen.items()}
    return log


def _scenarios(rank: int, out: Path) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    result: dict = {}
    mesh = init_device_mesh("cpu", (WORLD,))

    # --- DDP: the reference.
    model, q, opt, ddp = _ddp()
    seen, handles = _used_weights(model)
    result["ddp_log"] = _train(model, q, opt, rank, ddp, seen)
    for h in handles:
        h.remove()
    result["ddp_state"] = _full_state(model)
    model.eval()
    x_eval = _batch(99, 0)[0]
    with torch.no_grad():
        result["ddp_eval"] = ddp(x_eval)
    ddp = None

    # --- FSDP2, the documented order.
    model, q = _build()
    initial = _full_state(model)
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    q.setup_optimizer(opt)
    seen, handles = _used_weights(model)
    result["fsdp_log"] = _train(model, q, opt, rank, model, seen)
    result["fsdp_initial"] = initial
    # Between steps: what this rank holds (parameters, logits, the quantizer's state).
    local = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    result["held"] = (local, whole, [type(p).__name__ for p in model.parameters()],
                      bool(q._module_swaps._this_pass) or bool(q._module_swaps._replaced))
    # During a step: no derived (whole, noisy) weight stays alive from a block's forward to
    # its backward; the backward derives it again, with the same noise (DDP's, above).
    import gc
    import weakref

    derived = []
    train_weights = q._train_weights

    def recording(*args, **kwargs):
        out = train_weights(*args, **kwargs)
        derived.extend(weakref.ref(t) for t in out)
        return out

    q._train_weights = recording
    x, y = _batch(0, rank)
    loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
    gc.collect()
    result["alive_after_forward"] = (sum(r() is not None for r in derived), len(derived))
    loss.backward()
    opt.zero_grad()
    q._train_weights = train_weights
    # Eval: the quantized weights.
    model.eval()
    seen.clear()
    with torch.no_grad():
        result["fsdp_eval"] = model(x_eval)
    result["eval_used"] = {k: v.clone() for k, v in seen.items()}
    for h in handles:
        h.remove()
    result["fsdp_state"] = _full_state(model)
    result["sizes"] = (float(q.model_size()), q.true_model_size())
    diffq_triton.save_quantized(q, out / "sharded.safetensors")
    result["state"] = q.get_quantized_state()
    result["wrote"] = (out / "sharded.safetensors").exists()
    # Rank 0 cannot write (no such directory): every rank raises, none goes on.
    try:
        diffq_triton.save_quantized(q, out / "missing" / "sharded.safetensors")
    except (OSError, RuntimeError) as exc:
        result["failed_save"] = f"{type(exc).__name__}: {exc}"

    # --- Mixed precision: bf16 parameters in the forward, float32 shards and logits.
    model, q = _build()
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for block in model.blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    q.setup_optimizer(opt)
    seen, handles = _used_weights(model)
    result["mp_log"] = _train(model, q, opt, rank, model, seen)
    result["mp_initial_up"] = initial["blocks.0.up.weight"]

    # --- UniformQuantizer(qat=True), and DiffQ with each block compiled before sharding
    # (as torchtitan does; aot_eager keeps the test fast, the graph is the same).
    for name in ("uniform", "lsq", "compiled"):
        torch.manual_seed(0)
        model = Net()
        if name == "uniform":
            q = diffq_triton.UniformQuantizer(model, bits=3, qat=True, min_size=0)
        elif name == "lsq":
            q = diffq_triton.LSQ(model, bits=3, min_size=0)
        else:
            q = diffq_triton.DiffQuantizer(model, min_size=0, group_size=GROUP)
        for block in model.blocks:
            if name == "compiled":
                block.compile(backend="aot_eager", fullgraph=True)
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        if name != "uniform":
            q.setup_optimizer(opt)
        seen, handles = _used_weights(model)
        for step in range(2):
            x, y = _batch(step, rank)
            loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step == 0:
                result[f"{name}_used"] = {k: v.clone() for k, v in seen.items()}
        for h in handles:
            h.remove()
        result[f"{name}_before"] = initial["blocks.0.up.weight"]
        model.eval()
        with torch.no_grad():
            result[f"{name}_eval"] = model(x_eval)
        diffq_triton.save_quantized(q, out / f"{name}.safetensors")

    # --- diffq_triton.nn layers: their own noise, their sizes gathered.
    from diffq_triton import nn as qnn

    torch.manual_seed(0)
    model = Net()
    model.head.weight = nn.Parameter(model.head.weight.detach().clone())  # untie
    model = qnn.quantize_model(model, qnn.DiffQConfig(group_size=GROUP))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(2):
        x, y = _batch(step, rank)
        loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
        loss = loss + 1e-3 * qnn.model_size(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
    result["layers"] = (float(qnn.model_size(model)), _full_state(model))

    # --- Activation checkpointing of each block (checkpoint_wrapper, both kinds) under
    # FSDP2: the gradients of training without it.
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
        CheckpointImpl,
        checkpoint_wrapper,
    )

    from diffq_triton.quantizers.sharding import full

    checkpointed = {}
    for kind in (None, CheckpointImpl.NO_REENTRANT, CheckpointImpl.REENTRANT):
        model, q = _build()
        if kind is not None:
            model.blocks = nn.ModuleList(checkpoint_wrapper(b, checkpoint_impl=kind)
                                         for b in model.blocks)
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        q.setup_optimizer(opt, lr=0.1)
        torch.manual_seed(5 + rank)
        grads = []
        for step in range(2):
            x, y = _batch(step, rank)
            loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            (loss + 1e-3 * q.model_size()).backward()
            grads.append({n.replace("._checkpoint_wrapped_module", ""): full(p.grad).clone()
                          for n, p in model.named_parameters()})
            opt.step()
            opt.zero_grad()
        checkpointed[str(kind)] = grads
    result["checkpointed"] = checkpointed

    # --- The Triton kernels (under the interpreter): FSDP2 against DDP again, where the
    # backward finds the logits FSDP gathered again, wherever they are.
    from diffq_triton.ops.dispatch import use_backend

    with use_backend("triton"):
        model, q, opt, ddp = _ddp()
        _train(model, q, opt, rank, ddp)
        result["triton_ddp"] = _full_state(model)
        ddp = None
        model, q = _build()
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        q.setup_optimizer(opt)
        _train(model, q, opt, rank, model)
        result["triton_fsdp"] = _full_state(model)

    # --- Built on the meta device (torchtitan's flow): quantizer, fully_shard, to_empty,
    # the weights' init (here: the seed-0 model's weights), reset_parameters; then the
    # same step, bit for bit, as the model created with those weights. Or, resuming, a
    # load_state_dict of the whole (sharded) state in place of the init and the reset.
    from torch.distributed.tensor import distribute_tensor

    meta = {}
    for name in ("diffq", "lsq"):
        for how in ("plain", "reset", "loaded")[: 3 if name == "diffq" else 2]:
            torch.manual_seed(0)
            with torch.device("cpu" if how == "plain" else "meta"):
                model = Net()
            q = (diffq_triton.DiffQuantizer(model, min_size=0, group_size=GROUP)
                 if name == "diffq" else diffq_triton.LSQ(model, bits=3, min_size=0))
            for block in model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(model, mesh=mesh)
            if how == "plain":
                saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                model.to_empty(device="cpu")
                try:  # refused on every rank, before any collective
                    q.model_size()
                except RuntimeError as exc:
                    meta[(name, "refused")] = str(exc)
            if how == "reset":
                with torch.no_grad():
                    for key, p in model.named_parameters():
                        if key in initial and not key.endswith("_diffq"):
                            p.copy_(distribute_tensor(initial[key], mesh, p.placements))
                q.reset_parameters()
            elif how == "loaded":
                model.load_state_dict(saved)
            meta[(name, how, "sharded")] = q._sharded
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            q.setup_optimizer(opt)
            before = _full_state(model)
            torch.manual_seed(1234 + rank)
            x, y = _batch(0, rank)
            loss = nn.functional.cross_entropy(model(x).reshape(-1, VOCAB), y.reshape(-1))
            if name == "diffq":
                loss = loss + 1e-3 * q.model_size()
            loss.backward()
            grads = {k: full(p.grad).clone() for k, p in model.named_parameters()}
            opt.step()
            meta[(name, how)] = (before, grads, _full_state(model))
    result["meta"] = meta

    # --- The wrong orders are refused with what to do.
    errors = {}
    model, _ = _build()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    try:
        diffq_triton.DiffQuantizer(model, min_size=0, group_size=GROUP)
    except RuntimeError as exc:
        errors["quantizer_after"] = str(exc)
    model, q = _build()
    early = torch.optim.Adam(model.parameters(), lr=1e-2)
    fully_shard(model, mesh=mesh)
    try:
        q.setup_optimizer(early)
    except RuntimeError as exc:
        errors["optimizer_before"] = str(exc)
    result["errors"] = errors
    return result


def _worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=DEADLINE_S))
    torch.set_num_threads(1)
    try:
        result = _scenarios(rank, Path(out_dir))
    except BaseException as exc:  # the test reports it
        import traceback

        result = {"error": "".join(traceback.format_exception(exc))}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # gloo's threads can abort the interpreter's teardown: the result is saved


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> tuple[list[dict], Path]:
    pytest.importorskip("torch.distributed.fsdp")
    out = tmp_path_factory.mktemp("fsdp")
    context = mp.spawn(_worker, args=(str(out),), nprocs=WORLD, join=False)
    for process in context.processes:
        process.join(timeout=DEADLINE_S)
    alive = [p for p in context.processes if p.is_alive()]
    for process in alive:
        process.kill()
    assert not alive, f"FSDP2 ranks did not finish in {DEADLINE_S} s"
    results = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    for result in results:
        assert "error" not in result, result["error"]
    return results, out


QUANTIZED = ["blocks.0.up", "blocks.0.down", "blocks.1.up", "blocks.1.down", "head", "emb"]


def test_training_forwards_see_noisy_weights(ranks):
    results, _ = ranks
    for result in results:
        used = result["fsdp_log"][0]["used"]
        initial = result["fsdp_initial"]
        for name in QUANTIZED:
            w = initial[f"{name}.weight"]
            deviation = used[name] - w
            assert deviation.abs().max() > 0, f"{name} computed with its float weight"
            # Gaussian ξ = N(0,1)/2 times the step r/(2^b - 1), b = 8 at the start.
            step = (w.max() - w.min()) / (2**8 - 1)
            ratio = float((deviation / step).std())
            assert 0.4 < ratio < 0.6, (name, ratio)


def test_fsdp_matches_ddp(ranks):
    # The same noise (one seed per forward, a stream per parameter) and the same global
    # batch: the noisy weights of the first step are equal bit for bit; the gradients are
    # then averaged by a reduce-scatter instead of an all-reduce, and the size penalty's
    # gradient reaches the logits' shards directly instead of being averaged with the
    # loss's: equal up to float32 rounding of those sums (about 1e-7 relative), which 3
    # Adam steps keep within 1e-5.
    results, _ = ranks
    for result in results:
        for name in QUANTIZED:
            torch.testing.assert_close(result["fsdp_log"][0]["used"][name],
                                       result["ddp_log"][0]["used"][name], rtol=0, atol=0)
        for key, value in result["ddp_state"].items():
            torch.testing.assert_close(result["fsdp_state"][key], value, rtol=1e-4,
                                       atol=1e-5, msg=key)
        for fsdp, ddp in zip(result["fsdp_log"], result["ddp_log"], strict=True):
            assert fsdp["size"] == pytest.approx(ddp["size"], rel=1e-6)
            assert fsdp["lam"] == pytest.approx(ddp["lam"], rel=1e-5, abs=1e-9)
            assert fsdp["true_size"] == pytest.approx(ddp["true_size"], rel=1e-6)
        torch.testing.assert_close(result["fsdp_eval"], result["ddp_eval"], rtol=1e-4,
                                   atol=1e-4)


def test_sizes_and_lambda_agree_on_every_rank(ranks):
    results, _ = ranks
    for a, b in zip(results[0]["fsdp_log"], results[1]["fsdp_log"], strict=True):
        assert {k: a[k] for k in ("size", "lam", "true_size")} == {
            k: b[k] for k in ("size", "lam", "true_size")}
    assert results[0]["sizes"] == results[1]["sizes"]
    # ... and equal an unsharded model's with the same parameters.
    model, q = _build()
    model.load_state_dict(results[0]["fsdp_state"])
    assert q.model_size().item() == pytest.approx(results[0]["sizes"][0], rel=1e-6)
    assert q.true_model_size() == results[0]["sizes"][1]


def test_eval_uses_the_quantized_weights_and_the_file_reloads_them(ranks):
    results, out = ranks
    assert results[0]["wrote"]
    model, q = _build()
    model.load_state_dict(results[0]["fsdp_state"])
    for name in QUANTIZED:
        record = next(r for r in q._first_uses() if r.full_name == f"{name}.weight"
                      or f"{name}.weight" in [u.full_name for u in r.tied])
        expected = diffq_triton.ops.quantized_weight(record.param.detach(),
                                                     q._int_bits(record), GROUP)
        for result in results:
            torch.testing.assert_close(result["eval_used"][name], expected, rtol=0, atol=0)
    plain = Net()
    diffq_triton.load_quantized(plain, out / "sharded.safetensors")
    plain.eval()
    with torch.no_grad():
        outputs = plain(_batch(99, 0)[0])
    torch.testing.assert_close(outputs, results[0]["fsdp_eval"], rtol=0, atol=0)
    restored, rq = _build(seed=5)
    rq.restore_quantized_state(results[1]["state"])
    restored.eval()
    with torch.no_grad():
        torch.testing.assert_close(restored(_batch(99, 0)[0]), outputs, rtol=0, atol=0)


def test_no_rank_holds_unsharded_weights_between_steps(ranks):
    results, _ = ranks
    for result in results:
        local, whole, kinds, derived_alive = result["held"]
        assert set(kinds) == {"DTensor"}
        assert not derived_alive
        # Half of each tensor per rank, but for the rounding of uneven dim-0 shards.
        assert local <= whole / WORLD + 4 * (VOCAB + HIDDEN) * 4, (local, whole)


def test_no_derived_weight_is_kept_from_forward_to_backward(ranks):
    results, _ = ranks
    for result in results:
        alive, derived = result["alive_after_forward"]
        assert derived >= len(QUANTIZED)
        assert alive == 0, f"{alive} of {derived} derived weights kept for the backward"


def test_mixed_precision_trains_with_noise(ranks):
    results, _ = ranks
    for result in results:
        used = result["mp_log"][0]["used"]["blocks.0.up"]
        assert used.dtype == torch.bfloat16
        deviation = used.float() - result["mp_initial_up"].bfloat16().float()
        assert deviation.abs().max() > 0
        assert all(torch.isfinite(torch.tensor(s["size"])) for s in result["mp_log"])
    assert results[0]["mp_log"][-1]["size"] == results[1]["mp_log"][-1]["size"]


def test_a_failed_write_raises_on_every_rank(ranks):
    results, _ = ranks
    assert results[0]["failed_save"].startswith(("FileNotFoundError", "OSError"))
    assert results[1]["failed_save"].startswith("RuntimeError: save_quantized: rank 0 failed")
    assert "FileNotFoundError" in results[1]["failed_save"]


def test_wrong_orders_are_refused(ranks):
    results, _ = ranks
    for result in results:
        errors = result["errors"]
        assert "create the quantizer before fully_shard" in errors["quantizer_after"]
        assert "create the optimizer after sharding" in errors["optimizer_before"]


def test_uniform_qat_lsq_and_compiled_blocks(ranks):
    results, out = ranks
    for name in ("uniform", "lsq", "compiled"):
        plain = Net()
        diffq_triton.load_quantized(plain, out / f"{name}.safetensors")
        plain.eval()
        with torch.no_grad():
            outputs = plain(_batch(99, 0)[0])
        for result in results:
            torch.testing.assert_close(result[f"{name}_eval"], outputs, rtol=0, atol=0,
                                       msg=name)
            # Training forwards: QAT's 3-bit levels, DiffQ's noise.
            used = result[f"{name}_used"]["blocks.0.up"]
            assert not torch.equal(used, result[f"{name}_before"]), name
            if name != "compiled":
                assert used.unique().numel() <= 2**3, f"{name}: not on 8 levels"
                continue
            # The noise of each block's weights is its own (the traced call keys it by the
            # parameter's stream too), at the scale of the quantization step.
            xi = []
            for block in ("blocks.0.up", "blocks.1.up"):
                w = result["fsdp_initial"][f"{block}.weight"]
                step = (w.max() - w.min()) / (2**8 - 1)
                xi.append((result["compiled_used"][block] - w) / step)
                assert 0.4 < float(xi[-1].std()) < 0.6, (block, float(xi[-1].std()))
            assert (xi[0] - xi[1]).abs().max() > 0.1, "the same noise in both blocks"


def test_quantized_layers_train_sharded(ranks):
    from diffq_triton import nn as qnn

    results, _ = ranks
    assert results[0]["layers"][0] == results[1]["layers"][0]
    model = qnn.quantize_model(Net(), qnn.DiffQConfig(group_size=GROUP))
    model.load_state_dict(results[0]["layers"][1])
    assert float(qnn.model_size(model)) == pytest.approx(results[0]["layers"][0], rel=1e-6)


def test_checkpointed_blocks_keep_the_gradients(ranks):
    results, _ = ranks
    for result in results:
        runs = result["checkpointed"]
        plain = runs.pop("None")
        assert len(runs) == 2
        for kind, grads in runs.items():
            for step, (a, b) in enumerate(zip(plain, grads, strict=True)):
                assert a.keys() == b.keys()
                for name in a:
                    torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7,
                                               msg=f"{kind}, step {step}: {name}")


def test_a_model_built_on_meta_trains_as_one_built_with_its_weights(ranks):
    # fully_shard before to_empty: reset_parameters follows the sharded parameters, DiffQ's
    # logits are filled per shard, LSQ's steps computed from the gathered weights; a load
    # of the whole sharded state stands in for the init and the reset.
    results, _ = ranks
    for result in results:
        for name, how in (("diffq", "reset"), ("diffq", "loaded"), ("lsq", "reset")):
            got_run, plain = result["meta"][(name, how)], result["meta"][(name, "plain")]
            for what, got, expected in zip(("initial", "grads", "after"), got_run, plain,
                                           strict=True):
                assert got.keys() == expected.keys(), (name, how, what)
                for key, value in expected.items():
                    assert torch.equal(got[key], value), (name, how, what, key)
            assert any(k.endswith(f"_{name}") for k in got_run[0])
            assert result["meta"][(name, how, "sharded")]
        for name in ("diffq", "lsq"):
            assert "quantizer.reset_parameters()" in result["meta"][(name, "refused")]


def test_triton_path_matches_ddp(ranks):
    results, _ = ranks
    for result in results:
        for key, value in result["triton_ddp"].items():
            torch.testing.assert_close(result["triton_fsdp"][key], value, rtol=1e-4,
                                       atol=1e-5, msg=key)


def _inductor_worker(rank: int, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/store", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=600))
    try:
        mesh = init_device_mesh("cpu", (WORLD,))
        model, q = _build()
        for block in model.blocks:
            block.compile()  # inductor, as torchtitan compiles each block
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        q.setup_optimizer(opt)
        log = _train(model, q, opt, rank, model)
        model.eval()
        with torch.no_grad():
            outputs = model(_batch(99, 0)[0])
        diffq_triton.save_quantized(q, Path(out_dir) / "inductor.safetensors")
        result = {"log": log, "eval": outputs}
    except BaseException as exc:
        import traceback

        result = {"error": "".join(traceback.format_exception(exc))}
    torch.save(result, os.path.join(out_dir, f"inductor{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


@pytest.mark.slow
def test_blocks_compiled_by_inductor(tmp_path):
    mp.spawn(_inductor_worker, args=(str(tmp_path),), nprocs=WORLD)
    results = [torch.load(tmp_path / f"inductor{r}.pt", weights_only=False)
               for r in range(WORLD)]
    for result in results:
        assert "error" not in result, result["error"]
    plain = Net()
    diffq_triton.load_quantized(plain, tmp_path / "inductor.safetensors")
    plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(plain(_batch(99, 0)[0]), results[0]["eval"], rtol=0,
                                   atol=0)
    assert results[0]["log"] == results[1]["log"]
