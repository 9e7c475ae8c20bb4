"""Data reweighting: Meta-Weight-Net on long-tailed and label-noisy digits.

Shu et al., "Meta-Weight-Net: Learning an Explicit Mapping for Sample Weighting", NeurIPS
2019 (the original Betty's ``learning_to_reweight`` example). A bilevel program:

* ``classifier`` (lower) trains an MLP on a corrupted training set. Each sample's
  cross-entropy ``l_i`` is weighted by ``w_i = mwn(l_i)``; the loss is ``mean_i w_i l_i``.
  SGD (lr 0.1, momentum 0.9, weight decay 5e-3) with a cosine learning-rate decay to 0.
* ``mwn`` (upper) is the Meta-Weight-Net, a 1-100-1 MLP with a sigmoid output from a
  sample's loss to its weight. It minimises the classifier's cross-entropy on a small CLEAN,
  balanced meta set (10 digits per class), with Adam (lr 1e-3, weight decay 1e-4), one step
  after each classifier step once the classifier has trained alone for 100 steps (warm-up).
  Its hypergradient goes through the classifier's training (``Config(type="darts")`` on the
  classifier, as in the original).

Settings: scikit-learn's digits (1797 8x8 images) split into a stratified test set of 500, the
meta set of 100 and a training pool of 1197, then corrupted:
``lt10``/``lt50``/``lt100``: long-tailed, class c keeps ``n_max * rho**(-c/9)`` samples
(rho = 10, 50, 100: from 116 samples of class 0 down to 11, 2, 1 of class 9);
``noise20``/``noise40``: 20% or 40% of the training labels replaced by a different,
uniformly drawn class.
The baseline, "plain", trains the same MLP with the same optimizer, batches and number of
steps, every weight 1. Reported: final test accuracy (no early stopping, no model picked on
test data), mean +- std over seeds.

    python examples/data_reweighting/main.py  # the table; outputs/data_reweighting/mwn.png
    python examples/data_reweighting/main.py --settings noise40 --seeds 0
    python examples/data_reweighting/main.py --quick
    torchrun --nproc_per_node=2 examples/data_reweighting/main.py --strategy distributed
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import (  # noqa: E402
    accuracy,
    add_figure_arguments,
    digits_splits,
    figure_path,
    flip_labels,
    loader,
    long_tail,
)

from betty import Engine  # noqa: E402
from betty.configs import Config, EngineConfig  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402

SETTINGS = {"lt10": ("long_tail", 10), "lt50": ("long_tail", 50), "lt100": ("long_tail", 100),
            "noise20": ("noise", 0.2), "noise40": ("noise", 0.4)}
STRATEGIES = ("default", "cpu", "distributed")
PLOT = Path(__file__).with_name("mwn.png")
QUICK = {"settings": ("noise40",), "seeds": (0,), "steps": 300, "warmup": 50}  # --quick


# -- data ------------------------------------------------------------------------------------
def make_data(setting: str, seed: int) -> dict:
    """Digits with a corrupted training set; ``flipped`` marks the noisy labels (if any)."""
    data = digits_splits(seed, test_size=500, meta_per_class=10)
    kind, amount = SETTINGS[setting]
    x, y = data["train"]
    flipped = torch.zeros(len(y), dtype=torch.bool)
    if kind == "long_tail":
        x, y = long_tail((x, y), amount, seed)
        flipped = torch.zeros(len(y), dtype=torch.bool)
    else:
        y, flipped = flip_labels(y, amount, seed)
    return {"train": (x, y), "flipped": flipped, "meta": data["meta"], "test": data["test"]}


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))


def sgd(model: nn.Module, steps: int) -> tuple[torch.optim.Optimizer, object]:
    """The classifier's optimizer and its cosine learning-rate schedule (per step)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3)
    return optimizer, torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)


# -- the two levels --------------------------------------------------------------------------
class MetaWeightNet(nn.Module):
    """Loss -> weight in (0, 1). The loss enters as data (detached), as in the paper."""

    def __init__(self, hidden: int = 100) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1),
                                 nn.Sigmoid())

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return self.net(losses.detach().unsqueeze(-1)).squeeze(-1)


class Classifier(ImplicitProblem):
    """Lower level: the MWN-weighted training loss."""

    def training_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        weights = self.mwn(losses)
        return (weights * losses).mean()


class MWN(ImplicitProblem):
    """Upper level: the classifier's loss on the clean meta set."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)


def train_mwn(data: dict, *, steps: int, seed: int, warmup: int, meta_lr: float,
              strategy: str) -> dict:
    torch.manual_seed(seed)
    # strategy="distributed" (under torchrun): each rank reads its own shard of every loader,
    # so per-rank batches of 100 / ranks keep the global batch at 100, as in one process.
    ranks = int(os.environ.get("WORLD_SIZE", "1")) if strategy == "distributed" else 1
    model, weight_net = mlp(), MetaWeightNet()
    optimizer, scheduler = sgd(model, steps)
    classifier = Classifier(
        name="classifier",
        module=model,
        optimizer=optimizer,
        scheduler=scheduler,
        train_data_loader=loader(*data["train"], batch_size=100 // ranks, seed=seed),
        # mwn steps after every classifier step once the classifier has warmed up.
        config=Config(type="darts", unroll_steps=1, warmup_steps=warmup),
    )
    mwn = MWN(
        name="mwn",
        module=weight_net,
        optimizer=torch.optim.Adam(weight_net.parameters(), lr=meta_lr, weight_decay=1e-4),
        train_data_loader=loader(*data["meta"], batch_size=100 // ranks, seed=seed + 1),
    )
    engine = Engine(
        problems=[classifier, mwn],
        config=EngineConfig(train_iters=steps, strategy=strategy),
        dependencies={"u2l": {mwn: [classifier]}, "l2u": {classifier: [mwn]}},
    )
    engine.run()
    return {"model": model, "weight_net": weight_net}


def train_plain(data: dict, *, steps: int, seed: int) -> nn.Module:
    """The baseline: same MLP initialization, optimizer, batches and steps; weights all 1."""
    torch.manual_seed(seed)
    model = mlp()
    optimizer, scheduler = sgd(model, steps)
    batches = loader(*data["train"], batch_size=100, seed=seed)
    step = 0
    while step < steps:
        for x, y in batches:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
            step += 1
            if step == steps:
                break
    return model


@torch.no_grad()
def sample_weights(model: nn.Module, weight_net: nn.Module, split) -> tuple[torch.Tensor, ...]:
    """Each training sample's loss under the final classifier and the weight MWN gives it."""
    x, y = split
    losses = F.cross_entropy(model(x), y, reduction="none")
    return losses, weight_net(losses)


# -- putting it together ---------------------------------------------------------------------
def run_one(setting: str, seed: int, *, steps: int, warmup: int, meta_lr: float,
            strategy: str) -> dict:
    data = make_data(setting, seed)
    plain = train_plain(data, steps=steps, seed=seed)
    start = time.perf_counter()
    learned = train_mwn(data, steps=steps, seed=seed, warmup=warmup, meta_lr=meta_lr,
                        strategy=strategy)
    seconds = time.perf_counter() - start
    losses, weights = sample_weights(learned["model"], learned["weight_net"], data["train"])
    flipped, labels = data["flipped"], data["train"][1]
    # Whom MWN favours: clean vs flipped labels, or the 5 frequent vs the 5 rare classes.
    groups = ({"clean": ~flipped, "flipped": flipped} if flipped.any() else
              {"head classes 0-4": labels < 5, "tail classes 5-9": labels >= 5})
    return {"setting": setting, "seed": seed, "plain_acc": accuracy(plain, data["test"]),
            "mwn_acc": accuracy(learned["model"], data["test"]), "mwn_seconds": seconds,
            "train_size": len(flipped), "weight_net": learned["weight_net"],
            "losses": losses, "weights": weights, "flipped": flipped,
            "group_weights": {name: weights[mask].mean().item()
                              for name, mask in groups.items()}}


def run(settings: tuple[str, ...] = tuple(SETTINGS), seeds: tuple[int, ...] = (0, 1, 2),
        steps: int = 1000, warmup: int = 100, meta_lr: float = 1e-3,
        strategy: str = "default", plot: str | Path | None = None) -> dict:
    """Plain training vs MWN for every setting and seed; a summary per setting."""
    start = time.perf_counter()
    runs = [run_one(s, seed, steps=steps, warmup=warmup, meta_lr=meta_lr, strategy=strategy)
            for s in settings for seed in seeds]
    summary = {}
    for s in settings:
        mine = [r for r in runs if r["setting"] == s]
        row = {key: [r[key] for r in mine] for key in ("plain_acc", "mwn_acc")}
        row["group_weights"] = {name: statistics.fmean(r["group_weights"][name] for r in mine)
                                for name in mine[0]["group_weights"]}
        row["train_size"] = mine[0]["train_size"]
        summary[s] = row
    if plot is not None and is_main_process():
        save_plot(runs, plot)
    return {"runs": runs, "summary": summary, "steps": steps,
            "seconds": time.perf_counter() - start}


def is_main_process() -> bool:
    import torch.distributed as dist

    return not dist.is_available() or not dist.is_initialized() or dist.get_rank() == 0


def save_plot(runs: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    first = {}
    for r in runs:
        first.setdefault(r["setting"], r)  # the first seed of each setting
    fig, (curves, hist) = plt.subplots(1, 2, figsize=(11, 4.2))
    grid = torch.linspace(0, 6, 200)
    with torch.no_grad():
        for setting, r in first.items():
            curves.plot(grid, r["weight_net"](grid), label=f"{setting} (seed {r['seed']})")
    curves.set(title="learned weight vs loss", xlabel="sample loss (cross-entropy)",
               ylabel="MWN weight")
    curves.legend()
    noisy = [r for r in first.values() if r["flipped"].any()]
    if noisy:
        r = noisy[-1]
        f = r["flipped"]
        bins = torch.linspace(0, 1, 26).tolist()
        hist.hist(r["weights"][~f], bins=bins, alpha=0.6, label="clean label")
        hist.hist(r["weights"][f], bins=bins, alpha=0.6, label="flipped label")
        hist.set(title=f"{r['setting']} (seed {r['seed']}): weights of the training samples",
                 xlabel="MWN weight under the final classifier", ylabel="samples",
                 yscale="log")
        hist.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_std(values: list[float], scale: float = 100.0) -> str:
    mean = statistics.fmean(values) * scale
    std = statistics.stdev(values) * scale if len(values) > 1 else 0.0
    return f"{mean:.1f} ± {std:.1f}"


def format_table(result: dict) -> str:
    lines = ["| setting | train size | plain test acc (%) | MWN test acc (%) | MWN better? | "
             "mean MWN weight (final model, training set) |", "|---|---|---|---|---|---|"]
    for setting, row in result["summary"].items():
        gain = statistics.fmean(row["mwn_acc"]) - statistics.fmean(row["plain_acc"])
        spread = max(statistics.stdev(v) if len(v) > 1 else 0.0
                     for v in (row["mwn_acc"], row["plain_acc"]))
        verdict = (f"no ({100 * gain:+.1f})" if gain <= 0 else f"yes ({100 * gain:+.1f})"
                   if gain > spread else f"within noise ({100 * gain:+.1f} < std)")
        weights = ", ".join(f"{name} {w:.3f}" for name, w in row["group_weights"].items())
        lines.append(f"| {setting} | {row['train_size']} | {mean_std(row['plain_acc'])} | "
                     f"{mean_std(row['mwn_acc'])} | {verdict} | {weights} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=tuple(SETTINGS),
                        default=list(SETTINGS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=1000, help="classifier steps per run")
    parser.add_argument("--strategy", choices=STRATEGIES, default="default",
                        help="EngineConfig.strategy ('distributed': run under torchrun)")
    add_figure_arguments(parser, PLOT)
    parser.add_argument("--quick", action="store_true", help="a few seconds: smoke test")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tiny MLPs: more threads only add overhead
    kwargs = {"settings": tuple(args.settings), "seeds": tuple(args.seeds),
              "steps": args.steps}
    if args.quick:
        kwargs = QUICK
    result = run(strategy=args.strategy, plot=figure_path(args, PLOT), **kwargs)
    if is_main_process():
        print(format_table(result))
        print(f"{len(result['runs'])} runs of {result['steps']} steps each, "
              f"{result['seconds']:.1f} s in total")
    return result


if __name__ == "__main__":
    main()
