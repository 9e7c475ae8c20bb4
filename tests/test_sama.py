"""SAMA through `Engine` against hand-written references, in float64 (docs/math.md#sama).

The program is ridge regression: the inner problem ``L(w, lam) = 1/2 ||X w - y||^2 / n +
1/2 sum_i lam_i w_i^2`` is trained by a real optimizer (lr > 0), the outer problem's loss
``1/2 ||Xv w - yv||^2 / nv`` reaches ``lam`` only through ``w``, and the outer lr is 0 so
``lam`` stays put. At each outer step the engine's hypergradient must equal

    -C^T (P * v),   v = dL_outer/dw,   C = d2L_inner/dw dlam = diag(w),

with everything evaluated by hand at the inner weights of that moment: the gradients are the
closed forms above, the optimizer is simulated step by step here (no torch.optim, no
betty.optim), and ``P`` is the optimizer's update Jacobian written out per optimizer (SGD:
``lr``, ``lr (1 - dampening)`` or ``lr (1 + momentum)`` with nesterov; Adam/AdamW: the
derivative of ``lr m_hat / (sqrt(v_hat) + eps)`` with bias correction). ``dL/dlam = w^2 / 2``
is quadratic in ``w``, so sama's central difference is exact up to round-off.

Which step ``P`` belongs to: betty evaluates it at the optimizer's current state for the step
it would take next, fed with the latest gradient (`betty.optim.jacobian`); the reference below
does the same, from its own simulated state.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
import torch
from torch import Tensor, nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import BettyError, ConfigError
from betty.problems import ImplicitProblem

DTYPE = torch.float64
DIM = 6
STEPS = 3
TOL = 1e-9  # central difference of a quadratic: round-off only


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float(torch.linalg.vector_norm(actual - expected)
                 / torch.linalg.vector_norm(expected))


@dataclass
class Data:
    x: Tensor
    y: Tensor
    xv: Tensor
    yv: Tensor
    lam: Tensor
    w0: Tensor

    def inner_grad(self, w: Tensor) -> Tensor:
        """``dL_inner/dw = X^T (X w - y) / n + lam * w``."""
        return self.x.T @ (self.x @ w - self.y) / self.x.shape[0] + self.lam * w

    def outer_grad(self, w: Tensor) -> Tensor:
        """``v = dL_outer/dw = Xv^T (Xv w - yv) / nv``."""
        return self.xv.T @ (self.xv @ w - self.yv) / self.xv.shape[0]


@pytest.fixture(scope="module")
def data() -> Data:
    gen = torch.Generator().manual_seed(3)

    def randn(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=DTYPE)

    x = randn(30, DIM)
    return Data(x=x, y=x @ randn(DIM) + 0.2 * randn(30), xv=randn(20, DIM), yv=randn(20),
                lam=0.2 + torch.rand(DIM, generator=gen, dtype=DTYPE), w0=randn(DIM))


# -- the optimizers, simulated by hand --------------------------------------------------------
@dataclass
class HandSGD:
    """torch.optim.SGD's rule (coupled weight decay, momentum buffer starting at ``g'``)."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0
    buf: Tensor | None = field(default=None, init=False)

    def step(self, w: Tensor, g: Tensor) -> Tensor:
        d = g + self.weight_decay * w
        if self.momentum:
            self.buf = d.clone() if self.buf is None else \
                self.momentum * self.buf + (1 - self.dampening) * d
            d = d + self.momentum * self.buf if self.nesterov else self.buf
        return w - self.lr * d

    def p(self, w: Tensor, g: Tensor) -> Tensor:
        """dU/dg of the next step: the update is linear in g."""
        if not self.momentum:
            scale = self.lr
        else:
            keep = 1.0 if self.buf is None else 1 - self.dampening
            scale = self.lr * (1 + self.momentum * keep) if self.nesterov else self.lr * keep
        return torch.full_like(w, scale)


@dataclass
class HandAdam:
    """torch.optim.Adam (``decoupled=False``, decay added to g) or AdamW (``decoupled=True``,
    ``w <- w (1 - lr wd)`` before the step); amsgrad off."""

    lr: float
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    decoupled: bool = False
    m: Tensor | None = field(default=None, init=False)
    v: Tensor | None = field(default=None, init=False)
    t: int = field(default=0, init=False)

    def _direction(self, w: Tensor, g: Tensor) -> Tensor:
        return g if self.decoupled else g + self.weight_decay * w

    def _moments(self, d: Tensor) -> tuple[Tensor, Tensor]:
        b1, b2 = self.betas
        m = (1 - b1) * d if self.m is None else b1 * self.m + (1 - b1) * d
        v = (1 - b2) * d * d if self.v is None else b2 * self.v + (1 - b2) * d * d
        return m, v

    def update(self, w: Tensor, g: Tensor) -> Tensor:
        """``lr m_hat / (sqrt(v_hat) + eps)`` of the next step (differentiable in g)."""
        b1, b2 = self.betas
        t = self.t + 1
        m, v = self._moments(self._direction(w, g))
        return self.lr * (m / (1 - b1**t)) / ((v / (1 - b2**t)).sqrt() + self.eps)

    def step(self, w: Tensor, g: Tensor) -> Tensor:
        if self.decoupled:
            w = w * (1 - self.lr * self.weight_decay)
        u = self.update(w, g)
        self.m, self.v = self._moments(self._direction(w, g))
        self.t += 1
        return w - u

    def p(self, w: Tensor, g: Tensor) -> Tensor:
        """The closed form of d update / dg (elementwise), with c1 = 1 - b1^t,
        c2 = 1 - b2^t at the next step t: ``lr/c1 ((1 - b1)/D - m (1 - b2) d / (sqrt(c2 v)
        D^2))``, ``D = sqrt(v / c2) + eps`` (m, v the moments that step would hold)."""
        b1, b2 = self.betas
        t = self.t + 1
        c1, c2 = 1 - b1**t, 1 - b2**t
        d = self._direction(w, g)
        m, v = self._moments(d)
        denom = (v / c2).sqrt() + self.eps
        slope = (1 - b2) * d / (c2 * v).sqrt()
        return self.lr / c1 * ((1 - b1) / denom - m * slope / denom**2)


OPTIMIZERS = {
    "sgd": (lambda ps: torch.optim.SGD(ps, lr=0.1), lambda: HandSGD(lr=0.1)),
    "sgd_momentum_decay": (
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05),
        lambda: HandSGD(lr=0.1, momentum=0.9, dampening=0.3, weight_decay=0.05)),
    "sgd_nesterov": (
        lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, nesterov=True),
        lambda: HandSGD(lr=0.05, momentum=0.8, nesterov=True)),
    "adam": (lambda ps: torch.optim.Adam(ps, lr=0.05), lambda: HandAdam(lr=0.05)),
    "adam_coupled_decay": (
        lambda ps: torch.optim.Adam(ps, lr=0.05, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1),
        lambda: HandAdam(lr=0.05, betas=(0.8, 0.99), eps=1e-3, weight_decay=0.1)),
    "adamw": (
        lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1),
        lambda: HandAdam(lr=0.05, weight_decay=0.1, decoupled=True)),
}


def test_hand_adam_p_is_its_own_derivative(data):
    """The closed-form P of `HandAdam` equals autograd's derivative of its own update (the
    reference's P is checked before it is used; the update is elementwise, so the gradient of
    its sum is the diagonal)."""
    for _, make in (OPTIMIZERS["adam_coupled_decay"], OPTIMIZERS["adamw"]):
        opt, w = make(), data.w0.clone()
        for _ in range(2):
            g = data.inner_grad(w)
            expected = opt.p(w, g)
            g_var = g.clone().requires_grad_()
            (auto,) = torch.autograd.grad(opt.update(w, g_var).sum(), g_var)
            assert torch.allclose(expected, auto, rtol=1e-9, atol=1e-15)
            w = opt.step(w, g)


# -- the program through Engine ---------------------------------------------------------------
class Vector(nn.Module):
    def __init__(self, value: Tensor) -> None:
        super().__init__()
        self.value = nn.Parameter(value.clone())


class Inner(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        w = self.module.weight.reshape(-1)
        lam = self.outer.module.value
        return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam * w**2).sum()


class Outer(ImplicitProblem):
    """Records the inner weights its hypergradient is taken at, and the gradient it gets."""

    def training_step(self, batch):
        x, y = batch
        w = self.inner.module.weight.reshape(-1)
        self.w_seen.append(w.detach().clone())
        return 0.5 * ((x @ w - y) ** 2).mean()

    def grad_callback(self, grads):
        self.grads_seen.append(grads[0].detach().clone())


def build(data: Data, make_optimizer, inner_config: Config, *, steps: int = STEPS
          ) -> tuple[Engine, Inner, Outer]:
    linear = nn.Linear(DIM, 1, bias=False).to(DTYPE)
    with torch.no_grad():
        linear.weight.copy_(data.w0.reshape(1, -1))
    lam = Vector(data.lam)
    inner = Inner("inner", inner_config, linear, make_optimizer(linear.parameters()),
                  train_data_loader=[(data.x, data.y)])
    outer = Outer("outer", Config(), lam, torch.optim.SGD(lam.parameters(), lr=0.0),
                  train_data_loader=[(data.xv, data.yv)])
    outer.w_seen, outer.grads_seen = [], []
    engine = Engine([outer, inner], EngineConfig(train_iters=steps),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    return engine, inner, outer


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_engine_sama_matches_hand_reference(data, name):
    """Reference: ``-diag(w) (P * v)`` at the inner weights of each outer step, with the
    optimizer and its P simulated by hand (module docstring); 3 outer steps, so P is read from
    a state that has seen several gradients (momentum buffers, Adam moments, bias correction
    at t = 2, 3, 4)."""
    make_optimizer, make_hand = OPTIMIZERS[name]
    engine, _, outer = build(data, make_optimizer, Config(type="sama"))
    engine.run()
    assert len(outer.grads_seen) == STEPS
    hand, w = make_hand(), data.w0.clone()
    for step in range(STEPS):
        g = data.inner_grad(w)
        w = hand.step(w, g)
        assert torch.allclose(outer.w_seen[step], w, rtol=1e-12, atol=1e-14), \
            "the hand-simulated optimizer diverged from torch.optim"
        expected = -w * (hand.p(w, g) * data.outer_grad(w))  # -C^T (P v), C = diag(w)
        assert rel_err(outer.grads_seen[step], expected) < TOL, f"step {step + 1}"


def test_engine_sama_radius_does_not_matter_on_a_quadratic(data):
    """Reference: the default-radius result. ``dL/dlam`` is quadratic in ``w``, so the central
    difference is exact for any ``sama_adam_alpha``; the inner weights after the run are the
    optimizer's own (probes restored them bit for bit)."""
    results, weights = [], []
    for alpha in (1.0, 1e-3, 10.0):
        engine, inner, outer = build(data, OPTIMIZERS["adam"][0],
                                     Config(type="sama", sama_adam_alpha=alpha))
        engine.run()
        results.append(torch.stack(outer.grads_seen))
        weights.append(inner.module.weight.detach().clone())
    for other in results[1:]:
        assert rel_err(other, results[0]) < 1e-7
    for other in weights[1:]:
        assert torch.equal(other, weights[0])


def test_engine_sama_zero_learning_rate_gives_zero_not_nan(data):
    """Reference: 0. With lr = 0, P = 0 and the probe direction P v vanishes; the radius
    ``alpha / ||P v||`` must not turn into inf * 0 = NaN."""
    engine, _, outer = build(data, lambda ps: torch.optim.SGD(ps, lr=0.0), Config(type="sama"),
                             steps=1)
    engine.run()
    assert torch.equal(outer.grads_seen[0], torch.zeros(DIM, dtype=DTYPE))


def test_engine_sama_equals_darts_scaled_by_lr_for_plain_sgd(data):
    """Reference: darts on the same program. For plain SGD P = lr, so sama's hop is lr times
    darts's (both central differences of the same quadratic)."""
    out = {}
    for method in ("sama", "darts"):
        engine, _, outer = build(data, OPTIMIZERS["sgd"][0], Config(type=method), steps=2)
        engine.run()
        out[method] = torch.stack(outer.grads_seen)
    assert rel_err(out["sama"], 0.1 * out["darts"]) < TOL


# -- unsupported optimizers fail before training ----------------------------------------------
@pytest.mark.parametrize("make_optimizer", [
    lambda ps: torch.optim.Adamax(ps, lr=0.01),
    lambda ps: torch.optim.LBFGS(ps, lr=0.01),
    lambda ps: torch.optim.NAdam(ps, lr=0.01),  # an Adam-like class that is not Adam
], ids=["Adamax", "LBFGS", "NAdam"])
def test_sama_unsupported_optimizer_fails_before_training(data, make_optimizer):
    """Engine construction (before any step) raises a ConfigError that names the problem and
    the optimizers sama supports."""
    with pytest.raises(ConfigError) as info:
        build(data, make_optimizer, Config(type="sama"))
    message = str(info.value)
    assert "'inner'" in message and "sama" in message
    for supported in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad"):
        assert supported in message


def test_sama_unsupported_optimizer_is_fine_where_nobody_differentiates(data):
    """No error when no upper differentiates through the sama problem: the outer problem
    itself is declared sama (it is nobody's lower) and uses Adamax."""
    linear = nn.Linear(DIM, 1, bias=False).to(DTYPE)
    lam = Vector(data.lam)
    inner = Inner("inner", Config(), linear, torch.optim.SGD(linear.parameters(), lr=0.1),
                  train_data_loader=[(data.x, data.y)])
    outer = Outer("outer", Config(type="sama"), lam, torch.optim.Adamax(lam.parameters()),
                  train_data_loader=[(data.xv, data.yv)])
    outer.w_seen, outer.grads_seen = [], []
    Engine([outer, inner], EngineConfig(train_iters=1),
           {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}).run()
    assert len(outer.grads_seen) == 1


def test_sama_optimizer_swapped_after_set_up_fails_with_a_message(data):
    """An optimizer swapped in after the engine's checks (set_optimizer) is caught at the
    first hop, with an error (a BettyError) that names the problem."""
    engine, inner, _ = build(data, OPTIMIZERS["sgd"][0], Config(type="sama"), steps=1)
    inner.set_optimizer(torch.optim.Adamax(inner.module.parameters()))
    with pytest.raises(BettyError, match="'inner'"):
        engine.run()
