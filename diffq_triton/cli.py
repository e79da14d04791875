"""Command line: ``diffq-triton demo`` and ``info`` (also ``python -m diffq_triton ...``)."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _penalties(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected numbers separated by commas, got {text!r}"
        ) from None
    if not values or any(not v > 0 for v in values):
        raise argparse.ArgumentTypeError(f"penalties must be positive numbers, got {text!r}")
    return values


def _widths(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected integers separated by commas, got {text!r}"
        ) from None
    if not values or any(not 1 <= v <= 15 for v in values):
        raise argparse.ArgumentTypeError(f"widths must lie in [1, 15], got {text!r}")
    return values


def build_parser() -> argparse.ArgumentParser:
    """The ``diffq-triton`` argument parser (one sub-command per tool)."""
    from .demo import ModelConfig, TrainConfig, default_methods
    from .demo.data import VOCAB_SIZE
    from .demo.methods import DEFAULT_QAT_BITS

    train = TrainConfig()
    penalties = ",".join(f"{m.penalty:g}" for m in default_methods() if m.kind == "diffq")
    parser = argparse.ArgumentParser(
        prog="diffq-triton", description="Differentiable quantization (DiffQ) tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    qat_bits = ",".join(str(b) for b in DEFAULT_QAT_BITS)
    demo = commands.add_parser(
        "demo",
        help="train a small language model unquantized, with QAT and with DiffQ, and compare",
        description=(
            "Train a character-level Transformer on this Python's standard library sources: "
            f"a float32 baseline, QAT at {qat_bits} bits, DiffQ trained to each QAT model's "
            "size (size budget) and DiffQ at a fixed size penalty; print size and validation "
            "perplexity, plot the trade-off curve, save and reload the DiffQ models. "
            "No download."
        ),
    )
    demo.add_argument("--steps", type=_positive_int, default=None,
                      help=f"training steps per method (default {train.steps})")
    demo.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    demo.add_argument("--seed", type=int, default=0, help="seed of weights, batches and noise")
    demo.add_argument("--out", type=Path, default=Path("diffq_demo_out"),
                      help="output directory (default ./diffq_demo_out)")
    demo.add_argument("--penalties", type=_penalties, default=None,
                      help=f"DiffQ size penalties λ, comma-separated (default {penalties})")
    demo.add_argument("--target-mb", type=_positive_float, action="append", default=None,
                      help="add a DiffQ run trained to end at this size in MB "
                           "(size-budget mode; repeatable)")
    demo.add_argument("--qat-bits", type=_widths, default=None,
                      help=f"QAT widths, comma-separated; DiffQ is also trained to each one's "
                           f"size (default {qat_bits})")
    demo.add_argument("--batch", type=_positive_int, default=None,
                      help=f"windows per step (default {train.batch})")
    shape = ModelConfig(vocab=VOCAB_SIZE)
    demo.add_argument("--dim", type=_positive_int, default=shape.dim,
                      help=f"model width (default {shape.dim})")
    demo.add_argument("--layers", type=_positive_int, default=shape.layers,
                      help=f"Transformer blocks (default {shape.layers})")
    demo.add_argument("--eval-windows", type=_positive_int, default=None,
                      help=f"validation windows of 64 characters (default {train.eval_windows})")
    demo.add_argument("--max-chars", type=_positive_int, default=2_000_000,
                      help="training characters to read (default 2,000,000)")
    from .info import add_parser as add_info_parser

    add_info_parser(commands)
    return parser


def demo_config(args: argparse.Namespace):
    """The :class:`~diffq_triton.demo.DemoConfig` the parsed ``demo`` arguments describe."""
    from .demo import DemoConfig, ModelConfig, TrainConfig, default_methods
    from .demo.data import VOCAB_SIZE
    from .demo.methods import budget_method

    given = {"steps": args.steps, "batch": args.batch, "eval_windows": args.eval_windows}
    train = TrainConfig(
        device=args.device, seed=args.seed, **{k: v for k, v in given.items() if v is not None}
    )
    chosen = {"penalties": args.penalties, "qat_bits": args.qat_bits}
    methods = default_methods(**{k: v for k, v in chosen.items() if v is not None})
    methods += [budget_method(target) for target in args.target_mb or []]
    return DemoConfig(
        out=args.out, methods=methods, train=train,
        model=ModelConfig(vocab=VOCAB_SIZE, dim=args.dim, layers=args.layers),
        max_train_chars=args.max_chars,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``diffq-triton`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "info":
        from .info import run as run_info

        return run_info(args)
    if args.command == "demo":
        from .demo import run_demo

        try:
            config = demo_config(args)
            run_demo(config)
        except ValueError as err:
            print(f"diffq-triton demo: error: {err}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("\ninterrupted", file=sys.stderr)
            return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
