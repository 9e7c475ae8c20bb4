"""`Quad`, the problem of tests/test_errors.py and tests/test_default_retain_graph.py:
``(w - 1)^2`` on one weight, plus ``w * other.w`` for each problem named in ``uses``.
Every `Quad.training_step` appends the problem's name to `STEPS`, so a test can tell that no
training step ran."""

from __future__ import annotations

import torch

from betty.configs import Config
from betty.problems import ImplicitProblem

STEPS: list[str] = []  # names of problems whose training_step ran


class Quad(ImplicitProblem):
    """``(w - 1)^2`` plus ``w * other.w`` for each name in ``uses``."""

    def __init__(self, name: str, config: Config | None = None, *, uses: tuple = (),
                 module=..., optimizer=..., loader=...) -> None:
        if module is ...:
            module = torch.nn.Linear(1, 1, bias=False)
            torch.nn.init.constant_(module.weight, 0.5)
        if optimizer is ...:
            optimizer = None if module is None else torch.optim.SGD(module.parameters(), lr=0.1)
        loader = [torch.tensor(1.0)] if loader is ... else loader
        super().__init__(name, config, module=module, optimizer=optimizer,
                         train_data_loader=loader)
        self.uses = uses

    def training_step(self, batch):
        STEPS.append(self.name)
        w = self.module.weight.sum()
        loss = (w - batch) ** 2
        for other in self.uses:
            loss = loss + w * getattr(self, other).module.weight.sum()
        return loss
