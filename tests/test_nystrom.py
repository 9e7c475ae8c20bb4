"""Nyström hops (docs/math.md#nystrom) against dense references, in float64.

* one hop on ridge regression and on quadratics with singular or indefinite Hessians: with
  rank >= dim the result is ``-M (H + rho I)^-1 v`` (H_k = H); with rank < dim it is
  ``-M (C W^+ C^T + rho I)^-1 v`` formed densely (``torch.linalg.pinv``, ``torch.linalg.solve``
  of the n x n matrix) from the columns the hop sampled, which the test re-derives with
  `sample_coordinates`;
* the ridge hypergradient at full rank approaches the closed form ``-w* * (H^-1 g)`` with an
  error proportional to rho;
* column sampling: deterministic given the torch random state, which it does not advance;
* through `Engine`: three-level programs against the dense chained reference, and a run
  resumed from a checkpoint equals the uninterrupted one bit for bit.
"""

from __future__ import annotations

import pytest
import references as ref
import three_level as tl
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import ConfigError
from betty.hypergradient import Hop, nystrom
from betty.hypergradient.nystrom import sample_coordinates
from betty.problems import ImplicitProblem

DTYPE = torch.float64
EXACT = 1e-10


def split(vector: Tensor) -> list[Tensor]:
    """A 6-vector as parameters of two shapes, (2,) and (2, 2)."""
    return [vector[:2], vector[2:].reshape(2, 2)]


def hop_on(loss_of_flat, w0: Tensor, lam0: Tensor, v: Tensor, config: Config) -> Tensor:
    """``nystrom`` on a Hop over ``loss_of_flat(w, lam)``, w and lam split in two tensors."""
    w = [t.clone().requires_grad_() for t in split(w0)]
    lam = [t.clone().requires_grad_() for t in split(lam0)]
    hop = Hop(w, lam, lambda: loss_of_flat(torch.cat([t.reshape(-1) for t in w]),
                                           torch.cat([t.reshape(-1) for t in lam])))
    with hop:
        out = nystrom(hop, split(v), config)
    return torch.cat([t.reshape(-1) for t in out])


def hand_woodbury(h: Tensor, v: Tensor, coordinates: list[int], rho: float) -> Tensor:
    """``(C W^+ C^T + rho I)^-1 v``, every matrix formed densely."""
    c = h[:, coordinates]
    h_k = c @ torch.linalg.pinv(h[coordinates][:, coordinates], hermitian=True) @ c.T
    return torch.linalg.solve(h_k + rho * torch.eye(h.shape[0], dtype=DTYPE), v)


def quadratic(h: Tensor, seed: int):
    """``L(w, lam) = 1/2 w^T H w + w^T (lam * b)`` (H any symmetric matrix): Hessian H, mixed
    block ``diag(b)``, so the hop is ``-b * x``. Returns (loss, b, w0, lam0, v)."""
    gen = torch.Generator().manual_seed(seed)
    b, w0, lam0, v = (torch.randn(6, generator=gen, dtype=DTYPE) for _ in range(4))
    return (lambda w, lam: 0.5 * w @ h @ w + w @ (lam * b)), b, w0, lam0, v


def spd(seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(6, 6, generator=gen, dtype=DTYPE)
    return torch.eye(6, dtype=DTYPE) + q @ q.T / 6


def low_rank_psd(seed: int) -> Tensor:
    """Rank 3: every 4 x 4 block W of its columns is singular."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(6, 3, generator=gen, dtype=DTYPE)
    return q @ q.T


def indefinite(seed: int) -> Tensor:
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=gen, dtype=DTYPE))
    return q @ torch.diag(torch.tensor([-2.0, -0.5, 0.3, 1.0, 2.0, 4.0], dtype=DTYPE)) @ q.T


MATRICES = {"spd": spd, "low_rank_psd": low_rank_psd, "indefinite": indefinite}


@pytest.mark.parametrize("rank", [6, 10])
@pytest.mark.parametrize("rho", [1e-3, 0.1, 1.0])
def test_full_rank_is_damped_inverse(rank, rho):
    """rank >= dim: every column is sampled, H_k = H, and the hop is ``-b * (H + rho I)^-1
    v`` (dense solve) to round-off, for any seed."""
    h = spd(0)
    loss, b, w0, lam0, v = quadratic(h, 1)
    for seed in (0, 1):
        out = hop_on(loss, w0, lam0, v, Config(type="nystrom", nystrom_rank=rank,
                                               nystrom_rho=rho, nystrom_seed=seed))
        expected = -b * torch.linalg.solve(h + rho * torch.eye(6, dtype=DTYPE), v)
        assert tl.rel_err(out, expected) < EXACT


@pytest.mark.parametrize("matrix", list(MATRICES))
@pytest.mark.parametrize("rank", [1, 2, 4])
def test_low_rank_is_woodbury_of_sampled_columns(matrix, rank):
    """rank < dim: ``-b * (C W^+ C^T + rho I)^-1 v`` with the hop's own columns (re-derived
    from nystrom_seed), formed densely; W is singular for rank 4 of the rank-3 matrix and
    may be indefinite. The reference differs from the full-rank answer while k < rank(H) (the
    test tells rank k from rank dim), and equals it once the columns span H's range."""
    h, rho = MATRICES[matrix](2), 0.05
    loss, b, w0, lam0, v = quadratic(h, 3)
    out = hop_on(loss, w0, lam0, v, Config(type="nystrom", nystrom_rank=rank, nystrom_rho=rho,
                                           nystrom_seed=5))
    coordinates = sample_coordinates(6, rank, 5)
    assert len(set(coordinates)) == rank
    expected = -b * hand_woodbury(h, v, coordinates, rho)
    assert tl.rel_err(out, expected) < EXACT
    full = -b * torch.linalg.solve(h + rho * torch.eye(6, dtype=DTYPE), v)
    if rank < int(torch.linalg.matrix_rank(h)):
        assert tl.rel_err(expected, full) > 1e-3
    else:  # k >= rank(H) generic columns span H's range: H_k = H even with W singular
        assert tl.rel_err(out, full) < EXACT


def test_zero_hessian_and_non_contiguous_parameters():
    """A loss linear in w (H = 0, every column zero): x = v / rho. A transposed (non-contiguous)
    parameter: columns and solution follow its ``reshape(-1)`` order; full rank gives the
    dense ``-(A + rho I)^-1 v``."""
    gen = torch.Generator().manual_seed(9)
    w = torch.randn(4, generator=gen, dtype=DTYPE, requires_grad=True)
    lam = torch.randn(4, generator=gen, dtype=DTYPE, requires_grad=True)
    v = torch.randn(4, generator=gen, dtype=DTYPE)
    hop = Hop([w], [lam], lambda: (w * lam).sum())
    with hop:
        (out,) = nystrom(hop, [v], Config(type="nystrom", nystrom_rank=2, nystrom_rho=0.5,
                                          nystrom_seed=0))
    assert tl.rel_err(out, -v / 0.5) < EXACT
    a = spd(10)
    wt = torch.randn(2, 3, generator=gen, dtype=DTYPE).t().requires_grad_()  # shape (3, 2)
    assert not wt.is_contiguous()
    lam6 = torch.randn(6, generator=gen, dtype=DTYPE, requires_grad=True)
    v6 = torch.randn(3, 2, generator=gen, dtype=DTYPE)
    hop = Hop([wt], [lam6], lambda: 0.5 * wt.reshape(-1) @ a @ wt.reshape(-1)
              + (lam6 * wt.reshape(-1)).sum())
    with hop:
        (out,) = nystrom(hop, [v6], Config(type="nystrom", nystrom_rank=6, nystrom_rho=0.1,
                                           nystrom_seed=0))
    expected = -torch.linalg.solve(a + 0.1 * torch.eye(6, dtype=DTYPE), v6.reshape(-1))
    assert tl.rel_err(out, expected) < EXACT


def test_default_seed_follows_torch_rng_without_advancing_it():
    """nystrom_seed=None: the columns are a function of the CPU random state at the hop
    (same state, same columns; `sample_coordinates(..., None)` re-derives them), and the
    state is not advanced, inside or after the hop."""
    h, rho = spd(4), 0.05
    loss, b, w0, lam0, v = quadratic(h, 5)
    config = Config(type="nystrom", nystrom_rank=3, nystrom_rho=rho)
    results = []
    for seed in (11, 11, 12):
        torch.manual_seed(seed)
        state = torch.get_rng_state()
        coordinates = sample_coordinates(6, 3, None)
        assert torch.equal(torch.get_rng_state(), state)
        out = hop_on(loss, w0, lam0, v, config)
        assert torch.equal(torch.get_rng_state(), state)
        assert tl.rel_err(out, -b * hand_woodbury(h, v, coordinates, rho)) < EXACT
        results.append((coordinates, out))
    assert results[0][0] == results[1][0] and torch.equal(results[0][1], results[1][1])
    assert results[0][0] != results[2][0]  # another state, other columns


def ridge_problem() -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(40, 6, generator=gen, dtype=DTYPE)
    y = x @ torch.randn(6, generator=gen, dtype=DTYPE) + 0.3 * torch.randn(
        40, generator=gen, dtype=DTYPE)
    xv, yv = torch.randn(25, 6, generator=gen, dtype=DTYPE), torch.randn(25, generator=gen,
                                                                         dtype=DTYPE)
    lam = 0.5 + torch.rand(6, generator=gen, dtype=DTYPE)
    return x, y, xv, yv, lam


def test_ridge_error_proportional_to_rho():
    """Full rank on ridge: (H + rho I)^-1 = H^-1 - rho H^-2 + O(rho^2), so the relative
    error against the closed form `references.ridge_hypergradient` is
    ``rho * ||w* * H^-2 g|| / ||w* * H^-1 g||`` to first order: checked to 1% at three rho,
    and below 1e-10 at rho = 1e-12."""
    x, y, xv, yv, lam = ridge_problem()
    w_star, h = ref.ridge_solution(x, y, lam), ref.ridge_hessian(x, lam)
    g = xv.T @ (xv @ w_star - yv) / xv.shape[0]
    exact = ref.ridge_hypergradient(x, y, lam, g)
    slope = float(torch.linalg.vector_norm(w_star * torch.linalg.solve(h @ h, g))
                  / torch.linalg.vector_norm(exact))

    def loss(w: Tensor, lam_: Tensor) -> Tensor:
        return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam_ * w**2).sum()

    for rho in (1e-2, 1e-3, 1e-4):
        out = hop_on(loss, w_star, lam, g, Config(type="nystrom", nystrom_rank=6, nystrom_rho=rho))
        assert tl.rel_err(out, exact) == pytest.approx(rho * slope, rel=0.01 + 3 * rho)
    out = hop_on(loss, w_star, lam, g, Config(type="nystrom", nystrom_rank=6, nystrom_rho=1e-12))
    assert tl.rel_err(out, exact) < EXACT


def test_config_validation():
    for bad in ({"nystrom_rank": 0}, {"nystrom_rho": 0.0}, {"nystrom_seed": -1},
                {"nystrom_rank": 2.5}):
        with pytest.raises(ConfigError):
            Config(type="nystrom", **bad)


# -- through Engine ------------------------------------------------------------------------
def nystrom_solver(rank: int, rho: float, seed: int) -> ref.Solver:
    """What a nystrom hop puts in place of H^-1 v, formed densely."""
    return lambda h, v: hand_woodbury(h, v, sample_coordinates(h.shape[0], rank, seed), rho)


PROGRAMS = {
    "three_level": tl.Program(
        smooth={"U": ["M"], "M": ["U", "B"], "B": ["M"]}, sampled={},
        u2l={"U": ["M"], "M": ["B"]}, l2u={"B": ["M"], "M": ["U"]},
        paths={"U": [["U", "M", "U"]], "M": [["M", "B", "M"]], "B": []}),
    "three_level_both": tl.Program(
        smooth={"U": ["M"], "M": ["U", "B"], "B": ["U", "M"]}, sampled={},
        u2l={"U": ["M", "B"], "M": ["B"]}, l2u={"B": ["M"], "M": ["U"]},
        paths={"U": [["U", "M", "U"], ["U", "M", "B", "U"]], "M": [["M", "B", "M"]], "B": []}),
}


@pytest.mark.parametrize("rank", [3, 7, 9])
@pytest.mark.parametrize("program", list(PROGRAMS))
def test_engine_three_levels_against_dense_chain(program, rank):
    """`references.total_gradient` with each level's hop ``-C^T (C_k W^+ C_k^T + rho I)^-1
    v`` (rank 3: the sampled columns; 7 = dim and 9: the damped inverse), every level on
    nystrom with its own seed, through Engine.run."""
    rho = 0.02
    names = list(PROGRAMS[program].smooth)
    configs = {n: Config(type="nystrom", nystrom_rank=rank, nystrom_rho=rho, nystrom_seed=i)
               for i, n in enumerate(names)}
    solvers = {n: nystrom_solver(rank, rho, i) for i, n in enumerate(names)}
    for name, total_err, hyper_err in tl.run(PROGRAMS[program], configs, solvers):
        assert total_err < EXACT and hyper_err < EXACT, name


@pytest.mark.parametrize("rank", [4, 6])
def test_float32_small_rho_keeps_its_digits(rank):
    """float32 parameters, rho = 1e-4: within 1e-5 of the float64 dense Woodbury. At rank 6 =
    dim, where (H_k + rho I)^-1 v is of size |v|, the paper's ``v/rho - C (W + C^T C/rho)^-1
    C^T v/rho^2`` subtracts two terms of size |v|/rho: formed in float32 on these inputs it
    is off by 4e-3 (betty's form: 6e-8)."""
    h, rho = spd(6), 1e-4
    loss, b, w0, lam0, v = quadratic(h, 7)
    config = Config(type="nystrom", nystrom_rank=rank, nystrom_rho=rho, nystrom_seed=2)
    out = hop_on(lambda w, lam: loss(w.double(), lam.double()).float(), w0.float(),
                 lam0.float(), v.float(), config)
    assert out.dtype == torch.float32
    expected = -b * hand_woodbury(h, v, sample_coordinates(6, rank, 2), rho)
    assert tl.rel_err(out.double(), expected) < 1e-5


# -- a run resumed from a checkpoint -------------------------------------------------------
class RidgeLower(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        w = self.module.weight.reshape(-1)
        keep = (torch.rand(y.shape[0], dtype=y.dtype) > 0.2).to(y.dtype)  # moves torch's RNG
        return 0.5 * (keep * (self.module(x).reshape(-1) - y) ** 2).mean() + \
            0.5 * (self.upper.module.weight.reshape(-1) * w**2).sum()


class RidgeUpper(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return 0.5 * ((self.lower(x).reshape(-1) - y) ** 2).mean()


def ridge_engine(train_iters: int) -> Engine:
    """Bilevel ridge, nystrom (rank 2 of 6, nystrom_seed=None) on the lower, whose loss drops
    samples at random (so the torch random state moves at every step); shuffled loaders with
    generators of their own."""
    x, y, xv, yv, _ = ridge_problem()
    torch.manual_seed(0)
    lower_net, upper_net = nn.Linear(6, 1, bias=False).double(), nn.Linear(6, 1).double()
    with torch.no_grad():
        upper_net.weight.fill_(0.5)
    loader = DataLoader(TensorDataset(x, y), batch_size=10, shuffle=True,
                        generator=torch.Generator().manual_seed(1))
    lower = RidgeLower("lower", Config(type="nystrom", nystrom_rank=2, nystrom_rho=0.1),
                       lower_net, torch.optim.SGD(lower_net.parameters(), lr=0.1),
                       train_data_loader=loader)
    upper = RidgeUpper("upper", Config(), upper_net,
                       torch.optim.SGD(upper_net.parameters(), lr=0.5),
                       train_data_loader=DataLoader(
                           TensorDataset(xv, yv), batch_size=5, shuffle=True,
                           generator=torch.Generator().manual_seed(2)))
    return Engine([upper, lower], EngineConfig(train_iters=train_iters, progress_bar=False),
                  {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})


def test_resumed_run_draws_the_same_columns(tmp_path):
    """6 global steps straight through equal 3 steps, a checkpoint, and 3 more in a fresh
    engine, bit for bit: the columns come from the hop's stream (seed and position in the
    hop memory), which the checkpoint restores. Changing only nystrom_seed changes the
    result (the columns matter)."""
    straight = ridge_engine(6)
    straight.run()
    first = ridge_engine(3)
    first.run()
    path = first.save_checkpoint(tmp_path / "mid.pt")
    resumed = ridge_engine(6)
    resumed.load_checkpoint(path)
    resumed.run()
    for name in ("upper", "lower"):
        a = [p.detach() for p in getattr(straight, name).module.parameters()]
        b = [p.detach() for p in getattr(resumed, name).module.parameters()]
        assert all(torch.equal(p, q) for p, q in zip(a, b)), name
    fixed = ridge_engine(6)
    fixed.lower.config.nystrom_seed = 1
    fixed.run()
    assert not torch.equal(fixed.upper.module.weight, straight.upper.module.weight)


def test_engine_hops_draw_from_their_own_stream(monkeypatch):
    """In an engine, nystrom_seed=None seeds each hop's draws from a stream fixed at set-up
    (a hash of the CPU random state then, read, and the hop's name) advanced once per hop, not
    from the random state at the hop: draws made after set-up (loaders, dropout, which differ
    between ranks) do not move it. tests/test_distributed.py checks 2 ranks = 1 process."""
    import sys

    from betty.hypergradient.hop import seed_from

    module = sys.modules["betty.hypergradient.nystrom"]
    real = module.sample_coordinates
    runs = []
    for extra_draws in (0, 1000):
        seeds: list[int | None] = []
        monkeypatch.setattr(module, "sample_coordinates",
                            lambda n, k, seed, device=None, seen=seeds:
                            seen.append(seed) or real(n, k, seed))
        engine = ridge_engine(4)
        torch.rand(extra_draws)
        engine.run()
        (key,) = engine.lower.training_state()["hop_memory"]
        memory = engine.lower.hop_memory(key)
        assert seeds == [seed_from(memory["seed"], i) for i in range(4)]
        assert memory["nystrom_draws"] == 4
        runs.append(seeds)
    assert runs[0] == runs[1]  # (the loss's random drops differ: other hypergradients)
    assert len({tuple(real(6, 2, s)) for s in runs[0]}) > 1  # columns change
