"""Hypergradient diagnostics: norms of the direct and implicit parts, CG residual, Neumann
spectral radius (and its warning), time per problem; off by default and free when off.

References: eigenvalues and residuals from dense float64 matrices (`torch.linalg`), and, for
the scalar bilevel program below, the implicit hypergradient in closed form:

    inner:  L_in(w, lam)  = (w - b)^2 + exp(lam) w^2     H = 2 + 2 exp(lam),  M = 2 exp(lam) w
    outer:  L_out(w, lam) = (w - 1/2)^2 + c lam^2        direct = 2 c lam,    v = 2 (w - 1/2)
    implicit part = -M H^-1 v  (cg; exact after one iteration in one dimension)
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.diagnostics import Diagnostics, DiagnosticWarning, path_label
from betty.hypergradient import Hop, cg, neumann
from betty.linalg import solve_cg, spectral_radius
from betty.logging import RunLogger
from betty.problems import ImplicitProblem

C = 0.3


def spd(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    return a @ a.T / n + 0.5 * torch.eye(n, dtype=torch.float64)


# -- pure math ---------------------------------------------------------------------------
def test_spectral_radius_matches_the_eigenvalues():
    a = spd(6)
    eig = torch.linalg.eigvalsh(a)
    start = [torch.ones(6, dtype=torch.float64)]
    est = spectral_radius(lambda x: [a @ x[0]], start, iterations=200)
    assert float(est) == pytest.approx(float(eig.abs().max()), rel=1e-6)
    shifted = torch.eye(6, dtype=torch.float64) - 0.9 * a  # I - alpha A: may exceed 1
    est = spectral_radius(lambda x: [shifted @ x[0]], start, iterations=300)
    assert float(est) == pytest.approx(float(torch.linalg.eigvalsh(shifted).abs().max()),
                                       rel=1e-4)


def test_spectral_radius_of_a_zero_start_is_zero_not_nan():
    est = spectral_radius(lambda x: x, [torch.zeros(3, dtype=torch.float64)], iterations=3)
    assert float(est) == 0.0


@pytest.mark.parametrize("iterations", [1, 3, 6])
def test_cg_returns_its_true_residual_on_request(iterations):
    a, b = spd(6, seed=1), torch.linspace(1.0, 2.0, 6, dtype=torch.float64)
    x, residual = solve_cg(lambda p: [a @ p[0]], [b], iterations=iterations,
                           return_residual=True)
    true = torch.linalg.vector_norm(b - a @ x[0])
    assert float(residual) == pytest.approx(float(true), rel=1e-6, abs=1e-12)
    plain = solve_cg(lambda p: [a @ p[0]], [b], iterations=iterations)  # default: the vector
    torch.testing.assert_close(plain[0], x[0])


# -- the methods report through Hop.report -------------------------------------------------
def quadratic_hop(h: torch.Tensor) -> tuple[Hop, list[torch.Tensor]]:
    """``L(w, lam) = 1/2 w^T H w + lam . w`` (Hessian ``H``)."""
    w = torch.zeros(h.shape[0], dtype=torch.float64, requires_grad=True)
    lam = torch.ones(h.shape[0], dtype=torch.float64, requires_grad=True)
    return Hop([w], [lam], lambda: 0.5 * w @ h @ w + lam @ w), [w]


def run_method(method, h, v, config):
    hop, _ = quadratic_hop(h)
    reports: dict[str, torch.Tensor] = {}
    hop.report = lambda key, value: reports.__setitem__(key, value)
    with hop:
        method(hop, [v], config)
    return reports


def test_cg_reports_the_relative_residual():
    h, v = spd(5, seed=2), torch.linspace(-1.0, 1.0, 5, dtype=torch.float64)
    # one CG step from 0 is the line search along v: x = (v.v / v.Hv) v
    x = (v @ v) / (v @ h @ v) * v
    want = torch.linalg.vector_norm(v - h @ x) / torch.linalg.vector_norm(v)
    got = run_method(cg, h, v, Config(type="cg", cg_iterations=1, cg_alpha=0.7))
    assert float(got["cg_residual"]) == pytest.approx(float(want), rel=1e-9)
    got = run_method(cg, h, v, Config(type="cg", cg_iterations=5))
    assert float(got["cg_residual"]) < 1e-9  # converged in dimension 5


@pytest.mark.parametrize("alpha, radius", [(0.2, 0.9), (0.6, 1.4)])
def test_neumann_reports_the_spectral_radius(alpha, radius):
    h = torch.diag(torch.tensor([4.0, 0.5], dtype=torch.float64))  # I - aH: 1-4a, 1-a/2
    v = torch.tensor([1.0, 1.0], dtype=torch.float64)
    got = run_method(neumann, h, v, Config(type="neumann", neumann_alpha=alpha))
    assert float(got["neumann_rho"]) == pytest.approx(radius, rel=1e-3)


# -- the engine ------------------------------------------------------------------------------
class Scalar(torch.nn.Module):
    def __init__(self, init: float) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(init, dtype=torch.float64))


class Inner(ImplicitProblem):
    def get_batch(self):
        return torch.tensor(1.0 + 0.1 * self.count, dtype=torch.float64)

    def training_step(self, batch):
        w = self.module.w
        return (w - batch) ** 2 + self.outer.module.w.exp() * w ** 2


class Outer(ImplicitProblem):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.at: list[tuple[float, float]] = []  # (w, lam) at each of its steps

    def get_batch(self):
        return torch.tensor(0.5, dtype=torch.float64)

    def training_step(self, batch):
        w, lam = self.inner.module.w, self.module.w
        self.at.append((float(w.detach()), float(lam.detach())))
        return (w - batch) ** 2 + C * lam ** 2


def program(inner_config: Config, **engine_config) -> Engine:
    m_in, m_out = Scalar(0.0), Scalar(-1.0)
    inner = Inner("inner", inner_config, module=m_in,
                  optimizer=torch.optim.SGD(m_in.parameters(), lr=0.1))
    outer = Outer("outer", Config(), module=m_out,
                  optimizer=torch.optim.SGD(m_out.parameters(), lr=0.01))
    config = EngineConfig(train_iters=4, **engine_config)
    return Engine([outer, inner], config, {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})


def test_off_by_default_and_free_when_off(monkeypatch):
    calls = []
    real, real_both = Hop.hvp, Hop.hvp_and_mixed  # neumann takes (H x, M x) from one pass
    monkeypatch.setattr(Hop, "hvp", lambda self, x: calls.append(1) or real(self, x))
    monkeypatch.setattr(Hop, "hvp_and_mixed",
                        lambda self, x: calls.append(1) or real_both(self, x))
    engine = program(Config(type="neumann", neumann_iterations=2, neumann_alpha=0.1))
    assert not EngineConfig().diagnostics and not engine.diagnostics.enabled
    engine.run()
    assert len(calls) == 2 * 4  # the series' own products only
    assert engine.diagnostics.latest == {}
    calls.clear()
    engine = program(Config(type="neumann", neumann_iterations=2, neumann_alpha=0.1),
                     diagnostics=True)
    engine.run()
    assert len(calls) == (2 + 8) * 4  # plus the power iterations


def test_norms_and_residual_against_the_closed_form():
    engine = program(Config(type="cg", cg_iterations=1), diagnostics=True)
    engine.run()
    outer = engine.diagnostics.latest["outer"]
    w, lam = engine.outer.at[-1]
    h, m, v = 2 + 2 * math.exp(lam), 2 * math.exp(lam) * w, 2 * (w - 0.5)
    assert outer["direct_norm"] == pytest.approx(abs(2 * C * lam), rel=1e-9)
    assert outer["implicit_norm/inner"] == pytest.approx(abs(-m * v / h), rel=1e-9)
    assert outer["cg_residual/inner"] < 1e-12  # one dimension: one step is exact
    for name in ("inner", "outer"):
        assert engine.diagnostics.latest[name]["time_ms"] > 0.0
    assert "direct_norm" not in engine.diagnostics.latest["inner"]  # no paths: nothing


def test_diagnostics_are_logged_once_per_step_under_the_problem():
    engine = program(Config(type="cg"), diagnostics=True)
    seen: list[tuple[int, dict]] = []

    class Backend:
        def write(self, records, *, global_step):
            seen.append((global_step, {r.tag: r.metrics for r in records}))

        def close(self):
            pass

    engine.logger = RunLogger([Backend], clock=lambda: engine.global_step)
    engine.run()
    assert [step for step, _ in seen] == [1, 2, 3, 4]
    assert {"direct_norm", "implicit_norm/inner", "cg_residual/inner", "time_ms"} <= \
        set(seen[-1][1]["outer"])
    assert all(isinstance(v, float) for v in seen[-1][1]["outer"].values())


def test_neumann_that_cannot_converge_warns_once():
    # H = 2 + 2 exp(lam) ~ 2.7 near lam = -1, so alpha = 1 gives |1 - alpha H| ~ 1.7 > 1
    engine = program(Config(type="neumann", neumann_alpha=1.0), diagnostics=True)
    with pytest.warns(DiagnosticWarning, match="problem 'outer'.*lower problem 'inner'") as got:
        engine.run()
    assert len([w for w in got if issubclass(w.category, DiagnosticWarning)]) == 1
    w, lam = engine.outer.at[-1]
    rho = engine.diagnostics.latest["outer"]["neumann_rho/inner"]
    assert rho == pytest.approx(abs(1 - (2 + 2 * math.exp(lam))), rel=1e-9)


def test_neumann_that_converges_does_not_warn():
    engine = program(Config(type="neumann", neumann_alpha=0.2), diagnostics=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DiagnosticWarning)
        engine.run()
    assert engine.diagnostics.latest["outer"]["neumann_rho/inner"] < 1.0


def test_time_is_summed_per_problem_and_step():
    diagnostics = Diagnostics(enabled=True)
    for _ in range(2):
        started = diagnostics.clock()
        diagnostics.add_time("p", started - 0.5)  # as if 0.5 s earlier
    logged = []

    class Logger:
        def log(self, metrics, *, tag, step):
            logged.append((tag, step, metrics))

    out = diagnostics.end_step(Logger(), 7)
    assert out["p"]["time_ms"] == pytest.approx(1000.0, rel=0.05)
    assert logged == [("p", 7, out["p"])]
    assert Diagnostics().clock() is None  # off: no clock read


def test_path_labels():
    assert path_label(["outer", "inner", "outer"]) == "inner"
    assert path_label(["top", "mid", "low", "top"]) == "mid-low"
