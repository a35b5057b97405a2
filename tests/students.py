"""The tiny student the distiller tests share: embedding → tanh → linear head over a vocabulary of V tokens."""
from __future__ import annotations

import torch


class Student(torch.nn.Module):
    def __init__(self, V: int = 12, d: int = 8) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(V, d)
        self.out = torch.nn.Linear(d, V)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.emb(x)))
