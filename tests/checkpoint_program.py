"""The program of tests/test_checkpoint.py, rebuilt identically in any process by `build`.

A lower (an `ImplicitProblem` or an `IterativeProblem`) trains a small dropout classifier on a
shuffled DataLoader that draws from torch's global generator, with numpy and Python random
draws in its loss, an L2 penalty weighted by the upper's two hyperparameters and a StepLR
schedule. The upper learns those from the classifier's loss on its own data (a DataLoader
with its own generator, an ExponentialLR schedule). `ValidatedEngine` validates without
randomness, with early stopping on but never reached. `VARIANTS` add gradient accumulation,
warmup, roll-back, fp16 and bf16 with clipping, and reverse mode. ``interrupt_at`` raises
SIGINT (or SIGTERM) from inside a step, as Ctrl-C (or kill) would.
"""

from __future__ import annotations

import random
import signal
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem, IterativeProblem

N = 7  # the checkpoint's global step: mid-epoch, mid-window
HIDDEN = 16


def _lower_step(self: Any, batch: Any) -> torch.Tensor:
    x, y = batch
    interrupt = (self.cfg or {}).get("interrupt_at")
    if interrupt is not None and self.engine.global_step == interrupt[0]:
        kind = signal.SIGTERM if len(interrupt) > 2 else signal.SIGINT
        for _ in range(interrupt[1]):  # as Ctrl-C (or kill) does: to the main thread
            signal.raise_signal(kind)
        self.cfg = None
    noise = torch.from_numpy(np.random.randn(*x.shape)).float() * 0.01
    loss = F.cross_entropy(self.module(x + noise), y) * (1 + 0.01 * random.random())
    layers = [self.module[0].weight, self.module[3].weight]
    reg = sum(F.softplus(lam) * (w**2).sum() for lam, w in zip(self.upper.module.lam, layers))
    return loss + 1e-2 * reg


class Upper(ImplicitProblem):
    def training_step(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self.lower(x), y)


class Hyper(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lam = torch.nn.Parameter(torch.zeros(2))


class ValidatedEngine(Engine):
    """Validation without randomness; early stopping on, with a tolerance never reached."""

    def validation(self) -> dict[str, Any]:
        x, y = self.valid_data
        with torch.no_grad():
            return {"loss": F.cross_entropy(self.lower(x), y)}


def _lower_kinds() -> dict[str, type]:
    return {"implicit": ImplicitProblem, "iterative": IterativeProblem}


# Variants of the program: Config fields of the lower and upper, EngineConfig fields.
VARIANTS: dict[str, dict[str, dict[str, Any]]] = {
    "plain": {"lower": {"unroll_steps": 2}, "upper": {}, "engine": {}},
    "rollback-accumulation-warmup": {
        "lower": {"unroll_steps": 2, "gradient_accumulation": 2, "warmup_steps": 2},
        "upper": {"gradient_accumulation": 2}, "engine": {"roll_back": True}},
    "fp16-bf16-clipping": {
        "lower": {"unroll_steps": 2, "precision": "fp16", "gradient_clipping": 0.5,
                  "initial_dynamic_scale": 2.0**10},
        "upper": {"precision": "bf16", "gradient_clipping": 0.1}, "engine": {}},
    "reverse": {"lower": {"unroll_steps": 2}, "upper": {"first_order": False}, "engine": {}},
    "accumulation": {"lower": {"unroll_steps": 2, "gradient_accumulation": 2}, "upper": {},
                     "engine": {}},
}


def build(kind: str = "implicit", variant: str = "plain", hidden: int = HIDDEN,
          lower_name: str = "lower", interrupt_at: tuple[int, int] | None = None,
          **engine_fields: Any) -> Engine:
    """The program, rebuilt identically in any process (every seed set here)."""
    settings = VARIANTS[variant]
    torch.manual_seed(0)
    random.seed(0)
    np.random.seed(0)
    x, y = torch.randn(36, 6), torch.randint(0, 3, (36,))
    xv, yv = torch.randn(20, 6), torch.randint(0, 3, (20,))
    net = torch.nn.Sequential(torch.nn.Linear(6, hidden), torch.nn.ReLU(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(hidden, 3))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    lower_cls = type("Lower", (_lower_kinds()[kind],), {"training_step": _lower_step})
    lower = lower_cls(lower_name, Config(**settings["lower"]), module=net, optimizer=opt,
                      scheduler=torch.optim.lr_scheduler.StepLR(opt, 3, 0.7),
                      train_data_loader=DataLoader(TensorDataset(x, y), batch_size=8,
                                                   shuffle=True),
                      extra_config={"interrupt_at": interrupt_at})
    hyper = Hyper()
    hopt = torch.optim.Adam(hyper.parameters(), lr=0.01)
    upper = Upper("upper", Config(**settings["upper"]), module=hyper, optimizer=hopt,
                  scheduler=torch.optim.lr_scheduler.ExponentialLR(hopt, 0.95),
                  train_data_loader=DataLoader(TensorDataset(xv, yv), batch_size=8, shuffle=True,
                                               generator=torch.Generator().manual_seed(7)))
    config = EngineConfig(**{"train_iters": 2 * N, "valid_step": 3, "early_stopping": True,
                             "early_stopping_tolerance": 50, **settings["engine"],
                             **engine_fields})
    engine = ValidatedEngine([upper, lower], config,
                             dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    engine.valid_data = (xv, yv)
    return engine
