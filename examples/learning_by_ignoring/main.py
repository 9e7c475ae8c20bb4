"""Learning by ignoring: reweight a noisy source domain for pretraining, in three levels.

Zhang, Xie et al., "Learning by Ignoring, with Application to Domain Adaptation" (2020), the
original Betty's ``learning_by_ignoring`` example (there on OfficeHome). A source domain with
many labels, some of them harmful, helps a target domain with few labels:

* ``pretrain`` (level 1) trains a classifier on the source data; each source sample's
  cross-entropy is weighted by its weight from ``reweight``: ``mean_i w_i * CE_i``.
* ``finetune`` (level 2) trains a second classifier on the few labelled target images; its
  loss is their cross-entropy plus ``lam * ||v - w_pretrain||^2``, a proximal term that
  keeps it near the pretrained weights (the transfer from source to target).
* ``reweight`` (level 3) holds one logit per source sample (weight = sigmoid(logit), 0.5 at
  the start; Adam, lr 0.03) and minimises ``finetune``'s cross-entropy on target validation
  images. That loss reaches the logits only through ``finetune``'s solution, which depends
  on ``pretrain``'s, which depends on the weights: the hypergradient runs down the path
  reweight -> finetune -> pretrain -> reweight, through finetune by conjugate gradient
  (``Config(type="cg")``) and through pretrain by a finite difference (``type="darts"``).

Dependencies as in the original: ``u2l = {reweight: [pretrain]}``, ``l2u = {pretrain:
[finetune, reweight], finetune: [reweight]}``; each global step steps pretrain, then
finetune, then reweight, once each.

Data, from scikit-learn's 8x8 digits split into two disjoint stratified halves. Source: one
half as it is, ``noise`` (40%) of its labels replaced by a different, uniformly drawn digit:
the harmful samples. Target: the other half rotated by ``angle`` (30) degrees; 5 labelled
images per digit for ``finetune``, 10 per digit for ``reweight``'s validation, the rest
(747 images) for testing.

Compared, with the same networks (64-100-10 MLPs, one initialisation), optimizers (SGD, lr
0.1, momentum 0.9, weight decay 5e-3), batches and number of steps: ``target only``
(finetune alone, no source), ``pretrain -> finetune`` (the original's baseline: the two
lower levels, every source weight 1), ``LBI`` (all three levels) and an ``oracle`` that
pretrains on the clean source samples only (weight 1 for clean, 0 for harmful). Each at
every proximal strength in ``lams``. Reported: final target test accuracy (no model picked on
test data), mean +- std over seeds; the mean learned weight of clean and of harmful source
samples, and how often a clean sample outweighs a harmful one.

    python examples/learning_by_ignoring/main.py          # outputs/learning_by_ignoring/lbi.png
    python examples/learning_by_ignoring/main.py --noise 0.2 --lams 0.05 --seeds 0 1
    python examples/learning_by_ignoring/main.py --quick  # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import rotate
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import accuracy, add_figure_arguments, figure_path, flip_labels, loader  # noqa: E402

from betty import Engine  # noqa: E402
from betty.configs import Config, EngineConfig  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402

METHODS = ("target_only", "pretrain_finetune", "lbi", "oracle")
LABELS = {"target_only": "target only (no source)",
          "pretrain_finetune": "pretrain -> finetune (baseline)",
          "lbi": "LBI: reweight -> pretrain -> finetune", "oracle": "oracle: clean source only"}
PLOT = Path(__file__).with_name("lbi.png")
Split = tuple[torch.Tensor, ...]


# -- data: a noisy source domain and a rotated target domain ---------------------------------
def make_domains(seed: int, *, noise: float, angle: float, target_train_per_class: int = 5,
                 target_val_per_class: int = 10) -> dict:
    """Source: half the digits, ``noise`` of their labels flipped (``harmful`` marks them).
    Target: the other half rotated by ``angle`` degrees, split train / val / test."""
    x, y = load_digits(return_X_y=True)
    x_source, x_target, y_source, y_target = train_test_split(
        x, y, train_size=0.5, stratify=y, random_state=seed)
    x_target = rotate(x_target.reshape(-1, 8, 8), angle, axes=(1, 2), reshape=False,
                      order=1).reshape(-1, 64)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x_target, y_target, train_size=10 * target_train_per_class, stratify=y_target,
        random_state=seed)
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, train_size=10 * target_val_per_class, stratify=y_rest,
        random_state=seed)
    scaler = StandardScaler().fit(np.concatenate([x_source, x_train]))

    def tensors(xs: np.ndarray, ys: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.tensor(scaler.transform(xs), dtype=torch.float32),
                torch.tensor(ys, dtype=torch.long))

    source_x, clean_y = tensors(x_source, y_source)
    noisy_y, harmful = flip_labels(clean_y, noise, seed)
    return {"source": (source_x, noisy_y, torch.arange(len(noisy_y))), "harmful": harmful,
            "target_train": tensors(x_train, y_train), "target_val": tensors(x_val, y_val),
            "target_test": tensors(x_test, y_test)}


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))


def proximal(module: nn.Module, anchor: nn.Module) -> torch.Tensor:
    """``||v - w||^2`` summed over all parameters."""
    return sum((v - w).pow(2).sum() for v, w in zip(module.parameters(), anchor.parameters()))


# -- the three levels ------------------------------------------------------------------------
class SampleWeights(nn.Module):
    """One logit per source sample; ``forward(index)`` gives those samples' weights."""

    def __init__(self, num_samples: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(num_samples))

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits[index])


class Pretraining(ImplicitProblem):
    """Level 1: the source classifier, each sample's CE weighted by ``reweight``."""

    def training_step(self, batch):
        x, y, index = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        return (self.sample_weights(index) * losses).mean()

    def sample_weights(self, index: torch.Tensor) -> torch.Tensor:
        return self.reweight(index)


class FixedWeightPretraining(Pretraining):
    """Level 1 of the baselines: fixed weights (1 each, or 0 for the harmful samples)."""

    def __init__(self, *args, weights: torch.Tensor, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weights = weights

    def sample_weights(self, index: torch.Tensor) -> torch.Tensor:
        return self.weights[index]


class Finetuning(ImplicitProblem):
    """Level 2: the target classifier, kept near the pretrained one."""

    def __init__(self, *args, lam: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.lam = lam

    def training_step(self, batch):
        x, y = batch
        loss = F.cross_entropy(self.module(x), y)
        if self.lam:
            loss = loss + self.lam * proximal(self.module, self.pretrain.module)
        return loss


class Reweighting(ImplicitProblem):
    """Level 3: the fine-tuned classifier's CE on target validation images."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.finetune(x), y)


class TargetEngine(Engine):
    """Adds `validation()`: finetune's target test accuracy, for the learning curve."""

    def __init__(self, *args, test: Split, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.test, self.curve = test, []

    def validation(self):
        acc = accuracy(self.finetune.module, self.test)
        self.curve.append((self.global_step, acc))
        return {"acc": acc}


# -- one run of one method -------------------------------------------------------------------
def train(method: str, data: dict, *, seed: int, steps: int, lam: float, rw_lr: float,
          curve_points: int, finetune_type: str = "cg") -> dict:
    """Train ``method``'s program; return the target test accuracy, weights and curve."""
    torch.manual_seed(seed)
    source_net, target_net = mlp(), mlp()
    target_net.load_state_dict(source_net.state_dict())  # one initialisation for both
    harmful = data["harmful"]

    def sgd(net: nn.Module) -> torch.optim.Optimizer:
        return torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)

    pretrain_args = {
        "name": "pretrain", "module": source_net, "optimizer": sgd(source_net),
        "train_data_loader": loader(*data["source"], batch_size=100, seed=seed),
        # type: how reweight's hypergradient passes through pretrain's training (the last
        # hop of its path): a finite difference, as in the original
        "config": Config(type="darts", unroll_steps=1),
    }
    if method == "lbi":
        pretrain = Pretraining(**pretrain_args)
    else:
        weights = (~harmful).float() if method == "oracle" else torch.ones(len(harmful))
        pretrain = FixedWeightPretraining(**pretrain_args, weights=weights)
    finetune = Finetuning(
        name="finetune", module=target_net, optimizer=sgd(target_net),
        train_data_loader=loader(*data["target_train"], batch_size=50, seed=seed + 1),
        # the first hop: finetune's response to pretrain's weights, (H + 2 lam I)^-1 2 lam v,
        # by conjugate gradient (darts' H^-1 ~ I weights every direction alike; see README)
        config=Config(type=finetune_type, unroll_steps=1, cg_iterations=5),
        lam=0.0 if method == "target_only" else lam,
    )
    problems, dependencies = [pretrain, finetune], {"u2l": {}, "l2u": {pretrain: [finetune]}}
    if method == "lbi":
        sample_weights = SampleWeights(len(harmful))
        reweight = Reweighting(
            name="reweight", module=sample_weights,
            optimizer=torch.optim.Adam(sample_weights.parameters(), lr=rw_lr),
            train_data_loader=loader(*data["target_val"], batch_size=100, seed=seed + 2),
        )
        problems.append(reweight)
        # u2l: the weights enter pretrain's loss. l2u: pretrain steps, then finetune, then
        # reweight (which waits for both of its lowers).
        dependencies = {"u2l": {reweight: [pretrain]},
                        "l2u": {pretrain: [finetune, reweight], finetune: [reweight]}}

    engine = TargetEngine(
        problems=problems,
        config=EngineConfig(train_iters=steps, valid_step=max(1, steps // curve_points),
                            progress_bar=False),
        dependencies=dependencies, test=data["target_test"],
    )
    start = time.perf_counter()
    engine.run()
    out = {"acc": accuracy(target_net, data["target_test"]), "curve": engine.curve,
           "seconds": time.perf_counter() - start,
           "counts": {p.name: p.count for p in problems},
           "source_net": source_net, "target_net": target_net}
    if method == "lbi":
        with torch.no_grad():
            weights = sample_weights(torch.arange(len(harmful)))
        out.update(weights=weights, weight_clean=weights[~harmful].mean().item(),
                   weight_harmful=weights[harmful].mean().item(),
                   ranking=pairwise_ranking(weights, harmful))
    return out


def pairwise_ranking(weights: torch.Tensor, harmful: torch.Tensor) -> float:
    """Fraction of (clean, harmful) pairs in which the clean sample has the larger weight
    (the ROC AUC of ``-weight`` as a harmful-sample detector; 0.5 = no better than chance)."""
    clean, bad = weights[~harmful], weights[harmful]
    return (clean[:, None] > bad[None, :]).float().mean().item()


# -- putting it together ---------------------------------------------------------------------
def run(seeds: tuple[int, ...] = (0, 1, 2), steps: int = 1500, noise: float = 0.4,
        angle: float = 30.0, lams: tuple[float, ...] = (5e-3, 5e-2), rw_lr: float = 0.03,
        finetune_type: str = "cg", curve_points: int = 15,
        plot: str | Path | None = None) -> dict:
    """Every method on every seed, the source-based ones at every proximal strength in
    ``lams`` (target only has none); a summary per (method, lam)."""
    start = time.perf_counter()
    runs = []
    for seed in seeds:
        data = make_domains(seed, noise=noise, angle=angle)
        for method in METHODS:
            for lam in (0.0,) if method == "target_only" else lams:
                out = train(method, data, seed=seed, steps=steps, lam=lam, rw_lr=rw_lr,
                            curve_points=curve_points, finetune_type=finetune_type)
                runs.append({"method": method, "seed": seed, "lam": lam,
                             "harmful": data["harmful"], **out})
    summary: dict[tuple[str, float], dict] = {}
    for r in runs:
        row = summary.setdefault((r["method"], r["lam"]), {"acc": [], "seconds": []})
        row["acc"].append(r["acc"])
        row["seconds"].append(r["seconds"])
        for key in ("weight_clean", "weight_harmful", "ranking"):
            if key in r:
                row.setdefault(key, []).append(r[key])
    result = {"runs": runs, "summary": summary, "steps": steps, "noise": noise,
              "angle": angle, "lams": lams, "seeds": seeds, "finetune_type": finetune_type,
              "source_size": len(runs[0]["harmful"]),
              "seconds": time.perf_counter() - start}
    if plot is not None:
        save_plot(result, plot)
    return result


def save_plot(result: dict, path: str | Path) -> None:
    """Left: target test accuracy during training (first seed, largest lam, and target
    only). Right: LBI's learned weights of clean and of harmful source samples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    seed, lam = result["seeds"][0], max(result["lams"])
    shown = [r for r in result["runs"] if r["seed"] == seed and r["lam"] in (0.0, lam)]
    fig, (curves, histogram) = plt.subplots(1, 2, figsize=(11, 4.2))
    for r in shown:
        if r["curve"]:
            steps, accs = zip(*r["curve"])
            curves.plot(steps, [100 * a for a in accs], label=LABELS[r["method"]])
    curves.set(title=f"target test accuracy (seed {seed}, lam {lam:g})", xlabel="global step",
               ylabel="accuracy (%)")
    curves.legend(fontsize=8)
    for r in shown:
        if r["method"] == "lbi":
            weights, harmful = r["weights"], r["harmful"]
            bins = np.linspace(0, 1, 41)
            histogram.hist(weights[~harmful].numpy(), bins=bins, alpha=0.6,
                           label="clean label")
            histogram.hist(weights[harmful].numpy(), bins=bins, alpha=0.6,
                           label="flipped label (harmful)")
    histogram.set(title=f"LBI's learned source weights (seed {seed}, lam {lam:g})",
                  xlabel="weight = sigmoid(logit), 0.5 at the start", ylabel="source samples")
    histogram.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def format_table(result: dict) -> str:
    summary, lams = result["summary"], result["lams"]
    lines = [f"source: {result['source_size']} digits, {100 * result['noise']:.0f}% of labels "
             f"flipped; target: digits rotated {result['angle']:g} degrees, 50 labelled; "
             f"{result['steps']} steps; seeds {list(result['seeds'])}; finetune's "
             f"Config.type {result['finetune_type']!r}",
             "target test accuracy (%), mean ± std over seeds; lam = finetune's proximal "
             "strength",
             "| method | " + " | ".join(f"lam = {lam:g}" for lam in lams) + " |",
             "|---|" + "---|" * len(lams)]
    for method in METHODS:
        cells = []
        for lam in lams:
            row = summary.get((method, 0.0 if method == "target_only" else lam))
            if row is None:
                cells.append("-")
                continue
            cell = mean_std(row["acc"])
            baseline = summary.get(("pretrain_finetune", lam))
            if method in ("lbi", "oracle") and baseline is not None:
                gap = 100 * (statistics.fmean(row["acc"]) - statistics.fmean(baseline["acc"]))
                cell += f" ({'better' if gap > 0 else 'NOT better'}: {gap:+.1f})"
            cells.append(cell)
        lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
    lines += ["", "LBI's learned source weights, mean over seeds:",
              "| lam | clean samples | harmful samples | lower on harmful? | "
              "clean > harmful, pairs | seconds per run |", "|---|---|---|---|---|---|"]
    for lam in lams:
        row = summary.get(("lbi", lam))
        if row is None:
            continue
        clean, bad = statistics.fmean(row["weight_clean"]), statistics.fmean(row["weight_harmful"])
        lines.append(f"| {lam:g} | {clean:.3f} | {bad:.3f} | {'yes' if bad < clean else 'no'} "
                     f"| {100 * statistics.fmean(row['ranking']):.1f}% | "
                     f"{statistics.fmean(row['seconds']):.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1500, help="global steps per run")
    parser.add_argument("--noise", type=float, default=0.4, help="harmful source fraction")
    parser.add_argument("--angle", type=float, default=30.0, help="target rotation (degrees)")
    parser.add_argument("--lams", nargs="+", type=float, default=[5e-3, 5e-2],
                        help="finetune's proximal strengths")
    parser.add_argument("--finetune-type", choices=("cg", "darts", "neumann"), default="cg",
                        help="hypergradient method through finetune (its Config.type)")
    add_figure_arguments(parser, PLOT)
    parser.add_argument("--quick", action="store_true", help="a few seconds: smoke test")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tiny MLPs: more threads only add overhead
    kwargs = {"seeds": tuple(args.seeds), "steps": args.steps, "noise": args.noise,
              "angle": args.angle, "lams": tuple(args.lams),
              "finetune_type": args.finetune_type}
    if args.quick:
        kwargs.update(seeds=(0,), steps=300, lams=(5e-2,), curve_points=3)
    result = run(plot=figure_path(args, PLOT), **kwargs)
    print(format_table(result))
    print(f"{len(result['runs'])} runs, {result['seconds']:.1f} s in total")
    return result


if __name__ == "__main__":
    main()
