"""REINFORCE (docs/math.md#reinforce): `score_function_loss` and the `reinforce` hop, in
float64.

* the loss: its value and its gradient in the lower's parameters are those of
  ``losses.mean()`` bit for bit;
* one hop against the estimator written out per sample, ``-1/N sum_i (l_i - b_i) d log
  p(s_i)/dlam`` with ``l_i = <dL_i/dw, v>`` and ``b_i`` the leave-one-out mean (or 0);
* Bernoulli(sigmoid(phi)) samples: the exact expectation of the estimate over all 2^N
  outcomes is the closed form ``sigmoid'(phi) (r(1) - r(0))`` (unbiased, with and without the
  baseline), and over fixed-seed batches the root-mean-square error is ``sigma / sqrt(N)``
  with ``sigma`` the exact per-sample standard deviation (the 1/sqrt(N) rate, and the
  baseline's smaller sigma);
* through `Engine`: a bilevel program against the per-sample estimator (reinforce and cg on
  the same loss), and three-level programs against the dense chained reference.
"""

from __future__ import annotations

import itertools
import math

import pytest
import references as ref
import three_level as tl
import torch
from torch import Tensor, nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import HypergradientError
from betty.hypergradient import Hop, reinforce, score_function_loss
from betty.problems import ImplicitProblem

DTYPE = torch.float64
EXACT = 1e-12


def test_loss_value_and_lower_gradient_are_the_plain_mean():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, generator=gen, dtype=DTYPE, requires_grad=True)
    logits = torch.randn(5, generator=gen, dtype=DTYPE, requires_grad=True)
    x = torch.randn(5, 3, generator=gen, dtype=DTYPE)
    for baseline in ("leave_one_out", "none"):
        losses = (x @ w) ** 2
        surrogate = score_function_loss(losses, nn.functional.logsigmoid(logits), baseline)
        (grad,) = torch.autograd.grad(surrogate, w)
        plain = ((x @ w) ** 2).mean()
        assert torch.equal(surrogate.detach(), plain.detach())
        assert torch.equal(grad, torch.autograd.grad(plain, w)[0])


def test_loss_rejects_what_it_cannot_use():
    one = torch.zeros(1, dtype=DTYPE)
    with pytest.raises(ValueError, match="at least 2"):
        score_function_loss(one, one)
    with pytest.raises(ValueError, match="baseline"):
        score_function_loss(torch.zeros(2), torch.zeros(2), "mean")
    with pytest.raises(ValueError, match="shape"):
        score_function_loss(torch.zeros(2), torch.zeros(3))


def per_sample_estimate(per_sample_grads: Tensor, scores: Tensor, v: Tensor, baseline: str
                        ) -> Tensor:
    """``-1/N sum_i (l_i - b_i) scores_i``, ``l_i = <per_sample_grads_i, v>``; rows index
    samples; ``b_i`` = mean of the other l_j (leave-one-out) or 0."""
    ell = per_sample_grads @ v
    n = ell.shape[0]
    b = (ell.sum() - ell) / (n - 1) if baseline == "leave_one_out" else torch.zeros_like(ell)
    return -((ell - b)[:, None] * scores).mean(0)


@pytest.mark.parametrize("baseline", ["leave_one_out", "none"])
def test_hop_is_the_per_sample_estimator(baseline):
    """Categorical samples over 4 classes with logits lam; per-sample losses of w in R^3 that
    depend on the sample only (not on lam): the hop equals the estimator formed from
    per-sample gradients (`torch.func`-free: one autograd call per sample)."""
    gen = torch.Generator().manual_seed(1)
    lam = torch.randn(4, generator=gen, dtype=DTYPE, requires_grad=True)
    w = torch.randn(3, generator=gen, dtype=DTYPE, requires_grad=True)
    features = torch.randn(4, 3, generator=gen, dtype=DTYPE)
    samples = torch.multinomial(torch.softmax(lam.detach(), 0), 7, replacement=True,
                                generator=gen)
    v = torch.randn(3, generator=gen, dtype=DTYPE)

    def per_sample_losses() -> Tensor:
        return torch.cosh(features[samples] @ w) + 0.5 * (w**2).sum()

    def log_prob() -> Tensor:
        return torch.log_softmax(lam, 0)[samples]

    hop = Hop([w], [lam], lambda: score_function_loss(per_sample_losses(), log_prob(), baseline))
    with hop:
        (out,) = reinforce(hop, [v], Config(type="reinforce"))
    grads = torch.stack([torch.autograd.grad(loss_i, w, retain_graph=True)[0]
                         for loss_i in per_sample_losses()])
    scores = torch.stack([torch.autograd.grad(lp, lam, retain_graph=True)[0]
                          for lp in log_prob()])
    expected = per_sample_estimate(grads, scores, v, baseline)
    assert tl.rel_err(out, expected) < EXACT


def test_hop_refuses_a_loss_without_the_score():
    w = torch.ones(2, dtype=DTYPE, requires_grad=True)
    lam = torch.ones(2, dtype=DTYPE, requires_grad=True)
    hop = Hop([w], [lam], lambda: (w**2).sum())
    with hop, pytest.raises(HypergradientError, match="score_function_loss"):
        reinforce(hop, [torch.ones(2, dtype=DTYPE)], Config(type="reinforce"))


# -- Bernoulli(sigmoid(phi)) ------------------------------------------------------------------
PHI, W, V = 0.4, 0.3, 1.5
A = (4.0, 5.0)  # L(w, s) = 1/2 (w - A[s])^2: r(s) = -<dL/dw, v> = (A[s] - w) v


def bernoulli_hop(samples: Tensor, baseline: str) -> float:
    """The reinforce hop for ``v = V`` at ``w = W`` on these 0/1 samples."""
    phi = torch.tensor([PHI], dtype=DTYPE, requires_grad=True)
    w = torch.tensor([W], dtype=DTYPE, requires_grad=True)
    a = torch.where(samples > 0, A[1], A[0])

    def loss() -> Tensor:
        log_prob = tl.bernoulli_log_prob(samples[:, None], phi)
        return score_function_loss(0.5 * (w - a) ** 2, log_prob, baseline)

    hop = Hop([w], [phi], loss)
    with hop:
        (out,) = reinforce(hop, [torch.tensor([V], dtype=DTYPE)], Config(type="reinforce"))
    return float(out)


def closed_form() -> float:
    sig = 1 / (1 + math.exp(-PHI))
    return sig * (1 - sig) * ((A[1] - W) * V - (A[0] - W) * V)  # sigma'(phi) (r(1) - r(0))


def estimator_std(baseline: str, n: int) -> float:
    """Exact standard deviation of the estimate on N samples. With ``e = r(s) - E r`` and
    the score ``g = s - sigma``: ``Var(r g) / N`` without a baseline; with the leave-one-out
    baseline ``Var(e g) / N + (Var(e) Var(g) + E[e g]^2) / (N (N - 1))`` (the second term is
    the noise of the other samples' mean; cross terms vanish as E e = E g = 0)."""
    sig = 1 / (1 + math.exp(-PHI))
    prob, r = (1 - sig, sig), [(a - W) * V for a in A]

    def expect(f) -> float:
        return sum(p * f(s) for p, s in zip(prob, (0, 1)))

    mean_r = expect(lambda s: r[s])
    e, g = (lambda s: r[s] - mean_r), (lambda s: s - sig)
    if baseline == "none":
        rg = expect(lambda s: r[s] * g(s))
        return math.sqrt(expect(lambda s: (r[s] * g(s) - rg) ** 2) / n)
    eg = expect(lambda s: e(s) * g(s))
    var_eg = expect(lambda s: (e(s) * g(s) - eg) ** 2)
    var_e, var_g = expect(lambda s: e(s) ** 2), expect(lambda s: g(s) ** 2)
    return math.sqrt(var_eg / n + (var_e * var_g + eg**2) / (n * (n - 1)))


@pytest.mark.parametrize("n", [3, 5])
@pytest.mark.parametrize("baseline", ["leave_one_out", "none"])
def test_bernoulli_estimate_is_unbiased_exactly(baseline, n):
    """Over all 2^N outcomes, each weighted by its probability: the expectation of the
    estimate is the closed form sigmoid'(phi) (r(1) - r(0)) and its standard deviation is
    `estimator_std`, both to round-off."""
    sig = 1 / (1 + math.exp(-PHI))
    mean = second = 0.0
    for outcome in itertools.product((0.0, 1.0), repeat=n):
        prob = math.prod(sig if s else 1 - sig for s in outcome)
        estimate = bernoulli_hop(torch.tensor(outcome, dtype=DTYPE), baseline)
        mean, second = mean + prob * estimate, second + prob * estimate**2
    assert mean == pytest.approx(closed_form(), rel=EXACT)
    assert math.sqrt(second - mean**2) == pytest.approx(estimator_std(baseline, n), rel=1e-9)


def test_bernoulli_error_falls_like_one_over_sqrt_n():
    """Over 150 fixed-seed batches at each N, the root-mean-square error against the closed
    form is the exact standard deviation `estimator_std` (which falls like 1/sqrt(N)) within
    25%, for N from 16 to 1024; the leave-one-out baseline's is 20x smaller here (A's common
    offset cancels)."""
    repeats = 150
    sig = 1 / (1 + math.exp(-PHI))
    assert estimator_std("none", 1024) > 15 * estimator_std("leave_one_out", 1024)
    for baseline in ("leave_one_out", "none"):
        for n in (16, 128, 1024):
            squared = 0.0
            for seed in range(repeats):
                gen = torch.Generator().manual_seed(1000 * n + seed)
                samples = (torch.rand(n, generator=gen, dtype=DTYPE) < sig).to(DTYPE)
                squared += (bernoulli_hop(samples, baseline) - closed_form()) ** 2
            rms = math.sqrt(squared / repeats)
            ratio = rms / estimator_std(baseline, n)
            assert 0.75 < ratio < 1.25, (baseline, n, ratio)


# -- through Engine ------------------------------------------------------------------------
class Vector(nn.Module):
    def __init__(self, values: Tensor) -> None:
        super().__init__()
        self.values = nn.Parameter(values.clone())


class Sampled(ImplicitProblem):
    """Lower: w in R^3 trained on samples s_i ~ Bernoulli(sigmoid(phi)) (from the uniforms
    in the batch); per-sample loss 1/2 w^T D w - (G s_i)^T w."""

    def training_step(self, batch):
        samples = (batch < torch.sigmoid(self.upper.module.values.detach())).to(DTYPE)
        w = self.module.values
        losses = 0.5 * (D * w**2).sum() - samples @ G.T @ w
        return score_function_loss(losses, tl.bernoulli_log_prob(samples, self.upper.module.values))


class Upper(ImplicitProblem):
    def training_step(self, batch):
        return 0.5 * ((self.lower.module.values - T) ** 2).sum()

    def grad_callback(self, grads):
        self.seen = grads[0].detach().clone()


D = torch.tensor([1.0, 2.0, 4.0], dtype=DTYPE)
G = torch.tensor([[1.0, -2.0, 0.5], [0.3, 1.0, 2.0], [-1.0, 0.2, 1.5]], dtype=DTYPE)
T = torch.tensor([0.5, -1.0, 2.0], dtype=DTYPE)


@pytest.mark.parametrize("method", ["reinforce", "cg"])
def test_engine_bilevel_against_per_sample_estimator(method):
    """One global step, lr 0: the upper's gradient is the per-sample estimator with
    ``x = v`` (reinforce) or ``x = D^-1 v`` (cg, converged), ``v = w - T``, leave-one-out."""
    gen = torch.Generator().manual_seed(3)
    phi, w0 = torch.randn(3, generator=gen, dtype=DTYPE), torch.randn(3, generator=gen,
                                                                      dtype=DTYPE)
    uniforms = torch.rand(8, 3, generator=gen, dtype=DTYPE)
    lower_module, upper_module = Vector(w0), Vector(phi)
    config = Config(type=method, cg_iterations=3)
    lower = Sampled("lower", config, lower_module, torch.optim.SGD(lower_module.parameters(),
                                                                   lr=0.0),
                    train_data_loader=[uniforms])
    upper = Upper("upper", Config(), upper_module, torch.optim.SGD(upper_module.parameters(),
                                                                   lr=0.0),
                  train_data_loader=[torch.zeros(1)])
    Engine([upper, lower], EngineConfig(train_iters=1),
           {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}).run()
    samples = (uniforms < torch.sigmoid(phi)).to(DTYPE)
    grads = D * w0 - samples @ G.T  # per-sample dL_i/dw, rows
    sig = torch.sigmoid(phi)
    scores = samples - sig  # d/dphi log p(s_i), independent coordinates
    x = (w0 - T) if method == "reinforce" else (w0 - T) / D
    expected = per_sample_estimate(grads, scores, x, "leave_one_out")
    assert tl.rel_err(upper.seen, expected) < EXACT


PROGRAMS = {
    # M trains on samples drawn with U's logits, B on samples drawn with M's.
    "three_level": tl.Program(
        smooth={"U": ["M"], "M": ["B"], "B": []}, sampled={"M": ["U"], "B": ["M"]},
        u2l={"U": ["M"], "M": ["B"]}, l2u={"B": ["M"], "M": ["U"]},
        paths={"U": [["U", "M", "U"]], "M": [["M", "B", "M"]], "B": []}),
    # U reaches B's samples only: one path with two hops, M (smooth) then B (sampled).
    "three_level_two_hops": tl.Program(
        smooth={"U": ["M"], "M": ["B"], "B": []}, sampled={"B": ["U"]},
        u2l={"U": ["B"]}, l2u={"B": ["M"], "M": ["U"]},
        paths={"U": [["U", "M", "B", "U"]], "M": [], "B": []}),
}
ASSIGNMENTS = {  # method of (U, M, B), and the dense solver standing for it
    "reinforce": ({"U": "cg", "M": "reinforce", "B": "reinforce"}),
    "implicit": ({"U": "cg", "M": "cg", "B": "cg"}),
    "mixed": ({"U": "cg", "M": "nystrom", "B": "reinforce"}),
}
CONFIGS = {"cg": (Config(type="cg", cg_iterations=14), ref.exact_solve),
           "reinforce": (Config(type="reinforce"), ref.identity_solve),
           "nystrom": (Config(type="nystrom", nystrom_rank=7, nystrom_rho=1e-3),
                       lambda h, v: torch.linalg.solve(h + 1e-3 * torch.eye(7, dtype=DTYPE), v))}


@pytest.mark.parametrize("assignment", list(ASSIGNMENTS))
@pytest.mark.parametrize("program", list(PROGRAMS))
def test_engine_three_levels_against_dense_chain(program, assignment):
    """`references.total_gradient` on the score-function losses (the dense Hessian of the
    loss gives H and the score estimate of the mixed block), reinforce standing for
    ``-C^T v``, cg for ``-C^T H^-1 v``, nystrom (full rank) for ``-C^T (H + rho I)^-1 v``."""
    methods = ASSIGNMENTS[assignment]
    configs = {n: CONFIGS[m][0] for n, m in methods.items()}
    solvers = {n: CONFIGS[m][1] for n, m in methods.items()}
    for name, total_err, hyper_err in tl.run(PROGRAMS[program], configs, solvers):
        assert total_err < 1e-10 and hyper_err < 1e-10, name
