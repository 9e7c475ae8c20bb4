"""Multilevel programs through `Engine` against dense references (tests/references.py), in
float64: levels with quadratic losses in three-level programs (one-hop and two-hop paths, and
both) and learning-by-ignoring-shaped programs with two paths to the same upper, every level
with its own method (darts, converged and truncated cg / neumann, f2sa, a registered and an
unregistered user method), against the product of dense per-hop Jacobians ``-C^T S`` along
every path, summed (docs/math.md#chaining). Also guards the dense references themselves: they
tell the methods and the paths apart at the values the engine test uses.

Every optimizer has ``lr=0``, so the parameters the engine differentiates at are exactly the
ones the reference sees; each level records the gradient it computed (direct +
hypergradient) in ``grad_callback``. The solvers and the one-hop and bilevel ridge checks are
in test_hypergradient_exact.py.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import references as ref
import torch
from hypergradient_checks import DTYPE, EXACT, FINITE_DIFFERENCE, rel_err
from three_level import DIM, Level  # the same levels: shapes, seeds, float64
from torch import Tensor, nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.hypergradient import Hop, register

F2SA = 1e-6  # f2sa: O(1/lambda) at lambda = 1e6 (measured 2e-3 at lambda = 10)


# -- multilevel programs of quadratics through Engine ----------------------------------------


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
