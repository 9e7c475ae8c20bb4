"""Hypergradients against dense references (tests/references.py), in float64.

Three layers, each checked against matrices formed explicitly in the test:

* the pure solvers (`betty.linalg`): CG against ``torch.linalg.solve`` and against the
  Krylov-Galerkin projection its K-th iterate must equal, Neumann against the closed-form
  geometric sum;
* one hop (`betty.hypergradient` methods on a `Hop`) on ridge regression, whose hypergradient
  has a closed form (docs/math.md): ``-w* * (H^-1 g)`` for cg/neumann, ``-w* * g`` for darts;
* whole programs through `Engine` (the user path): ridge regression, three-level programs and
  a learning-by-ignoring-shaped program with two paths to the same upper, against the product
  of dense per-hop Jacobians ``-C^T H^-1`` along every path (docs/math.md#chaining).

Every optimizer in the programs has ``lr=0``, so the parameters the engine differentiates at
are exactly the ones the reference sees; each problem records the gradient it computed (direct
+ hypergradient) in ``grad_callback``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import references as ref
import torch
from torch import Tensor, nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.hypergradient import Hop, cg, darts, neumann, register
from betty.linalg import neumann_series, solve_cg
from betty.problems import ImplicitProblem

DTYPE = torch.float64
EXACT = 1e-10  # converged cg / neumann: round-off only
FINITE_DIFFERENCE = 1e-9  # darts: a central difference, exact on these losses up to round-off
F2SA = 1e-6  # f2sa: O(1/lambda) at lambda = 1e6 (measured 2e-3 at lambda = 10)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


def split(vector: Tensor, sizes: tuple[int, ...] = (2, 4)) -> list[Tensor]:
    """A vector as a list of tensors of different shapes, as a module's parameters are."""
    parts = list(torch.split(vector, list(sizes)))
    return [parts[0], parts[1].reshape(2, -1)] if len(parts) == 2 else parts


def flat(tensors: list[Tensor | None], like: list[Tensor] | None = None) -> Tensor:
    like = like if like is not None else tensors  # type: ignore[assignment]
    return torch.cat([torch.zeros(p.numel(), dtype=DTYPE) if t is None else t.reshape(-1)
                      for t, p in zip(tensors, like)])


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
class Vector(nn.Module):
    """Parameters only: one float64 tensor per entry of ``tensors``."""

    def __init__(self, *tensors: Tensor) -> None:
        super().__init__()
        self.tensors = nn.ParameterList([nn.Parameter(t.detach().clone()) for t in tensors])

    def flat(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self.tensors])


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


# -- multilevel programs of quadratics through Engine ----------------------------------------
SHAPES = [(3,), (2, 2)]  # every level: a vector and a matrix, 7 parameters
DIM = sum(torch.Size(s).numel() for s in SHAPES)


def quadratic_loss(owner: str, inputs: list[str], seed: int, *, own: bool = True) -> ref.Loss:
    """``1/2 w^T A w - a^T w + w^T B z + 1/2 sum softplus(R z) * w^2 + 1/2 ||S z - s||^2`` with
    ``w`` the owner's parameters and ``z`` the inputs' (concatenated); ``own=False`` keeps the
    last term only (a loss that does not use the owner, like a validation loss).

    Quadratic in ``w`` with ``H = A + diag(softplus(R z))`` (eigenvalues in about [1, 4]), and
    ``dL/dz`` quadratic in ``w``, so darts's central difference is exact up to round-off.
    """
    gen = torch.Generator().manual_seed(seed)
    m = DIM * len(inputs)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=gen, dtype=DTYPE)

    q = rand(DIM, DIM, scale=DIM**-0.5)
    a_mat, a_vec = torch.eye(DIM, dtype=DTYPE) + 0.5 * q @ q.T, rand(DIM)
    b_mat, r_mat = rand(DIM, m, scale=0.5 * m**-0.5), rand(DIM, m, scale=0.3 * m**-0.5)
    s_mat, s_vec = rand(m, m, scale=m**-0.5), rand(m)

    def loss(values: ref.Values) -> Tensor:
        z = torch.cat([values[n] for n in inputs])
        out = 0.5 * ((s_mat @ z - s_vec) ** 2).sum()
        if own:
            w = values[owner]
            out = out + 0.5 * w @ a_mat @ w - a_vec @ w + w @ (b_mat @ z)
            out = out + 0.5 * (nn.functional.softplus(r_mat @ z) * w**2).sum()
        return out

    return loss


class Level(ImplicitProblem):
    """A level whose loss is ``level_loss`` of its own and its inputs' flat parameters."""

    def __init__(self, name: str, config: Config, loss: ref.Loss, inputs: list[str],
                 seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        module = Vector(*(torch.randn(s, generator=gen, dtype=DTYPE) for s in SHAPES))
        super().__init__(name, config, module, torch.optim.SGD(module.parameters(), lr=0.0),
                         train_data_loader=[torch.zeros(1, dtype=DTYPE)])
        self.level_loss, self.level_inputs, self.seen = loss, inputs, []

    def training_step(self, batch):
        values = {self.name: self.module.flat()}
        values.update({n: getattr(self, n).module.flat() for n in self.level_inputs})
        return self.level_loss(values)

    def grad_callback(self, grads):
        self.seen.append(flat(grads, self.trainable_parameters()))


@dataclass
class Program:
    """Which levels each loss reads, the dependencies, and the paths written out by hand."""

    inputs: dict[str, list[str]]
    u2l: dict[str, list[str]]
    l2u: dict[str, list[str]]
    paths: dict[str, list[list[str]]]
    own: dict[str, bool] = field(default_factory=dict)


PROGRAMS = {
    # U above M above B; U's loss reads M, M's reads U and B, B's reads M.
    "three_level": Program(
        inputs={"U": ["M"], "M": ["U", "B"], "B": ["M"]},
        u2l={"U": ["M"], "M": ["B"]}, l2u={"B": ["M"], "M": ["U"]},
        paths={"U": [["U", "M", "U"]], "M": [["M", "B", "M"]], "B": []}),
    # U's parameters enter B's loss only: one path with two hops, through M then B.
    "three_level_two_hops": Program(
        inputs={"U": ["M"], "M": ["B"], "B": ["U"]},
        u2l={"U": ["B"]}, l2u={"B": ["M"], "M": ["U"]},
        paths={"U": [["U", "M", "B", "U"]], "M": [], "B": []}),
    # Both: U gets a one-hop and a two-hop path, M a path of its own.
    "three_level_both": Program(
        inputs={"U": ["M"], "M": ["U", "B"], "B": ["U", "M"]},
        u2l={"U": ["M", "B"], "M": ["B"]}, l2u={"B": ["M"], "M": ["U"]},
        paths={"U": [["U", "M", "U"], ["U", "M", "B", "U"]], "M": [["M", "B", "M"]], "B": []}),
    # Learning by ignoring: rw's loss reads ft (not rw), ft's reads pt (proximal), pt's reads
    # rw (weights). Path [rw, pt, rw] starts from dL_rw/dpt = 0 and carries nothing.
    "lbi": Program(
        inputs={"rw": ["ft"], "ft": ["pt"], "pt": ["rw"]},
        u2l={"rw": ["pt"]}, l2u={"pt": ["ft", "rw"], "ft": ["rw"]},
        paths={"rw": [["rw", "pt", "rw"], ["rw", "ft", "pt", "rw"]], "ft": [], "pt": []},
        own={"rw": False}),
    # The same, with rw's loss reading pt too: both paths carry and must add up.
    "lbi_both_paths": Program(
        inputs={"rw": ["ft", "pt"], "ft": ["pt"], "pt": ["rw"]},
        u2l={"rw": ["pt"]}, l2u={"pt": ["ft", "rw"], "ft": ["rw"]},
        paths={"rw": [["rw", "pt", "rw"], ["rw", "ft", "pt", "rw"]], "ft": [], "pt": []},
        own={"rw": False}),
}

def halved_mixed(hop: Hop, v, config: Config):
    """A user's method, registered below (an extension point): ``-M (v / 2)``, i.e. the
    inverse Hessian replaced by ``I / 2``; written with the public `Hop` closures only."""
    return [None if m is None else -m for m in hop.mixed([t / 2 for t in v])]


def conjugate_step(hop: Hop, v, config: Config):
    """Another user's method, passed as ``Config(type=conjugate_step)`` without registering:
    one Richardson step from 0 with step 1, ``x = v``, then ``-M (2 v - H v)`` (two terms
    of the Neumann series with alpha 1)."""
    hv = hop.hvp(v)
    x = [2 * t - h for t, h in zip(v, hv)]
    return [None if m is None else -m for m in hop.mixed(x)]


register("halved", halved_mixed)

# Each method: the Config it runs with and the dense solver that stands for it.
METHOD_TABLE: dict[str, tuple[Config, ref.Solver]] = {
    "darts": (Config(type="darts"), ref.identity_solve),
    "neumann": (Config(type="neumann", neumann_iterations=200, neumann_alpha=0.2),
                ref.exact_solve),
    "cg": (Config(type="cg", cg_iterations=2 * DIM, cg_alpha=0.5), ref.exact_solve),
    "neumann_3_terms": (Config(type="neumann", neumann_iterations=3, neumann_alpha=0.3),
                        ref.neumann_solve(3, 0.3)),
    "cg_2_steps": (Config(type="cg", cg_iterations=2, cg_alpha=3.0), ref.krylov_solve(2)),
    "registered": (Config(type="halved"), lambda h, v: v / 2),
    "callable": (Config(type=conjugate_step), ref.neumann_solve(1, 1.0)),
    # first-order: 4 paired steps of size 0.15 are the 4-term Neumann series with alpha 0.15
    # up to O(1/lambda) (the losses' mixed gradients are quadratic in w; docs/math.md#f2sa)
    "f2sa": (Config(type="f2sa", f2sa_steps=4, f2sa_lr=0.15, f2sa_lambda=1e6,
                    f2sa_lambda_growth=0.0), ref.neumann_solve(3, 0.15)),
}
# Methods per level, in the order of Program.inputs; a list cycles over the levels.
ASSIGNMENTS = {
    "darts": ["darts"],
    "neumann": ["neumann"],
    "cg": ["cg"],
    "mixed_truncated": ["darts", "cg_2_steps", "neumann_3_terms"],
    "mixed_truncated_rotated": ["neumann_3_terms", "darts", "cg_2_steps"],
    "user_methods": ["registered", "callable", "cg"],
    "user_methods_rotated": ["callable", "cg", "registered"],
    "f2sa": ["f2sa"],
    "f2sa_mixed": ["f2sa", "cg_2_steps", "neumann_3_terms"],
}


def build(program: Program, assignment: str
          ) -> tuple[dict[str, Level], dict[str, ref.Loss], dict[str, Tensor], dict[str, str]]:
    """Levels (not yet in an engine), their losses, initial values and method names."""
    names = list(program.inputs)
    cycle = ASSIGNMENTS[assignment]
    methods = {n: cycle[i % len(cycle)] for i, n in enumerate(names)}
    losses = {n: quadratic_loss(n, program.inputs[n], seed=10 + i, own=program.own.get(n, True))
              for i, n in enumerate(names)}
    levels = {n: Level(n, METHOD_TABLE[methods[n]][0], losses[n], program.inputs[n], seed=i)
              for i, n in enumerate(names)}
    values = {n: level.module.flat().detach().clone() for n, level in levels.items()}
    return levels, losses, values, methods


@pytest.mark.parametrize("assignment", list(ASSIGNMENTS))
@pytest.mark.parametrize("program_name", list(PROGRAMS))
def test_engine_multilevel_against_dense_chain(program_name, assignment):
    """Reference: `references.total_gradient`: direct gradient + for each path the product of
    dense per-hop Jacobians ``-C_i^T S_i`` (``S_i``: ``H_i^-1`` for converged cg/neumann, the
    identity for darts, the truncated Neumann sum or the K-th Krylov-Galerkin iterate),
    each hop with its own level's loss and method, every other level held fixed."""
    program = PROGRAMS[program_name]
    levels, losses, values, methods = build(program, assignment)
    engine = Engine(list(levels.values()), EngineConfig(train_iters=1), {
        "u2l": {levels[u]: [levels[x] for x in xs] for u, xs in program.u2l.items()},
        "l2u": {levels[lo]: [levels[x] for x in xs] for lo, xs in program.l2u.items()}})
    for n, level in levels.items():
        assert sorted([p.name for p in path] for path in level.paths) == sorted(program.paths[n])
    engine.run()

    solvers = {n: METHOD_TABLE[m][1] for n, m in methods.items()}
    tol = FINITE_DIFFERENCE if "darts" in methods.values() else EXACT
    tol = F2SA if "f2sa" in methods.values() else tol
    for n, level in levels.items():
        assert len(level.seen) == 1, f"{n} stepped {len(level.seen)} times"
        expected = ref.total_gradient(losses, values, n, program.paths[n], solvers)
        assert rel_err(level.seen[0], expected) < tol, n
        if program.paths[n]:  # the hypergradient alone, which may be small next to the direct
            hyper = expected - ref.gradient(losses[n], values, n)
            assert rel_err(level.seen[0] - ref.gradient(losses[n], values, n), hyper) < tol, n
        assert torch.equal(level.module.flat().detach(), values[n])  # lr 0, probes restored


@pytest.mark.parametrize("program_name", list(PROGRAMS))
def test_dense_references_tell_methods_apart(program_name):
    """Guards the references themselves, at the values the engine test uses: every path
    that should carry has a non-zero dense hypergradient, and darts, truncated Neumann and
    truncated CG each differ from the converged one by far more than the tolerances, so the
    engine comparisons can tell the methods (and a dropped or extra path) apart. Every
    level's H also lies inside Neumann(alpha=0.2)'s region of convergence."""
    program = PROGRAMS[program_name]
    _, losses, values, _ = build(program, "cg")
    for owner, paths in program.paths.items():
        per_method = {m: [ref.path_hypergradient(losses, values, p, {
            n: METHOD_TABLE[m][1] for n in program.inputs}) for p in paths]
            for m in ("cg", "darts", "neumann_3_terms", "cg_2_steps")}
        for i, path in enumerate(paths):
            carries = program.own.get(owner, True) or path[1] in program.inputs[owner]
            exact = per_method["cg"][i]
            assert (float(exact.norm()) > 1e-3) == carries, path
            if carries:
                for m in ("darts", "neumann_3_terms", "cg_2_steps"):
                    assert rel_err(per_method[m][i], exact) > 1e-4, (path, m)
    hops = {(lo, up) for paths in program.paths.values() for path in paths
            for lo, up in zip(path[1:-1], path[2:])}
    for lower, upper in hops:
        h, _ = ref.second_derivatives(losses[lower], values, lower, upper)
        eig = torch.linalg.eigvalsh(h)
        assert 0.5 < float(eig[0]) and float(eig[-1]) < 2 / 0.2, lower
