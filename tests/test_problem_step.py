"""`Problem`'s local step: the user's optimizer object and param groups (against the update
written by hand and against a plain torch loop), frozen parameters, and the hooks of a local
step (on_inner_loop_start, grad_callback, param_callback, custom_optimizer_step), gradient
clipping, forward and attribute access to other problems. Construction, data, logging, modes
and state are in test_problem.py."""

from __future__ import annotations

import pytest
import torch
from single_problem import Linear, batches, linear_module, single, step

from betty import Engine
from betty.configs import Config
from betty.problems import ImplicitProblem


# -- the user's optimizer and param groups ------------------------------------------------
def test_user_optimizer_object_and_per_group_lr():
    module = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD([
        {"params": [module.weight], "lr": 0.1},
        {"params": [module.bias], "lr": 0.01},
    ])
    groups = optimizer.param_groups
    p = Linear("p", module=module, optimizer=optimizer, train_data_loader=batches(1))
    engine = single(p)
    assert p.optimizer is optimizer and p.optimizer.param_groups is groups
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.01]

    x, y = batches(1)[0]
    w, b = module.weight.detach().clone(), module.bias.detach().clone()
    residual = (x @ w.T).squeeze(-1) + b - y  # d/dw mean(r^2) = 2 mean(r x)
    grad_w = (2 * residual.unsqueeze(1) * x).mean(0, keepdim=True)
    grad_b = 2 * residual.mean().reshape(1)
    step(engine, 1)
    torch.testing.assert_close(module.weight.detach(), w - 0.1 * grad_w)
    torch.testing.assert_close(module.bias.detach(), b - 0.01 * grad_b)


def test_optimizer_with_momentum_matches_torch():
    # The same data through the engine and through a plain torch loop: identical weights.
    def make():
        module = linear_module(seed=3)
        opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01,
                              nesterov=True)
        return module, opt

    data = batches(3)
    module, opt = make()
    p = Linear("p", module=module, optimizer=opt, train_data_loader=data)
    step(single(p), 6)
    ref, ref_opt = make()
    for i in range(6):
        x, y = data[i % 3]
        ref_opt.zero_grad()
        ((ref(x).squeeze(-1) - y) ** 2).mean().backward()
        ref_opt.step()
    torch.testing.assert_close(module.weight.detach(), ref.weight.detach())


def test_frozen_parameters_are_not_trained():
    module = torch.nn.Linear(3, 1)
    module.bias.requires_grad_(False)
    bias = module.bias.detach().clone()
    p = Linear("p", module=module, optimizer=torch.optim.SGD([module.weight], lr=0.1),
               train_data_loader=batches(1))
    assert p.trainable_parameters() == [module.weight]
    step(single(p), 2)
    assert torch.equal(module.bias.detach(), bias)


# -- hooks of a local step -----------------------------------------------------------------
class Hooks(ImplicitProblem):
    def __init__(self, *args, **kwargs) -> None:
        module = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(module.weight, 0.0)
        super().__init__(*args, module=module,
                         optimizer=torch.optim.SGD(module.parameters(), lr=1.0), **kwargs)
        self.starts: list[int] = []
        self.grads: list[float] = []
        self.params_after: list[float] = []

    def get_batch(self):
        return torch.tensor(5.0)

    def training_step(self, batch):
        return (self.module.weight.sum() - batch) ** 2

    def on_inner_loop_start(self):
        self.starts.append(self.count)

    def grad_callback(self, grads):
        self.grads.append(float(grads[0]))


def test_on_inner_loop_start_once_per_window():
    inner = Hooks("inner", Config(unroll_steps=3))
    outer = Hooks("outer")
    engine = Engine([outer, inner], dependencies={"l2u": {inner: [outer]}})
    step(engine, 9)
    assert inner.starts == [0, 3, 6]
    assert outer.starts == [0, 1, 2]


def test_on_inner_loop_start_with_accumulation():
    inner = Hooks("inner", Config(unroll_steps=2, gradient_accumulation=2))
    outer = Hooks("outer")
    engine = Engine([outer, inner], dependencies={"l2u": {inner: [outer]}})
    step(engine, 8)
    assert inner.starts == [0, 4]


def test_grad_callback_receives_this_steps_gradient():
    p = Hooks("p")
    engine = single(p)
    step(engine, 2)
    # w0 = 0: grad 2(0 - 5) = -10; w1 = 0 - 1.0 * -10 = 10: grad 2(10 - 5) = 10
    assert p.grads == [-10.0, 10.0]


def test_grad_callback_edits_gradients_in_place():
    class Halving(Hooks):
        def grad_callback(self, grads):
            grads[0].mul_(0.5)

    p = Halving("p")
    step(single(p), 1)
    assert p.module.weight.item() == pytest.approx(5.0)  # 0 - 1.0 * (0.5 * -10)


def test_param_callback_clamps_after_each_step():
    class Clamped(Hooks):
        def param_callback(self, params):
            self.params_after.append(params[0].item())
            for q in params:
                q.data.clamp_(max=2.0)

    p = Clamped("p")
    step(single(p), 3)
    # w: 0 -> 10 (clamped to 2) -> 2 - 2(2 - 5) = 8 (clamped to 2) -> 8 again
    assert p.params_after == [10.0, 8.0, 8.0]
    assert p.module.weight.item() == 2.0


def test_param_callback_not_called_while_accumulating():
    class Counting(Hooks):
        def param_callback(self):
            self.params_after.append(self.count)

    p = Counting("p", Config(gradient_accumulation=3))
    step(single(p), 7)
    assert p.params_after == [3, 6]


def test_custom_optimizer_step_replaces_optimizer():
    class Custom(Hooks):
        def custom_optimizer_step(self):
            with torch.no_grad():
                for q in self.trainable_parameters():
                    q -= 0.25 * q.grad

    p = Custom("p")
    step(single(p), 1)
    assert p.module.weight.item() == pytest.approx(2.5)  # 0 - 0.25 * -10


def test_gradient_clipping():
    p = Hooks("p", Config(gradient_clipping=1.0))
    step(single(p), 1)
    assert p.module.weight.item() == pytest.approx(1.0)  # |grad| 10 clipped to 1


def test_forward_and_problem_call():
    class Scaled(Hooks):
        def forward(self, x):
            return 3 * x

    a, b = Scaled("a"), Hooks("b")
    engine = Engine([a, b])
    assert float(b.a(torch.tensor(2.0))) == 6.0
    assert engine.a is a and engine.b is b and a.b is b
