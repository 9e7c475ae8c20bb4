"""Hypergradients against dense references (tests/references.py), in float64.

Three layers, each checked against matrices formed explicitly in the test:

* the pure solvers (`betty.linalg`): CG against ``torch.linalg.solve`` and against the
  Krylov-Galerkin projection its K-th iterate must equal, Neumann against the closed-form
  geometric sum;
* one hop (`betty.hypergradient` methods on a `Hop`) on ridge regression, whose hypergradient
  has a closed form (docs/math.md): ``-w* * (H^-1 g)`` for cg/neumann, ``-w* * g`` for darts;
* the bilevel ridge regression program through `Engine` (the user path), against the same
  closed form.

Multilevel programs through `Engine`, against products of dense per-hop Jacobians, are in
test_hypergradient_multilevel.py.

Every optimizer in the programs has ``lr=0``, so the parameters the engine differentiates at
are exactly the ones the reference sees; the outer problem records the gradient it computed
(direct + hypergradient) in ``grad_callback``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import references as ref
import torch
from hypergradient_checks import DTYPE, EXACT, FINITE_DIFFERENCE, Vector, flat, rel_err
from torch import Tensor, nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.hypergradient import Hop, cg, darts, neumann
from betty.linalg import neumann_series, solve_cg
from betty.problems import ImplicitProblem


def split(vector: Tensor, sizes: tuple[int, ...] = (2, 4)) -> list[Tensor]:
    """A vector as a list of tensors of different shapes, as a module's parameters are."""
    parts = list(torch.split(vector, list(sizes)))
    return [parts[0], parts[1].reshape(2, -1)] if len(parts) == 2 else parts


def spd(dim: int, seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(dim, dim, generator=gen, dtype=DTYPE)
    return torch.eye(dim, dtype=DTYPE) + q @ q.T / dim


# -- betty.linalg ----------------------------------------------------------------------------
def dense_matvec(a: Tensor):
    return lambda xs: split(a @ flat(xs))


@pytest.mark.parametrize("iterations", [6, 18])
def test_solve_cg_matches_dense_solve(iterations):
    """Reference: ``torch.linalg.solve(A, b)``; ``iterations >= dim`` (6), incl. 3 x dim."""
    a, b = spd(6, 0), torch.linspace(-1.0, 2.0, 6, dtype=DTYPE)
    x = flat(solve_cg(dense_matvec(a), split(b), iterations=iterations))
    assert torch.isfinite(x).all()
    assert rel_err(x, ref.exact_solve(a, b)) < EXACT


def test_solve_cg_exact_convergence_stays_finite():
    """Reference: ``b / 2`` for ``A = 2 I``. The residual is exactly 0 after one step, so the
    next steps divide 0 by 0; CG must keep the solution instead of returning NaN."""
    b = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.25, -1.5], dtype=DTYPE)
    x = flat(solve_cg(lambda xs: [2.0 * t for t in xs], split(b), iterations=5))
    assert torch.equal(x, b / 2)


@pytest.mark.parametrize("iterations", [1, 2, 4])
def test_solve_cg_truncated_is_krylov_galerkin(iterations):
    """Reference: `references.krylov_solve` (the K-th CG iterate is the Galerkin projection
    onto ``span{b, Ab, ..., A^(K-1) b}``); catches wrong step sizes or directions."""
    a, b = spd(6, 1), torch.linspace(0.5, -1.0, 6, dtype=DTYPE)
    x = flat(solve_cg(dense_matvec(a), split(b), iterations=iterations))
    assert rel_err(x, ref.krylov_solve(iterations)(a, b)) < EXACT


@pytest.mark.parametrize("iterations", [0, 1, 3])
@pytest.mark.parametrize("alpha", [0.1, 0.4])
def test_neumann_series_truncated(iterations, alpha):
    """Reference: `references.neumann_solve`, ``alpha * sum_{k=0..K} (I - alpha A)^k b`` in
    closed form ``A^-1 (I - (I - alpha A)^(K+1)) b``; catches an off-by-one in K or alpha."""
    a, b = spd(6, 2), torch.linspace(-2.0, 1.0, 6, dtype=DTYPE)
    x = flat(neumann_series(dense_matvec(a), split(b), iterations=iterations, alpha=alpha))
    assert rel_err(x, ref.neumann_solve(iterations, alpha)(a, b)) < EXACT


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.95])
def test_neumann_series_converges_to_inverse(fraction):
    """Reference: ``torch.linalg.solve(A, b)`` for ``alpha = fraction * 2 / lambda_max``."""
    a, b = spd(6, 3), torch.linspace(1.0, 3.0, 6, dtype=DTYPE)
    alpha = fraction * 2 / float(torch.linalg.eigvalsh(a)[-1])
    k = ref.neumann_iterations_for(a, alpha)
    x = flat(neumann_series(dense_matvec(a), split(b), iterations=k, alpha=alpha))
    assert rel_err(x, ref.exact_solve(a, b)) < EXACT


# -- one hop on ridge regression -------------------------------------------------------------
@dataclass
class Ridge:
    """Inner: ``1/2 ||X w - y||^2 / n + 1/2 sum lam_i w_i^2``; outer: ``1/2 ||Xv w - yv||^2 /
    nv``, whose gradient at ``w*`` is ``g``."""

    x: Tensor
    y: Tensor
    lam: Tensor
    xv: Tensor
    yv: Tensor
    w_star: Tensor = field(init=False)
    g: Tensor = field(init=False)
    h: Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.w_star = ref.ridge_solution(self.x, self.y, self.lam)
        self.g = self.xv.T @ (self.xv @ self.w_star - self.yv) / self.xv.shape[0]
        self.h = ref.ridge_hessian(self.x, self.lam)

    @property
    def dim(self) -> int:
        return self.x.shape[1]

    def inner_loss(self, w: Tensor, lam: Tensor) -> Tensor:
        return 0.5 * ((self.x @ w - self.y) ** 2).mean() + 0.5 * (lam * w**2).sum()

    def implicit(self) -> Tensor:
        return ref.ridge_hypergradient(self.x, self.y, self.lam, self.g)

    def identity(self) -> Tensor:
        return ref.ridge_darts_hypergradient(self.x, self.y, self.lam, self.g)


@pytest.fixture(scope="module")
def ridge() -> Ridge:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40, 6, generator=gen, dtype=DTYPE)
    y = x @ torch.randn(6, generator=gen, dtype=DTYPE) + 0.3 * torch.randn(
        40, generator=gen, dtype=DTYPE)
    xv = torch.randn(25, 6, generator=gen, dtype=DTYPE)
    yv = torch.randn(25, generator=gen, dtype=DTYPE)
    lam = 0.5 + torch.rand(6, generator=gen, dtype=DTYPE)
    return Ridge(x, y, lam, xv, yv)


def run_hop(ridge: Ridge, method, config: Config) -> tuple[Tensor, list[Tensor]]:
    """``method`` on a Hop over ridge's inner loss, parameters split in two tensors each."""
    w = [t.clone().requires_grad_() for t in split(ridge.w_star)]
    lam = [t.clone().requires_grad_() for t in split(ridge.lam)]
    hop = Hop(w, lam, lambda: ridge.inner_loss(flat(w), flat(lam)))
    with hop:
        out = method(hop, split(ridge.g), config)
    return flat(out, lam), w


@pytest.mark.parametrize("cg_alpha", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("iterations", [6, 18])
def test_cg_hop_ridge_closed_form(ridge, cg_alpha, iterations):
    """Reference: `references.ridge_hypergradient`, ``-w* * (H^-1 g)``; dim 6, so 6 and 18
    iterations both converge, for any cg_alpha."""
    config = Config(type="cg", cg_iterations=iterations, cg_alpha=cg_alpha)
    out, _ = run_hop(ridge, cg, config)
    assert torch.isfinite(out).all()
    assert rel_err(out, ridge.implicit()) < EXACT


@pytest.mark.parametrize("cg_alpha", [0.1, 1.0, 3.0])
def test_cg_hop_truncated_does_not_depend_on_alpha(ridge, cg_alpha):
    """Reference: ``-w* * krylov_solve(2)(H, g)``: cg_alpha scales H and v alike, so even the
    unconverged iterate is the same for every cg_alpha."""
    out, _ = run_hop(ridge, cg, Config(type="cg", cg_iterations=2, cg_alpha=cg_alpha))
    assert rel_err(out, -ridge.w_star * ref.krylov_solve(2)(ridge.h, ridge.g)) < EXACT


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.9])
def test_neumann_hop_ridge_closed_form(ridge, fraction):
    """Reference: `references.ridge_hypergradient`, with ``neumann_alpha = fraction * 2 /
    lambda_max(H)`` and enough terms for the remainder to fall below 1e-15."""
    alpha = fraction * 2 / float(torch.linalg.eigvalsh(ridge.h)[-1])
    k = ref.neumann_iterations_for(ridge.h, alpha)
    out, _ = run_hop(ridge, neumann,
                     Config(type="neumann", neumann_iterations=k, neumann_alpha=alpha))
    assert rel_err(out, ridge.implicit()) < EXACT


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_neumann_hop_truncated(ridge, alpha):
    """Reference: ``-w* * neumann_solve(3, alpha)(H, g)``: three terms, not converged."""
    out, _ = run_hop(ridge, neumann,
                     Config(type="neumann", neumann_iterations=3, neumann_alpha=alpha))
    assert rel_err(out, -ridge.w_star * ref.neumann_solve(3, alpha)(ridge.h, ridge.g)) < EXACT


@pytest.mark.parametrize("darts_alpha", [1e-3, 1e-2, 1.0])
def test_darts_hop_ridge(ridge, darts_alpha):
    """Reference: `references.ridge_darts_hypergradient`, ``-w* * g`` (dL/dlam = w^2 / 2 is
    quadratic in w, so the central difference is exact for any radius); the probed lower
    parameters are restored bit for bit."""
    out, w = run_hop(ridge, darts, Config(type="darts", darts_alpha=darts_alpha))
    assert rel_err(out, ridge.identity()) < FINITE_DIFFERENCE
    assert torch.equal(flat([t.detach() for t in w]), ridge.w_star)


# -- ridge regression through Engine ---------------------------------------------------------
class RidgeInner(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        w = self.module.weight.reshape(-1)
        lam = self.outer.module.flat()
        return 0.5 * ((self.module(x).reshape(-1) - y) ** 2).mean() + 0.5 * (lam * w**2).sum()


class RidgeOuter(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return 0.5 * ((self.inner(x).reshape(-1) - y) ** 2).mean()

    def grad_callback(self, grads):
        self.seen.append(flat(grads, self.trainable_parameters()))


def run_ridge_engine(ridge: Ridge, inner_config: Config, sizes: tuple[int, ...] = (2, 4)
                     ) -> tuple[Tensor, Tensor]:
    """One global step of the bilevel ridge program, inner weights at ``w*``, every lr 0.
    Returns the outer gradient the engine computed and the inner weights afterwards."""
    linear = nn.Linear(ridge.dim, 1, bias=False).double()
    with torch.no_grad():
        linear.weight.copy_(ridge.w_star.reshape(1, -1))
    lam = Vector(*split(ridge.lam, sizes))
    inner = RidgeInner("inner", inner_config, linear, torch.optim.SGD(linear.parameters(), lr=0.0),
                       train_data_loader=[(ridge.x, ridge.y)])
    outer = RidgeOuter("outer", Config(), lam, torch.optim.SGD(lam.parameters(), lr=0.0),
                       train_data_loader=[(ridge.xv, ridge.yv)])
    outer.seen = []
    Engine([outer, inner], EngineConfig(train_iters=1),
           {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}).run()
    assert len(outer.seen) == 1
    return outer.seen[0], linear.weight.detach().reshape(-1)


@pytest.mark.parametrize("cg_alpha", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("iterations", [6, 30])
def test_engine_ridge_cg(ridge, cg_alpha, iterations):
    """Reference: `references.ridge_hypergradient` (closed form), via Engine.run; 30 > dim
    iterations must stay finite and exact."""
    grad, _ = run_ridge_engine(ridge, Config(type="cg", cg_iterations=iterations,
                                             cg_alpha=cg_alpha))
    assert torch.isfinite(grad).all()
    assert rel_err(grad, ridge.implicit()) < EXACT


@pytest.mark.parametrize("fraction", [0.3, 0.9])
def test_engine_ridge_neumann(ridge, fraction):
    """Reference: `references.ridge_hypergradient` (closed form), via Engine.run, with
    ``neumann_alpha = fraction * 2 / lambda_max(H)`` and terms enough to converge."""
    alpha = fraction * 2 / float(torch.linalg.eigvalsh(ridge.h)[-1])
    k = ref.neumann_iterations_for(ridge.h, alpha)
    grad, _ = run_ridge_engine(ridge, Config(type="neumann", neumann_iterations=k,
                                             neumann_alpha=alpha))
    assert rel_err(grad, ridge.implicit()) < EXACT


def test_engine_ridge_cg_exact_convergence_stays_finite(ridge):
    """Reference: `references.ridge_hypergradient` with ``X = 2 I`` (n = 4) and ``lam = 1``,
    so ``H = 2 I`` bit for bit: CG's residual is exactly 0 after one step and the other
    iterations divide 0 by 0; the engine's hypergradient must stay finite and exact."""
    x = 2.0 * torch.eye(4, dtype=DTYPE)
    exact = Ridge(x, torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=DTYPE),
                  torch.ones(4, dtype=DTYPE), ridge.xv[:, :4], ridge.yv)
    assert torch.equal(exact.h, 2.0 * torch.eye(4, dtype=DTYPE))
    grad, _ = run_ridge_engine(exact, Config(type="cg", cg_iterations=5), sizes=(2, 2))
    assert torch.isfinite(grad).all()
    assert rel_err(grad, exact.implicit()) < EXACT


def test_engine_ridge_darts(ridge):
    """Reference: `references.ridge_darts_hypergradient`, ``-w* * g``, via Engine.run; the
    inner weights are still exactly ``w*`` after the probes."""
    grad, w = run_ridge_engine(ridge, Config(type="darts"))
    assert rel_err(grad, ridge.identity()) < FINITE_DIFFERENCE
    assert torch.equal(w, ridge.w_star)
