"""MAML on sinusoid regression: the library (task-batched and sequential) against hand-written
PyTorch (a torch.autograd loop and a torch.func + vmap version), and higher / torchopt where
installed (`pip install -e ".[bench]"`).

Setting (the issue's): 16 tasks per meta-step, 5 inner SGD steps (lr 0.01), 10 shots (and 10
query points), MLP 1-40-40-1, Adam meta-optimizer (lr 1e-3). Every variant consumes the same
pre-sampled tasks from the same initialisation; the first meta-gradient of each is compared
with the autograd loop's (max abs difference). Variants alternate; medians are reported.

    python benchmarks/bench_maml.py                    # 20 meta-steps x 3 repeats
    python benchmarks/bench_maml.py --steps 50 --repeats 5
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem, TaskBatchedProblem

TASKS, SHOTS, INNER, LR = 16, 10, 5, 0.01
Tasks = tuple[Tensor, Tensor, Tensor, Tensor]


def sample_tasks(generator: torch.Generator) -> Tasks:
    """y = a sin(x + b), a ~ U[0.1, 5], b ~ U[0, pi], x ~ U[-5, 5]; tensors [T, n, 1]."""
    a = torch.rand(TASKS, 1, 1, generator=generator) * 4.9 + 0.1
    b = torch.rand(TASKS, 1, 1, generator=generator) * math.pi
    x = torch.rand(TASKS, 2 * SHOTS, 1, generator=generator) * 10 - 5
    y = a * torch.sin(x + b)
    return x[:, :SHOTS], y[:, :SHOTS], x[:, SHOTS:], y[:, SHOTS:]


def make_net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                         nn.Linear(40, 1))


Variant = Callable[[list[Tasks]], list[Tensor]]  # runs the meta-steps; returns 1st meta-grad


# -- hand-written --------------------------------------------------------------------------
def autograd_loop(tasks: list[Tasks]) -> list[Tensor]:
    net = make_net()
    meta = torch.optim.Adam(net.parameters(), lr=1e-3)
    names = [n for n, _ in net.named_parameters()]
    first: list[Tensor] = []
    for xs, ys, xq, yq in tasks:
        meta.zero_grad()
        for t in range(TASKS):
            params = list(net.parameters())
            for _ in range(INNER):
                loss = F.mse_loss(functional_call(net, dict(zip(names, params)), (xs[t],)),
                                  ys[t])
                grads = torch.autograd.grad(loss, params, create_graph=True)
                params = [p - LR * g for p, g in zip(params, grads)]
            query = F.mse_loss(functional_call(net, dict(zip(names, params)), (xq[t],)), yq[t])
            (query / TASKS).backward()
        first = first or [p.grad.clone() for p in net.parameters()]
        meta.step()
    return first


def vmap_version(tasks: list[Tasks]) -> list[Tensor]:
    net = make_net()
    meta = torch.optim.Adam(net.parameters(), lr=1e-3)
    names = [n for n, _ in net.named_parameters()]

    def task_loss(params: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return F.mse_loss(functional_call(net, params, (x,)), y)

    def adapted_query(params: dict[str, Tensor], xs: Tensor, ys: Tensor, xq: Tensor,
                      yq: Tensor) -> Tensor:
        for _ in range(INNER):
            g = grad(task_loss)(params, xs, ys)
            params = {k: params[k] - LR * g[k] for k in params}
        return task_loss(params, xq, yq)

    batched = vmap(adapted_query, in_dims=(None, 0, 0, 0, 0))
    first: list[Tensor] = []
    for xs, ys, xq, yq in tasks:
        meta.zero_grad()
        params = dict(zip(names, net.parameters()))
        batched(params, xs, ys, xq, yq).mean().backward()
        first = first or [p.grad.clone() for p in net.parameters()]
        meta.step()
    return first


# -- the library ---------------------------------------------------------------------------
class Inner(TaskBatchedProblem):
    def initial_parameters(self) -> nn.Module:
        return self.meta.module

    def get_batch(self) -> tuple[Tensor, Tensor]:
        return self.current[0], self.current[1]

    def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.mse_loss(self.module(x), y)


class Meta(ImplicitProblem):
    def get_batch(self) -> tuple[Tensor, Tensor]:
        return self.inner.current[2], self.inner.current[3]

    def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.mse_loss(self.inner(x), y)


def library(tasks: list[Tasks], *, sequential: bool) -> list[Tensor]:
    """Task-batched: one window adapts all 16 tasks (vmap). Sequential: the same program with
    one task per window and the meta-gradient accumulated over 16 windows."""
    net, template = make_net(), make_net(1)
    per_window = 1 if sequential else TASKS
    meta = Meta("meta", Config(first_order=False, gradient_accumulation=TASKS // per_window),
                module=net, optimizer=torch.optim.Adam(net.parameters(), lr=1e-3))
    inner = Inner("inner", Config(unroll_steps=INNER), module=template,
                  optimizer=torch.optim.SGD(template.parameters(), lr=LR))
    windows = [tuple(t[i:i + per_window] for t in task)
               for task in tasks for i in range(0, TASKS, per_window)]
    order = iter(windows)
    inner.on_inner_loop_start = lambda: setattr(inner, "current", next(order))
    seen: list[list[Tensor]] = []

    def keep(grads: list[Tensor]) -> None:
        if len(seen) < TASKS // per_window:
            seen.append([g.clone() for g in grads])

    meta.grad_callback = keep
    engine = Engine([meta, inner], EngineConfig(train_iters=INNER * len(windows)),
                    {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}})
    engine.run()
    return seen[-1]  # .grad after the last micro-batch of the first meta-step


def maybe(name: str) -> Variant | None:
    try:
        __import__(name)
    except Exception as err:  # not installed, or broken on this torch
        print(f"{name}: skipped ({type(err).__name__}: {err})")
        return None
    if name == "higher":
        import higher

        def run(tasks: list[Tasks]) -> list[Tensor]:
            net = make_net()
            meta = torch.optim.Adam(net.parameters(), lr=1e-3)
            inner = torch.optim.SGD(net.parameters(), lr=LR)
            first: list[Tensor] = []
            for xs, ys, xq, yq in tasks:
                meta.zero_grad()
                for t in range(TASKS):
                    with higher.innerloop_ctx(net, inner, copy_initial_weights=False) as (f, d):
                        for _ in range(INNER):
                            d.step(F.mse_loss(f(xs[t]), ys[t]))
                        (F.mse_loss(f(xq[t]), yq[t]) / TASKS).backward()
                first = first or [p.grad.clone() for p in net.parameters()]
                meta.step()
            return first
        return run
    import torchopt

    def run_opt(tasks: list[Tasks]) -> list[Tensor]:
        net = make_net()
        meta = torch.optim.Adam(net.parameters(), lr=1e-3)
        first: list[Tensor] = []
        for xs, ys, xq, yq in tasks:
            meta.zero_grad()
            for t in range(TASKS):
                inner = torchopt.MetaSGD(net, lr=LR)
                snapshot = torchopt.extract_state_dict(net)
                for _ in range(INNER):
                    inner.step(F.mse_loss(net(xs[t]), ys[t]))
                (F.mse_loss(net(xq[t]), yq[t]) / TASKS).backward()
                torchopt.recover_state_dict(net, snapshot)
            first = first or [p.grad.clone() for p in net.parameters()]
            meta.step()
        return first
    return run_opt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20, help="meta-steps per timed run")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    tasks = [sample_tasks(generator) for _ in range(args.steps)]
    variants: dict[str, Variant] = {
        "betty task-batched": lambda t: library(t, sequential=False),
        "betty sequential": lambda t: library(t, sequential=True),
        "hand autograd loop": autograd_loop,
        "hand torch.func+vmap": vmap_version,
    }
    for name in ("higher", "torchopt"):
        found = maybe(name)
        if found is not None:
            variants[name] = found
    reference = autograd_loop(tasks[:1])
    times: dict[str, list[float]] = {name: [] for name in variants}
    diffs: dict[str, float] = {}
    for name, run in variants.items():  # warm-up and agreement on the first meta-step
        got = run(tasks[:1])
        diffs[name] = max(float((a - b).abs().max()) for a, b in zip(got, reference))
    for _ in range(args.repeats):
        for name, run in variants.items():
            start = time.perf_counter()
            run(tasks)
            times[name].append(1000 * (time.perf_counter() - start) / args.steps)
    vmap_ms = statistics.median(times["hand torch.func+vmap"])
    print(f"torch {torch.__version__}, threads {args.threads}, {args.steps} meta-steps x "
          f"{args.repeats} repeats (median), T={TASKS}, K={INNER}, shots={SHOTS}")
    print(f"{'variant':22s} {'ms/meta-step':>12s} {'x vmap':>8s} {'max|dgrad| vs loop':>20s}")
    for name in variants:
        ms = statistics.median(times[name])
        print(f"{name:22s} {ms:12.2f} {ms / vmap_ms:8.2f} {diffs[name]:20.2e}")


if __name__ == "__main__":
    main()
