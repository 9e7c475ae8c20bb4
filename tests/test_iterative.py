"""Reverse mode (`IterativeProblem`), in float64, against hand-written unrolls (unrolled.py).

Also: an lr scheduler inside a window; ``first_order=True`` over an IterativeProblem against
the same program with an ImplicitProblem; dropout masks against a hand-written unroll drawing
the same ones; ``initial_parameters()`` restarts (one task per window) against the sequential
MAML loop. Every program runs through `Engine`; the upper records its gradient in
``grad_callback``. What the windows leave behind (buffers, optimizer state, memory), bf16 and
the errors before training are in test_iterative_training.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from unrolled import (
    DT,
    EXACT,
    META_LR,
    TASKS,
    UPPER_LR,
    Hyper,
    ImplicitLower,
    Lower,
    Upper,
    adam,
    batches,
    bilevel,
    bn_net,
    detach,
    mlp,
    reference_unroll,
    rel_err,
    sequential_maml,
    sgd_momentum,
    task_sets,
    weights,
)

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import ConfigError, ProblemDefinitionError
from betty.problems import ImplicitProblem, IterativeProblem


# -- 1. reverse mode is the exact derivative of the unrolled updates ---------------------------
@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_reverse_mode_matches_hand_written_unroll(name):
    if name == "sgd_momentum":
        def make(net):
            return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
        rule = sgd_momentum(0.1, 0.9, 0.01)
    else:
        def make(net):
            return torch.optim.Adam(net.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-3)
        rule = adam(0.05, 0.8, 0.9, 1e-3)
    engine, up = bilevel(make, unroll=3, windows=3)
    engine.run()
    expected, w_end = reference_unroll(rule, unroll=3, windows=3)
    assert len(up.record) == 3
    for got, want in zip(up.record, expected):  # windows 2 and 3: the state carried over
        assert rel_err(got, [want]) < EXACT
    assert rel_err(engine.lower.trainable_parameters(), w_end) < EXACT


def test_truncation_differentiates_only_the_last_updates():
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    engine, up = bilevel(make, unroll=4, windows=2,
                         lower=Config(unroll_steps=4, truncation_steps=2))
    engine.run()
    rule = sgd_momentum(0.1, 0.9, 0.01)
    truncated, _ = reference_unroll(rule, unroll=4, windows=2, truncate=2)
    full, _ = reference_unroll(rule, unroll=4, windows=2)
    for got, want, untruncated in zip(up.record, truncated, full):
        assert rel_err(got, [want]) < EXACT
        assert rel_err(got, [untruncated]) > 1e-4  # the test can tell truncation apart


@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_accumulation_and_clipping_inside_the_window_are_differentiated(clip):
    """Config.gradient_accumulation=2 and gradient_clipping on the IterativeProblem: each
    update uses the summed micro-batch gradients of loss/2, clipped to norm 0.05 (the clip
    active at every step, and differentiated through), as the hand-written unroll does."""
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    lower = Config(unroll_steps=3, gradient_accumulation=2, gradient_clipping=clip)
    engine, up = bilevel(make, unroll=3, windows=2, lower=lower, micro=2)
    seen = []
    engine.lower.grad_callback = lambda grads: seen.append(
        float(torch.sqrt(sum(g.detach().square().sum() for g in grads))))
    engine.run()
    rule = sgd_momentum(0.1, 0.9, 0.01)
    expected, w_end = reference_unroll(rule, unroll=3, windows=2, micro=2, clip=clip)
    # grad_callback runs once per micro-batch, before accumulation and clipping (one order
    # for every kind of problem, betty/problems/hooks.py)
    assert len(up.record) == 2 and len(seen) == 12
    for got, want in zip(up.record, expected):
        assert rel_err(got, [want]) < EXACT
    assert rel_err(engine.lower.trainable_parameters(), w_end) < EXACT
    if clip:
        # every optimizer step's summed micro-batch gradient is above the limit: clipped
        assert all(a + b > clip for a, b in zip(seen[::2], seen[1::2]))
        unclipped, _ = reference_unroll(rule, unroll=3, windows=2, micro=2)
        assert rel_err(up.record[0], [unclipped[0]]) > 1e-3  # the test can tell


def test_scheduler_changes_lr_inside_a_window():
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.2)

    def schedule(opt):
        return torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    engine, up = bilevel(make, unroll=3, windows=2, scheduler=schedule)
    engine.run()
    expected, w_end = reference_unroll(sgd_momentum(0.2, 0.0, 0.0), unroll=3, windows=2,
                                       lrs=lambda t: 0.5 ** (t - 1))
    for got, want in zip(up.record, expected):
        assert rel_err(got, [want]) < EXACT
    assert rel_err(engine.lower.trainable_parameters(), w_end) < EXACT
    assert engine.lower.optimizer.param_groups[0]["lr"] == pytest.approx(0.2 * 0.5**6)


# -- 2. an upper with first_order=True uses the lower's implicit type at its final weights ----
@pytest.mark.parametrize("method", ["darts", "cg", "neumann"])
def test_first_order_upper_uses_the_implicit_type(method):
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    lower = Config(type=method, unroll_steps=2, cg_iterations=3, neumann_iterations=3,
                   neumann_alpha=0.5)
    results = []
    for lower_cls in (Lower, ImplicitLower):
        engine, up = bilevel(make, unroll=2, windows=3, lower_cls=lower_cls,
                             upper=Config(first_order=True), lower=lower)
        engine.run()
        results.append((up.record, engine.lower.trainable_parameters()))
    (iterative, w_iterative), (implicit, w_implicit) = results
    assert len(iterative) == 3
    for got, want in zip(iterative, implicit):
        assert rel_err(got, want) < 1e-12  # round-off: p - lr*b vs torch.optim's fused add
    assert rel_err(w_iterative, w_implicit) < 1e-12


# -- 3. dropout: reverse mode differentiates through the masks the forward drew --------------
DROP = 0.3


def dropout_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(DROP), nn.Linear(8, 1)).to(DT)


def dropout_apply(w: list[Tensor], x: Tensor) -> Tensor:
    return F.dropout(torch.tanh(x @ w[0].T + w[1]), DROP, training=True) @ w[2].T + w[3]


def dropout_weights(module: nn.Module) -> list[Tensor]:
    return [module[0].weight, module[0].bias, module[3].weight, module[3].bias]


def dropout_lower_loss(w: list[Tensor], lam: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    penalty = lam[0].exp() * w[0].square().sum() + lam[1].exp() * w[2].square().sum()
    return F.mse_loss(dropout_apply(w, x), y) + 0.5 * penalty


class DropoutLower(IterativeProblem):
    def training_step(self, batch):
        x, y = batch
        lam = self.upper.module.lam
        penalty = (lam[0].exp() * self.module[0].weight.square().sum()
                   + lam[1].exp() * self.module[3].weight.square().sum())
        return F.mse_loss(self.module(x), y) + 0.5 * penalty


class DropoutUpper(Upper):
    def training_step(self, batch):
        x, y = batch  # the lower's module in train mode: dropout here too
        return F.mse_loss(self.lower(x), y) + 1e-2 * self.module.lam.square().sum()


def test_dropout_masks_are_the_ones_differentiated():
    """nn.Dropout in the lower's module: the library draws exactly the masks of a
    hand-written unroll using F.dropout in the same order from the same seed (one draw per
    local step, one in the upper's loss), and the reverse-mode hypergradient is the
    derivative with those masks, to 1e-10."""
    unroll, windows = 3, 2
    net, hyper = dropout_net(), Hyper()
    up = DropoutUpper("upper", Config(first_order=False), module=hyper,
                      optimizer=torch.optim.SGD(hyper.parameters(), lr=UPPER_LR),
                      train_data_loader=batches(2, windows))
    up.record = []
    low = DropoutLower("lower", Config(unroll_steps=unroll), module=net,
                       optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
                       train_data_loader=batches(1, unroll * windows))
    engine = Engine([up, low], EngineConfig(train_iters=unroll * windows),
                    {"u2l": {up: [low]}, "l2u": {low: [up]}})
    torch.manual_seed(123)
    engine.run()

    def hand(seed: int) -> tuple[list[Tensor], list[Tensor]]:
        init, update = sgd_momentum(0.1, 0.9, 0.0)
        w = [p.detach().clone() for p in dropout_weights(dropout_net())]
        state, lam = init(w), Hyper().lam.detach().clone()
        lows, ups = batches(1, unroll * windows), batches(2, windows)
        torch.manual_seed(seed)
        grads, t = [], 0
        for window in range(windows):
            lam_ = lam.clone().requires_grad_()
            w, state = [p.detach().requires_grad_() for p in w], detach(state)
            for k in range(unroll):
                t += 1
                loss = dropout_lower_loss(w, lam_, lows[window * unroll + k])
                g = torch.autograd.grad(loss, w, create_graph=True)
                w, state = update(w, g, state, t)
            x, y = ups[window]
            upper = F.mse_loss(dropout_apply(w, x), y) + 1e-2 * lam_.square().sum()
            grads.append(torch.autograd.grad(upper, lam_)[0])
            lam = lam - UPPER_LR * grads[-1]
        return grads, w

    expected, w_end = hand(123)
    for got, want in zip(up.record, expected):
        assert rel_err(got, [want]) < EXACT
    assert rel_err(dropout_weights(net), w_end) < EXACT
    other, _ = hand(124)  # other masks, another hypergradient: the test can tell
    assert rel_err(up.record[0], [other[0]]) > 1e-3


# -- 4. restarting from initial_parameters(): one task per window is sequential MAML ----------
class OneTask(IterativeProblem):
    """MAML the original Betty's way: one task per window, every window restarting from
    theta through `initial_parameters()`."""

    def initial_parameters(self):
        return self.meta.module

    def on_inner_loop_start(self):
        self.task = next(self.sampler)

    def get_batch(self):
        return self.task[0], self.task[1]

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.module(x), y)


class TaskMeta(ImplicitProblem):
    def get_batch(self):
        return self.inner.task[2], self.inner.task[3]

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.inner(x), y)

    def grad_callback(self, grads):
        self.record.append([g.clone() for g in grads])


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_iterative_problem_restarting_from_theta_is_sequential_maml(name):
    """An IterativeProblem whose initial_parameters() is the upper's module, one task per
    window, the upper accumulating TASKS query gradients: exact MAML, as the hand loop."""
    if name == "sgd_momentum":
        def make(net):
            return torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5)
        rule = sgd_momentum(0.3, 0.5, 0.0)
    else:
        def make(net):
            return torch.optim.Adam(net.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-3)
        rule = adam(0.05, 0.8, 0.9, 1e-3)
    unroll, windows = 3, 2
    meta_net, template = mlp(0), mlp(1)
    meta = TaskMeta("meta", Config(first_order=False, gradient_accumulation=TASKS),
                    module=meta_net, optimizer=torch.optim.SGD(meta_net.parameters(),
                                                               lr=META_LR))
    meta.record = []
    inner = OneTask("inner", Config(unroll_steps=unroll), module=template,
                    optimizer=make(template))
    inner.sampler = iter([tuple(part[t] for part in window)
                          for window in task_sets(3, windows) for t in range(TASKS)])
    Engine([meta, inner], EngineConfig(train_iters=unroll * TASKS * windows),
           {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}}).run()
    expected, adapted = sequential_maml(rule, unroll=unroll, windows=windows)
    assert len(meta.record) == TASKS * windows  # grad_callback sees each micro-batch
    sums = [[sum(parts) for parts in zip(*meta.record[i:i + TASKS])]
            for i in range(0, len(meta.record), TASKS)]  # what each optimizer step uses
    for got, want in zip(sums, expected):
        assert rel_err(got, want) < EXACT
    # the module holds the last task's adapted weights; theta is untouched by the windows
    assert rel_err(weights(template), [w[-1] for w in adapted]) < EXACT


class FromDict(OneTask):
    def initial_parameters(self):
        return self.start  # a dict name -> tensor


def test_initial_parameters_restart_without_an_upper_gradient():
    """With no reverse-mode upper the restart is a detached copy with fresh optimizer state:
    each window equals K plain torch.optim steps from the given tensors."""
    start, template = mlp(0), mlp(1)
    inner = FromDict("inner", Config(unroll_steps=2), module=template,
                     optimizer=torch.optim.Adam(template.parameters(), lr=0.05))
    inner.start = dict(start.named_parameters())
    tasks = [tuple(part[t] for part in task_sets(4, 1)[0]) for t in range(2)]
    inner.sampler = iter(tasks)
    Engine([inner], EngineConfig(train_iters=4)).run()
    plain = copy.deepcopy(start)
    opt = torch.optim.Adam(plain.parameters(), lr=0.05)
    for _ in range(2):  # the second window: fresh Adam state, from `start` again
        opt.zero_grad()
        F.mse_loss(plain(tasks[1][0]), tasks[1][1]).backward()
        opt.step()
    assert rel_err(weights(template), weights(plain)) < 1e-12
    assert rel_err(weights(start), weights(mlp(0))) == 0  # the source is never written


def test_initial_parameters_errors_before_training():
    meta_net, template = mlp(0), bn_net()  # another architecture
    meta = TaskMeta("meta", Config(first_order=False), module=meta_net,
                    optimizer=torch.optim.SGD(meta_net.parameters(), lr=META_LR))
    inner = OneTask("inner", Config(unroll_steps=2), module=template,
                    optimizer=torch.optim.SGD(template.parameters(), lr=0.1))
    with pytest.raises(ProblemDefinitionError, match=r"'inner'.*initial_parameters\(\)"):
        Engine([meta, inner], EngineConfig(train_iters=2),
               {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}})
    template = mlp(1)
    meta = TaskMeta("meta", Config(first_order=False), module=meta_net,
                    optimizer=torch.optim.SGD(meta_net.parameters(), lr=META_LR))
    inner = OneTask("inner", Config(unroll_steps=2), module=template,
                    optimizer=torch.optim.SGD(template.parameters(), lr=0.1))
    with pytest.raises(ConfigError, match=r"'inner'.*roll_back=False"):
        Engine([meta, inner], EngineConfig(train_iters=2, roll_back=True),
               {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}})
