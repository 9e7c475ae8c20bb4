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

The tasks, the betty program, the joint-training baseline and the evaluation are in
``maml_program.py``; this file runs the settings, prints the table and draws the figure.

    python examples/maml/main.py            # the README's table, outputs/maml/maml.png (60 s)
    python examples/maml/main.py --quick    # seconds: a short run, as in the test
    python examples/maml/main.py --meta-val # the meta-validation behind the digits inner lr
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from torch import Tensor, nn
from torch.func import functional_call

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: _common
sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: maml_program
from _common import add_figure_arguments, figure_path  # noqa: E402
from maml_program import (  # noqa: E402
    Family,
    FewShotDigits,
    Settings,
    Sinusoids,
    adaptation_curve,
    digit_classes,
    joint_train,
    meta_train,
    pick_lr,
)

METHODS = ("MAML", "first-order MAML", "joint training", "random init")

PLOT = Path(__file__).with_name("maml.png")  # committed next to the README


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
