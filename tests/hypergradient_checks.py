"""Shared by test_hypergradient_exact.py and test_hypergradient_multilevel.py: the float64
dtype and tolerances of their comparisons, the relative error, gradient lists flattened to one
vector, and `Vector`, a module of float64 parameters only."""

from __future__ import annotations

import torch
from torch import Tensor, nn

DTYPE = torch.float64
EXACT = 1e-10  # converged cg / neumann: round-off only
FINITE_DIFFERENCE = 1e-9  # darts: a central difference, exact on these losses up to round-off


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


def flat(tensors: list[Tensor | None], like: list[Tensor] | None = None) -> Tensor:
    like = like if like is not None else tensors  # type: ignore[assignment]
    return torch.cat([torch.zeros(p.numel(), dtype=DTYPE) if t is None else t.reshape(-1)
                      for t, p in zip(tensors, like)])


class Vector(nn.Module):
    """Parameters only: one float64 tensor per entry of ``tensors``."""

    def __init__(self, *tensors: Tensor) -> None:
        super().__init__()
        self.tensors = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in tensors])

    def flat(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self.tensors])
