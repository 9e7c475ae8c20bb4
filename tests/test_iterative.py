"""Reverse mode (`IterativeProblem`) and task batching (`TaskBatchedProblem`), in float64.

References, all written in this file with plain torch and no betty code:

* reverse-mode hypergradients: the same K updates written by hand (SGD with momentum, Adam
  with bias correction) with ``torch.autograd.grad(create_graph=True)``, and a truncated
  variant that differentiates only the last N of them (MATH.md, "Reverse mode");
* optimizer state, schedulers and BatchNorm statistics: plain torch.optim training of a copy
  of the module on the same batches;
* ``first_order=True`` over an IterativeProblem: the same program with an ImplicitProblem;
* task batching: a sequential per-task MAML loop.

Every program runs through `Engine`; the upper records its gradient in ``grad_callback``.
"""

from __future__ import annotations

import copy
import gc
import math
import os
import weakref
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import ConfigError, ProblemDefinitionError, TrainingError
from betty.problems import ImplicitProblem, IterativeProblem, TaskBatchedProblem

DT = torch.float64
EXACT = 1e-10


def rel_err(actual: list[Tensor], expected: list[Tensor]) -> float:
    a = torch.cat([t.detach().reshape(-1) for t in actual])
    e = torch.cat([t.detach().reshape(-1) for t in expected])
    return float(torch.linalg.vector_norm(a - e) / torch.linalg.vector_norm(e))


# -- a bilevel program: the lower fits a small MLP with L2 weights from the upper --------------
def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def mlp_apply(w: list[Tensor], x: Tensor) -> Tensor:
    """The same network as a function of its parameters [W1, b1, W2, b2]."""
    return torch.tanh(x @ w[0].T + w[1]) @ w[2].T + w[3]


def batches(seed: int, count: int, n: int = 6) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(n, 3, generator=gen, dtype=DT)
        out.append((x, torch.sin(x.sum(1, keepdim=True)) + 0.1 * x[:, :1]))
    return out


def lower_loss(w: list[Tensor], lam: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    penalty = lam[0].exp() * w[0].square().sum() + lam[1].exp() * w[2].square().sum()
    return F.mse_loss(mlp_apply(w, x), y) + 0.5 * penalty


def upper_loss(w: list[Tensor], lam: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.mse_loss(mlp_apply(w, x), y) + 1e-2 * lam.square().sum()  # + a direct term


class Hyper(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lam = nn.Parameter(torch.tensor([-1.0, -2.0], dtype=DT))


def weights(module: nn.Module) -> list[Tensor]:
    return [module[0].weight, module[0].bias, module[2].weight, module[2].bias]


class Lower(IterativeProblem):
    def training_step(self, batch):
        return lower_loss(weights(self.module), self.upper.module.lam, batch)


class ImplicitLower(ImplicitProblem):
    def training_step(self, batch):
        return lower_loss(weights(self.module), self.upper.module.lam, batch)


class Upper(ImplicitProblem):
    def training_step(self, batch):
        return upper_loss(weights(self.lower.module), self.module.lam, batch)

    def grad_callback(self, grads):
        self.record.append([g.clone() for g in grads])


UPPER_LR = 0.5


def bilevel(make_opt: Callable[[nn.Module], torch.optim.Optimizer], *, unroll: int,
            windows: int, lower_cls: type = Lower, upper: Config | None = None,
            lower: Config | None = None, scheduler: Callable | None = None,
            micro: int = 1) -> tuple[Engine, Upper]:
    """``micro``: the lower's micro-batches per update (its Config.gradient_accumulation)."""
    net = mlp()
    opt = make_opt(net)
    hyper = Hyper()
    up = Upper("upper", upper or Config(first_order=False), module=hyper,
               optimizer=torch.optim.SGD(hyper.parameters(), lr=UPPER_LR),
               train_data_loader=batches(2, windows))
    up.record = []
    low = lower_cls("lower", lower or Config(unroll_steps=unroll), module=net, optimizer=opt,
                    scheduler=scheduler(opt) if scheduler else None,
                    train_data_loader=batches(1, unroll * windows * micro))
    engine = Engine([up, low], EngineConfig(train_iters=unroll * windows * micro),
                    {"u2l": {up: [low]}, "l2u": {low: [up]}})
    return engine, up


# -- the hand-written reference: update rules and the unroll -----------------------------------
def sgd_momentum(lr: float, momentum: float, weight_decay: float):
    def init(w):
        return [None for _ in w]

    def update(w, g, bufs, t):
        new_w, new_bufs = [], []
        for p, gp, b in zip(w, g, bufs):
            d = gp + weight_decay * p
            b = d if b is None else momentum * b + d
            new_w.append(p - lr * b)
            new_bufs.append(b)
        return new_w, new_bufs

    return init, update


def adam(lr: float, beta1: float, beta2: float, eps: float):
    def init(w):
        return [(torch.zeros_like(p), torch.zeros_like(p)) for p in w]

    def update(w, g, state, t):  # t: this step's count, from 1, running on across windows
        new_w, new_state = [], []
        for p, gp, (m, v) in zip(w, g, state):
            m = beta1 * m + (1 - beta1) * gp
            v = beta2 * v + (1 - beta2) * gp * gp
            m_hat_scale = lr / (1 - beta1**t)
            denom = v.sqrt() / math.sqrt(1 - beta2**t) + eps
            new_w.append(p - m_hat_scale * m / denom)
            new_state.append((m, v))
        return new_w, new_state

    return init, update


def detach(tree):
    if isinstance(tree, Tensor):
        return tree.detach()
    if isinstance(tree, (list, tuple)):
        return type(tree)(detach(t) for t in tree)
    return tree


def clipped(g: list[Tensor], clip: float) -> list[Tensor]:
    """Global-norm clipping written out: g * min(1, c / (||g|| + 1e-6)), differentiable."""
    norm = torch.sqrt(sum(gp.square().sum() for gp in g))
    return [gp * torch.clamp(clip / (norm + 1e-6), max=1.0) for gp in g]


def reference_unroll(rule, *, unroll: int, windows: int, truncate: int = 0,
                     lrs: Callable[[int], float] | None = None, micro: int = 1,
                     clip: float = 0.0) -> tuple[list[Tensor], list]:
    """Upper gradients of every window, and the lower weights at the end.

    ``truncate=N`` differentiates only the last N updates of each window; ``lrs(t)`` scales
    the rule's step t (a scheduler); ``micro=M`` makes each update's gradient the sum of M
    micro-batches' gradients of loss/M; ``clip=c`` scales that gradient by
    min(1, c / (||g|| + 1e-6)), differentiably."""
    init, update = rule
    w = [p.detach().clone() for p in weights(mlp())]
    state = init(w)
    lam = Hyper().lam.detach().clone()
    low, up = batches(1, unroll * windows * micro), batches(2, windows)
    grads, t = [], 0
    for window in range(windows):
        lam_ = lam.clone().requires_grad_()
        w, state = detach(w), detach(state)
        w = [p.requires_grad_() for p in w]
        for k in range(unroll):
            t += 1
            live = truncate == 0 or k >= unroll - truncate
            if not live:
                w = [p.detach().requires_grad_() for p in w]
                state = detach(state)
            first = (window * unroll + k) * micro
            g = [torch.zeros_like(p) for p in w]
            for batch in low[first:first + micro]:
                part = torch.autograd.grad(lower_loss(w, lam_, batch) / micro, w,
                                           create_graph=live)
                g = [a + b for a, b in zip(g, part)]
            if clip > 0:
                g = clipped(g, clip)
            if lrs is not None:
                g = [lrs(t) * gp for gp in g]  # plain SGD: a scaled lr is a scaled gradient
            w, state = update(w, g, state, t)
        grads.append(torch.autograd.grad(upper_loss(w, lam_, up[window]), lam_)[0])
        lam = lam - UPPER_LR * grads[-1]
    return grads, detach(w)


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


# -- 3. buffers and optimizer state follow the functional steps -------------------------------
def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)


def bn_loss(net: nn.Module, lam: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.mse_loss(net(x), y) + 0.5 * lam[0].exp() * net[0].weight.square().sum()


class BNLower(IterativeProblem):
    def training_step(self, batch):
        return bn_loss(self.module, self.upper.module.lam, batch)


class WeightNorm(ImplicitProblem):
    """An upper whose loss reads the lower's final weights only (no forward: BN untouched)."""

    def training_step(self, batch):
        return self.lower.module[3].weight.square().sum() + 0 * self.module.lam.sum()

    def grad_callback(self, grads):
        self.record.append([g.clone() for g in grads])


@pytest.mark.parametrize("reverse", [False, True])
def test_buffers_and_optimizer_state_match_plain_torch(reverse):
    unroll, steps = 3, 8  # the run stops inside the third window: its steps count too
    data = batches(1, steps)
    net = bn_net()
    plain = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.05, betas=(0.8, 0.9), weight_decay=0.01)
    hyper = Hyper()
    upper = WeightNorm("upper", Config(first_order=not reverse), module=hyper,
                       optimizer=torch.optim.SGD(hyper.parameters(), lr=0.0),
                       train_data_loader=[None])
    upper.record = []
    lower = BNLower("lower", Config(unroll_steps=unroll), module=net, optimizer=opt,
                    train_data_loader=data)
    Engine([upper, lower], EngineConfig(train_iters=steps),
           {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}).run()

    plain_opt = torch.optim.Adam(plain.parameters(), lr=0.05, betas=(0.8, 0.9),
                                 weight_decay=0.01)
    for batch in data:
        plain_opt.zero_grad()
        bn_loss(plain, hyper.lam.detach(), batch).backward()
        plain_opt.step()
    for (name, got), want in zip(net.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), name  # incl. running stats
    assert int(net[1].num_batches_tracked) == steps
    for p, q in zip(net.parameters(), plain.parameters()):
        mine, theirs = opt.state[p], plain_opt.state[q]
        assert set(mine) == set(theirs)
        for key in theirs:
            assert torch.allclose(mine[key], theirs[key], rtol=1e-12, atol=1e-14), key
    if reverse:  # the window was differentiated: a gradient reached the upper
        assert len(upper.record) == steps // unroll
        assert bool(upper.record[0][0].abs().sum() > 0)
    # after run() the module holds the optimizer's own parameters again, and torch.optim
    # goes on from the written-back state exactly as from its own
    assert all(a is b for a, b in zip(net.parameters(), opt.param_groups[0]["params"]))
    for o, module in ((opt, net), (plain_opt, plain)):
        o.zero_grad()
        bn_loss(module, hyper.lam.detach(), data[0]).backward()
        o.step()
    for p, q in zip(net.parameters(), plain.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


# -- 3b. dropout: reverse mode differentiates through the masks the forward drew -------------
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


# -- 4. graph hygiene: each window's graph is cut when the next one starts ---------------------
class Vector(nn.Module):
    def __init__(self, size: int, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((size,), value, dtype=DT))


class Follower(IterativeProblem):
    def training_step(self, batch):
        return (self.module.w - self.leader.module.w).square().mean()


class Leader(ImplicitProblem):
    def training_step(self, batch):
        loss = self.follower.module.w.square().mean()  # w_K of the follower's window
        self.nodes.append(graph_size(loss))
        if len(self.nodes) == 1:
            self.first_window = weakref.ref(self.follower.module.w)
        return loss


def graph_size(t: Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux RSS")
def test_memory_stays_flat_over_thousands_of_windows():
    size, unroll = 4096, 2  # a leaked window would hold ~10 tensors of 32 KiB: ~0.6 GiB
    lead = Vector(size, 1.0)
    leader = Leader("leader", Config(first_order=False), module=lead,
                    optimizer=torch.optim.SGD(lead.parameters(), lr=0.01),
                    train_data_loader=[None])
    leader.nodes = []
    follow = Vector(size, 0.0)
    follower = Follower("follower", Config(unroll_steps=unroll), module=follow,
                        optimizer=torch.optim.SGD(follow.parameters(), lr=0.1, momentum=0.9),
                        train_data_loader=[None])
    engine = Engine([leader, follower], EngineConfig(train_iters=200 * unroll),
                    {"u2l": {leader: [follower]}, "l2u": {follower: [leader]}})
    engine.run()
    gc.collect()
    before = resident_bytes()
    engine.config.train_iters = 2200 * unroll
    engine.run()
    gc.collect()
    grown = resident_bytes() - before
    assert len(leader.nodes) == 2200
    assert leader.first_window() is None  # window 1's tensors are gone
    assert len(set(leader.nodes[1:])) == 1  # the same graph size in every window (not growing)
    assert grown < 64 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB"


# -- 5. clear errors before training -----------------------------------------------------------
def test_unsupported_optimizer_names_the_supported_ones():
    def make(net):
        return torch.optim.Adadelta(net.parameters())
    with pytest.raises(ProblemDefinitionError) as info:
        bilevel(make, unroll=2, windows=1)
    message = str(info.value)
    assert "'lower'" in message and "Adadelta" in message
    for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad"):
        assert f"torch.optim.{name}" in message


def test_fp16_is_refused_with_a_reason():
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"'lower'.*fp16.*'bf16'"):
        bilevel(make, unroll=2, windows=1, lower=Config(unroll_steps=2, precision="fp16"))


class Bf16Lower(IterativeProblem):
    def training_step(self, batch):
        x, y = batch
        penalty = self.upper.module.lam.exp() * sum(w.square().sum()
                                                    for w in self.module.parameters())
        return F.mse_loss(self.module(x), y) + penalty.sum()


class Bf16Upper(Upper):
    def training_step(self, batch):
        x, y = batch
        out = self.lower(x)
        self.dtypes.add(out.dtype)
        return F.mse_loss(out.float(), y)


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_bf16_reverse_mode_hypergradient_is_close_to_fp32(name):
    """bf16 autocast inside the differentiable updates: the forward runs in bf16 (checked),
    the parameters and optimizer state stay float32, and the reverse-mode hypergradient of
    4 windows of 5 steps lies within 2% of the fp32 one (and differs from it)."""
    def run(precision: str) -> tuple[Tensor, set]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        hyper = nn.Module()
        hyper.lam = nn.Parameter(torch.tensor([-2.0]))
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(64, 8, generator=gen) for _ in range(20)]
        data = [(x, torch.sin(x.sum(1, keepdim=True))) for x in xs]
        opt = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if name == "sgd_momentum"
               else torch.optim.Adam(net.parameters(), lr=0.01))
        up = Bf16Upper("upper", Config(first_order=False, precision=precision), module=hyper,
                       optimizer=torch.optim.SGD(hyper.parameters(), lr=0.1),
                       train_data_loader=data)
        up.record, up.dtypes = [], set()
        low = Bf16Lower("lower", Config(unroll_steps=5, precision=precision), module=net,
                        optimizer=opt, train_data_loader=data)
        Engine([up, low], EngineConfig(train_iters=20),
               {"u2l": {up: [low]}, "l2u": {low: [up]}}).run()
        assert {p.dtype for p in net.parameters()} == {torch.float32}
        assert all(t.dtype == torch.float32 for s in opt.state.values()
                   for t in s.values() if t.dim() > 0)
        return torch.cat([g[0] for g in up.record]), up.dtypes

    exact, dtypes = run("fp32")
    assert dtypes == {torch.float32} and exact.abs().min() > 1e-4
    half, dtypes = run("bf16")
    assert dtypes == {torch.bfloat16}
    assert not torch.equal(half, exact)
    assert rel_err([half], [exact]) < 0.02  # measured: 0.4% (SGD), 0.2% (Adam)


# -- 6. task batching: one vmapped inner loop equals T sequential ones -------------------------
TASKS, SUPPORT, QUERY, META_LR = 4, 5, 6, 0.1


def task_sets(seed: int, windows: int) -> list[tuple[Tensor, ...]]:
    """Per window: support x, y and query x, y of TASKS regression tasks, stacked."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(windows):
        phase = torch.rand(TASKS, 1, 1, generator=gen, dtype=DT) * 3
        xs = [torch.randn(TASKS, n, 3, generator=gen, dtype=DT) for n in (SUPPORT, QUERY)]
        ys = [torch.sin(x.sum(-1, keepdim=True) + phase) for x in xs]
        out.append((xs[0], ys[0], xs[1], ys[1]))
    return out


class Adapt(TaskBatchedProblem):
    def initial_parameters(self):
        return self.meta.module

    def on_inner_loop_start(self):
        self.tasks = next(self.sampler)

    def get_batch(self):
        return self.tasks[0], self.tasks[1]

    def training_step(self, batch):
        x, y = batch
        assert x.shape == (SUPPORT, 3)  # written for ONE task
        return {"loss": F.mse_loss(self.module(x), y), "note": "not a tensor: not logged"}


class Meta(ImplicitProblem):
    def get_batch(self):
        return self.adapt.tasks[2], self.adapt.tasks[3]

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.adapt(x), y)  # [T, QUERY, 1]: each task's adapted model

    def grad_callback(self, grads):
        self.record.append([g.clone() for g in grads])


def maml(make_opt, *, unroll: int, windows: int, adapt_cls: type = Adapt,
         micro: int = 1, clip: float = 0.0) -> tuple[Engine, Meta, Adapt]:
    meta_net, template = mlp(0), mlp(1)
    meta = Meta("meta", Config(first_order=False), module=meta_net,
                optimizer=torch.optim.SGD(meta_net.parameters(), lr=META_LR))
    meta.record = []
    config = Config(unroll_steps=unroll, gradient_accumulation=micro, gradient_clipping=clip)
    adapt = adapt_cls("adapt", config, module=template, optimizer=make_opt(template))
    adapt.sampler = iter(task_sets(3, windows))
    engine = Engine([meta, adapt], EngineConfig(train_iters=unroll * windows * micro),
                    {"u2l": {meta: [adapt]}, "l2u": {adapt: [meta]}})
    return engine, meta, adapt


def sequential_maml(rule, *, unroll: int, windows: int, micro: int = 1,
                    clip: float = 0.0) -> tuple[list[list[Tensor]], list]:
    """The reference: per window, each task adapted by its own loop from theta (fresh
    optimizer state), query losses averaged, theta stepped by SGD. ``micro=2``: each update
    sums the gradients of loss/2 on the support points 0, 2, 4 and then 1, 3; ``clip=c``:
    each task's gradient is scaled by min(1, c / (||g|| + 1e-6))."""
    init, update = rule
    theta = [p.detach().clone() for p in weights(mlp(0))]
    grads, adapted = [], []
    for xs, ys, xq, yq in task_sets(3, windows):
        theta = [p.detach().requires_grad_() for p in theta]
        meta_loss, adapted = 0.0, []
        for t in range(TASKS):
            w, state = list(theta), init(theta)
            for k in range(unroll):
                if micro == 1:
                    loss = F.mse_loss(mlp_apply(w, xs[t]), ys[t])
                else:
                    loss = sum(F.mse_loss(mlp_apply(w, xs[t][j::micro]), ys[t][j::micro])
                               for j in range(micro)) / micro
                g = torch.autograd.grad(loss, w, create_graph=True)
                if clip > 0:
                    g = clipped(g, clip)
                w, state = update(w, g, state, k + 1)
            adapted.append(w)
            meta_loss = meta_loss + F.mse_loss(mlp_apply(w, xq[t]), yq[t]) / TASKS
        grads.append(list(torch.autograd.grad(meta_loss, theta)))
        theta = [p - META_LR * g for p, g in zip(theta, grads[-1])]
    return grads, [torch.stack([w[i] for w in adapted]).detach() for i in range(4)]


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_task_batched_maml_matches_sequential_loops(name):
    if name == "sgd_momentum":
        def make(net):
            return torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5)
        rule = sgd_momentum(0.3, 0.5, 0.0)
    else:
        def make(net):
            return torch.optim.Adam(net.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-3)
        rule = adam(0.05, 0.8, 0.9, 1e-3)
    engine, meta, adapt = maml(make, unroll=3, windows=2)
    engine.run()
    expected, adapted = sequential_maml(rule, unroll=3, windows=2)
    assert len(meta.record) == 2
    for got, want in zip(meta.record, expected):
        assert rel_err(got, want) < EXACT
    got = adapt.adapted_parameters()
    assert list(got) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert got["0.weight"].shape == (TASKS, 4, 3)
    assert rel_err(list(got.values()), adapted) < EXACT
    assert not adapt.optimizer.state  # each window starts every task afresh


class MicroAdapt(Adapt):
    """Two micro-batches per update: the support points 0, 2, 4, then 1, 3."""

    def get_batch(self):
        j = (self.count - 1) % 2
        return self.tasks[0][:, j::2], self.tasks[1][:, j::2]

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.module(x), y)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_task_batched_accumulation_and_per_task_clipping(clip):
    """gradient_accumulation=2 over two different micro-batches and gradient_clipping by each
    task's own norm, differentiated through: the sequential per-task loops doing the same."""
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5)
    engine, meta, adapt = maml(make, unroll=3, windows=2, adapt_cls=MicroAdapt, micro=2,
                               clip=clip)
    grads_seen = []
    adapt.grad_callback = lambda grads: grads_seen.append([g.detach() for g in grads])
    engine.run()
    rule = sgd_momentum(0.3, 0.5, 0.0)
    expected, adapted = sequential_maml(rule, unroll=3, windows=2, micro=2, clip=clip)
    assert len(meta.record) == 2 and len(grads_seen) == 12  # once per micro-batch, unclipped
    for got, want in zip(meta.record, expected):
        assert rel_err(got, want) < EXACT
    assert rel_err(list(adapt.adapted_parameters().values()), adapted) < EXACT
    if clip:  # per-task norms of each step's summed micro-batches: some above c, some below
        steps = [[a + b for a, b in zip(first, second)]
                 for first, second in zip(grads_seen[::2], grads_seen[1::2])]
        norms = torch.stack([torch.sqrt(sum(g.reshape(TASKS, -1).square().sum(1) for g in step))
                             for step in steps])
        assert (norms > 1.01 * clip).sum() >= 3
        assert (norms < 0.99 * clip).sum() >= 3
        whole, _ = sequential_maml(rule, unroll=3, windows=2, micro=2)
        assert rel_err(meta.record[0], whole[0]) > 1e-4  # the test can tell
    else:
        one, _ = sequential_maml(rule, unroll=3, windows=2)  # the whole support at once
        assert rel_err(meta.record[0], one[0]) > 1e-4  # the two halves are not the mean


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


class IndexedAdapt(Adapt):
    """Tasks chosen by the window index (the local step count is checkpointed)."""

    def on_inner_loop_start(self):
        self.tasks = self.sets[self.count // self.config.unroll_steps]


def _indexed_maml(windows: int, **engine: object) -> tuple[Engine, Meta, IndexedAdapt]:
    meta_net, template = mlp(0), mlp(1)
    meta = Meta("meta", Config(first_order=False), module=meta_net,
                optimizer=torch.optim.Adam(meta_net.parameters(), lr=0.05))
    meta.record = []
    adapt = IndexedAdapt("adapt", Config(unroll_steps=2), module=template,
                         optimizer=torch.optim.SGD(template.parameters(), lr=0.3, momentum=0.5))
    adapt.sets = task_sets(5, 4)
    program = Engine([meta, adapt], EngineConfig(train_iters=2 * windows, **engine),
                     {"u2l": {meta: [adapt]}, "l2u": {adapt: [meta]}})
    return program, meta, adapt


def test_task_batched_checkpoint_resumes_bitwise(tmp_path):
    """Saved between windows, a task-batched program resumes bitwise (meta Adam state
    included); mid-window, the periodic checkpoint waits for the window's end."""
    whole, meta, adapt = _indexed_maml(4)
    whole.run()
    first, _, _ = _indexed_maml(3, checkpoint_dir=str(tmp_path), checkpoint_step=3)
    first.run()  # step 3 is mid-window: saved at step 4 instead (and at step 6)
    assert sorted(os.listdir(tmp_path)) == ["step_00000004.pt", "step_00000006.pt"]
    resumed, meta2, adapt2 = _indexed_maml(4)
    resumed.load_checkpoint(tmp_path / "step_00000004.pt")
    resumed.run()
    for a, b in zip(meta.module.parameters(), meta2.module.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(adapt.adapted_parameters().values(), adapt2.adapted_parameters().values()):
        assert torch.equal(a, b)
    assert torch.equal(meta.optimizer.state_dict()["state"][0]["exp_avg"],
                       meta2.optimizer.state_dict()["state"][0]["exp_avg"])


def test_adapt_evaluates_new_tasks_and_keeps_buffers_per_task():
    """`adapt` (e.g. in validation) without a graph; BatchNorm statistics per task."""
    net = bn_net()
    problem = Adapt("adapt", Config(unroll_steps=2), module=net,
                    optimizer=torch.optim.SGD(net.parameters(), lr=0.2))
    problem.initial_parameters = lambda: None  # start from its own module
    lead = Hyper()
    meta = Meta("meta", Config(first_order=False), module=lead,
                optimizer=torch.optim.SGD(lead.parameters(), lr=0.1))
    Engine([meta, problem], EngineConfig(train_iters=0),
           {"u2l": {meta: [problem]}, "l2u": {problem: [meta]}})
    xs, ys, xq, _ = task_sets(4, 1)[0]
    with torch.no_grad():
        adapted = problem.adapt((xs, ys), steps=3)
        net.eval()
        out = problem(xq)
        net.train()
    assert out.shape == (TASKS, QUERY, 1) and not out.requires_grad
    for t in range(TASKS):  # plain torch: a copy of the module trained on task t alone
        plain = copy.deepcopy(net)
        opt = torch.optim.SGD(plain.parameters(), lr=0.2)
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(plain(xs[t]), ys[t]).backward()
            opt.step()
        for name, p in plain.named_parameters():
            assert torch.allclose(adapted[name][t], p, rtol=1e-12, atol=1e-14)
        plain.eval()
        assert torch.allclose(out[t], plain(xq[t]), rtol=1e-12, atol=1e-14)  # running stats
    assert int(net[1].num_batches_tracked) == 0  # the module's own buffers are untouched


def test_task_batched_dropout_draws_different_masks_per_task_reproducibly():
    """nn.Dropout inside the vmapped window (vmap randomness='different'): T copies of the
    SAME task adapt differently (each task draws its own masks), and the same seed gives
    the same meta-gradient and adapted parameters bit for bit."""
    def run(seed: int) -> tuple[list[Tensor], list[Tensor]]:
        torch.manual_seed(0)
        meta_net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5),
                                 nn.Linear(8, 1)).to(DT)
        template = copy.deepcopy(meta_net)
        meta = Meta("meta", Config(first_order=False), module=meta_net,
                    optimizer=torch.optim.SGD(meta_net.parameters(), lr=META_LR))
        meta.record = []
        adapt = Adapt("adapt", Config(unroll_steps=2), module=template,
                      optimizer=torch.optim.SGD(template.parameters(), lr=0.3))
        one = task_sets(3, 1)[0]
        adapt.sampler = iter([tuple(t[:1].expand_as(t).clone() for t in one)])  # T x task 0
        engine = Engine([meta, adapt], EngineConfig(train_iters=2),
                        {"u2l": {meta: [adapt]}, "l2u": {adapt: [meta]}})
        torch.manual_seed(seed)
        engine.run()
        return meta.record[0], [a.detach() for a in adapt.adapted_parameters().values()]

    grads, adapted = run(7)
    first = adapted[0]  # [T, 8, 3]
    for t in range(1, TASKS):
        assert (first[t] - first[0]).abs().max() > 1e-6, "tasks drew the same masks"
    again_grads, again_adapted = run(7)
    assert all(torch.equal(a, b) for a, b in zip(grads, again_grads))
    assert all(torch.equal(a, b) for a, b in zip(adapted, again_adapted))
    other_grads, _ = run(8)
    assert not all(torch.equal(a, b) for a, b in zip(grads, other_grads))


def test_task_batched_bf16_meta_gradient_is_close_to_fp32():
    """precision='bf16' on both levels of a task-batched MAML program (float32 modules):
    autocast reaches the vmapped forward (its matmuls run in bfloat16: the meta-gradient
    moves by far more than float32 round-off) and the meta-gradient of the second
    meta-step lies within 5% of the fp32 one (1.6% measured)."""
    def run(precision: str) -> Tensor:
        torch.manual_seed(0)
        meta_net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
        template = copy.deepcopy(meta_net)
        meta = Meta("meta", Config(first_order=False, precision=precision), module=meta_net,
                    optimizer=torch.optim.SGD(meta_net.parameters(), lr=META_LR))
        meta.record = []
        adapt = Adapt("adapt", Config(unroll_steps=3, precision=precision), module=template,
                      optimizer=torch.optim.SGD(template.parameters(), lr=0.3))
        adapt.sampler = iter([tuple(t.float() for t in s) for s in task_sets(3, 2)])
        Engine([meta, adapt], EngineConfig(train_iters=6),
               {"u2l": {meta: [adapt]}, "l2u": {adapt: [meta]}}).run()
        assert all(g.dtype == torch.float32 for g in meta.record[1])
        assert {p.dtype for p in template.parameters()} == {torch.float32}
        return torch.cat([g.reshape(-1) for g in meta.record[1]])

    exact, half = run("fp32"), run("bf16")
    assert 1e-3 < rel_err([half], [exact]) < 0.05


class ScaledAdapt(TaskBatchedProblem):
    def get_batch(self):
        return self.batch

    def training_step(self, batch):
        x, y, scale = batch  # `scale` is a Python float: shared by the tasks, not vmapped
        loss = scale * F.mse_loss(self.module(x), y)
        return {"loss": loss, "scaled_twice": 2 * loss}


def test_task_batch_with_non_tensor_leaves_and_logged_extras():
    """Non-tensor leaves of a stacked batch reach every task unchanged; each task's gradient
    is its own (the backward of the summed task losses), and dict entries are task means."""
    net = mlp(2)
    problem = ScaledAdapt("adapt", Config(unroll_steps=2), module=net,
                          optimizer=torch.optim.SGD(net.parameters(), lr=0.3))
    lead = Hyper()
    meta = Meta("meta", Config(first_order=False), module=lead,
                optimizer=torch.optim.SGD(lead.parameters(), lr=0.1))
    Engine([meta, problem], EngineConfig(train_iters=0),
           {"u2l": {meta: [problem]}, "l2u": {problem: [meta]}})
    xs, ys, _, _ = task_sets(5, 1)[0]
    w = [p.detach().clone() for p in weights(net)]
    with torch.no_grad():
        adapted = list(problem.adapt((xs, ys, 0.25), steps=1).values())
    grads = [(p - a) / 0.3 for p, a in zip(w, adapted)]  # one SGD step: w - 0.3 g
    problem._start(TASKS)
    logged = problem._window_gradients((xs, ys, 0.25), create_graph=False)[1]
    losses = []
    for t in range(TASKS):
        wt = [p.clone().requires_grad_() for p in w]
        loss = 0.25 * F.mse_loss(mlp_apply(wt, xs[t]), ys[t])
        losses.append(loss.detach())
        for g, want in zip(grads, torch.autograd.grad(loss, wt)):
            assert torch.allclose(g[t], want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(logged["loss"], torch.stack(losses).mean(), rtol=1e-12)
    assert torch.allclose(logged["scaled_twice"], 2 * torch.stack(losses).mean(), rtol=1e-12)


def test_task_batched_program_errors_before_training():
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.1)
    meta_net, template = mlp(0), mlp(1)
    meta = Meta("meta", Config(first_order=True), module=meta_net,
                optimizer=torch.optim.SGD(meta_net.parameters(), lr=META_LR))
    adapt = Adapt("adapt", Config(unroll_steps=2), module=template, optimizer=make(template))
    with pytest.raises(ConfigError, match=r"'adapt'.*first_order=False"):
        Engine([meta, adapt], EngineConfig(train_iters=2),
               {"u2l": {meta: [adapt]}, "l2u": {adapt: [meta]}})
    meta = Meta("meta", Config(first_order=False), module=bn_net(),  # another architecture
                optimizer=torch.optim.SGD(meta_net.parameters(), lr=META_LR))
    adapt = Adapt("adapt", Config(unroll_steps=2), module=template, optimizer=make(template))
    with pytest.raises(ProblemDefinitionError, match=r"'adapt'.*initial_parameters\(\)"):
        Engine([meta, adapt], EngineConfig(train_iters=2),
               {"u2l": {meta: [adapt]}, "l2u": {adapt: [meta]}})


def test_task_batch_shapes_are_checked():
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.1)
    engine, _, adapt = maml(make, unroll=2, windows=1)
    xs, ys, xq, yq = task_sets(3, 1)[0]
    adapt.sampler = iter([(xs, ys[:3], xq, yq)])
    shapes = r"\(4, 5, 3\), \(3, 5, 1\)"
    with pytest.raises(TrainingError, match=rf"'adapt'.*leading dimension T.*{shapes}"):
        engine.run()
