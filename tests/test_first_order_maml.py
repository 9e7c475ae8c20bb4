"""Config(first_order_updates=True) on a TaskBatchedProblem or an IterativeProblem is
first-order MAML: the meta-gradient is the mean over tasks of the query gradient at the
adapted weights (each inner update treated as a constant). Reference: a hand-written
per-task loop in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from betty import Config, Engine, EngineConfig
from betty.errors import ConfigError
from betty.problems import ImplicitProblem, IterativeProblem, TaskBatchedProblem

TASKS, SHOTS, STEPS, LR = 4, 6, 3, 0.05


def _net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double()


class Inner(TaskBatchedProblem):
    def initial_parameters(self):
        return self.meta.module

    def get_batch(self):
        return self.tasks[0], self.tasks[1]

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.module(x), y)


class Meta(ImplicitProblem):
    def get_batch(self):
        return self.inner.tasks[2], self.inner.tasks[3]

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.inner(x), y)


def _tasks():
    g = torch.Generator().manual_seed(3)
    x = torch.rand(TASKS, 2 * SHOTS, 1, generator=g, dtype=torch.float64) * 4 - 2
    y = torch.sin(x * torch.rand(TASKS, 1, 1, generator=g, dtype=torch.float64) * 3)
    return x[:, :SHOTS], y[:, :SHOTS], x[:, SHOTS:], y[:, SHOTS:]


def _reference(tasks, first_order: bool, zero_head: bool = False) -> list[torch.Tensor]:
    """The meta-gradient by hand; ``zero_head``: every task starts with a constant zero
    last layer (then only the first layer's meta-gradient is returned)."""
    net = _net(0)
    names = [n for n, _ in net.named_parameters()]
    theta = [p.detach().clone().requires_grad_() for p in net.parameters()]
    if zero_head:
        theta = theta[:2]
    xs, ys, xq, yq = tasks
    total = [torch.zeros_like(p) for p in theta]
    for t in range(TASKS):
        w = list(theta)
        if zero_head:
            w += [torch.zeros(1, 8, dtype=torch.float64, requires_grad=True),
                  torch.zeros(1, dtype=torch.float64, requires_grad=True)]
        for _ in range(STEPS):
            loss = F.mse_loss(functional_call(net, dict(zip(names, w)), (xs[t],)), ys[t])
            g = torch.autograd.grad(loss, w, create_graph=not first_order)
            w = [p - LR * (gi.detach() if first_order else gi) for p, gi in zip(w, g)]
        query = F.mse_loss(functional_call(net, dict(zip(names, w)), (xq[t],)), yq[t])
        total = [a + b / TASKS for a, b in zip(total, torch.autograd.grad(query, theta))]
    return total


@pytest.mark.parametrize("first_order", [True, False])
def test_task_batched_meta_gradient_matches_hand_written(first_order):
    tasks = _tasks()
    meta_net, template = _net(0), _net(1)
    meta = Meta("meta", Config(first_order=False), module=meta_net,
                optimizer=torch.optim.SGD(meta_net.parameters(), lr=0.0))
    inner = Inner("inner", Config(unroll_steps=STEPS, first_order_updates=first_order),
                  module=template, optimizer=torch.optim.SGD(template.parameters(), lr=LR))
    inner.tasks = tasks
    seen = []
    meta.grad_callback = lambda grads: seen.append([g.clone() for g in grads])
    Engine([meta, inner], EngineConfig(train_iters=STEPS),
           {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}}).run()
    reference = _reference(tasks, first_order)
    for got, want in zip(seen[0], reference):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    other = _reference(tasks, not first_order)  # the two meta-gradients really differ
    assert max(float((a - b).abs().max()) for a, b in zip(reference, other)) > 1e-4


class OneTask(IterativeProblem):
    """The same program one task per window: every window restarts from theta."""

    def initial_parameters(self):
        return self.meta.module

    def on_inner_loop_start(self):
        self.index = (self.index + 1) % TASKS

    def get_batch(self):
        return self.tasks[0][self.index], self.tasks[1][self.index]

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.module(x), y)


class SequentialMeta(ImplicitProblem):
    def get_batch(self):
        return self.inner.tasks[2][self.inner.index], self.inner.tasks[3][self.inner.index]

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.inner(x), y)


@pytest.mark.parametrize("first_order", [True, False])
def test_iterative_problem_first_order_updates_match_hand_written(first_order):
    """`first_order_updates` on an IterativeProblem: the upper accumulates the TASKS windows'
    query gradients (gradient_accumulation) to the same meta-gradient."""
    tasks = _tasks()
    meta_net, template = _net(0), _net(1)
    meta = SequentialMeta("meta", Config(first_order=False, gradient_accumulation=TASKS),
                          module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(),
                                                                     lr=0.0))
    inner = OneTask("inner", Config(unroll_steps=STEPS, first_order_updates=first_order),
                    module=template, optimizer=torch.optim.SGD(template.parameters(), lr=LR))
    inner.tasks, inner.index = tasks, -1
    seen = []
    meta.grad_callback = lambda grads: seen.append([g.clone() for g in grads])
    Engine([meta, inner], EngineConfig(train_iters=STEPS * TASKS),
           {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}}).run()
    summed = [sum(parts) for parts in zip(*seen[-TASKS:])]  # grad_callback: per micro-batch
    for got, want in zip(summed, _reference(tasks, first_order)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_reverse_mode_fields_are_refused_on_an_implicit_problem():
    net = _net(0)
    for field in ({"first_order_updates": True}, {"truncation_steps": 2}):
        problem = Meta("meta", Config(**field), module=net,
                       optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
        name = next(iter(field))
        with pytest.raises(ConfigError, match=rf"'meta' is a Meta.*{name}=.*IterativeProblem"):
            Engine([problem], EngineConfig(train_iters=1))


class ZeroHeadInner(Inner):
    def initial_parameters(self):  # the body from theta, the head a constant zero
        start = dict(self.meta.module.named_parameters())
        return {**start, "2.weight": torch.zeros_like(start["2.weight"]).detach(),
                "2.bias": torch.zeros_like(start["2.bias"]).detach()}


@pytest.mark.parametrize("first_order", [True, False])
def test_constant_tensors_from_initial_parameters(first_order):
    """A start that holds constants (a zero head, the same for every task): the meta-gradient
    of the rest matches the hand-written loop, and the head gets none."""
    tasks = _tasks()
    meta_net, template = _net(0), _net(1)
    meta = Meta("meta", Config(first_order=False), module=meta_net,
                optimizer=torch.optim.SGD(meta_net.parameters(), lr=0.0))
    inner = ZeroHeadInner("inner", Config(unroll_steps=STEPS, first_order_updates=first_order),
                          module=template,
                          optimizer=torch.optim.SGD(template.parameters(), lr=LR))
    inner.tasks = tasks
    seen = []
    meta.grad_callback = lambda grads: seen.append([None if g is None else g.clone()
                                                    for g in grads])
    Engine([meta, inner], EngineConfig(train_iters=STEPS),
           {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}}).run()
    for got, want in zip(seen[0][:2], _reference(tasks, first_order, zero_head=True)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert all(g is None or not g.any() for g in seen[0][2:])
