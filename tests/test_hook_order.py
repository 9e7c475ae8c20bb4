"""The hook order of one local step, the same for every kind of problem (betty/problems/hooks.py,
docs/training.md): ``on_inner_loop_start`` at a window start; per micro-batch
``grad_callback`` on that micro-batch's unclipped gradient; on the last micro-batch the
update (clipped), the scheduler and ``param_callback`` (an `IterativeProblem` runs it when the
window's values are written back to its real parameters; a `TaskBatchedProblem` never
writes back). Also ``meta_trainable_parameters``: the original's name is accepted when it
names the trainable parameters and refused, before training, when it names others.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import ProblemDefinitionError
from betty.problems import ImplicitProblem, IterativeProblem, TaskBatchedProblem

LR, CLIP, TARGET = 0.1, 0.5, 4.0


class Recording:
    """Mixin: records each hook as it runs; the loss is (sum(w) - TARGET)^2 per batch."""

    def on_inner_loop_start(self):
        self.events.append("start")

    def training_step(self, batch):  # the upper's weight is 1 (lr 0): TARGET * 1
        target = TARGET * self.upper.module.weight.sum()
        return (self.module.weight.sum() - target) ** 2 * batch.sum()

    def grad_callback(self, grads):
        norm = float(torch.sqrt(sum(g.detach().square().sum() for g in grads)))
        self.events.append("grad")
        self.norms.append(norm)

    def param_callback(self, params):
        self.events.append("param")


class Implicit(Recording, ImplicitProblem):
    pass


class Iterative(Recording, IterativeProblem):
    pass


class Tasks(Recording, TaskBatchedProblem):
    pass  # training_step sees one task: w has no leading T inside vmap


class Upper(ImplicitProblem):
    def training_step(self, batch):
        out = self.lower.module.weight.sum() if not self.tasks else \
            self.lower.adapted_parameters()["weight"].sum()
        return out * self.module.weight.sum()


def run(kind: type, *, reverse: bool) -> tuple[list[str], list[float], nn.Module]:
    net = nn.Linear(2, 1, bias=False).double()
    nn.init.zeros_(net.weight)
    opt = torch.optim.SGD(net.parameters(), lr=LR)
    events: list[str] = []
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: events.append("sched") or 1.0)
    events.clear()  # LambdaLR evaluates the lambda once when built
    batch = torch.ones(3, 1, dtype=torch.float64) if kind is Tasks else \
        torch.ones(1, dtype=torch.float64)
    lower = kind("lower", Config(unroll_steps=2, gradient_accumulation=2,
                                 gradient_clipping=CLIP),
                 module=net, optimizer=opt, scheduler=sched,
                 train_data_loader=[batch])
    lower.events, lower.norms = events, []
    hyper = nn.Linear(1, 1, bias=False).double()
    nn.init.ones_(hyper.weight)
    upper = Upper("upper", Config(first_order=not reverse), module=hyper,
                  optimizer=torch.optim.SGD(hyper.parameters(), lr=0.0),
                  train_data_loader=[torch.zeros(1)])
    upper.tasks = kind is Tasks
    Engine([upper, lower], EngineConfig(train_iters=4, progress_bar=False),
           {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}).run()
    return events, lower.norms, net


ORDER = ["start", "grad", "grad", "sched", "grad", "grad", "sched"]


def test_implicit_problem_hook_order_and_clipping_after_grad_callback():
    events, norms, net = run(Implicit, reverse=False)
    assert events == ["start", "grad", "grad", "param", "sched",
                      "grad", "grad", "param", "sched"]
    # grad_callback sees each micro-batch's unclipped gradient: 2 (0 - 4) / 2 per weight
    assert norms[0] == pytest.approx(4.0 * 2**0.5)
    # the update used the clipped sum: each step moves w by LR * CLIP along (1, 1)/sqrt(2)
    step = LR * CLIP / 2**0.5
    assert net.weight.detach().reshape(-1).tolist() == pytest.approx([2 * step, 2 * step])


@pytest.mark.parametrize("reverse", [False, True])
def test_iterative_problem_hook_order(reverse):
    events, norms, net = run(Iterative, reverse=reverse)
    assert events == ORDER + ["param"]  # param_callback at the write-back
    assert norms[0] == pytest.approx(4.0 * 2**0.5)
    step = LR * CLIP / 2**0.5
    assert net.weight.detach().reshape(-1).tolist() == pytest.approx([2 * step, 2 * step])


def test_task_batched_problem_hook_order():
    events, norms, net = run(Tasks, reverse=True)
    assert events == ORDER  # never written back: no param_callback
    # per micro-batch, stacked [T=3, ...]: each task's gradient has norm 4 sqrt(2)
    assert norms[0] == pytest.approx(4.0 * 2**0.5 * 3**0.5)
    assert not net.weight.detach().any()  # the module keeps its own parameters


class MetaTrainable(ImplicitProblem):
    def training_step(self, batch):
        return self.module(batch).sum()


def test_meta_trainable_parameters_naming_the_trainable_ones_is_accepted():
    class Same(MetaTrainable):
        def meta_trainable_parameters(self):
            return list(self.module.parameters())

    net = nn.Linear(2, 1)
    before = net.weight.detach().clone()
    Engine([Same("p", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                 train_data_loader=[torch.ones(1, 2)])], EngineConfig(train_iters=1)).run()
    # d(sum(W x + b))/dW = x = (1, 1): one SGD step moves every weight by -0.1
    torch.testing.assert_close(net.weight.detach(), before - 0.1)


def test_meta_trainable_parameters_naming_others_is_refused_before_training():
    class Other(MetaTrainable):
        def meta_trainable_parameters(self):
            return [self.module.weight]

    net = nn.Linear(2, 1)
    with pytest.raises(ProblemDefinitionError, match=r"'p'.*meta_trainable_parameters"):
        Engine([Other("p", module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                      train_data_loader=[torch.ones(1, 2)])], EngineConfig(train_iters=1))
