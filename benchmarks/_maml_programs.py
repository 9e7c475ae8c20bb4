"""The MAML variants of `bench_maml.py`: sinusoid tasks, the network, and one class per way
of computing the meta-gradient (hand-written PyTorch, `higher`, `torchopt`, and three betty
programs), each holding its own copy of theta and its Adam optimizer (`bench_maml.py`'s
docstring describes them).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem, IterativeProblem, TaskBatchedProblem

Batch = tuple[Tensor, Tensor, Tensor, Tensor]  # x_support, y_support, x_query, y_query


@dataclass
class Setting:
    tasks: int = 16
    shots: int = 10
    queries: int = 10
    inner_steps: int = 5
    inner_lr: float = 0.01
    meta_lr: float = 1e-3


# -- tasks and network -----------------------------------------------------------------------
def sample_batches(count: int, s: Setting, seed: int) -> list[Batch]:
    """``count`` meta-batches of sinusoid tasks; every tensor is [tasks, points, 1]."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        a = torch.empty(s.tasks, 1, 1).uniform_(0.1, 5.0, generator=gen)
        b = torch.empty(s.tasks, 1, 1).uniform_(0.0, math.pi, generator=gen)
        x = torch.empty(s.tasks, s.shots + s.queries, 1).uniform_(-5.0, 5.0, generator=gen)
        y = a * torch.sin(x + b)
        batches.append((x[:, :s.shots], y[:, :s.shots], x[:, s.shots:], y[:, s.shots:]))
    return batches


def make_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                         nn.Linear(40, 1))


class Stream:
    """The meta-batches in a fixed cycle: every variant sees the same sequence."""

    def __init__(self, batches: list[Batch]) -> None:
        self.batches, self.index = batches, -1

    def next(self) -> Batch:
        self.index += 1
        return self.batches[self.index % len(self.batches)]


# -- the variants ----------------------------------------------------------------------------
class Variant:
    """Holds its own copy of theta and an Adam optimizer; ``meta_steps(n)`` trains n steps."""

    def __init__(self, net: nn.Module, batches: list[Batch], s: Setting) -> None:
        self.net = copy.deepcopy(net)
        self.meta_opt = torch.optim.Adam(self.net.parameters(), lr=s.meta_lr)
        self.stream, self.s = Stream(batches), s

    def meta_steps(self, n: int) -> None:
        raise NotImplementedError

    def first_meta_gradient(self) -> list[Tensor]:
        """The meta-gradient of the first meta-step (then that step is taken)."""
        raise NotImplementedError


class HandWritten(Variant):
    """A meta-step: ``meta_gradient`` fills ``.grad`` of theta, then Adam steps."""

    def meta_gradient(self, batch: Batch) -> None:
        raise NotImplementedError

    def meta_steps(self, n: int) -> None:
        for _ in range(n):
            self.meta_opt.zero_grad(set_to_none=True)
            self.meta_gradient(self.stream.next())
            self.meta_opt.step()

    def first_meta_gradient(self) -> list[Tensor]:
        self.meta_opt.zero_grad(set_to_none=True)
        self.meta_gradient(self.stream.next())
        grads = [p.grad.clone() for p in self.net.parameters()]
        self.meta_opt.step()
        return grads


class AutogradLoop(HandWritten):
    def meta_gradient(self, batch: Batch) -> None:
        xs, ys, xq, yq = batch
        names = [n for n, _ in self.net.named_parameters()]
        theta = list(self.net.parameters())
        for i in range(self.s.tasks):
            w = theta
            for _ in range(self.s.inner_steps):
                out = functional_call(self.net, dict(zip(names, w)), (xs[i],))
                g = torch.autograd.grad(F.mse_loss(out, ys[i]), w, create_graph=True)
                w = [p - self.s.inner_lr * gp for p, gp in zip(w, g)]
            out = functional_call(self.net, dict(zip(names, w)), (xq[i],))
            (F.mse_loss(out, yq[i]) / self.s.tasks).backward()


class FuncVmap(HandWritten):
    def meta_gradient(self, batch: Batch) -> None:
        net, s = self.net, self.s

        def support_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return F.mse_loss(functional_call(net, params, (x,)), y)

        def query_loss_after_adapting(params: dict[str, Tensor], xs: Tensor, ys: Tensor,
                                      xq: Tensor, yq: Tensor) -> Tensor:
            for _ in range(s.inner_steps):
                g = grad(support_loss)(params, xs, ys)
                params = {n: p - s.inner_lr * g[n] for n, p in params.items()}
            return F.mse_loss(functional_call(net, params, (xq,)), yq)

        theta = dict(net.named_parameters())
        losses = vmap(query_loss_after_adapting, in_dims=(None, 0, 0, 0, 0))(theta, *batch)
        losses.mean().backward()


class Higher(HandWritten):
    def meta_gradient(self, batch: Batch) -> None:
        import higher

        xs, ys, xq, yq = batch
        inner_opt = torch.optim.SGD(self.net.parameters(), lr=self.s.inner_lr)
        for i in range(self.s.tasks):
            with higher.innerloop_ctx(self.net, inner_opt, copy_initial_weights=False) \
                    as (fnet, diffopt):
                for _ in range(self.s.inner_steps):
                    diffopt.step(F.mse_loss(fnet(xs[i]), ys[i]))
                (F.mse_loss(fnet(xq[i]), yq[i]) / self.s.tasks).backward()


class TorchOpt(HandWritten):
    def meta_gradient(self, batch: Batch) -> None:
        import torchopt

        xs, ys, xq, yq = batch
        inner_opt = torchopt.MetaSGD(self.net, lr=self.s.inner_lr)
        net_state = torchopt.extract_state_dict(self.net)
        opt_state = torchopt.extract_state_dict(inner_opt)
        for i in range(self.s.tasks):
            for _ in range(self.s.inner_steps):
                inner_opt.step(F.mse_loss(self.net(xs[i]), ys[i]))
            (F.mse_loss(self.net(xq[i]), yq[i]) / self.s.tasks).backward()
            torchopt.recover_state_dict(self.net, net_state)
            torchopt.recover_state_dict(inner_opt, opt_state)


# -- betty -----------------------------------------------------------------------------------
class LibraryVariant(Variant):
    """An engine built once; each call of ``meta_steps`` extends ``train_iters`` and runs."""

    steps_per_meta_step = 1

    def __init__(self, net: nn.Module, batches: list[Batch], s: Setting) -> None:
        super().__init__(net, batches, s)
        self.meta, self.engine = self.build()

    def build(self) -> tuple[ImplicitProblem, Engine]:
        raise NotImplementedError

    def meta_steps(self, n: int) -> None:
        self.engine.config.train_iters += n * self.steps_per_meta_step
        self.engine.run()

    def first_meta_gradient(self) -> list[Tensor]:
        seen: list[list[Tensor]] = []
        # an instance attribute is called like the hook; the hook sees each micro-batch's
        # gradient before accumulation, so the meta-gradient is the sum of the last ones
        self.meta.grad_callback = lambda grads: seen.append([g.clone() for g in grads])
        self.meta_steps(1)
        del self.meta.grad_callback
        micro = self.meta.config.gradient_accumulation
        return [torch.stack(parts).sum(0) for parts in zip(*seen[-micro:])]


class TBInner(TaskBatchedProblem):
    def initial_parameters(self):
        return self.meta.module  # every task starts from theta, differentiably

    def on_inner_loop_start(self):
        self.tasks = self.stream.next()

    def get_batch(self):
        return self.tasks[0], self.tasks[1]

    def training_step(self, batch):  # one task
        x, y = batch
        return F.mse_loss(self.module(x), y)


class TBMeta(ImplicitProblem):
    def get_batch(self):
        return self.inner.tasks[2], self.inner.tasks[3]

    def training_step(self, batch):  # [tasks, queries, 1]
        x, y = batch
        return F.mse_loss(self.inner(x), y)


class BettyTaskBatched(LibraryVariant):
    def build(self) -> tuple[ImplicitProblem, Engine]:
        s, template = self.s, copy.deepcopy(self.net)
        meta = TBMeta("meta", Config(first_order=False), module=self.net,
                      optimizer=self.meta_opt)
        inner = TBInner("inner", Config(unroll_steps=s.inner_steps), module=template,
                        optimizer=torch.optim.SGD(template.parameters(), lr=s.inner_lr))
        inner.stream = self.stream
        self.steps_per_meta_step = s.inner_steps
        engine = Engine([meta, inner], EngineConfig(train_iters=0, progress_bar=False),
                        {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}})
        return meta, engine


class OneTask(IterativeProblem):
    """Adapts task ``self.index`` of the current meta-batch; every window restarts from
    theta (``initial_parameters()``), differentiably, with fresh optimizer state."""

    def initial_parameters(self):
        return self.meta.module

    def on_inner_loop_start(self):
        self.tasks = self.stream.next()

    def get_batch(self):
        return self.tasks[0][self.index], self.tasks[1][self.index]

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.module(x), y)


class MetaOverProblems(ImplicitProblem):
    def get_batch(self):  # each task problem's query set
        return [(t.tasks[2][t.index], t.tasks[3][t.index]) for t in self.children]

    def training_step(self, batch):
        losses = [F.mse_loss(task(x), y) for task, (x, y) in zip(self.children, batch)]
        return torch.stack(losses).mean()


def task_problem(cls: type[OneTask], name: str, net: nn.Module, s: Setting, stream: Stream,
                 index: int) -> OneTask:
    template = copy.deepcopy(net)
    problem = cls(name, Config(unroll_steps=s.inner_steps), module=template,
                  optimizer=torch.optim.SGD(template.parameters(), lr=s.inner_lr))
    problem.stream, problem.index = stream, index
    return problem


class BettyProblems(LibraryVariant):
    def build(self) -> tuple[ImplicitProblem, Engine]:
        s = self.s
        streams = [Stream(self.stream.batches) for _ in range(s.tasks)]  # one per problem
        tasks = [task_problem(OneTask, f"task{i}", self.net, s, streams[i], i)
                 for i in range(s.tasks)]
        meta = MetaOverProblems("meta", Config(first_order=False), module=self.net,
                                optimizer=self.meta_opt)
        self.steps_per_meta_step = s.inner_steps
        engine = Engine([meta, *tasks], EngineConfig(train_iters=0, progress_bar=False),
                        {"u2l": {meta: tasks}, "l2u": {t: [meta] for t in tasks}})
        return meta, engine


class TaskAfterTask(OneTask):
    """One task per window: window k adapts task k % T of meta-batch k // T."""

    def on_inner_loop_start(self):
        self.index = (self.index + 1) % self.count_tasks
        if self.index == 0:
            self.tasks = self.stream.next()


class MetaAccumulating(ImplicitProblem):
    def get_batch(self):
        task = self.task
        return task.tasks[2][task.index], task.tasks[3][task.index]

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.task(x), y)


class BettyWindows(LibraryVariant):
    def build(self) -> tuple[ImplicitProblem, Engine]:
        s = self.s
        task = task_problem(TaskAfterTask, "task", self.net, s, self.stream, index=-1)
        task.count_tasks = s.tasks
        meta = MetaAccumulating(
            "meta", Config(first_order=False, gradient_accumulation=s.tasks),
            module=self.net, optimizer=self.meta_opt)
        self.steps_per_meta_step = s.inner_steps * s.tasks
        engine = Engine([meta, task], EngineConfig(train_iters=0, progress_bar=False),
                        {"u2l": {meta: [task]}, "l2u": {task: [meta]}})
        return meta, engine


VARIANTS: dict[str, tuple[str, type[Variant]]] = {
    "betty-tb": ("betty task-batched", BettyTaskBatched),
    "betty-problems": ("betty 16 problems", BettyProblems),
    "betty-windows": ("betty 1 problem x16", BettyWindows),
    "loop": ("autograd loop", AutogradLoop),
    "vmap": ("torch.func+vmap", FuncVmap),
    "higher": ("higher", Higher),
    "torchopt": ("torchopt", TorchOpt),
}


def installed(module: str) -> str | None:
    """None if ``module`` imports, else why not."""
    try:
        __import__(module)
    except Exception as err:  # any import failure (not only ImportError): skip the variant
        return f"{type(err).__name__}: {err}"
    return None
