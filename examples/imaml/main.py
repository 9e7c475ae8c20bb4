"""Implicit MAML (iMAML) on few-shot digits, against MAML and two non-meta baselines.

Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019 (the
original Betty's ``implicit_maml`` example, there on Omniglot). Few-shot tasks come from
scikit-learn's 8x8 digits. Meta-training classes: digits 0-4, each under the four rotations
by 90 degrees and their mirror images (40 classes; Omniglot's rotations make new classes the
same way). Meta-test classes: digits 5-9 as they are, never seen in meta-training. A task is
N-way K-shot: N classes drawn from a pool and given the labels 0..N-1 in a random order (no
class keeps a label across tasks), K support images per class to adapt on and Q query
images per class to score on.

* iMAML, a bilevel program. ``inner`` (lower, one task per unroll window) starts each window
  at the meta-parameters theta (``on_inner_loop_start``) and takes ``steps`` SGD steps on
  ``support CE + lam/2 * ||w - theta||^2``, theta read from ``self.meta.module``. ``meta``
  (upper) holds theta and minimises the adapted model's query CE, averaged over
  ``meta_batch`` tasks (``gradient_accumulation``). Its hypergradient is the implicit one,
  by conjugate gradient (``Config(type="cg")`` on ``inner``):
  ``dL_query/dtheta = lam * (H + lam I)^-1 dL_query/dw``, H the support CE's Hessian at the
  adapted w. Nothing is back-propagated through the inner steps.
* MAML, reverse mode: ``inner`` is a `TaskBatchedProblem` (an IterativeProblem that adapts
  the ``meta_batch`` tasks of a window at once, each from theta, by differentiable SGD steps
  on its support CE) and ``meta`` has ``Config(first_order=False)``: back-propagation
  through the ``steps`` updates gives the exact MAML gradient.
* ``pretrain``: the same network trained as a plain 40-class classifier on all meta-training
  images; per task its output layer is replaced by a zero one and the whole network is
  fine-tuned on the support set.
* ``scratch``: the network at its random initialisation (theta's, before meta-training),
  trained on the support set alone.

Both meta-learners use the same network (64-64-64-N MLP), tasks, inner SGD (lr 0.3, 10 steps),
meta batch (4 tasks) and meta optimizer (Adam, lr 3e-3, cosine decay). Every method is scored
the same way on the same 500 meta-test tasks: adapt on the support set, classify the query
set. iMAML adapts as it was meta-trained (with its proximal term), MAML and pretrain by
``steps`` plain SGD steps, scratch by ``scratch_steps`` (it starts from nothing). Reported:
mean query accuracy with a 95% interval over tasks, and the same on 200 tasks of the
meta-training classes ("seen classes": how much each method fits them).

The tasks, both methods' betty problems and the scoring are in ``imaml_program.py``; this
file trains each method, prints the table and draws the figure.

    python examples/imaml/main.py                 # writes outputs/imaml/imaml.png
    python examples/imaml/main.py --shots 5 --seed 1
    python examples/imaml/main.py --quick         # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: _common
sys.path.insert(0, str(Path(__file__).resolve().parent))  # this folder: imaml_program
from _common import add_figure_arguments, figure_path  # noqa: E402
from imaml_program import (  # noqa: E402
    FewShotEngine,
    IMAMLInner,
    IMAMLMeta,
    MAMLInner,
    MAMLMeta,
    TaskSampler,
    adapt_and_score,
    class_pools,
    mlp,
)

from betty.configs import Config, EngineConfig

METHODS = ("imaml", "maml", "pretrain", "scratch")
PLOT = Path(__file__).with_name("imaml.png")


# -- training each method --------------------------------------------------------------------
def train_imaml(pool, *, ways, shots, queries, seed, meta_iters, meta_batch, steps, lr, lam,
                meta_lr, cg_iterations, curve_tasks, curve_points):
    torch.manual_seed(seed)
    theta, template = mlp(ways), mlp(ways)
    inner = IMAMLInner(
        name="inner",
        module=template,
        optimizer=torch.optim.SGD(template.parameters(), lr=lr),
        # `steps` steps per task, then meta takes one micro-batch; type: meta's
        # hypergradient through this problem's solution is the implicit one, by CG.
        config=Config(type="cg", unroll_steps=steps, cg_iterations=cg_iterations),
        sampler=TaskSampler(pool, ways=ways, shots=shots, queries=queries, seed=seed),
        lam=lam,
    )
    optimizer = torch.optim.Adam(theta.parameters(), lr=meta_lr)
    meta = IMAMLMeta(
        name="meta",
        module=theta,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=meta_iters),
        config=Config(gradient_accumulation=meta_batch),  # meta_batch tasks per step
    )
    train_iters = meta_iters * meta_batch * steps
    engine = FewShotEngine(
        problems=[inner, meta],
        config=EngineConfig(train_iters=train_iters,
                            valid_step=max(1, train_iters // curve_points),
                            progress_bar=False),
        # u2l: theta enters inner's loss (the proximal term). l2u: inner's window, then meta.
        dependencies={"u2l": {meta: [inner]}, "l2u": {inner: [meta]}},
        curve_tasks=curve_tasks, adapt={"steps": steps, "lr": lr, "lam": lam},
        tasks_per_step=1 / steps,
    )
    start = time.perf_counter()
    engine.run()
    return theta, engine.curve, time.perf_counter() - start


def train_maml(pool, *, ways, shots, queries, seed, meta_iters, meta_batch, steps, lr,
               meta_lr, curve_tasks, curve_points):
    torch.manual_seed(seed)
    theta, template = mlp(ways), mlp(ways)
    inner = MAMLInner(
        name="inner",
        module=template,  # only its architecture is used: every task starts from theta
        optimizer=torch.optim.SGD(template.parameters(), lr=lr),
        config=Config(unroll_steps=steps),
        sampler=TaskSampler(pool, ways=ways, shots=shots, queries=queries, seed=seed),
        tasks=meta_batch,
    )
    optimizer = torch.optim.Adam(theta.parameters(), lr=meta_lr)
    meta = MAMLMeta(
        name="meta",
        module=theta,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=meta_iters),
        config=Config(first_order=False),  # reverse mode through inner's unrolled steps
    )
    train_iters = meta_iters * steps
    engine = FewShotEngine(
        problems=[inner, meta],
        config=EngineConfig(train_iters=train_iters,
                            valid_step=max(1, train_iters // curve_points),
                            progress_bar=False),
        dependencies={"u2l": {meta: [inner]}, "l2u": {inner: [meta]}},
        curve_tasks=curve_tasks, adapt={"steps": steps, "lr": lr},
        tasks_per_step=meta_batch / steps,
    )
    start = time.perf_counter()
    engine.run()
    return theta, engine.curve, time.perf_counter() - start


def pretrain(pool, *, ways, seed, iters, batch_size=64, lr=1e-3) -> tuple[nn.Module, float]:
    """A plain classifier of the meta-training classes; its output layer then zeroed (a
    task's labels are a fresh random order, so the old layer means nothing)."""
    torch.manual_seed(seed)
    start = time.perf_counter()
    x = torch.cat([pool[c] for c in sorted(pool)])
    y = torch.cat([torch.full((len(pool[c]),), i) for i, c in enumerate(sorted(pool))])
    model = mlp(len(pool))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(iters):
        index = torch.randint(len(y), (batch_size,), generator=generator)
        loss = F.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model[-1] = nn.Linear(model[-1].in_features, ways)
    nn.init.zeros_(model[-1].weight)
    nn.init.zeros_(model[-1].bias)
    return model, time.perf_counter() - start


# -- putting it together ---------------------------------------------------------------------
def mean_and_interval(scores: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal 95% interval."""
    return statistics.fmean(scores), 1.96 * statistics.stdev(scores) / math.sqrt(len(scores))


def distance(a: nn.Module, b: nn.Module) -> float:
    return math.sqrt(sum((p - q).pow(2).sum().item()
                         for p, q in zip(a.parameters(), b.parameters())))


def run(ways: int = 5, shots: int = 1, queries: int = 10, seed: int = 0,
        meta_iters: int = 1000, meta_batch: int = 4, steps: int = 10, lr: float = 0.3,
        lam: float = 0.2, meta_lr: float = 3e-3, cg_iterations: int = 5,
        scratch_steps: int = 100, pretrain_iters: int = 500, test_tasks: int = 500,
        seen_tasks: int = 200, curve_tasks: int = 50, curve_points: int = 10,
        plot: str | Path | None = None) -> dict:
    """Meta-train iMAML and MAML, pretrain the baseline, score all four on meta-test tasks."""
    start = time.perf_counter()
    train_pool, test_pool = class_pools()
    shape = {"ways": ways, "shots": shots, "queries": queries}
    unseen = TaskSampler(test_pool, **shape, seed=10_000 + seed)
    seen = TaskSampler(train_pool, **shape, seed=20_000 + seed)
    tasks = {"unseen": [unseen.sample() for _ in range(test_tasks)],
             "seen": [seen.sample() for _ in range(seen_tasks)]}
    common = {**shape, "seed": seed, "meta_iters": meta_iters, "meta_batch": meta_batch,
              "steps": steps, "lr": lr, "meta_lr": meta_lr, "curve_points": curve_points,
              "curve_tasks": tasks["unseen"][:curve_tasks]}  # the curve: a prefix of the tasks

    imaml, imaml_curve, imaml_s = train_imaml(train_pool, lam=lam,
                                              cg_iterations=cg_iterations, **common)
    maml, maml_curve, maml_s = train_maml(train_pool, **common)
    pretrained, pretrain_s = pretrain(train_pool, ways=ways, seed=seed, iters=pretrain_iters)
    torch.manual_seed(seed)
    scratch = mlp(ways)  # the same draw as theta's initialisation in train_imaml/train_maml

    adaptation = {"imaml": (imaml, {"steps": steps, "lr": lr, "lam": lam}),
                  "maml": (maml, {"steps": steps, "lr": lr}),
                  "pretrain": (pretrained, {"steps": steps, "lr": lr}),
                  "scratch": (scratch, {"steps": scratch_steps, "lr": lr})}
    accuracy, interval, seen_accuracy = {}, {}, {}
    for method, (model, how) in adaptation.items():
        accuracy[method], interval[method] = mean_and_interval(
            adapt_and_score(model, tasks["unseen"], **how))
        if method != "scratch":  # scratch never saw any class
            seen_accuracy[method] = statistics.fmean(adapt_and_score(model, tasks["seen"],
                                                                     **how))
    result = {
        "shape": shape, "steps": steps, "scratch_steps": scratch_steps, "lam": lam,
        "meta_iters": meta_iters, "meta_batch": meta_batch, "test_tasks": test_tasks,
        "seed": seed, "accuracy": accuracy, "interval": interval, "seen_accuracy": seen_accuracy,
        "train_seconds": {"imaml": imaml_s, "maml": maml_s, "pretrain": pretrain_s},
        "curves": {"imaml": imaml_curve, "maml": maml_curve},
        "moved": {"imaml": distance(imaml, scratch), "maml": distance(maml, scratch)},
        "chance": 1 / ways, "seconds": time.perf_counter() - start,
    }
    if plot is not None:
        save_plot(result, plot)
    return result


def save_plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for method in ("imaml", "maml"):
        tasks, accs = zip(*result["curves"][method]) if result["curves"][method] else ((), ())
        ax.plot(tasks, [100 * a for a in accs], marker="o", label=LABELS[method])
    for method, style in (("pretrain", "--"), ("scratch", ":")):
        ax.axhline(100 * result["accuracy"][method], linestyle=style, color="grey",
                   label=f"{LABELS[method]} (final)")
    ax.axhline(100 * result["chance"], color="black", linewidth=0.8, label="chance")
    s = result["shape"]
    ax.set(title=f"{s['ways']}-way {s['shots']}-shot, unseen digits 5-9",
           xlabel="meta-training tasks seen", ylabel="meta-test query accuracy (%)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


LABELS = {"imaml": "iMAML (cg)", "maml": "MAML (reverse mode)",
          "pretrain": "pretrain + fine-tune", "scratch": "scratch on support set"}


def format_table(result: dict) -> str:
    s = result["shape"]
    best_baseline = max(result["accuracy"][m] for m in ("pretrain", "scratch"))
    lines = [f"{s['ways']}-way {s['shots']}-shot, seed {result['seed']}: "
             f"{result['test_tasks']} tasks of the unseen digits 5-9 "
             f"({s['queries']} queries per class)",
             "| method | adaptation on the support set | unseen-class accuracy (%) | "
             "beats both baselines? | seen-class accuracy (%) | training time |",
             "|---|---|---|---|---|---|"]
    for method in METHODS:
        acc = result["accuracy"][method]
        steps = result["scratch_steps"] if method == "scratch" else result["steps"]
        adapt = f"{steps} SGD steps" + (f" + prox (lam={result['lam']:g})"
                                        if method == "imaml" else "")
        verdict = "-"
        if method in ("imaml", "maml"):
            gap = 100 * (acc - best_baseline)
            verdict = f"yes (+{gap:.1f})" if gap > 0 else f"no ({gap:.1f})"
        seen = result["seen_accuracy"].get(method)
        seen_text = f"{100 * seen:.1f}" if seen is not None else "-"
        seconds = result["train_seconds"].get(method)
        time_text = f"{seconds:.1f} s" if seconds is not None else "-"
        lines.append(f"| {LABELS[method]} | {adapt} | {100 * acc:.1f} ± "
                     f"{100 * result['interval'][method]:.1f} | {verdict} | {seen_text} | "
                     f"{time_text} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ways", type=int, default=5)
    parser.add_argument("--shots", type=int, default=1)
    parser.add_argument("--meta-iters", type=int, default=1000, help="meta-parameter updates")
    parser.add_argument("--steps", type=int, default=10, help="inner SGD steps per task")
    parser.add_argument("--lam", type=float, default=0.2, help="iMAML's proximal strength")
    parser.add_argument("--seed", type=int, default=0)
    add_figure_arguments(parser, PLOT)
    parser.add_argument("--quick", action="store_true", help="a few seconds: smoke test")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tiny MLPs: more threads only add overhead
    kwargs = {"ways": args.ways, "shots": args.shots, "meta_iters": args.meta_iters,
              "steps": args.steps, "lam": args.lam, "seed": args.seed}
    if args.quick:
        kwargs.update(meta_iters=60, steps=5, pretrain_iters=100, test_tasks=60,
                      seen_tasks=20, curve_tasks=20, curve_points=3, scratch_steps=30)
    result = run(plot=figure_path(args, PLOT), **kwargs)
    print(format_table(result))
    t = result["train_seconds"]
    print(f"meta-training: {result['meta_iters']} updates of {result['meta_batch']} tasks; "
          f"iMAML {t['imaml']:.1f} s, MAML {t['maml']:.1f} s; "
          f"{result['seconds']:.1f} s in total")
    return result


if __name__ == "__main__":
    main()
