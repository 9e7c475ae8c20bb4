"""Shared by test_problem.py and test_problem_step.py: `Linear`, a least-squares
ImplicitProblem recording the batches it saw, its module and batches, and `single` / `step`,
which put one problem in an engine and run its local steps one global step at a time."""

from __future__ import annotations

import torch

from betty import Engine
from betty.configs import EngineConfig
from betty.problems import ImplicitProblem


class Linear(ImplicitProblem):
    """Least squares ``mean((x @ w - y)^2)`` on batches ``(x, y)``; records what it saw."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list = []

    def training_step(self, batch):
        self.batches.append(batch)
        x, y = batch
        return ((self.module(x).squeeze(-1) - y) ** 2).mean()


def linear_module(n: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(n, 1, bias=False)


def batches(k: int, n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, n, generator=g), torch.randn(4, generator=g)) for _ in range(k)]


def single(problem, config: EngineConfig | None = None, engine_type=Engine) -> Engine:
    return engine_type([problem], config or EngineConfig(train_iters=1))


def step(engine: Engine, n: int = 1) -> None:
    for _ in range(n):
        engine.global_step += 1
        engine.train_step()
