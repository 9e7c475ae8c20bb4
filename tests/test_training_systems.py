"""Training systems around the local step: gradient accumulation, mixed precision (bf16
autocast; fp16 with a grad scaler), gradient clipping, roll-back with warm-up, early stopping.

References: a single batch of size k*b for accumulation (float64, exact up to round-off);
the fp32 run of the same program for bf16/fp16 hypergradients (cosine); hand-written event
lists for the roll-back / warm-up schedule; scripted validation metrics for early stopping.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import ProblemDefinitionError
from betty.hypergradient import METHODS
from betty.problems import ImplicitProblem

D = 5


class Hyper(torch.nn.Module):
    def __init__(self, value: float, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.lam = torch.nn.Parameter(torch.full((D,), value, dtype=dtype))


class Recorder:
    """Mixin: records (global step, lr) at each optimizer step and the raw gradients."""

    def param_callback(self, params):
        self.steps.append((self.engine.global_step, self.optimizer.param_groups[0]["lr"]))

    def grad_callback(self, grads):
        scale = self.state_dict().get("scaler", {}).get("scale", 1.0)
        self.raw = [g.detach().double() / scale for g in grads]


class RidgeLower(Recorder, ImplicitProblem):
    """L(w, lam) = 1/2 mean((x w - y)^2) + 1/2 sum(lam * w^2)  (docs/math.md#ridge-regression)."""

    def training_step(self, batch):
        x, y = batch
        fit = 0.5 * ((self.module(x).squeeze(-1) - y) ** 2).mean()
        return fit + 0.5 * (self.upper.module.lam * self.module.weight.squeeze(0) ** 2).sum()


class RidgeUpper(Recorder, ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return 0.5 * ((self.lower(x).squeeze(-1) - y) ** 2).mean()


def ridge_data(n: int, seed: int, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    y = x @ torch.randn(D, generator=g, dtype=torch.float64) + 0.1 * torch.randn(
        n, generator=g, dtype=torch.float64)
    return x.to(dtype), y.to(dtype)


def ridge(lower_batches: list, *, lower: dict | None = None, upper: dict | None = None,
          lower_lr: float = 0.1, upper_lr: float = 1.0, adam: bool = False,
          dtype: torch.dtype = torch.float32, engine: dict | None = None,
          engine_class: type = Engine) -> Engine:
    torch.manual_seed(0)
    net = torch.nn.Linear(D, 1, bias=False).to(dtype)
    opt = (torch.optim.Adam(net.parameters(), lr=lower_lr) if adam
           else torch.optim.SGD(net.parameters(), lr=lower_lr))
    low = RidgeLower("lower", Config(**(lower or {})), module=net, optimizer=opt,
                     scheduler=torch.optim.lr_scheduler.StepLR(opt, 1, 0.5) if adam else None,
                     train_data_loader=lower_batches)
    hyper = Hyper(0.5, dtype)
    up = RidgeUpper("upper", Config(**(upper or {})), module=hyper,
                    optimizer=torch.optim.SGD(hyper.parameters(), lr=upper_lr),
                    train_data_loader=[ridge_data(16, 1, dtype)])
    for problem in (low, up):
        problem.steps, problem.raw = [], []
    config = EngineConfig(**{"train_iters": 1, **(engine or {})})
    return engine_class([up, low], config,
                        dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})


def params(problem) -> torch.Tensor:
    return torch.cat([p.detach().double().reshape(-1) for p in problem.trainable_parameters()])


# -- gradient accumulation -----------------------------------------------------------------
def test_accumulating_k_micro_batches_equals_one_batch_of_k_b_float64():
    k, b, windows = 3, 4, 2
    x, y = ridge_data(k * b * 2 * windows, 0, torch.float64)
    micro = [(x[i:i + b], y[i:i + b]) for i in range(0, len(x), b)]
    whole = [(x[i:i + k * b], y[i:i + k * b]) for i in range(0, len(x), k * b)]
    cfg = {"unroll_steps": 2}
    acc = ridge(micro, lower={**cfg, "gradient_accumulation": k}, adam=True,
                dtype=torch.float64, upper_lr=0.5, engine={"train_iters": k})
    one = ridge(whole, lower=cfg, adam=True, dtype=torch.float64, upper_lr=0.5)
    acc.run()
    one.run()
    assert acc.lower.steps == [(k, 0.1)]  # one optimizer step after k micro-batches
    torch.testing.assert_close(params(acc.lower), params(one.lower), rtol=0, atol=1e-6)
    assert not torch.equal(params(acc.lower), params(ridge(micro).lower))  # it moved

    acc.config.train_iters, one.config.train_iters = k * 2 * windows, 2 * windows
    acc.run()
    one.run()
    # uppers every unroll_steps * k local steps; the scheduler once per optimizer step
    assert [s for s, _ in acc.upper.steps] == [2 * k, 4 * k]
    assert [s for s, _ in one.upper.steps] == [2, 4]
    assert [lr for _, lr in acc.lower.steps] == [0.1, 0.05, 0.025, 0.0125]
    assert acc.lower.scheduler.last_epoch == 2 * windows
    # darts' hop through this lower does not depend on its batch: whole runs must agree
    torch.testing.assert_close(params(acc.lower), params(one.lower), rtol=0, atol=1e-6)
    torch.testing.assert_close(params(acc.upper), params(one.upper), rtol=0, atol=1e-6)


# -- mixed precision -----------------------------------------------------------------------
METHOD_CONFIG = {"cg_iterations": D, "neumann_iterations": 20, "neumann_alpha": 0.2}


def upper_gradient(method: str, precision: str, **fields: Any) -> tuple[torch.Tensor, Engine]:
    """The upper's applied (unscaled) gradient after one global step: SGD, lr 1."""
    cfg = {"precision": precision, **fields}
    engine = ridge([ridge_data(32, 0)], lower={"type": method, **METHOD_CONFIG, **cfg},
                   upper=cfg)
    before = params(engine.upper)
    engine.run()
    return before - params(engine.upper), engine


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bf16_and_fp16_hypergradients_match_fp32(method):
    exact, _ = upper_gradient(method, "fp32")
    assert exact.norm() > 1e-3
    bf16, _ = upper_gradient(method, "bf16")
    assert cosine(bf16, exact) > 0.99
    fp16, engine = upper_gradient(method, "fp16", initial_dynamic_scale=2.0**8)
    assert engine.upper.skipped_steps == 0 and engine.lower.skipped_steps == 0
    assert cosine(fp16, exact) > 0.999  # a hypergradient left scaled would be 256x too long
    torch.testing.assert_close(fp16, exact, rtol=0, atol=5e-3 * float(exact.norm()))


@pytest.mark.parametrize("who", ["lower", "upper"])
def test_overflowing_fp16_step_is_skipped_counted_and_the_scale_backs_off(who):
    fp16 = {"precision": "fp16", "initial_dynamic_scale": 2.0**24}
    engine = ridge([ridge_data(32, 0)], **{who: fp16})
    problem = getattr(engine, who)
    before = params(problem)
    engine.run()
    assert problem.skipped_steps == 1 and problem.steps == []
    assert torch.equal(params(problem), before)
    assert problem.state_dict()["scaler"]["scale"] == 2.0**23
    engine.config.train_iters = 20
    engine.run()
    assert 1 < problem.skipped_steps < 20 and len(problem.steps) == 20 - problem.skipped_steps
    assert not torch.equal(params(problem), before)


def test_fp16_scaler_takes_its_settings_from_config():
    engine = ridge([ridge_data(8, 0)], lower={"precision": "fp16",
                                              "initial_dynamic_scale": 256.0,
                                              "scale_factor": 4.0})
    scaler = engine.lower.state_dict()["scaler"]
    assert scaler["scale"] == 256.0 and scaler["growth_factor"] == 4.0
    assert "scaler" not in engine.upper.state_dict()


# -- gradient clipping ---------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("who", ["lower", "upper"])
def test_clipping_bounds_the_applied_gradient_norm(who, precision):
    limit = 1e-3
    cfg = {"gradient_clipping": limit, "precision": precision, "initial_dynamic_scale": 2.0**6}
    engine = ridge([ridge_data(32, 0)], **{who: cfg}, lower_lr=1.0, upper_lr=1.0)
    problem = getattr(engine, who)
    applied: list[torch.Tensor] = []
    step = problem.optimizer.step

    def recording_step(*args, **kwargs):  # what the optimizer is given, after clipping
        applied.append(torch.cat([p.grad.detach().double().reshape(-1)
                                  for p in problem.trainable_parameters()]))
        return step(*args, **kwargs)

    problem.optimizer.step = recording_step
    before = params(problem)
    engine.run()
    raw = torch.cat([g.reshape(-1) for g in problem.raw]).norm()  # after unscaling
    assert raw > 10 * limit  # clipping was needed
    assert len(applied) == 1 and applied[0].norm() <= limit * (1 + 1e-6)
    assert applied[0].norm() == pytest.approx(limit, rel=1e-4)
    # SGD with lr 1 moved the parameters by the clipped gradient (float32 round-off)
    assert (before - params(problem)).norm() == pytest.approx(limit, rel=1e-3)


def test_gradients_under_the_limit_are_not_clipped():
    engine = ridge([ridge_data(32, 0)], lower={"gradient_clipping": 1e6}, lower_lr=1.0)
    before = params(engine.lower)
    engine.run()
    raw = torch.cat([g.reshape(-1) for g in engine.lower.raw])
    torch.testing.assert_close(before - params(engine.lower), raw)


# -- roll-back and warm-up: a hand-written schedule ----------------------------------------
class ScalarLower(ImplicitProblem):
    """L(w, lam) = 1/2 (w - lam - b)^2 on batch b; SGD; lr halves at each scheduler step."""

    def training_step(self, batch):
        return 0.5 * (self.module.w - self.upper.module.w - batch) ** 2

    def on_inner_loop_start(self):
        self.events.append(("L", "start", self.count + 1))

    def param_callback(self, params):
        self.events.append(("L", self.count, int(self.cur_batch), self.optimizer.param_groups[0]
                            ["lr"], float(self.module.w.detach())))


class ScalarUpper(ImplicitProblem):
    def training_step(self, batch):
        return 0.5 * (self.lower.module.w - batch) ** 2

    def param_callback(self, params):
        self.events.append(("U", self.count, int(self.cur_batch), float(self.module.w.detach())))


class Scalar(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))


def scalar_program(*, roll_back: bool, gas: int = 1, train_iters: int = 8,
                   unroll: int = 2, warmup: int = 3) -> tuple[Engine, list]:
    events: list = []
    low_net, up_net = Scalar(), Scalar()
    opt = torch.optim.SGD(low_net.parameters(), lr=0.5)
    low = ScalarLower("lower", Config(unroll_steps=unroll, warmup_steps=warmup,
                                      gradient_accumulation=gas),
                      module=low_net, optimizer=opt,
                      scheduler=torch.optim.lr_scheduler.StepLR(opt, 1, 0.5),
                      train_data_loader=[torch.tensor(float(b)) for b in range(1, 9)])
    up = ScalarUpper("upper", module=up_net, optimizer=torch.optim.SGD(up_net.parameters(), lr=1),
                     train_data_loader=[torch.tensor(float(b)) for b in (10, 20, 30)])
    low.events = up.events = events
    engine = Engine([up, low], EngineConfig(train_iters=train_iters, roll_back=roll_back),
                    dependencies={"u2l": {up: [low]}, "l2u": {low: [up]}})
    return engine, events


def _schedule(events: list) -> list:
    """Events without the parameter values: (who, local step, batch, lr) and window starts."""
    return [e if e[1] == "start" else e[:4] if e[0] == "L" else e[:3] for e in events]


def test_schedule_without_roll_back():
    engine, events = scalar_program(roll_back=False)
    engine.run()
    assert _schedule(events) == [
        ("L", "start", 1), ("L", 1, 1, 0.5), ("L", 2, 2, 0.25),  # warm-up: no trigger at 2
        ("L", 3, 3, 0.125), ("L", 4, 4, 0.0625), ("U", 1, 10),
        ("L", "start", 5), ("L", 5, 5, 0.03125), ("L", 6, 6, 0.015625), ("U", 2, 20),
        ("L", "start", 7), ("L", 7, 7, 0.0078125), ("L", 8, 8, 0.00390625), ("U", 3, 30),
    ]


def test_schedule_with_roll_back_and_warm_up():
    engine, events = scalar_program(roll_back=True)
    engine.run()
    # Warm-up steps (window ending at 2 <= warmup_steps) are real ones: they step the
    # scheduler and are never rolled back. Each later window is a look-ahead at a fixed lr;
    # after the upper steps, the lower restores its state from the window's start and
    # replays the window's last batch as one real step, then the scheduler steps.
    assert _schedule(events) == [
        ("L", "start", 1), ("L", 1, 1, 0.5), ("L", 2, 2, 0.25),
        ("L", 3, 3, 0.125), ("L", 4, 4, 0.125), ("U", 1, 10), ("L", 4, 4, 0.125),
        ("L", "start", 5), ("L", 5, 5, 0.0625), ("L", 6, 6, 0.0625), ("U", 2, 20),
        ("L", 6, 6, 0.0625),
        ("L", "start", 7), ("L", 7, 7, 0.03125), ("L", 8, 8, 0.03125), ("U", 3, 30),
        ("L", 8, 8, 0.03125),
    ]
    # values: each replay starts from the state before its window, with the new upper
    w_after = {(e[1], i): e[4] for i, e in enumerate(events) if e[0] == "L" and e[1] != "start"}
    replays = [i for i, e in enumerate(events) if e[0] == "U"]
    for i in replays:
        count, batch, lr, w_replay = events[i + 1][1:]
        w_start = w_after[count - 2, max(j for (c, j) in w_after if c == count - 2 and j < i)]
        lam = events[i][3]
        assert w_replay == pytest.approx(w_start - lr * (w_start - lam - batch), abs=1e-6)


def test_roll_back_replay_is_one_whole_step_even_with_accumulation():
    engine, events = scalar_program(roll_back=True, gas=2, unroll=1, warmup=0, train_iters=2)
    engine.run()
    assert _schedule(events) == [("L", "start", 1), ("L", 2, 2, 0.5), ("U", 1, 10),
                                 ("L", 2, 2, 0.5)]
    lam = events[1 + 1][3]
    # restored to w = 0, then the full gradient of batch 2 (not half of it)
    assert events[-1][4] == pytest.approx(0.0 - 0.5 * (0.0 - lam - 2.0), abs=1e-6)


# -- early stopping ------------------------------------------------------------------------
class Scripted(Engine):
    script: list[float] = []

    def validation(self):
        return {"acc": self.script[self.global_step - 1], "loss": 0.0}


@pytest.mark.parametrize(("mode", "script", "tolerance", "stop"), [
    ("min", [5, 4, 4.5, 4, 3.9, 4, 4, 4, 1, 1, 1, 1], 3, 8),  # equal is no improvement
    ("max", [1, 2, 1, 3, 2, 2, 9, 9, 9, 9, 9, 9], 2, 6),
    ("min", list(range(1, 13)), 20, None),  # never reaches the tolerance
])
def test_early_stopping(mode, script, tolerance, stop):
    engine = ridge([ridge_data(8, 0)], engine_class=type("E", (Scripted,), {"script": script}),
                   engine={"train_iters": 10, "valid_step": 1, "early_stopping": True,
                           "early_stopping_mode": mode, "early_stopping_tolerance": tolerance,
                           "early_stopping_metric": "acc"})
    engine.run()
    assert engine.stopped_early == (stop is not None)
    assert engine.global_step == (stop or 10)
    assert engine.lower.count == engine.global_step
    engine.config.train_iters = 12
    engine.run()  # a stopped run stays stopped
    assert engine.global_step == (stop or 12)


def test_early_stopping_off_ignores_the_metric():
    engine = ridge([ridge_data(8, 0)], engine_class=type("E", (Scripted,), {"script": [1] * 5}),
                   engine={"train_iters": 5, "valid_step": 1, "early_stopping_tolerance": 1})
    engine.run()
    assert engine.global_step == 5 and not engine.stopped_early


def test_early_stopping_on_a_missing_metric_fails_with_the_keys():
    engine = ridge([ridge_data(8, 0)], engine_class=type("E", (Scripted,), {"script": [1] * 5}),
                   engine={"train_iters": 5, "valid_step": 1, "early_stopping": True,
                           "early_stopping_metric": "f1"})
    with pytest.raises(ProblemDefinitionError, match=r"'f1'.*\['acc', 'loss'\]"):
        engine.run()
