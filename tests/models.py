"""Small models shared by the tests."""

import torch
from torch import nn


class TiedLM(nn.Module):
    """Embedding, LSTM and an output layer tied to the embedding (as GPT-2's lm_head)."""

    def __init__(self, vocab: int = 300, dim: int = 64):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.out = nn.Linear(dim, vocab)
        self.out.weight = self.emb.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm(self.emb(x))
        return self.out(h)


def conv_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.Flatten(), nn.Linear(512, 10)
    )


def mlp(d_in: int = 32, hidden: int = 64, d_out: int = 10) -> nn.Module:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))
