"""The non-finite guard (betty/guard.py, docs/reliability.md) and host reads on the hot path.

* ``EngineConfig(nonfinite="raise")`` (default): a NaN loss in the middle of an unroll window
  stops the run at the global step where it happened, naming the problem, the step and what
  was not finite; no checkpoint of that step or later is written and the newest kept one
  loads with finite values. A NaN hypergradient with finite losses is reported against the
  upper that received it, at the step it did.
* ``"skip"``: the step is skipped as the fp16 scaler would; the result equals the hand-written
  loop that leaves that step out.
* A checkpoint is never written from parameters holding NaN (whatever the policy).
* Host reads: with the guard off a global step reads nothing from the device (no ``.item()``,
  ``.tolist()``, ``bool(tensor)``, ``.cpu()``), for every method; with it on, once.
"""

from __future__ import annotations

import os

import pytest
import torch

from betty import Engine
from betty.checkpoint import CheckpointError, list_checkpoints, safe_load
from betty.configs import Config, EngineConfig
from betty.guard import NonFiniteError
from betty.problems import ImplicitProblem, IterativeProblem

LR = 0.1


class Scalar(ImplicitProblem):
    """``(w - target)^2 + w * upper``: NaN from local step ``bad_at`` on if given."""

    def __init__(self, name, config=None, *, upper=None, bad_at=None, bad_hyper=False,
                 cls_lr=LR):
        module = torch.nn.Linear(1, 1, bias=False).double()
        torch.nn.init.constant_(module.weight, 0.5)
        super().__init__(name, config, module=module,
                         optimizer=torch.optim.SGD(module.parameters(), lr=cls_lr),
                         train_data_loader=[torch.tensor(1.0, dtype=torch.float64)])
        self.upper_name, self.bad_at, self.bad_hyper = upper, bad_at, bad_hyper

    def training_step(self, batch):
        w = self.module.weight.sum()
        loss = (w - batch) ** 2
        if self.upper_name is not None:
            lam = getattr(self, self.upper_name).module.weight.sum()
            loss = loss + w * lam
            if self.bad_hyper:  # finite value 0, but d/dlam = 0 * inf = NaN at lam = 0
                loss = loss + 0.0 * (lam - 0.5).abs().sqrt()
        if self.bad_at is not None and self.count >= self.bad_at:
            loss = loss * float("nan")
        return loss


class Outer(ImplicitProblem):
    def __init__(self, name, config=None):
        module = torch.nn.Linear(1, 1, bias=False).double()
        torch.nn.init.constant_(module.weight, 0.5)
        super().__init__(name, config, module=module,
                         optimizer=torch.optim.SGD(module.parameters(), lr=LR),
                         train_data_loader=[torch.tensor(0.0, dtype=torch.float64)])

    def training_step(self, batch):
        return self.inner.module.weight.sum() ** 2


def bilevel(inner_kwargs, engine_kwargs, *, lower_cls=Scalar, inner_config=None):
    inner = lower_cls("inner", inner_config or Config(unroll_steps=10), upper="outer",
                      **inner_kwargs)
    outer = Outer("outer")
    return Engine([outer, inner], EngineConfig(progress_bar=False, **engine_kwargs),
                  {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})


def test_nan_loss_mid_window_stops_there_and_saves_nothing_after(tmp_path):
    """The issue's case: a 10-step window, NaN at step 45 (here 5), a checkpoint every
    step keeping 3: the run stops at step 5; files 2-4 remain, all finite."""
    engine = bilevel({"bad_at": 5}, {"train_iters": 20, "checkpoint_dir": str(tmp_path),
                                     "checkpoint_step": 1, "keep_checkpoints": 3})
    with pytest.raises(NonFiniteError, match=r"'inner'.*loss.*nan.*local step 5.*global step 5"):
        engine.run()
    assert engine.global_step == 5
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3, 4]
    newest = safe_load(list_checkpoints(tmp_path)[-1][1])
    weights = [t for p in newest["problems"].values()
               for t in p["state"]["module"].values()]
    assert all(torch.isfinite(t).all() for t in weights)


def test_nan_hypergradient_with_finite_losses_names_the_upper_at_its_step():
    engine = bilevel({"bad_hyper": True}, {"train_iters": 12},
                     inner_config=Config(unroll_steps=3))
    with pytest.raises(NonFiniteError, match=r"'outer'.*hypergradient.*global step 3"):
        engine.run()
    assert engine.global_step == 3  # the first upper step: reported there, not later


def test_skip_policy_leaves_out_the_bad_step_as_the_hand_loop_does():
    class OnceBad(Scalar):
        def training_step(self, batch):
            loss = super().training_step(batch)
            return loss * float("nan") if self.count == 3 else loss

    p = OnceBad("p")
    engine = Engine([p], EngineConfig(train_iters=6, nonfinite="skip", progress_bar=False))
    engine.run()
    w = 0.5
    for step in range(1, 7):  # SGD on (w - 1)^2, step 3 skipped
        if step != 3:
            w -= LR * 2 * (w - 1)
    assert p.module.weight.item() == pytest.approx(w, abs=1e-15)
    assert p.skipped_steps == 1


def test_a_checkpoint_is_never_written_from_nan_parameters(tmp_path):
    p = Scalar("p")
    engine = Engine([p], EngineConfig(train_iters=2, checkpoint_dir=str(tmp_path),
                                      nonfinite="off", progress_bar=False))
    engine.run()
    engine.save_checkpoint()
    with torch.no_grad():
        p.module.weight.fill_(float("nan"))
    engine.global_step += 1
    with pytest.raises(CheckpointError, match=r"'p'\.weight.*NaN or inf"):
        engine.save_checkpoint()
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2]
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# -- host reads ---------------------------------------------------------------------------
class Counter:
    def __init__(self, monkeypatch):
        self.calls: list[str] = []
        for name in ("item", "tolist", "__bool__", "cpu", "__float__", "__int__"):
            original = getattr(torch.Tensor, name)
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, original))

    def _wrap(self, name, original):
        def counted(tensor, *args, **kwargs):
            self.calls.append(name)
            return original(tensor, *args, **kwargs)
        return counted


class Reverse(IterativeProblem):
    def training_step(self, batch):
        w = self.module.weight.sum()
        return (w - batch) ** 2 + w * self.outer.module.weight.sum()


@pytest.mark.parametrize("method", ["darts", "sama", "neumann", "cg", "nystrom", "f2sa",
                                    "reinforce", "reverse"])
@pytest.mark.parametrize("policy", ["off", "raise"])
def test_host_reads_per_global_step(method, policy, monkeypatch):
    reverse = method == "reverse"
    inner = (Reverse if reverse else Scalar)(
        "inner", Config(type="darts" if reverse else method, unroll_steps=1,
                        cg_iterations=3, neumann_iterations=3, neumann_alpha=0.3,
                        nystrom_rank=1, f2sa_steps=2),
        **({} if reverse else {"upper": "outer"}))
    if reverse:
        net = torch.nn.Linear(1, 1, bias=False).double()
        inner = Reverse("inner", Config(unroll_steps=2), module=net,
                        optimizer=torch.optim.SGD(net.parameters(), lr=LR),
                        train_data_loader=[torch.tensor(1.0, dtype=torch.float64)])
    outer = Outer("outer", Config(first_order=not reverse))
    engine = Engine([outer, inner], EngineConfig(train_iters=8, nonfinite=policy,
                                                 progress_bar=False),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    for _ in range(2):  # warm-up: first-step checks
        engine.global_step += 1
        engine.train_step()
    counter = Counter(monkeypatch)
    steps = 4
    for _ in range(steps):
        engine.global_step += 1
        engine.train_step()
    monkeypatch.undo()
    allowed = 0 if policy == "off" else steps
    assert len(counter.calls) <= allowed, counter.calls
    if policy == "raise":
        assert counter.calls.count("item") == steps  # exactly the guard's one read


def test_largest_magnitude_of_small_and_large_tensors_is_exact_and_propagates_faults():
    """Small tensors go through one inf-norm launch, large ones through min/max: the result
    is max |entry| over all of them exactly, NaN if any entry is NaN, inf if any is inf."""
    from betty.guard import LARGE, largest_magnitude

    gen = torch.Generator().manual_seed(0)
    small = torch.randn(7, 5, generator=gen)
    large = torch.randn(LARGE + 3, generator=gen)
    for peak_in, value in ((small, -9.5), (large, -11.25), (large, 12.0)):
        tensors = [small.clone(), large.clone()]
        target = tensors[0] if peak_in is small else tensors[1]
        target.view(-1)[3] = value
        assert largest_magnitude(tensors).item() == abs(value)
        assert largest_magnitude([tensors[1]]).item() == tensors[1].abs().max().item()
    for bad in (float("nan"), float("inf"), -float("inf")):
        for index in (0, 1):
            tensors = [small.clone(), large.clone()]
            tensors[index].view(-1)[-1] = bad
            got = largest_magnitude(tensors).item()
            assert (got != got) if bad != bad else got == float("inf")
    assert largest_magnitude([None, torch.empty(0)]) is None


def test_the_one_read_tells_an_overflowing_sum_from_a_non_finite_value():
    """The guard reads the sum of its flags once; finite flags whose sum overflows float32
    are still finite, and a NaN or inf is found at its own index."""
    from betty.guard import _finite

    big = torch.tensor(3e38)
    assert _finite([big, big, torch.tensor(1.0)]) == [True, True, True]
    assert _finite([torch.tensor(1.0), torch.tensor(float("nan")), big]) == [True, False, True]
    assert _finite([torch.tensor(-float("inf"))]) == [False]
    mixed = [torch.tensor(2.0, dtype=torch.bfloat16), torch.tensor(float("inf"))]
    assert _finite(mixed) == [True, False]
