"""MAML and first-order MAML with betty: sinusoid regression and few-shot digits.

MAML (Finn, Abbeel & Levine, ICML 2017) learns an initialisation theta from which a few SGD
steps on a new task's small support set give a good model of that task. Two problems:

* ``inner``, a `TaskBatchedProblem`, adapts theta to each of the 16 tasks of a meta-batch:
  K = 5 SGD steps on each task's support set, all 16 tasks in one vmapped loop. Its
  ``initial_parameters()`` returns the meta problem's module, so every window starts from
  theta, differentiably.
* ``meta``, an `ImplicitProblem` with ``Config(first_order=False)``, holds theta. Its loss
  is the adapted models' loss on the tasks' query sets, ``self.inner(x)``, back-propagated
  through the K inner updates: the exact MAML meta-gradient, second derivatives included.

First-order MAML is the same program with ``Config(first_order_updates=True)`` on ``inner``:
each inner update counts as a constant, so the meta-gradient is the query gradient at the
adapted weights, applied to theta unchanged (no second derivatives).

Two baselines learn no initialisation for adaptation: a network trained on the pooled
meta-training data ("joint training"; for digits, a classifier over all meta-training classes
whose head is replaced by a zero 5-way head), and a randomly initialised network. Both are
fine-tuned like MAML (K plain SGD steps on the support set), with the learning rate picked
from a grid on tasks of the meta-training distribution. Every model is scored the same way,
on new tasks:

* sinusoids: y = a sin(x + b), a ~ U[0.1, 5], b ~ U[0, pi], x ~ U[-5, 5]; 10 support points,
  query MSE on 100 points; MLP 1-40-40-1, inner SGD lr 0.01, as in Finn et al. section 5.1;
* digits (scikit-learn's 8x8 digits): 5-way 1-shot and 5-shot classification, labels shuffled
  per task, 15 queries per class. Meta-training classes: digits 0-4, each under 4 rotations
  and a mirror image (40 classes); test classes: the upright digits 5-9, never seen in
  meta-training. MLP 64-64-5 whose head starts every task at zero, inner SGD lr 1.0
  (chosen by ``--meta-val`` on held-out meta-training classes, never on digits 5-9).

    python examples/maml/main.py            # the README's table, outputs/maml/maml.png (60 s)
    python examples/maml/main.py --quick    # seconds: a short run, as in the test
    python examples/maml/main.py --meta-val # the meta-validation behind the digits inner lr
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import add_figure_arguments, figure_path  # noqa: E402

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem, TaskBatchedProblem

Tasks = tuple[Tensor, Tensor, Tensor, Tensor]  # x_support, y_support, x_query, y_query
METHODS = ("MAML", "first-order MAML", "joint training", "random init")

PLOT = Path(__file__).with_name("maml.png")  # committed next to the README


# -- tasks: every tensor stacked per task (leading dim T) ------------------------------------
class Sinusoids:
    """y = a sin(x + b), one random (a, b) per task; x and y are [T, points, 1]."""

    kind, metric = "regression", "query MSE"

    def __init__(self, shots: int = 10, queries: int = 10) -> None:
        self.shots, self.queries = shots, queries

    def sample(self, count: int, gen: torch.Generator) -> Tasks:
        a = torch.empty(count, 1, 1).uniform_(0.1, 5.0, generator=gen)
        b = torch.empty(count, 1, 1).uniform_(0.0, math.pi, generator=gen)
        x = torch.empty(count, self.shots + self.queries, 1).uniform_(-5.0, 5.0, generator=gen)
        y = a * torch.sin(x + b)
        return x[:, :self.shots], y[:, :self.shots], x[:, self.shots:], y[:, self.shots:]

    def network(self, outputs: int = 1) -> nn.Module:
        return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                             nn.Linear(40, outputs))

    @staticmethod
    def loss(prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target)

    @staticmethod
    def score(prediction: Tensor, target: Tensor) -> Tensor:
        """Query MSE of each task: [T]."""
        return (prediction - target).pow(2).mean(dim=(1, 2))


class FewShotDigits:
    """5-way k-shot tasks drawn from a pool of classes (a list of [n, 64] image tensors); the
    task's classes get the labels 0..4 in a random order. x is [T, 5 * points, 64]."""

    kind, metric = "classification", "query accuracy"
    ways = 5

    def __init__(self, classes: list[Tensor], shots: int, queries: int = 15) -> None:
        self.classes, self.shots, self.queries = classes, shots, queries

    def sample(self, count: int, gen: torch.Generator) -> Tasks:
        tasks = []
        for _ in range(count):
            chosen = torch.randperm(len(self.classes), generator=gen)[:self.ways].tolist()
            picks = [self.classes[c][torch.randperm(len(self.classes[c]), generator=gen)
                                     [:self.shots + self.queries]] for c in chosen]
            tasks.append((torch.cat([p[:self.shots] for p in picks]),
                          torch.arange(self.ways).repeat_interleave(self.shots),
                          torch.cat([p[self.shots:] for p in picks]),
                          torch.arange(self.ways).repeat_interleave(self.queries)))
        return tuple(torch.stack(parts) for parts in zip(*tasks))  # type: ignore[return-value]

    def network(self, outputs: int = 5) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, outputs))

    @staticmethod
    def loss(prediction: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(prediction.reshape(-1, prediction.shape[-1]), target.reshape(-1))

    @staticmethod
    def score(prediction: Tensor, target: Tensor) -> Tensor:
        """Query accuracy of each task: [T]."""
        return (prediction.argmax(-1) == target).float().mean(-1)


def digit_classes(train_digits=range(5), test_digits=range(5, 10), *, transform_test=False
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """Images by class, pixels in [0, 1]. Meta-training classes: each of ``train_digits``
    rotated by 0, 90, 180, 270 degrees, and mirrored (8 classes a digit). Test classes: the
    upright ``test_digits``, or (``transform_test``) their 8 variants each too."""
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 8, 8) / 16.0
    labels = torch.tensor(y)

    def variants(digit: int, transform: bool) -> list[Tensor]:
        if not transform:
            return [images[labels == digit].reshape(-1, 64)]
        out = []
        for quarter_turns in range(4):
            rotated = torch.rot90(images[labels == digit], quarter_turns, dims=(1, 2))
            out += [rotated.reshape(-1, 64), rotated.flip(2).reshape(-1, 64)]
        return out

    train = [c for d in train_digits for c in variants(d, True)]
    test = [c for d in test_digits for c in variants(d, transform_test)]
    return train, test


Family = Sinusoids | FewShotDigits


# -- MAML with betty -------------------------------------------------------------------------
class Inner(TaskBatchedProblem):
    """Adapts theta to every task of the meta-batch; ``training_step`` is ONE task's loss."""

    zero_head = False  # few-shot classification: every task starts from a zero head

    def initial_parameters(self):
        if not self.zero_head:
            return self.meta.module  # every window starts from theta
        # the "zeroing trick" (Kao et al., ICLR 2022): labels are shuffled per task, so a
        # meta-learned head can only be a bias; theta's head is zero and stays zero (its
        # meta-gradient through ``* 0`` is zero, and so is Adam's step)
        start = dict(self.meta.module.named_parameters())
        head = self.meta.module.head_names
        return {n: p * 0 if n in head else p for n, p in start.items()}

    def on_inner_loop_start(self):
        self.tasks = self.family.sample(self.tasks_per_step, self.generator)  # new tasks

    def get_batch(self):
        x_support, y_support, _, _ = self.tasks
        return x_support, y_support  # the same support sets at each of the K steps

    def training_step(self, batch):
        x, y = batch
        return self.family.loss(self.module(x), y)


class Meta(ImplicitProblem):
    """Holds theta; its loss is the adapted models' query loss, over all tasks."""

    def get_batch(self):
        _, _, x_query, y_query = self.inner.tasks
        return x_query, y_query

    def training_step(self, batch):
        x, y = batch
        return self.inner.family.loss(self.inner(x), y)  # self.inner(x): each adapted model


@dataclass
class Settings:
    inner_lr: float
    meta_steps: int
    inner_steps: int = 5
    tasks_per_step: int = 16
    meta_lr: float = 1e-3


def meta_train(family: Family, s: Settings, *, first_order: bool, seed: int
               ) -> tuple[nn.Module, Inner]:
    """theta after ``s.meta_steps`` meta-steps of MAML, or of first-order MAML; and the
    inner problem, which can adapt theta to new tasks."""
    torch.manual_seed(seed)
    theta, template = family.network(), family.network()
    zero_head = family.kind == "classification"
    if zero_head:
        nn.init.zeros_(theta[-1].weight)
        nn.init.zeros_(theta[-1].bias)
        theta.head_names = {f"{len(theta) - 1}.weight", f"{len(theta) - 1}.bias"}
    meta = Meta("meta", Config(first_order=False), module=theta,
                optimizer=torch.optim.Adam(theta.parameters(), lr=s.meta_lr))
    inner = Inner("inner", Config(unroll_steps=s.inner_steps, first_order_updates=first_order),
                  module=template,  # only the architecture: theta comes from meta
                  optimizer=torch.optim.SGD(template.parameters(), lr=s.inner_lr))
    inner.family, inner.tasks_per_step, inner.zero_head = family, s.tasks_per_step, zero_head
    inner.generator = torch.Generator().manual_seed(seed)
    engine = Engine([meta, inner],  # one window of K inner steps, then one meta-step
                    EngineConfig(train_iters=s.inner_steps * s.meta_steps, progress_bar=False),
                    {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}})
    engine.run()
    return theta, inner


# -- the baselines ---------------------------------------------------------------------------
def joint_train(family: Family, s: Settings, *, seed: int) -> nn.Module:
    """Adam on the pooled meta-training data, as many steps and examples as MAML sees."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(family, Sinusoids):  # regress y on x over the mixture of tasks
        net = family.network()

        def batch():
            xs, ys, xq, yq = family.sample(s.tasks_per_step, gen)
            return torch.cat([xs, xq], 1), torch.cat([ys, yq], 1)
    else:  # one classifier over all meta-training classes
        net = family.network(outputs=len(family.classes))
        x = torch.cat(family.classes)
        y = torch.cat([torch.full((len(c),), i) for i, c in enumerate(family.classes)])
        size = s.tasks_per_step * family.ways * (family.shots + family.queries)

        def batch():
            pick = torch.randint(len(y), (size,), generator=gen)
            return x[pick], y[pick]
    opt = torch.optim.Adam(net.parameters(), lr=s.meta_lr)
    for _ in range(s.meta_steps):
        inputs, targets = batch()
        loss = family.loss(net(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if not isinstance(family, Sinusoids):  # new classes: a new head, all zeros
        net[-1] = nn.Linear(net[-1].in_features, family.ways)
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
    return net


# -- evaluation: the same fine-tuning for every model ----------------------------------------
def adaptation_curve(family: Family, net: nn.Module, tasks: Tasks, lr: float, steps: int
                     ) -> list[float]:
    """Mean query score over ``tasks`` after 0, 1, ..., ``steps`` plain SGD steps (learning
    rate ``lr``) from ``net``'s parameters on each task's support set."""
    def support_loss(params, x, y):
        return family.loss(functional_call(net, params, (x,)), y)

    def predictions_along_the_way(params, x_support, y_support, x_query):
        out = [functional_call(net, params, (x_query,))]
        for _ in range(steps):
            g = grad(support_loss)(params, x_support, y_support)
            params = {n: p - lr * g[n] for n, p in params.items()}
            out.append(functional_call(net, params, (x_query,)))
        return torch.stack(out)

    x_support, y_support, x_query, y_query = tasks
    start = {n: p.detach() for n, p in net.named_parameters()}
    with torch.no_grad():  # torch.func.grad still differentiates inside
        out = vmap(predictions_along_the_way, in_dims=(None, 0, 0, 0))(
            start, x_support, y_support, x_query)
        return [family.score(out[:, k], y_query).mean().item() for k in range(steps + 1)]


def pick_lr(family: Family, net: nn.Module, tasks: Tasks, steps: int,
            grid: tuple[float, ...]) -> float:
    """The grid's learning rate with the best score after ``steps`` steps on ``tasks``."""
    better = -1.0 if family.kind == "classification" else 1.0  # minimise MSE, -accuracy
    return min(grid, key=lambda lr: better * adaptation_curve(family, net, tasks, lr, steps)[-1])


# -- one setting: four models on the same test tasks -----------------------------------------
def run_setting(name: str, train: Family, test: Family, s: Settings,
                lr_grid: tuple[float, ...], eval_tasks: int, curve_steps: int, seed: int
                ) -> tuple[list[dict], dict]:
    gen = torch.Generator().manual_seed(seed + 1)  # evaluation tasks: not the training ones
    test_tasks = test.sample(eval_tasks, gen)
    tuning_tasks = train.sample(eval_tasks, gen)  # meta-training distribution
    rows, curves = [], {}
    for method in METHODS:
        start = time.perf_counter()
        lr, betty_after = None, None
        if method in ("MAML", "first-order MAML"):
            net, inner = meta_train(train, s, first_order=method != "MAML", seed=seed)
            lr = s.inner_lr  # the step theta was meta-trained for
            with torch.no_grad():  # betty's own adaptation, to cross-check the evaluation
                inner.adapt(test_tasks[:2], steps=s.inner_steps)
                betty_after = test.score(inner(test_tasks[2]), test_tasks[3]).mean().item()
        elif method == "joint training":
            net = joint_train(train, s, seed=seed)
        else:
            torch.manual_seed(seed)
            net = train.network()
        seconds = time.perf_counter() - start
        if lr is None:
            lr = pick_lr(train, net, tuning_tasks, s.inner_steps, lr_grid)
        curve = adaptation_curve(test, net, test_tasks, lr, curve_steps)
        curves[method] = {"curve": curve, "net": net, "lr": lr}
        rows.append({"setting": name, "method": method, "kind": train.kind,
                     "metric": train.metric, "before": curve[0], "after": curve[s.inner_steps],
                     "betty_after": betty_after, "lr": lr, "seconds": seconds})
    return rows, curves


DIGIT_INNER_LR = 1.0  # MAML's inner step on digits: picked by meta_validation(), not on 5-9
DIGIT_LR_GRID = (0.1, 0.2, 0.5, 1.0)  # the baselines' fine-tuning lr, picked on train tasks


def meta_validation(seed: int = 0, lrs: tuple[float, ...] = (0.5, 1.0), steps: int = 1000
                    ) -> list[dict]:
    """How DIGIT_INNER_LR was chosen, without the test digits: meta-train on the variants of
    digits 0-3 (32 classes) and score on 5-way tasks of the 8 variants of digit 4, held out."""
    train_classes, val_classes = digit_classes(range(4), [4], transform_test=True)
    rows = []
    for shots in (1, 5):
        for lr in lrs:
            r, _ = run_setting(f"val: digit 4, {shots}-shot, inner lr {lr:g}",
                               FewShotDigits(train_classes, shots),
                               FewShotDigits(val_classes, shots),
                               Settings(inner_lr=lr, meta_steps=steps), DIGIT_LR_GRID, 300, 5,
                               seed)
            rows += r
    return rows


def run(quick: bool = False, seed: int = 0, plot: str | None = None) -> dict:
    """Meta-train, train the baselines and evaluate them all; ``quick``: 30 meta-steps."""
    sinusoid_steps, digit_steps = (30, 30) if quick else (3000, 1000)
    eval_tasks, curve_steps = (50, 10) if quick else (300, 10)
    rows, curves = [], {}

    train = Sinusoids()
    test = Sinusoids(queries=100)  # a finer estimate of each new task's error
    r, curves["sinusoid"] = run_setting(
        "sinusoid, 10-shot", train, test, Settings(inner_lr=0.01, meta_steps=sinusoid_steps),
        (0.005, 0.01, 0.02, 0.05), eval_tasks, curve_steps, seed)
    rows += r

    train_classes, test_classes = digit_classes()
    for shots in (1, 5):
        r, curves[f"digits {shots}-shot"] = run_setting(
            f"digits 5-way {shots}-shot", FewShotDigits(train_classes, shots),
            FewShotDigits(test_classes, shots),
            Settings(inner_lr=DIGIT_INNER_LR, meta_steps=digit_steps),
            DIGIT_LR_GRID, eval_tasks, curve_steps, seed)
        rows += r
    result = {"rows": rows, "curves": curves, "quick": quick}
    if plot:
        draw(result, test, seed, plot)
    return result


# -- output ----------------------------------------------------------------------------------
def print_table(rows: list[dict]) -> None:
    print("| setting | method | metric | before adapting | after K=5 steps | fine-tuning lr "
          "| train s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['setting']} | {r['method']} | {r['metric']} | {r['before']:.3f} "
              f"| {r['after']:.3f} | {r['lr']:g} | {r['seconds']:.1f} |")


def draw(result: dict, sinusoids: Sinusoids, seed: int, path: str) -> None:
    """Three panels: one new sinusoid task, MSE against steps, accuracy against steps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    colors = dict(zip(METHODS, ("C0", "C1", "C2", "C7")))

    ax = axes[0]  # one new task: a = 3, b = 1, ten support points
    gen = torch.Generator().manual_seed(seed + 2)
    x_support = torch.empty(1, 10, 1).uniform_(-5.0, 5.0, generator=gen)
    y_support = 3.0 * torch.sin(x_support + 1.0)
    grid = torch.linspace(-5, 5, 200).reshape(1, -1, 1)
    ax.plot(grid[0, :, 0], 3.0 * torch.sin(grid[0, :, 0] + 1.0), "k", lw=2, label="true")
    ax.scatter(x_support[0, :, 0], y_support[0, :, 0], c="k", zorder=5, label="support")
    for method in ("MAML", "joint training"):
        entry = result["curves"]["sinusoid"][method]
        for steps, style in ((0, ":"), (5, "-")):
            y = fine_tuned(sinusoids, entry["net"], x_support, y_support, grid, entry["lr"],
                           steps)
            ax.plot(grid[0, :, 0], y, style, color=colors[method],
                    label=f"{method}, {steps} steps")
    ax.set(title="a new sinusoid task (a=3, b=1)", xlabel="x", ylabel="y")
    ax.legend(fontsize=7)

    ax = axes[1]
    for method, entry in result["curves"]["sinusoid"].items():
        ax.plot(entry["curve"], "o-", color=colors[method], label=method)
    ax.axvline(5, color="grey", lw=0.5)
    ax.set(title="sinusoids: new tasks", xlabel="SGD steps on the support set",
           ylabel="query MSE", yscale="log")
    ax.legend(fontsize=8)

    ax = axes[2]
    for shots, style in ((5, "o-"), (1, "s--")):
        for method, entry in result["curves"][f"digits {shots}-shot"].items():
            ax.plot(entry["curve"], style, color=colors[method], label=f"{method}, {shots}-shot")
    ax.axhline(0.2, color="grey", lw=0.5)
    ax.axvline(5, color="grey", lw=0.5)
    ax.set(title="digits 5-9, 5-way (unseen classes)", xlabel="SGD steps on the support set",
           ylabel="query accuracy")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fine_tuned(family: Family, net: nn.Module, x: Tensor, y: Tensor, grid: Tensor, lr: float,
               steps: int) -> Tensor:
    """``net`` after ``steps`` SGD steps on (x, y), evaluated on ``grid`` (one task)."""
    params = {n: p.detach().clone().requires_grad_() for n, p in net.named_parameters()}
    for _ in range(steps):
        loss = family.loss(functional_call(net, params, (x[0],)), y[0])
        grads = torch.autograd.grad(loss, list(params.values()))
        params = {n: (p - lr * g).detach().requires_grad_()
                  for (n, p), g in zip(params.items(), grads)}
    with torch.no_grad():
        return functional_call(net, params, (grid[0],))[:, 0]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 meta-steps, 50 test tasks")
    parser.add_argument("--seed", type=int, default=0)
    add_figure_arguments(parser, PLOT)
    parser.add_argument("--meta-val", action="store_true",
                        help="only the meta-validation that chose MAML's inner lr on digits")
    args = parser.parse_args(argv)
    if args.meta_val:
        torch.set_num_threads(1)
        rows = meta_validation(seed=args.seed)
        print_table(rows)
        return {"rows": rows}
    plot = figure_path(args, PLOT)

    torch.set_num_threads(1)  # small networks: more threads only add overhead
    start = time.perf_counter()
    result = run(quick=args.quick, seed=args.seed, plot=plot)
    print_table(result["rows"])
    check = [abs(r["betty_after"] - r["after"]) for r in result["rows"]
             if r["betty_after"] is not None]
    print(f"betty's inner.adapt vs this evaluation, after K steps: max difference "
          f"{max(check):.1e}")
    print(f"total {time.perf_counter() - start:.1f} s" + (f"; figure: {plot}" if plot else ""))
    return result


if __name__ == "__main__":
    main()
