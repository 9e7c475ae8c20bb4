"""MAML and first-order MAML with betty: sinusoid regression and few-shot digits.

The lower problem adapts a copy of the meta-initialisation to each task of a meta-batch, all
tasks at once (`TaskBatchedProblem`: one `torch.func.vmap` over stacked per-task parameters);
the upper problem holds the initialisation and its loss is the adapted models' query loss.
With `Config(first_order=False)` on the upper, autograd differentiates through the K inner
SGD steps (MAML); `Config(first_order_updates=True)` on the lower drops the second
derivatives (first-order MAML). The baseline is the same network, not meta-learned: trained
jointly on the meta-training tasks, then fine-tuned with the same K steps on each new task.

    python examples/maml/main.py            # both benchmarks, table and plot (about 2 min)
    python examples/maml/main.py --quick    # seconds (the test suite runs this)
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem, TaskBatchedProblem

HERE = os.path.dirname(os.path.abspath(__file__))


# == tasks ===================================================================================
@dataclass
class Setting:
    name: str
    kind: str            # "regression" or "classification"
    tasks: int           # tasks per meta-step
    shots: int           # support examples per class (classification) or per task
    inner_steps: int
    inner_lr: float
    meta_steps: int


def sinusoid_tasks(count: int, shots: int, g: torch.Generator) -> tuple[Tensor, ...]:
    """y = a sin(x + b), a ~ U[0.1, 5], b ~ U[0, pi], x ~ U[-5, 5]; [T, n, 1] tensors."""
    a = torch.rand(count, 1, 1, generator=g) * 4.9 + 0.1
    b = torch.rand(count, 1, 1, generator=g) * math.pi
    x = torch.rand(count, 2 * shots, 1, generator=g) * 10 - 5
    y = a * torch.sin(x + b)
    return x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:]


class Digits:
    """5-way tasks from scikit-learn's digits. Meta-training draws from digits 0-4 under 4
    rotations x mirroring (40 classes: with only 5, every task holds the same classes and
    meta-learning overfits them); meta-testing uses the upright digits 5-9, never seen."""

    def __init__(self) -> None:
        data = load_digits()
        x = torch.tensor(data.data, dtype=torch.float32) / 16.0
        y = torch.tensor(data.target)
        self.by_class: dict[object, Tensor] = {c: x[y == c] for c in range(10)}
        for c in range(5):
            images = x[y == c].view(-1, 8, 8)
            for turns in range(4):
                for mirror in (False, True):
                    view = torch.rot90(images, turns, dims=(1, 2))
                    view = view.flip(2) if mirror else view
                    self.by_class[(c, turns, mirror)] = view.reshape(-1, 64)
        self.meta_train = [k for k in self.by_class if isinstance(k, tuple)]

    def tasks(self, count: int, shots: int, classes: list, g: torch.Generator,
              queries: int = 10) -> tuple[Tensor, ...]:
        xs, ys, xq, yq = [], [], [], []
        for _ in range(count):
            order = [classes[i] for i in torch.randperm(len(classes), generator=g)[:5]]
            support, query = [], []
            for label, c in enumerate(order):  # labels permuted per task
                pool = self.by_class[c]
                pick = torch.randperm(len(pool), generator=g)[:shots + queries]
                support.append((pool[pick[:shots]], torch.full((shots,), label)))
                query.append((pool[pick[shots:]], torch.full((queries,), label)))
            xs.append(torch.cat([s[0] for s in support]))
            ys.append(torch.cat([s[1] for s in support]))
            xq.append(torch.cat([q[0] for q in query]))
            yq.append(torch.cat([q[1] for q in query]))
        return torch.stack(xs), torch.stack(ys), torch.stack(xq), torch.stack(yq)


def make_net(kind: str) -> nn.Module:
    if kind == "regression":
        return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                             nn.Linear(40, 1))
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5))


def task_loss(kind: str, out: Tensor, y: Tensor) -> Tensor:
    return F.mse_loss(out, y) if kind == "regression" else F.cross_entropy(out, y)


# == the program =============================================================================
class Inner(TaskBatchedProblem):
    """Adapts every task of the meta-batch from the meta-initialisation (one vmapped loop)."""

    def initial_parameters(self) -> nn.Module:
        return self.meta.module

    def on_inner_loop_start(self) -> None:
        self.current = self.cfg["sample"]()  # a new meta-batch of tasks per window

    def get_batch(self) -> tuple[Tensor, Tensor]:
        return self.current[0], self.current[1]

    def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:  # ONE task
        x, y = batch
        return task_loss(self.cfg["kind"], self.module(x), y)


class Meta(ImplicitProblem):
    """Holds the initialisation; its loss is the adapted models' query loss."""

    def get_batch(self) -> tuple[Tensor, Tensor]:
        return self.inner.current[2], self.inner.current[3]

    def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch  # [T, queries, ...]
        out = self.inner(x)  # each task's adapted model on its own queries
        if self.cfg["kind"] == "classification":
            return F.cross_entropy(out.flatten(0, 1), y.flatten())
        return F.mse_loss(out, y)


def meta_train(setting: Setting, sample, first_order_updates: bool, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    net, template = make_net(setting.kind), make_net(setting.kind)
    extra = {"kind": setting.kind, "sample": sample}
    meta = Meta("meta", Config(first_order=False), module=net,
                optimizer=torch.optim.Adam(net.parameters(), lr=1e-3), extra_config=extra)
    inner = Inner("inner", Config(unroll_steps=setting.inner_steps,
                                  first_order_updates=first_order_updates),
                  module=template, optimizer=torch.optim.SGD(template.parameters(),
                                                             lr=setting.inner_lr),
                  extra_config=extra)
    Engine([meta, inner], EngineConfig(train_iters=setting.inner_steps * setting.meta_steps),
           {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}}).run()
    return net


def joint_train(setting: Setting, sample, seed: int) -> nn.Module:
    """Baseline: one network trained on the meta-training tasks' data (task labels as
    given), no meta-learning."""
    torch.manual_seed(seed)
    net = make_net(setting.kind)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for _ in range(setting.meta_steps):
        xs, ys, xq, yq = sample()
        x, y = torch.cat([xs, xq], 1).flatten(0, 1), torch.cat([ys, yq], 1).flatten(0, 1)
        opt.zero_grad()
        task_loss(setting.kind, net(x), y).backward()
        opt.step()
    return net


def evaluate(net: nn.Module, setting: Setting, tasks: tuple[Tensor, ...], steps: int
             ) -> float:
    """Mean query loss (regression) or accuracy (classification) after `steps` SGD steps
    on each task's support set, from `net`'s weights."""
    names = [n for n, _ in net.named_parameters()]
    xs, ys, xq, yq = tasks
    scores = []
    for t in range(xs.shape[0]):
        w = [p.detach().clone().requires_grad_() for p in net.parameters()]
        for _ in range(steps):
            out = torch.func.functional_call(net, dict(zip(names, w)), (xs[t],))
            grads = torch.autograd.grad(task_loss(setting.kind, out, ys[t]), w)
            w = [(p - setting.inner_lr * g).detach().requires_grad_() for p, g in zip(w, grads)]
        with torch.no_grad():
            out = torch.func.functional_call(net, dict(zip(names, w)), (xq[t],))
            if setting.kind == "regression":
                scores.append(F.mse_loss(out, yq[t]).item())
            else:
                scores.append((out.argmax(-1) == yq[t]).float().mean().item())
    return sum(scores) / len(scores)


# == experiments =============================================================================
def settings(quick: bool) -> list[Setting]:
    scale = 0.05 if quick else 1.0
    return [
        Setting("sinusoid, 10-shot", "regression", 16, 10, 5, 0.01, int(1500 * scale)),
        Setting("digits 5-way 1-shot", "classification", 16, 1, 5, 0.5, int(600 * scale)),
        Setting("digits 5-way 5-shot", "classification", 16, 5, 5, 0.5, int(600 * scale)),
    ]


def run(quick: bool = False, seed: int = 0, test_tasks: int = 200) -> dict:
    torch.set_num_threads(1)
    digits = Digits()
    rows = []
    nets: dict[str, dict[str, nn.Module]] = {}
    for setting in settings(quick):
        g = torch.Generator().manual_seed(seed)

        def sample(setting: Setting = setting, g: torch.Generator = g) -> tuple[Tensor, ...]:
            if setting.kind == "regression":
                return sinusoid_tasks(setting.tasks, setting.shots, g)
            return digits.tasks(setting.tasks, setting.shots, digits.meta_train, g)

        test_g = torch.Generator().manual_seed(10_000 + seed)
        count = 20 if quick else test_tasks
        test = (sinusoid_tasks(count, setting.shots, test_g) if setting.kind == "regression"
                else digits.tasks(count, setting.shots, [5, 6, 7, 8, 9], test_g))
        trained: dict[str, nn.Module] = {}
        for method in ("MAML", "first-order MAML", "joint training (no meta)"):
            start = time.perf_counter()
            if method == "joint training (no meta)":
                net = joint_train(setting, sample, seed)
            else:
                net = meta_train(setting, sample, method == "first-order MAML", seed)
            seconds = time.perf_counter() - start
            trained[method] = net
            rows.append({"setting": setting.name, "method": method,
                         "before": evaluate(net, setting, test, 0),
                         "after": evaluate(net, setting, test, setting.inner_steps),
                         "seconds": seconds, "kind": setting.kind})
        nets[setting.name] = trained
    return {"rows": rows, "nets": nets}


def table(rows: list[dict]) -> str:
    lines = ["| setting | method | metric | before adapting | after K=5 steps | train s |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        metric = "query MSE (lower is better)" if r["kind"] == "regression" else \
            "query accuracy, unseen classes"
        lines.append(f"| {r['setting']} | {r['method']} | {metric} | {r['before']:.3f} | "
                     f"{r['after']:.3f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setting = settings(False)[0]
    nets = result["nets"][setting.name]
    g = torch.Generator().manual_seed(123)
    xs, ys, _, _ = sinusoid_tasks(1, setting.shots, g)
    grid = torch.linspace(-5, 5, 200).unsqueeze(1)
    fig, axes = plt.subplots(1, len(nets), figsize=(4 * len(nets), 3.2), sharey=True)
    for ax, (method, net) in zip(axes, nets.items()):
        names = [n for n, _ in net.named_parameters()]
        w = [p.detach().clone().requires_grad_() for p in net.parameters()]
        for step in range(setting.inner_steps + 1):
            if step in (0, setting.inner_steps):
                with torch.no_grad():
                    out = torch.func.functional_call(net, dict(zip(names, w)), (grid,))
                ax.plot(grid[:, 0], out[:, 0], label=f"after {step} steps")
            out = torch.func.functional_call(net, dict(zip(names, w)), (xs[0],))
            grads = torch.autograd.grad(F.mse_loss(out, ys[0]), w)
            w = [(p - setting.inner_lr * gr).detach().requires_grad_() for p, gr in zip(w, grads)]
        ax.scatter(xs[0][:, 0], ys[0][:, 0], c="k", s=12, label="support (10 shots)")
        ax.set_title(method)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny run (seconds)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    result = run(quick=args.quick, seed=args.seed)
    print(table(result["rows"]))
    if not args.quick:
        plot(result, os.path.join(HERE, "maml.png"))
        print(f"plot: {os.path.join(HERE, 'maml.png')}")
    print(f"total {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
