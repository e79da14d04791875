"""Offline demo: a character-level Transformer LM on the Python standard library's sources,
trained unquantized, with 4-bit QAT and with DiffQ, compared on size and perplexity."""

from .methods import Method, QuantSettings, default_methods, qat_budget_method
from .model import CharTransformer, ModelConfig
from .runner import DemoConfig, run_demo
from .train import TrainConfig

__all__ = [
    "CharTransformer",
    "DemoConfig",
    "Method",
    "ModelConfig",
    "QuantSettings",
    "TrainConfig",
    "default_methods",
    "qat_budget_method",
    "run_demo",
]
