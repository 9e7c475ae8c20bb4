"""The scalar problem of tests/test_engine.py: one parameter ``w``, a quadratic loss coupled
to other problems' ``w``, and records of the order and number of its steps."""

from __future__ import annotations

import torch

from betty.configs import Config
from betty.problems import ImplicitProblem


class ScalarModule(torch.nn.Module):
    def __init__(self, init: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(init))


class Scalar(ImplicitProblem):
    """``loss = (w - target)^2 + sum_j coef_j * w * w_j`` over the coupled problems ``j``.

    ``get_batch`` returns the target (1.0, or ``targets(count)``) and appends the problem's
    name to ``trace``, so the trace is the order of local steps (hypergradient probes reuse
    ``cur_batch`` and do not call it).
    """

    def __init__(self, name: str, config: Config | None = None, *, trace: list | None = None,
                 couple: dict[str, float] | None = None, init: float = 0.5, lr: float = 0.1,
                 targets=None) -> None:
        module = ScalarModule(init)
        super().__init__(name, config, module=module,
                         optimizer=torch.optim.SGD(module.parameters(), lr=lr))
        self.trace = trace if trace is not None else []
        self.couple = couple or {}
        self.targets = targets
        self.optimizer_steps = 0
        self.grads_seen: list[float] = []

    def get_batch(self):
        self.trace.append(self.name)
        return torch.tensor(1.0 if self.targets is None else float(self.targets(self.count)))

    def training_step(self, batch):
        w = self.module.w
        loss = (w - batch) ** 2
        for other, coef in self.couple.items():
            loss = loss + coef * w * getattr(self, other).module.w
        return loss

    def param_callback(self):
        self.optimizer_steps += 1
