"""The iMAML and learning-by-ignoring examples run (their --quick configurations) and learn.

* iMAML (examples/imaml): the meta-parameters move, and after adaptation the meta-test
  accuracy on unseen digits is well above chance (0.2 for 5-way). Reference for the
  hypergradient the example's program computes: the implicit one,
  ``lam * (H + lam I)^-1 dL_query/dw`` with H the Hessian of the support CE plus the proximal
  term at the adapted w, solved densely in float64.
* Learning by ignoring (examples/learning_by_ignoring): each of the three levels steps once
  per global step, and the learned weights of the harmful (label-flipped) source samples
  are lower than those of the clean ones.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from betty import Engine
from betty.configs import Config, EngineConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

pytestmark = pytest.mark.slow  # each runs an example program


def load(name: str, relative: str):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / relative)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def imaml():
    return load("imaml_example", "imaml/main.py")


@pytest.fixture(scope="module")
def lbi():
    return load("lbi_example", "learning_by_ignoring/main.py")


def test_imaml_quick_meta_learns(imaml, tmp_path, capsys):
    plot = tmp_path / "imaml.png"
    result = imaml.main(["--quick", "--plot", str(plot)])
    out = capsys.readouterr().out

    assert result["chance"] == pytest.approx(0.2)
    # theta moved away from its initialisation (the scratch model) ...
    assert result["moved"]["imaml"] > 0.5
    assert result["moved"]["maml"] > 0.5
    # ... and adapts to unseen digits far better than chance (quick: 60 tasks, ±3 points)
    assert result["accuracy"]["imaml"] > 0.35
    assert result["accuracy"]["maml"] > 0.35
    assert result["seen_accuracy"]["imaml"] > 0.5  # meta-training classes: fit better
    assert len(result["curves"]["imaml"]) == len(result["curves"]["maml"]) == 3
    assert plot.stat().st_size > 10_000
    assert "| iMAML (cg) |" in out and "| MAML (reverse mode) |" in out


def test_imaml_hypergradient_is_the_implicit_one(imaml):
    """One meta-gradient of the example's program, against lam (H + lam I)^-1 v."""
    torch.manual_seed(0)
    lam, steps = 2.0, 40
    pool = {c: x.double() for c, x in imaml.class_pools()[0].items()}
    theta, template = imaml.mlp(5, hidden=16).double(), imaml.mlp(5, hidden=16).double()
    recorded = []

    class Meta(imaml.IMAMLMeta):
        def grad_callback(self, grads):
            recorded.append([g.clone() for g in grads])

    inner = imaml.IMAMLInner(
        name="inner", module=template,
        optimizer=torch.optim.SGD(template.parameters(), lr=0.3),
        config=Config(type="cg", unroll_steps=steps, cg_iterations=80),
        sampler=imaml.TaskSampler(pool, ways=5, shots=1, queries=4, seed=0), lam=lam)
    meta = Meta(name="meta", module=theta,
                optimizer=torch.optim.SGD(theta.parameters(), lr=0.0))
    Engine([inner, meta], EngineConfig(train_iters=steps, progress_bar=False),
           {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}}).run()
    assert len(recorded) == 1

    names = [n for n, _ in template.named_parameters()]
    shapes = [p.shape for p in template.parameters()]
    w = torch.cat([p.detach().flatten() for p in template.parameters()])
    anchor = torch.cat([p.detach().flatten() for p in theta.parameters()])

    def unflatten(v):
        return dict(zip(names, (t.view(s) for t, s in zip(v.split([s.numel() for s in shapes]),
                                                             shapes))))

    def ce(v, part):
        x, y = inner.task[part]
        return F.cross_entropy(torch.func.functional_call(template, unflatten(v), (x,)), y)

    hessian = torch.autograd.functional.hessian(
        lambda v: ce(v, "support") + lam / 2 * (v - anchor).pow(2).sum(), w)
    v = torch.func.grad(lambda q: ce(q, "query"))(w)
    want = lam * torch.linalg.solve(hessian, v)
    got = torch.cat([g.flatten() for g in recorded[0]])
    assert torch.linalg.vector_norm(got - want) < 1e-8 * torch.linalg.vector_norm(want)


def test_learning_by_ignoring_quick(lbi, tmp_path, capsys):
    plot = tmp_path / "lbi.png"
    result = lbi.main(["--quick", "--plot", str(plot)])
    out = capsys.readouterr().out
    steps = result["steps"]

    runs = {r["method"]: r for r in result["runs"]}
    assert set(runs) == set(lbi.METHODS)
    # the three-level schedule: pretrain, then finetune, then reweight, once per global step
    assert runs["lbi"]["counts"] == {"pretrain": steps, "finetune": steps, "reweight": steps}
    assert runs["pretrain_finetune"]["counts"] == {"pretrain": steps, "finetune": steps}
    # reweighting learned to ignore: harmful (label-flipped) samples weigh less on average,
    # and a clean sample outweighs a harmful one in most pairs (0.5 = chance)
    lbi_run = runs["lbi"]
    assert lbi_run["weight_harmful"] < lbi_run["weight_clean"] - 0.1
    assert lbi_run["ranking"] > 0.6
    weights = lbi_run["weights"]
    assert weights.shape == (result["source_size"],) and bool(((weights > 0) &
                                                               (weights < 1)).all())
    for method in lbi.METHODS:
        assert runs[method]["acc"] > 0.6  # target test accuracy; 0.1 is chance
    assert plot.stat().st_size > 10_000
    assert "lower on harmful?" in out and "| 0.05 |" in out
