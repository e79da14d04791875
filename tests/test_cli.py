"""The ``diffq-triton`` command line: argument handling, errors, and a tiny demo run."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import pytest

from diffq_triton import cli

TINY = ["--steps", "2", "--dim", "16", "--layers", "1", "--batch", "2", "--eval-windows", "2",
        "--max-chars", "20000", "--penalties", "1,30"]


def test_demo_command_runs_and_reports(tmp_path, capsys):
    assert cli.main(["demo", *TINY, "--out", str(tmp_path), "--seed", "3"]) == 0
    out = capsys.readouterr().out
    assert "float32 baseline" in out and "QAT 2-bit" in out and "DiffQ λ=30" in out
    # Nothing is large enough to quantize at width 16: every model has the float size, so
    # each QAT-sized budget is met as it stands; each DiffQ model has its own file.
    assert "skipped" not in out and out.count("(equal)") == 6
    assert (tmp_path / "results.json").exists()
    assert (tmp_path / "diffq_penalty_30.safetensors").exists()
    assert len(list(tmp_path.glob("diffq_at_qat*_size.safetensors"))) == 4


def test_arguments_reach_the_config(tmp_path):
    args = cli.build_parser().parse_args(
        ["demo", *TINY, "--out", str(tmp_path), "--qat-bits", "3,5", "--seed", "7",
         "--target-mb", "0.5", "--target-mb", "0.25"]
    )
    config = cli.demo_config(args)
    assert config.train.steps == 2 and config.train.seed == 7 and config.train.batch == 2
    assert [m.name for m in config.methods] == [
        "float32 baseline", "QAT 3-bit", "DiffQ ≤QAT 3-bit", "QAT 5-bit", "DiffQ ≤QAT 5-bit",
        "DiffQ λ=1", "DiffQ λ=30", "DiffQ ≤0.5 MB", "DiffQ ≤0.25 MB",
    ]
    assert config.methods[-1].target_mb == 0.25
    assert config.model.dim == 16 and config.max_train_chars == 20000


def test_defaults_come_from_the_demo():
    config = cli.demo_config(cli.build_parser().parse_args(["demo"]))
    from diffq_triton.demo import TrainConfig, default_methods

    assert config.train == TrainConfig()
    assert config.methods == default_methods()


@pytest.mark.parametrize("argv", [
    ["demo", "--steps", "0"],
    ["demo", "--penalties", "a,b"],
    ["demo", "--penalties", "1,-2"],
    ["demo", "--target-mb", "0"],
    ["demo", "--target-mb", "x"],
    ["demo", "--qat-bits", "0"],
    ["demo", "--qat-bits", "4,x"],
    ["nope"],
    [],
])
def test_bad_arguments_exit_with_usage(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    assert "usage" in capsys.readouterr().err


def test_unusable_device_is_a_clear_error(tmp_path, capsys):
    assert cli.main(["demo", *TINY, "--out", str(tmp_path), "--device", "nodevice"]) == 2
    assert "device 'nodevice'" in capsys.readouterr().err


def test_module_entry_and_console_script():
    done = subprocess.run(
        [sys.executable, "-m", "diffq_triton", "demo", "--help"],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0 and "--steps" in done.stdout and "--device" in done.stdout
    scripts = {ep.name: ep.value for ep in entry_points(group="console_scripts")}
    assert scripts.get("diffq-triton") == "diffq_triton.cli:main"
