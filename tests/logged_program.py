"""The program of tests/test_logging.py: a bilevel problem on two scalars, run for `STEPS`
global steps with a validation every `VALID`. By default the lower logs a dict (its loss and
its target) at every local step and the upper its loss at every second one; `Spy`, the
engine, records as floats everything the program asks to log and what its validation
returned."""

from __future__ import annotations

import torch

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem

STEPS, VALID = 6, 3


class Scalar(torch.nn.Module):
    def __init__(self, init: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(init))


class Inner(ImplicitProblem):
    def get_batch(self):
        return torch.tensor(1.0 + 0.1 * self.count)

    def training_step(self, batch):
        w = self.module.w
        return {"loss": (w - batch) ** 2 + self.outer.module.w.exp() * w ** 2, "target": batch}


class Outer(ImplicitProblem):
    def get_batch(self):
        return torch.tensor(0.5)

    def training_step(self, batch):
        return (self.inner.module.w - batch) ** 2 + 0.1 * self.module.w ** 2


class Spy(Engine):
    """Records, as floats, everything the program asks to log."""

    def __init__(self, *args, **kwargs) -> None:
        self.seen: dict[tuple[str, int], dict[str, float]] = {}
        super().__init__(*args, **kwargs)

    def log_metrics(self, name, metrics, step):
        self.seen[(name, step)] = {k: float(torch.as_tensor(v).detach())
                                   for k, v in metrics.items()}
        super().log_metrics(name, metrics, step)

    def validation(self):
        out = {"loss": (self.inner.module.w.detach() - 0.5) ** 2, "acc": self.global_step / 100}
        self.seen[("validation", self.global_step)] = {k: float(v) for k, v in out.items()}
        return out


def program(outer_config: Config | None = None, inner_config: Config | None = None,
            **engine_config) -> Spy:
    m_in, m_out = Scalar(0.0), Scalar(-1.0)
    opt = torch.optim.SGD(m_in.parameters(), lr=0.1)
    inner = Inner("inner", inner_config or Config(log_step=1), module=m_in, optimizer=opt,
                  scheduler=torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5))
    outer = Outer("outer", outer_config or Config(log_step=2), module=m_out,
                  optimizer=torch.optim.SGD(m_out.parameters(), lr=0.01))
    config = EngineConfig(train_iters=STEPS, valid_step=VALID, **engine_config)
    return Spy([outer, inner], config, {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
