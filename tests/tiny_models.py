"""Small models shared by the method tests."""

from __future__ import annotations

import torch
from torch import nn


class TinyViT(nn.Module):
    """2×2 patches of an 8×8 image as 16 tokens plus a class token; taps ``blocks``
    ``(17, dim)``."""

    def __init__(self, dim: int, num_classes: int = 4) -> None:
        super().__init__()
        self.embed = nn.Linear(4, dim)
        self.cls = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.Sequential(nn.Linear(dim, dim), nn.GELU())
        self.head = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        patches = x.unfold(2, 2, 2).unfold(3, 2, 2).reshape(x.shape[0], 16, 4)
        tokens = torch.cat([self.cls.expand(x.shape[0], -1, -1), self.embed(patches)], dim=1)
        return self.head(self.blocks(tokens)[:, 0])
