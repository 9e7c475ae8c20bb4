"""Warm-started cg and neumann (``Config(warm_start=True)``), float64.

The lower loss is the quadratic ``L(w, lam) = 1/2 w^T A w - lam^T B w``: ``H = A`` and the mixed
product is ``M x = -B x``, so a hop returns ``B x`` (times ``||v||``) where ``x`` is the
solver's approximation of ``A^-1 v / ||v||``; the exact hop is ``B A^-1 v``. The vector ``v``
moves over the outer steps and settles, as an upper's gradient does. The solver gets
one iteration per outer step: warm-started, the error of the hop goes to 0 along the run (the
iterations accumulate across steps); from 0 every step, it stays where one iteration leaves it.
Each outer step builds a new `Hop`, as the chain does, sharing one ``memory`` dict.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import ConfigError
from betty.hypergradient import Hop, cg, neumann
from betty.problems import ImplicitProblem

DTYPE = torch.float64
DIM, UPPER = 12, 3


def problem() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(DIM, DIM, generator=gen, dtype=DTYPE))
    a = q @ torch.diag(torch.linspace(1.0, 8.0, DIM, dtype=DTYPE)) @ q.T  # condition 8
    b = torch.randn(UPPER, DIM, generator=gen, dtype=DTYPE)
    v_start = torch.randn(DIM, generator=gen, dtype=DTYPE)
    v_end = torch.randn(DIM, generator=gen, dtype=DTYPE)
    return a, b, v_start, v_end


def run(method, config: Config, steps: int, memory: dict | None) -> list[float]:
    """Relative error of the hop at each outer step."""
    a, b, v_start, v_end = problem()
    w = torch.randn(DIM, dtype=DTYPE, requires_grad=True)
    lam = torch.randn(UPPER, dtype=DTYPE, requires_grad=True)
    errors = []
    for t in range(steps):
        v = v_end + (v_start - v_end) * 0.85**t  # moves, then settles
        hop = Hop([w], [lam], lambda: 0.5 * w @ a @ w - lam @ b @ w)
        hop.memory = memory  # type: ignore[attr-defined]
        with hop:
            out = method(hop, [v.clone()], config)[0]
        exact = b @ torch.linalg.solve(a, v)
        errors.append(float((out - exact).norm() / exact.norm()))
    return errors


CASES = {
    "cg": (cg, Config(type="cg", cg_iterations=1, cg_alpha=0.3)),
    "neumann": (neumann, Config(type="neumann", neumann_iterations=1, neumann_alpha=0.2)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_one_iteration_per_step_tracks_the_solution_with_warm_start(name):
    """Reference: ``B A^-1 v`` by a dense solve. Warm-started, one iteration per outer step
    reaches 1e-8 after 150 steps (and the error falls along the run); cold, the error never
    drops below 5%."""
    method, config = CASES[name]
    warm = run(method, dataclasses.replace(config, warm_start=True), 150, {})
    cold = run(method, config, 150, {})
    assert warm[-1] < 1e-8
    assert warm[-1] < 1e-4 * warm[20] < 1e-4 * warm[0]
    assert min(cold) > 0.05
    assert cold[0] == pytest.approx(warm[0], rel=1e-12)  # the first warm solve starts at 0


@pytest.mark.parametrize("name", list(CASES))
def test_without_memory_or_with_stale_shapes_the_solve_starts_from_zero(name):
    """Reference: the cold solve. No memory (``hop.memory = None``) gives exactly the cold
    result; a stored solution whose shapes do not match the parameters is replaced, and the
    solve starts from 0 (neumann then forms the series' sum to keep it, where the cold solve
    accumulates the mixed products of the terms: equal up to rounding)."""
    method, config = CASES[name]
    warm_config = dataclasses.replace(config, warm_start=True)
    cold = run(method, config, 3, None)
    assert run(method, warm_config, 3, None) == cold
    stale = {name: [torch.ones(DIM + 1, dtype=DTYPE)]}
    assert run(method, warm_config, 1, stale) == pytest.approx(cold[:1], rel=1e-12)
    assert stale[name][0].shape == (DIM,)  # replaced by the new solution


def test_warm_start_must_be_a_bool():
    with pytest.raises(ConfigError, match="warm_start"):
        Config(warm_start="yes")  # type: ignore[arg-type]


# -- through the engine: the lower problem keeps the solution between outer steps -------------
class Quadratic(ImplicitProblem):
    def training_step(self, batch):
        a, b, _, _ = problem()
        w, lam = self.module.w, self.upper.module.w
        return 0.5 * w @ a @ w - lam @ b @ w


class Target(ImplicitProblem):
    def training_step(self, batch):
        _, _, target, _ = problem()
        return 0.5 * ((self.lower.module.w - target) ** 2).sum()

    def grad_callback(self, grads):
        self.seen.append(grads[0].detach().clone())
        self.v.append(self.lower.module.w.detach() - problem()[2])


class Vector(torch.nn.Module):
    def __init__(self, values: torch.Tensor) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(values.clone())


def engine_errors(config: Config, steps: int) -> list[float]:
    a, b, _, _ = problem()
    lower_module = Vector(torch.zeros(DIM, dtype=DTYPE))
    upper_module = Vector(torch.ones(UPPER, dtype=DTYPE))
    lower = Quadratic("lower", config, lower_module,
                      torch.optim.SGD(lower_module.parameters(), lr=0.2),
                      train_data_loader=[torch.zeros(1)])
    upper = Target("upper", Config(), upper_module,
                   torch.optim.SGD(upper_module.parameters(), lr=0.0),
                   train_data_loader=[torch.zeros(1)])
    upper.seen, upper.v = [], []
    Engine([upper, lower], EngineConfig(train_iters=steps, progress_bar=False),
           {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}).run()
    errors = []
    for got, v in zip(upper.seen, upper.v):
        exact = b @ torch.linalg.solve(a, v)
        errors.append(float((got - exact).norm() / exact.norm()))
    return errors


def test_engine_keeps_the_solution_per_hop_across_outer_steps():
    """Reference: ``B A^-1 v`` with ``v = w - target`` at each outer step (the upper has
    lr 0, so its own gradient is only the hypergradient). The lower converges under SGD, so
    ``v`` settles; with ``warm_start`` and one CG iteration per outer step the hypergradient
    converges to the exact one, without it the error stays."""
    config = Config(type="cg", cg_iterations=1)
    warm = engine_errors(dataclasses.replace(config, warm_start=True), 100)
    cold = engine_errors(config, 100)
    assert warm[-1] < 1e-6 and min(cold) > 0.05
