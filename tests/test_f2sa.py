"""F2SA, the fully first-order hop (betty/hypergradient/f2sa.py, docs/math.md#f2sa), float64.

References written here with dense linear algebra: the implicit hypergradient
``B^T H(z)^-1 v`` of a lower loss ``g(y; x) = 1/2 y^T A y - y^T B x + c/4 sum y^4`` at its
minimiser ``z`` (found by Newton's method), whose F2SA estimate must converge like O(1/lambda)
(error * lambda roughly constant) and be exact when ``c = 0`` (``g`` quadratic).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.hypergradient import Hop, f2sa
from betty.problems import ImplicitProblem

DT = torch.float64
N, M = 5, 3


def lower_setup(c: float):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(N, N, generator=gen, dtype=DT)
    a = torch.eye(N, dtype=DT) + q @ q.T / N
    b = torch.randn(N, M, generator=gen, dtype=DT)
    x = torch.randn(M, generator=gen, dtype=DT)
    target = torch.randn(N, generator=gen, dtype=DT)
    z = torch.zeros(N, dtype=DT)
    for _ in range(50):  # Newton on grad g = A z - B x + c z^3
        grad = a @ z - b @ x + c * z**3
        z = z - torch.linalg.solve(a + 3 * c * torch.diag(z**2), grad)
    hessian = a + 3 * c * torch.diag(z**2)
    v = z - target  # f(y) = 1/2 ||y - target||^2
    exact = b.T @ torch.linalg.solve(hessian, v)  # -M H^-1 v with M v = -B^T v
    return a, b, x, z, v, exact


def f2sa_estimate(c: float, lam: float, steps: int = 300, lr: float = 0.2) -> tuple:
    a, b, x0, z0, v, exact = lower_setup(c)
    w = z0.clone().requires_grad_()
    x = x0.clone().requires_grad_()

    def g():
        return 0.5 * w @ a @ w - w @ b @ x + c / 4 * (w**4).sum()

    hop = Hop([w], [x], g)
    hop.memory = {}
    config = Config(type="f2sa", f2sa_lambda=lam, f2sa_lambda_growth=0.0, f2sa_steps=steps,
                    f2sa_lr=lr)
    with hop:
        out = f2sa(hop, [v], config)[0]
    assert torch.equal(w.detach(), z0)  # the lower parameters are untouched
    return out, exact, hop.memory


def rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def test_error_shrinks_like_one_over_lambda():
    scaled = []
    for lam in (1e2, 1e3, 1e4):
        out, exact, _ = f2sa_estimate(c=0.5, lam=lam)
        scaled.append(rel(out, exact) * lam)
    assert min(scaled) > 1e-3  # the O(1/lambda) term is really there ...
    assert max(scaled) / min(scaled) < 1.3  # ... and error * lambda is constant


def test_quadratic_lower_is_exact_for_any_lambda():
    for lam in (2.0, 50.0):
        out, exact, _ = f2sa_estimate(c=0.0, lam=lam)
        assert rel(out, exact) < 1e-10


def test_penalized_copy_is_kept_and_lambda_grows():
    a, b, x0, z0, v, exact = lower_setup(0.5)
    w, x = z0.clone().requires_grad_(), x0.clone().requires_grad_()
    hop = Hop([w], [x], lambda: 0.5 * w @ a @ w - w @ b @ x + 0.125 * (w**4).sum())
    hop.memory = {}
    config = Config(type="f2sa", f2sa_lambda=100.0, f2sa_lambda_growth=100.0, f2sa_steps=40,
                    f2sa_lr=0.2)
    errors = []
    for _ in range(60):  # one lower, the upper fixed: y converges across outer steps
        with hop:
            errors.append(rel(f2sa(hop, [v], config)[0], exact))
    assert hop.memory["f2sa_step"] == 60 and len(hop.memory["f2sa_shift"]) == 1
    assert errors[-1] < 0.2 * errors[0] and errors[-1] < 2e-4


# -- through the engine ------------------------------------------------------------------
class Lower(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        w = self.module.weight.reshape(-1)
        pred = x @ w
        return 0.5 * ((pred - y) ** 2).mean() + 0.5 * (self.upper.module.weight.exp() * w**2).sum()


class Upper(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return 0.5 * ((x @ self.lower.module.weight.reshape(-1) - y) ** 2).mean()


def program(method: str, *, precision: str = "fp32", **engine):
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(16, 4, generator=gen, dtype=DT) for _ in range(3)]
    data = [(x, x @ torch.tensor([1.0, -2.0, 0.5, 0.0], dtype=DT)) for x in xs]
    inner, hyper = nn.Linear(4, 1, bias=False).double(), nn.Linear(4, 1, bias=False).double()
    nn.init.zeros_(inner.weight)
    nn.init.constant_(hyper.weight, -1.0)
    lower = Lower("lower", Config(type=method, unroll_steps=5, precision=precision,
                                  f2sa_lambda=20.0, f2sa_steps=20, f2sa_lr=0.3,
                                  cg_iterations=10),
                  module=inner, optimizer=torch.optim.SGD(inner.parameters(), lr=0.3),
                  train_data_loader=data)
    upper = Upper("upper", module=hyper, optimizer=torch.optim.SGD(hyper.parameters(), lr=0.1),
                  train_data_loader=data[::-1])
    upper.record = []
    upper.grad_callback = lambda grads: upper.record.append(grads[0].detach().clone())
    return Engine([upper, lower], EngineConfig(train_iters=30, progress_bar=False, **engine),
                  {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})


def test_no_double_backward_anywhere(monkeypatch):
    seen = []
    original = torch.autograd.grad

    def recording(*args, **kwargs):
        seen.append(bool(kwargs.get("create_graph", False)))
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "grad", recording)
    program("f2sa").run()
    assert seen and not any(seen)  # a first-order method: no graph of a gradient, ever
    seen.clear()
    program("cg").run()
    assert any(seen)  # the test can tell: cg's Hessian-vector products build one


def test_agrees_with_cg_along_a_run():
    f2sa_run, cg_run = program("f2sa"), program("cg")
    f2sa_run.run()
    cg_run.run()
    got, want = torch.stack(f2sa_run.upper.record), torch.stack(cg_run.upper.record)
    assert len(got) == 6
    cosines = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1))
    assert float(cosines.min()) > 0.99


def test_penalized_copy_resumes_bitwise(tmp_path):
    whole = program("f2sa")
    whole.run()
    first = program("f2sa", checkpoint_dir=str(tmp_path), checkpoint_step=15)
    first.config.train_iters = 15
    first.run()
    memory = first.lower.hop_memory("upper > lower > upper #0")
    assert memory["f2sa_step"] == 3 and len(memory["f2sa_shift"]) == 1
    resumed = program("f2sa", resume_from=str(tmp_path / "step_00000015.pt"))
    resumed.run()
    for a, b in zip(whole.upper.record[3:], resumed.upper.record):
        assert torch.equal(a, b)
    assert torch.equal(whole.upper.module.weight, resumed.upper.module.weight)


@pytest.mark.parametrize("precision", ["bf16"])
def test_low_precision_is_close_to_fp32(precision):
    exact, half = program("f2sa"), program("f2sa", precision=precision)
    exact.run()
    half.run()
    got, want = torch.stack(half.upper.record), torch.stack(exact.upper.record)
    cosines = torch.nn.functional.cosine_similarity(got.flatten(1), want.flatten(1))
    assert float(cosines.min()) > 0.98
