"""Offline demo: a character-level Transformer LM on the Python standard library's sources,
trained unquantized, with QAT at 2 to 8 bits and with DiffQ at the same sizes: the
size/perplexity trade-off curve of each."""

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
