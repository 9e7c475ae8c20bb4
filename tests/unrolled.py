"""Shared by the reverse-mode test files (test_iterative.py, test_iterative_training.py,
test_task_batched.py): small float64 bilevel programs and their hand-written references, in
plain torch with no betty code in the references (docs/math.md#reverse-mode):

* the same K updates written by hand (SGD with momentum, Adam with bias correction) with
  ``torch.autograd.grad(create_graph=True)``, and a truncated variant that differentiates
  only the last N of them;
* a sequential per-task MAML loop, for task batching.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from betty import Engine
from betty.configs import Config, EngineConfig
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


def bn_net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 1)).to(DT)
