"""The offline demo: data, model, progress bar, methods, report, and one tiny end-to-end run."""

from __future__ import annotations

import io
import json
import sys

import pytest
import torch

import diffq_triton
from diffq_triton.demo import (
    DemoConfig,
    Method,
    ModelConfig,
    QuantSettings,
    TrainConfig,
    data,
    default_methods,
    report,
    run_demo,
)
from diffq_triton.demo.methods import (
    Attached,
    attach,
    budget_method,
    qat_budget_method,
    resolve_budget,
)
from diffq_triton.demo.model import CharTransformer
from diffq_triton.demo.progress import ProgressBar
from diffq_triton.demo.train import RunResult
from diffq_triton.quantizers.budget import FINAL_TOLERANCE

TINY_MODEL = ModelConfig(vocab=data.VOCAB_SIZE, context=16, dim=16, layers=1, heads=2)


def _write_sources(root, count=12, size=3000):
    for i in range(count):
        (root / f"mod_{i:02d}.py").write_text(f"# module {i}\n" + "x = 1\n" * (size // 6))


# ------------------------------------------------------------------------------ data
def test_encode_decode_round_trip_and_unknown():
    text = "def f(x):\n\treturn x + 1  # ok"
    ids = data.encode(text)
    assert ids.dtype == torch.int64 and ids.shape == (len(text),)
    assert data.decode(ids) == text
    unknown = data.encode("é€")
    assert unknown.tolist() == [data.VOCAB_SIZE - 1] * 2
    assert int(data.encode("".join(chr(c) for c in range(32, 127))).max()) < data.VOCAB_SIZE - 1


def test_corpus_split_is_deterministic_and_disjoint(tmp_path):
    _write_sources(tmp_path)
    (tmp_path / "notes.txt").write_text("not python " * 1000)
    a = data.load_corpus(tmp_path, val_every=4)
    b = data.load_corpus(tmp_path, val_every=4)
    assert a.train_files == b.train_files and torch.equal(a.train, b.train)
    assert not set(a.train_files) & set(a.val_files)
    assert a.val_files == ["mod_03.py", "mod_07.py", "mod_11.py"]
    assert "notes.txt" not in a.train_files
    assert data.decode(a.train[:12]) == "# module 0\nx"


def test_corpus_caps_and_errors(tmp_path):
    _write_sources(tmp_path)
    capped = data.load_corpus(tmp_path, max_train_chars=10_000, val_every=4)
    assert capped.train.numel() == 10_000
    with pytest.raises(ValueError, match="too little"):
        data.load_corpus(tmp_path / "missing")
    with pytest.raises(ValueError, match="val_every"):
        data.load_corpus(tmp_path, val_every=1)
    with pytest.raises(ValueError, match="max_train_chars"):
        data.load_corpus(tmp_path, max_train_chars=0)


def test_stdlib_corpus_loads():
    corpus = data.load_corpus(max_train_chars=20_000, max_val_chars=5_000)
    assert corpus.train.numel() == 20_000 and corpus.val.numel() == 5_000
    assert all(name.endswith(".py") for name in corpus.train_files)


def test_batches_are_shifted_windows_and_reproducible():
    stream = torch.arange(1000)
    x, y = data.random_batch(stream, 5, 16, torch.Generator().manual_seed(3))
    x2, _ = data.random_batch(stream, 5, 16, torch.Generator().manual_seed(3))
    assert x.shape == y.shape == (5, 16)
    assert torch.equal(y, x + 1) and torch.equal(x, x2)


def test_eval_windows_cover_the_stream_once():
    stream = torch.arange(100)
    windows = data.eval_windows(stream, 16, max_windows=100)
    assert windows.shape == (6, 17)
    # Window i's last target is window i+1's first input: each token predicted once.
    assert torch.equal(windows[:-1, -1], windows[1:, 0])
    assert data.eval_windows(stream, 16, max_windows=2).shape == (2, 17)


# ------------------------------------------------------------------------------ model
def test_model_is_causal_and_shaped():
    torch.manual_seed(0)
    model = CharTransformer(TINY_MODEL).eval()
    tokens = torch.randint(0, data.VOCAB_SIZE, (2, 10))
    logits = model(tokens)
    assert logits.shape == (2, 10, data.VOCAB_SIZE)
    changed = tokens.clone()
    changed[:, 6:] = (changed[:, 6:] + 1) % data.VOCAB_SIZE
    # Positions before the change cannot see it.
    torch.testing.assert_close(model(changed)[:, :6], logits[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(model(changed)[:, 6:], logits[:, 6:])


@pytest.mark.parametrize("kwargs, name", [
    (dict(vocab=0), "vocab"), (dict(vocab=10, dim=10, heads=3), "heads"),
    (dict(vocab=10, layers=1.5), "layers"),
])
def test_model_config_errors(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ModelConfig(**kwargs)


# ------------------------------------------------------------------------------ progress
def test_progress_bar_on_a_pipe_writes_one_final_line():
    stream = io.StringIO()
    with ProgressBar(4, "run", stream, width=8) as bar:
        for _ in range(4):
            bar.update(loss=1.23456)
    out = stream.getvalue()
    assert out.count("\n") == 1 and "\r" not in out
    assert "run  [########]  4/4  loss=1.23" in out


def test_progress_bar_redraws_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self):
            return True

    stream = Tty()
    bar = ProgressBar(2, "t", stream, width=4, refresh=1e9)
    bar.update()
    assert "[##..]  1/2" in stream.getvalue()
    bar.update()
    bar.close()
    assert stream.getvalue().count("\r") >= 3 and stream.getvalue().endswith("\n")
    with pytest.raises(ValueError, match="total"):
        ProgressBar(0)


# ------------------------------------------------------------------------------ methods
def test_methods_validate_and_attach():
    with pytest.raises(ValueError, match="kind"):
        Method("x", "int8")
    with pytest.raises(ValueError, match="penalty"):
        Method("x", "diffq")
    names = [m.name for m in default_methods((1.0, 3.0), qat_bits=(2, 3))]
    assert names == ["float32 baseline", "QAT 2-bit", "DiffQ ≤QAT 2-bit", "QAT 3-bit",
                     "DiffQ ≤QAT 3-bit", "DiffQ λ=1", "DiffQ λ=3"]
    names = [m.name for m in default_methods((1.0,), qat_bits=(4,), qat_budget=None)]
    assert names == ["float32 baseline", "QAT 4-bit", "DiffQ λ=1"]
    kinds = [(m.kind, m.bits) for m in default_methods() if m.kind in ("qat", "budget")]
    assert kinds == [(kind, b) for b in (2, 3, 4, 8) for kind in ("qat", "budget")]

    settings = QuantSettings(min_size=0.0)
    for method, cls in [(Method("q", "qat", bits=3), diffq_triton.UniformQuantizer),
                        (Method("d", "diffq", penalty=2.0), diffq_triton.DiffQuantizer)]:
        model = CharTransformer(TINY_MODEL)
        opt = torch.optim.Adam(model.parameters())
        attached = attach(method, model, opt, settings)
        quantizer, penalty = attached.quantizer, attached.penalty
        assert isinstance(quantizer, cls) and attached.finish is None
        if penalty is not None:
            torch.testing.assert_close(penalty(), 2.0 * quantizer.model_size())
            assert len(opt.param_groups) == 2  # the bit logits were added
    model = CharTransformer(TINY_MODEL)
    assert attach(Method("f", "float"), model, torch.optim.Adam(model.parameters()),
                  settings) == Attached()


def test_budget_method_attaches_a_size_budget():
    with pytest.raises(ValueError, match="target_mb"):
        Method("b", "budget")
    method = budget_method(0.01)
    assert method.name == "DiffQ ≤0.01 MB" and method.kind == "budget"
    model = CharTransformer(TINY_MODEL)
    opt = torch.optim.Adam(model.parameters())
    attached = attach(method, model, opt, QuantSettings(min_size=0.0))
    assert isinstance(attached.quantizer, diffq_triton.DiffQuantizer)
    assert attached.penalty().requires_grad and attached.finish is not None
    attached.finish()
    assert attached.quantizer.true_model_size() <= 0.01


def test_qat_budget_is_resolved_from_the_qat_size():
    method = qat_budget_method(3, 0.9)
    assert method.kind == "budget" and method.target_mb == 0 and method.qat_ratio == 0.9
    assert method.paired_qat_bits == 3 and budget_method(0.3).paired_qat_bits is None
    resolved = resolve_budget(method, {2: 0.3, 3: 0.5})
    assert resolved.target_mb == pytest.approx(0.45)
    assert resolved.name == "DiffQ ≤0.9×QAT 3-bit (0.45 MB)"
    fixed = budget_method(0.3)
    assert resolve_budget(fixed, {3: 0.5}) is fixed
    assert resolve_budget(Method("d", "diffq", penalty=1.0), {}).penalty == 1.0
    with pytest.raises(ValueError, match="QAT 3-bit row: put that method before it"):
        resolve_budget(method, {4: 0.5})
    with pytest.raises(ValueError, match="ratio"):
        qat_budget_method(3, 0.0)


def test_train_config_errors():
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0.0)


# ------------------------------------------------------------------------------ end to end
TINY_TRAIN = TrainConfig(steps=6, batch=4, warmup=2, eval_windows=8)


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    config = DemoConfig(
        out=out,
        methods=default_methods((1.0, 50.0)),
        model=TINY_MODEL,
        train=TINY_TRAIN,
        quant=QuantSettings(min_size=0.0, bits_lr=0.5),
        max_train_chars=30_000,
    )
    stream = io.StringIO()
    return out, run_demo(config, stream), stream.getvalue()


def test_demo_end_to_end(tiny_demo):
    out, outcome, text = tiny_demo
    results = outcome["results"]
    kinds = [(r.method.kind, r.method.bits) for r in results if r.method.kind != "diffq"]
    # The curve: the baseline, then every QAT width, each followed by DiffQ at its size.
    assert kinds == [("float", 4)] + [(k, b) for b in (2, 3, 4, 8) for k in ("qat", "budget")]
    assert [r.method.penalty for r in results if r.method.kind == "diffq"] == [1.0, 50.0]
    float_run = results[0]
    assert float_run.bits_per_weight == pytest.approx(32.0)
    assert float_run.size_mb == pytest.approx(float_run.params * 4 / 2**20)
    qats = {r.method.bits: r for r in results if r.method.kind == "qat"}
    tensors = list(CharTransformer(TINY_MODEL).parameters())
    params = sum(p.numel() for p in tensors)
    for bits, qat in qats.items():
        # min_size=0: every parameter quantized at `bits` plus 64 bits of range per tensor
        # (UniformQuantizer's size, spec §4), nothing else stored.
        assert qat.params == float_run.params == params
        assert qat.size_mb * 2**23 == bits * params + 64 * len(tensors)
    for budget in (r for r in results if r.method.kind == "budget"):
        qat = qats[budget.method.paired_qat_bits]
        # Sized from its QAT twin and ends within the budget's tolerance under it:
        # min_bits=1 reaches even the 2-bit size.
        target = budget.method.target_mb
        assert target == qat.size_mb
        assert budget.method.name == f"DiffQ ≤QAT {qat.method.bits}-bit ({target:.4g} MB)"
        assert (1 - FINAL_TOLERANCE) * target <= budget.size_mb <= target
        assert budget.method.name in text
    # A larger penalty gives a smaller model.
    penalized = [r for r in results if r.method.kind == "diffq"]
    assert penalized[1].size_mb < penalized[0].size_mb < float_run.size_mb
    for r in results:
        assert r.val_ppl > 1 and r.val_ppl == r.val_ppl
    for line in ("method", "float32 baseline", "QAT 2-bit", "QAT 8-bit", "DiffQ λ=50"):
        assert line in text
    comparisons = report.comparison(results)
    assert len(comparisons) == 6 and all(line in text for line in comparisons)


def test_demo_reload_matches_quantized(tiny_demo):
    out, outcome, text = tiny_demo
    checks = outcome["reload"]
    assert len(checks) == 6  # four budget rows and two penalties
    for check in checks:
        assert check.path.exists() and check.file_mb > 0
        assert check.reloaded_ppl == check.quantized_ppl
    assert text.count("(equal)") == 6


def test_demo_packed_models_match_the_reloaded_ones(tiny_demo):
    _, outcome, text = tiny_demo
    packed = outcome["packed"]
    assert [p.method for p in packed] == [c.method for c in outcome["reload"]]
    for check in packed:
        assert check.packed_ppl == check.reloaded_ppl
        assert 0 < check.resident_mb <= 1.1 * check.file_mb + 64 / 1024
    assert text.count("packed in memory") == 6 and text.count("(identical)") == 6


def test_demo_writes_results(tiny_demo):
    out, outcome, _ = tiny_demo
    record = json.loads((out / "results.json").read_text())
    assert [r["method"] for r in record["results"]] == [
        r.method.name for r in outcome["results"]
    ]
    assert record["config"]["train"]["steps"] == 6
    assert len(record["reload"]) == 6
    assert (out / "results.md").read_text().startswith("| method | bits/weight |")


def test_out_of_reach_qat_budget_is_skipped(tmp_path):
    # 1% of the 2-bit QAT size is under every group at 1 bit: the row is left out with the
    # reason, the rest of the demo runs.
    methods = [Method("float32 baseline", "float"), Method("QAT 2-bit", "qat", 2),
               qat_budget_method(2, 0.01), Method("DiffQ λ=1", "diffq", penalty=1.0)]
    config = DemoConfig(out=tmp_path, methods=methods, model=TINY_MODEL,
                        train=TrainConfig(steps=2, batch=2, eval_windows=2),
                        quant=QuantSettings(min_size=0.0), max_train_chars=20_000)
    stream = io.StringIO()
    outcome = run_demo(config, stream)
    assert [r.method.kind for r in outcome["results"]] == ["float", "qat", "diffq"]
    assert "DiffQ ≤0.01×QAT 2-bit (" in stream.getvalue()
    assert "skipped: target_mb=" in stream.getvalue()


def test_demo_rejects_bad_method_list(tmp_path):
    with pytest.raises(ValueError, match="baseline"):
        run_demo(DemoConfig(out=tmp_path, methods=default_methods()[1:]), io.StringIO())


# ------------------------------------------------------------------------------ report
def test_table_and_plot_message(tiny_demo, monkeypatch, tmp_path):
    _, outcome, _ = tiny_demo
    results = outcome["results"]
    table = report.format_table(results)
    header, rule, first, *_ = table.splitlines()
    assert header.split()[:2] == ["method", "bits/weight"]
    assert set(rule) == {"-"}
    assert first.split()[-3] == "1.0"  # the baseline's compression
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    message = report.plot_size_vs_ppl(results, tmp_path / "p.png")
    assert "matplotlib is not installed" in message
    assert not (tmp_path / "p.png").exists()


def test_plot_is_written_when_matplotlib_is_installed(tiny_demo, tmp_path):
    pytest.importorskip("matplotlib")
    _, outcome, _ = tiny_demo
    path = tmp_path / "p.png"
    assert report.plot_size_vs_ppl(outcome["results"], path) is None
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_comparison_states_the_verdict():
    def run(method, size, ppl):
        return RunResult(method, None, None, 1000, size, ppl, 1.0)

    qat2 = run(Method("QAT 2-bit", "qat", 2), 0.5, 12.0)
    qat4 = run(Method("QAT 4-bit", "qat", 4), 1.0, 10.0)
    lines = report.comparison([
        run(Method("float", "float"), 8.0, 9.0), qat2, qat4,
        run(Method("d1", "diffq", penalty=1.0), 0.5, 9.9),
        run(Method("d2", "diffq", penalty=2.0), 0.8, 11.0),
        run(Method("d3", "diffq", penalty=3.0), 2.0, 9.0),
        run(resolve_budget(qat_budget_method(2), {2: 0.5}), 0.499, 11.4),
        run(resolve_budget(qat_budget_method(4), {4: 1.0}), 0.995, 10.2),
    ])
    assert len(lines) == 5
    # A fixed-λ run against the smallest QAT run at least its size.
    assert lines[0].startswith("d1: 1.00x smaller than QAT 2-bit") and "(-17.5%)" in lines[0]
    assert "beats it on both" in lines[0]
    assert "1.25x smaller than QAT 4-bit" in lines[1] and "(+10.0%)" in lines[1]
    assert "smaller, but worse perplexity" in lines[1]
    assert "2.00x larger than QAT 4-bit" in lines[2] and "better perplexity" in lines[2]
    # A budget run against its QAT twin, at the same size.
    assert "at QAT 2-bit's size (0.499 vs 0.5 MB)" in lines[3]
    assert "(-5.0%): DiffQ better" in lines[3]
    assert "at QAT 4-bit's size" in lines[4] and "(+2.0%): QAT better" in lines[4]
    assert report.comparison([run(Method("float", "float"), 8.0, 9.0)]) == []


def test_bits_per_weight_counts_model_parameters_only(tiny_demo):
    _, outcome, _ = tiny_demo
    results = outcome["results"]
    # DiffQ's bit logits are parameters of the model but are not stored: not counted.
    assert {r.params for r in results} == {results[0].params}
    for r in results:
        assert r.bits_per_weight == pytest.approx(r.size_mb * 2**23 / r.params)


def test_packed_check_verdicts():
    # CPU: identical; CUDA's fused packed kernels: within float32 rounding; else DIFFERENT.
    from diffq_triton.demo.packed_check import PackedCheck, describe

    def check(packed_ppl):
        return PackedCheck("DiffQ", 0.1, 0.1, 0, packed_ppl, 9.5)

    assert check(9.5).verdict == "identical"
    assert check(9.5 * (1 + 3e-6)).verdict == "within float32 rounding"
    assert check(9.6).verdict == "DIFFERENT"
    assert describe(check(9.6)).endswith("(DIFFERENT)")
