"""A small causal character-level Transformer language model for the demo and benchmarks."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ModelConfig:
    """Shape of :class:`CharTransformer`.

    Args:
        vocab: number of token ids.
        context: longest input the positional table covers, in tokens.
        dim: width of the residual stream. 96 for the demo: its ten trainings fit in
            4 minutes on 2 CPU cores (at 128 they took about 5).
        layers: number of Transformer blocks.
        heads: attention heads per block; must divide ``dim``.
    """

    vocab: int
    context: int = 64
    dim: int = 96
    layers: int = 2
    heads: int = 4

    def __post_init__(self) -> None:
        for name in ("vocab", "context", "dim", "layers", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.dim % self.heads:
            raise ValueError(f"heads ({self.heads}) must divide dim ({self.dim})")


class Block(nn.Module):
    """Pre-norm Transformer block: causal self-attention then a 4x MLP, both residual."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        q, k, v = self.qkv(self.norm1(x)).split(dim, dim=-1)
        # (B, T, D) -> (B, H, T, D/H) for the fused attention kernel.
        q, k, v = (t.view(batch, length, self.heads, -1).transpose(1, 2) for t in (q, k, v))
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(batch, length, dim))
        return x + self.down(F.gelu(self.up(self.norm2(x))))


class CharTransformer(nn.Module):
    """Token and learned position embeddings, ``layers`` blocks, a final norm and a linear head.

    Input: int64 token ids of shape (B, T) with T <= ``config.context``.
    Output: float32 logits of shape (B, T, vocab), position t predicting token t + 1.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab, config.dim)
        self.position = nn.Embedding(config.context, config.dim)
        self.blocks = nn.ModuleList(Block(config.dim, config.heads) for _ in range(config.layers))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.position(positions)
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x))


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy in nats; logits (B, T, V) float, targets (B, T) int64."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())
