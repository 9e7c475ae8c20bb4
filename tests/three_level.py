"""Three-level programs for tests/test_nystrom.py and tests/test_reinforce.py: levels whose
losses read other levels' parameters smoothly (quadratics) or through samples drawn from
Bernoulli distributions with the other level's parameters as logits (score-function losses),
run through `Engine`, and compared with `references.total_gradient` (docs/math.md#chaining).

Every optimizer has ``lr=0``, so the engine differentiates at the values the reference sees;
each level records the gradient it computed (direct + hypergradient) in ``grad_callback``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import references as ref
import torch
from torch import Tensor, nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.hypergradient import score_function_loss
from betty.problems import ImplicitProblem

DTYPE = torch.float64
SHAPES = [(3,), (2, 2)]  # every level: a vector and a matrix, 7 parameters
DIM = 7
SAMPLES = 6  # draws per sampled input


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float(torch.linalg.vector_norm(actual - expected) / torch.linalg.vector_norm(expected))


def flat(tensors: list[Tensor | None], like: list[Tensor]) -> Tensor:
    return torch.cat([torch.zeros(p.numel(), dtype=DTYPE) if t is None else t.reshape(-1)
                      for t, p in zip(tensors, like)])


def bernoulli_log_prob(samples: Tensor, logits: Tensor) -> Tensor:
    """``log p(s)`` of each row of ``samples`` (N x d, entries 0/1) under independent
    Bernoulli(sigmoid(logits)) draws."""
    logsig = nn.functional.logsigmoid
    return (samples * logsig(logits) + (1 - samples) * logsig(-logits)).sum(dim=1)


def level_loss(owner: str, smooth: list[str], sampled: list[str], seed: int, *,
               own: bool = True, baseline: str = "leave_one_out") -> ref.Loss:
    """A loss of ``owner``'s parameters ``w``: ``1/2 w^T A w - a^T w + w^T B z + 1/2 sum
    softplus(R z) w^2 + 1/2 ||S z - s||^2`` with ``z`` the ``smooth`` inputs; for each
    ``sampled`` input (logits ``q``), per-sample terms ``1/4 sum (P s_i) w^2 - (G s_i)^T w``
    with ``s_i = 1[u_i < sigmoid(q)]`` (fixed uniforms u_i), combined by
    `score_function_loss`. H stays positive definite (eigenvalues >= 1)."""
    gen = torch.Generator().manual_seed(seed)
    m = DIM * len(smooth)

    def rand(*shape: int, scale: float = 1.0) -> Tensor:
        return scale * torch.randn(*shape, generator=gen, dtype=DTYPE)

    q = rand(DIM, DIM, scale=DIM**-0.5)
    a_mat, a_vec = torch.eye(DIM, dtype=DTYPE) + 0.5 * q @ q.T, rand(DIM)
    b_mat, r_mat = rand(DIM, max(m, 1), scale=0.5), rand(DIM, max(m, 1), scale=0.3)
    s_mat, s_vec = rand(max(m, 1), max(m, 1)), rand(max(m, 1))
    uniforms = {n: torch.rand(SAMPLES, DIM, generator=gen, dtype=DTYPE) for n in sampled}
    p_mats = {n: rand(DIM, DIM).abs() / DIM for n in sampled}
    g_mats = {n: rand(DIM, DIM) for n in sampled}

    def loss(values: ref.Values) -> Tensor:
        w = values[owner]
        out = torch.zeros((), dtype=DTYPE)
        if smooth:
            z = torch.cat([values[n] for n in smooth])
            b, r = b_mat[:, :m] / m**0.5, r_mat[:, :m] / m**0.5
            out = out + 0.5 * ((s_mat[:m, :m] @ z / m**0.5 - s_vec[:m]) ** 2).sum()
            if own:
                out = out + w @ (b @ z) + 0.5 * (nn.functional.softplus(r @ z) * w**2).sum()
        if own:
            out = out + 0.5 * w @ a_mat @ w - a_vec @ w
        for n in sampled:
            logits = values[n]
            samples = (uniforms[n] < torch.sigmoid(logits.detach())).to(DTYPE)
            per_sample = (0.25 * (samples @ p_mats[n].T) * w**2).sum(1) - samples @ g_mats[n].T @ w
            log_prob = bernoulli_log_prob(samples, logits)
            out = out + score_function_loss(per_sample, log_prob, baseline)
        return out

    return loss


class Vector(nn.Module):
    """Parameters only: one float64 tensor per entry of SHAPES."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.tensors = nn.ParameterList(
            [nn.Parameter(torch.randn(s, generator=gen, dtype=DTYPE)) for s in SHAPES])

    def flat(self) -> Tensor:
        return torch.cat([p.reshape(-1) for p in self.tensors])


class Level(ImplicitProblem):
    """A level whose loss is ``level_loss`` of its own and its inputs' flat parameters."""

    def __init__(self, name: str, config: Config, loss: ref.Loss, inputs: list[str],
                 seed: int) -> None:
        module = Vector(seed)
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
    """Which levels each loss reads (smoothly / through samples), the dependencies, the
    paths written out by hand, and whether a loss uses its owner's parameters."""

    smooth: dict[str, list[str]]
    sampled: dict[str, list[str]]
    u2l: dict[str, list[str]]
    l2u: dict[str, list[str]]
    paths: dict[str, list[list[str]]]
    own: dict[str, bool] = field(default_factory=dict)


def run(program: Program, configs: dict[str, Config], solvers: dict[str, ref.Solver]
        ) -> list[tuple[str, float, float]]:
    """One global step of ``program``; for each level with a path: (name, relative error of
    the engine's gradient against `references.total_gradient`, of its hypergradient part)."""
    names = list(program.smooth)
    losses = {n: level_loss(n, program.smooth[n], program.sampled.get(n, []), seed=10 + i,
                            own=program.own.get(n, True)) for i, n in enumerate(names)}
    levels = {n: Level(n, configs[n], losses[n],
                       program.smooth[n] + program.sampled.get(n, []), seed=i)
              for i, n in enumerate(names)}
    values = {n: level.module.flat().detach().clone() for n, level in levels.items()}
    engine = Engine(list(levels.values()), EngineConfig(train_iters=1), {
        "u2l": {levels[u]: [levels[x] for x in xs] for u, xs in program.u2l.items()},
        "l2u": {levels[lo]: [levels[x] for x in xs] for lo, xs in program.l2u.items()}})
    for n, level in levels.items():
        assert sorted([p.name for p in path] for path in level.paths) == sorted(program.paths[n])
    engine.run()
    out = []
    for n, level in levels.items():
        assert len(level.seen) == 1, f"{n} stepped {len(level.seen)} times"
        assert torch.equal(level.module.flat().detach(), values[n])  # lr 0, probes restored
        if not program.paths[n]:
            continue
        expected = ref.total_gradient(losses, values, n, program.paths[n], solvers)
        direct = ref.gradient(losses[n], values, n)
        out.append((n, rel_err(level.seen[0], expected),
                    rel_err(level.seen[0] - direct, expected - direct)))
    return out
