"""Neural architecture search: a DARTS-style supernet on digits, then retraining from scratch.

Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search", ICLR 2019 (the original
Betty's ``neural_architecture_search`` example, on CIFAR-10). A bilevel program:

* ``network`` (lower) trains the supernet's weights on the search-train half of the data.
  The supernet is a stem convolution and one cell of three nodes; node ``j`` sums a mixed
  operation over every earlier state (the stem's output and nodes ``0..j-1``: 6 edges).
  A mixed operation is ``sum_o softmax(alpha_e)_o * op_o(x)`` over six candidates: none
  (zero), skip, 3x3 average pooling, 3x3 convolution, 3x3 separable and 3x3 dilated
  convolution (DARTS' list without max pooling and the 5x5 variants, to fit two CPU cores).
  The cell's output concatenates the nodes, then global pooling and a linear map.
* ``arch`` (upper) holds ``alpha`` (6 edges x 6 operations) and minimises the supernet's
  loss on the search-validation half. Its hypergradient goes through the network's training
  (``Config(type="darts")`` on the network: DARTS' finite-difference second-order term);
  ``--roll-back`` sets ``EngineConfig(roll_back=True)``: each network step is a look-ahead that
  is undone after the architecture step, then taken again with the new ``alpha``.

The architecture is derived as in DARTS: each node keeps its two strongest incoming edges
(one for node 0), each edge its strongest operation other than none. It is retrained from
scratch on all training data (search-train + search-validation) and tested on held-out
digits, against random architectures with the same edges per node and exactly the same
number of parameters (operations drawn uniformly, redrawn until the count matches), each
retrained the same way. Data: scikit-learn's digits as 1x8x8 images, standardized per pixel;
a stratified test set of 500, the remaining 1297 split in half for the search.

    python examples/nas/main.py               # search, retrain, writes outputs/nas/nas.png
    python examples/nas/main.py --roll-back
    python examples/nas/main.py --quick
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import accuracy, add_figure_arguments, digits_splits, figure_path, loader  # noqa: E402

from betty import Engine  # noqa: E402
from betty.configs import Config, EngineConfig  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402

PLOT = Path(__file__).with_name("nas.png")
QUICK = {"steps": 40, "epochs": 2, "channels": 4, "seeds": (0,), "valid_step": 20}  # --quick
NODES = 3
EDGES = [(node, src) for node in range(NODES) for src in range(node + 1)]  # src 0: stem
Genotype = list[tuple[int, int, str]]  # (node, source state, operation) per kept edge


# -- the search space ------------------------------------------------------------------------
def _bn(c: int, affine: bool) -> nn.Module:
    return nn.BatchNorm2d(c, affine=affine)


class Zero(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mul(0.0)


OPS = {
    "none": lambda c, affine: Zero(),
    "skip_connect": lambda c, affine: nn.Identity(),
    "avg_pool_3x3": lambda c, affine: nn.Sequential(
        nn.AvgPool2d(3, 1, 1, count_include_pad=False), _bn(c, affine)),
    "conv_3x3": lambda c, affine: nn.Sequential(
        nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, bias=False), _bn(c, affine)),
    "sep_conv_3x3": lambda c, affine: nn.Sequential(
        nn.ReLU(), nn.Conv2d(c, c, 3, padding=1, groups=c, bias=False),
        nn.Conv2d(c, c, 1, bias=False), _bn(c, affine)),
    "dil_conv_3x3": lambda c, affine: nn.Sequential(
        nn.ReLU(), nn.Conv2d(c, c, 3, padding=2, dilation=2, bias=False), _bn(c, affine)),
}
PRIMITIVES = tuple(OPS)


class Backbone(nn.Module):
    """Stem, then the cell's node states (via `cell`), concatenated, pooled, classified."""

    def __init__(self, channels: int, affine: bool) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1, bias=False),
                                  _bn(channels, affine))
        self.classifier = nn.Linear(NODES * channels, 10)

    def head(self, states: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(torch.cat(states[1:], dim=1).mean(dim=(2, 3)))


class SuperNet(Backbone):
    """Every edge holds every operation; ``alphas`` mixes them (DARTS' continuous relaxation)."""

    def __init__(self, channels: int) -> None:
        super().__init__(channels, affine=False)
        self.edges = nn.ModuleList(
            nn.ModuleList(OPS[name](channels, False) for name in PRIMITIVES) for _ in EDGES)

    def forward(self, x: torch.Tensor, alphas: torch.Tensor) -> torch.Tensor:
        weights = alphas.softmax(dim=-1)
        states = [self.stem(x)]
        for node in range(NODES):
            total = 0
            for e, (target, src) in enumerate(EDGES):
                if target == node:  # "none" adds nothing: skip computing it
                    total = total + sum(w * op(states[src]) for w, op, name in
                                        zip(weights[e], self.edges[e], PRIMITIVES)
                                        if name != "none")
            states.append(total)
        return self.head(states)


class FixedNet(Backbone):
    """A discrete architecture: one operation on each kept edge."""

    def __init__(self, genotype: Genotype, channels: int) -> None:
        super().__init__(channels, affine=True)
        self.genotype = list(genotype)
        self.ops = nn.ModuleList(OPS[name](channels, True) for _, _, name in genotype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        states = [self.stem(x)]
        for node in range(NODES):
            states.append(sum(op(states[src]) for (target, src, _), op in
                              zip(self.genotype, self.ops) if target == node))
        return self.head(states)


def derive(alphas: torch.Tensor) -> Genotype:
    """DARTS' rule: per node the top-2 incoming edges by their strongest non-none weight."""
    weights = alphas.detach().softmax(dim=-1)
    genotype = []
    for node in range(NODES):
        incoming = [(e, src) for e, (target, src) in enumerate(EDGES) if target == node]
        best = []
        for e, src in incoming:
            strength, op = max((weights[e, i].item(), name) for i, name in
                               enumerate(PRIMITIVES) if name != "none")
            best.append((strength, src, op))
        for _, src, op in sorted(best, reverse=True)[:2]:
            genotype.append((node, src, op))
    return sorted(genotype)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def random_genotype(size: int, channels: int, seed: int, tries: int = 10000) -> Genotype:
    """Random edges (as many per node as DARTS keeps) and operations (not none), redrawn
    until the network has exactly ``size`` parameters."""
    rng = random.Random(seed)
    choices = [name for name in PRIMITIVES if name != "none"]
    for _ in range(tries):
        genotype = sorted((node, src, rng.choice(choices)) for node in range(NODES)
                          for src in rng.sample(range(node + 1), min(2, node + 1)))
        if num_parameters(FixedNet(genotype, channels)) == size:
            return genotype
    raise RuntimeError(f"no random architecture with {size} parameters in {tries} draws")


# -- the two levels --------------------------------------------------------------------------
class Architecture(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.alphas = nn.Parameter(1e-3 * torch.randn(len(EDGES), len(PRIMITIVES)))

    def forward(self) -> torch.Tensor:
        return self.alphas


class Network(ImplicitProblem):
    """Lower level: the supernet's weights on search-train data, with the current alphas."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.module(x, self.arch()), y)


class Arch(ImplicitProblem):
    """Upper level: the supernet's loss on search-validation data, as a function of alpha."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.network(x, self.module()), y)


class NASEngine(Engine):
    """Adds `validation()`: the supernet's search-validation accuracy and the op weights."""

    def __init__(self, *args, val_data, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_data = val_data
        self.history: list[dict] = []

    @torch.no_grad()
    def validation(self):
        x, y = self.val_data
        acc = (self.network(x, self.arch()).argmax(1) == y).float().mean().item()
        self.history.append({"step": self.global_step, "acc": acc,
                             "weights": self.arch().softmax(-1).clone()})
        return {"acc": acc}


def images(split):
    x, y = split
    return x.view(-1, 1, 8, 8), y


def search(data: dict, *, steps: int, channels: int, seed: int, roll_back: bool,
           arch_lr: float, valid_step: int) -> dict:
    torch.manual_seed(seed)
    supernet, architecture = SuperNet(channels), Architecture()
    optimizer = torch.optim.SGD(supernet.parameters(), lr=0.05, momentum=0.9,
                                weight_decay=3e-4)
    network = Network(
        name="network",
        module=supernet,
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=1e-3),
        train_data_loader=loader(*data["train"], batch_size=64, seed=seed),
        config=Config(type="darts", unroll_steps=1),
    )
    arch = Arch(
        name="arch",
        module=architecture,
        optimizer=torch.optim.Adam(architecture.parameters(), lr=arch_lr, betas=(0.5, 0.999),
                                   weight_decay=1e-3),
        train_data_loader=loader(*data["val"], batch_size=64, seed=seed + 1),
    )
    engine = NASEngine(
        problems=[network, arch],
        config=EngineConfig(train_iters=steps, valid_step=valid_step, roll_back=roll_back),
        dependencies={"u2l": {arch: [network]}, "l2u": {network: [arch]}},
        val_data=data["val"],
    )
    initial = architecture.alphas.detach().clone()
    engine.run()
    return {"initial_alphas": initial, "alphas": architecture.alphas.detach().clone(),
            "history": engine.history}


def retrain(genotype: Genotype, data: dict, *, channels: int, epochs: int, seed: int) -> float:
    """Train the discrete architecture from scratch on all training data; test accuracy."""
    torch.manual_seed(seed)
    model = FixedNet(genotype, channels)
    x = torch.cat([data["train"][0], data["val"][0]])
    y = torch.cat([data["train"][1], data["val"][1]])
    batches = loader(x, y, batch_size=64, seed=seed)
    steps = epochs * len(batches)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=3e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    for _ in range(epochs):
        for xb, yb in batches:
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
    return accuracy(model, data["test"])


# -- putting it together ---------------------------------------------------------------------
def run(steps: int = 300, channels: int = 8, epochs: int = 30,
        seeds: tuple[int, ...] = (0, 1, 2, 3, 4), seed: int = 0, roll_back: bool = False,
        arch_lr: float = 3e-3, valid_step: int = 50, plot: str | Path | None = None) -> dict:
    """Search once, then retrain the derived and random architectures (one per seed)."""
    start = time.perf_counter()
    split = digits_splits(seed, test_size=500, meta_per_class=0, val_size=648)
    data = {name: images(part) for name, part in split.items()}
    found = search(data, steps=steps, channels=channels, seed=seed, roll_back=roll_back,
                   arch_lr=arch_lr, valid_step=valid_step)
    search_seconds = time.perf_counter() - start
    derived = derive(found["alphas"])
    size = num_parameters(FixedNet(derived, channels))
    randoms = [random_genotype(size, channels, seed=1000 + s) for s in seeds]
    derived_acc = [retrain(derived, data, channels=channels, epochs=epochs, seed=s)
                   for s in seeds]
    random_acc = [retrain(g, data, channels=channels, epochs=epochs, seed=s)
                  for g, s in zip(randoms, seeds)]
    result = {"derived": derived, "random": randoms, "size": size, "derived_acc": derived_acc,
              "random_acc": random_acc, "search_seconds": search_seconds,
              "seconds": time.perf_counter() - start, "roll_back": roll_back, **found}
    if plot is not None:
        save_plot(result, plot)
    return result


def save_plot(result: dict, path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (heat, bars) = plt.subplots(1, 2, figsize=(12, 4.5),
                                     gridspec_kw={"width_ratios": [1.6, 1]})
    weights = result["alphas"].softmax(-1).numpy()
    image = heat.imshow(weights, cmap="viridis", aspect="auto")
    heat.set_xticks(range(len(PRIMITIVES)), PRIMITIVES, rotation=30, ha="right")
    heat.set_yticks(range(len(EDGES)),
                    [f"{'stem' if s == 0 else f'node {s - 1}'} -> node {n}" for n, s in EDGES])
    kept = {(n, s): op for n, s, op in result["derived"]}
    for e, (n, s) in enumerate(EDGES):
        if (n, s) in kept:
            heat.text(PRIMITIVES.index(kept[(n, s)]), e, "*", ha="center", va="center",
                      color="red", fontsize=14)
    heat.set_title("softmax(alpha) after search (* = derived architecture)")
    fig.colorbar(image, ax=heat)
    labels = ["derived (DARTS)", "random, same size"]
    values = [result["derived_acc"], result["random_acc"]]
    bars.boxplot(values, tick_labels=labels)
    for i, v in enumerate(values, start=1):
        bars.scatter([i] * len(v), v, color="k", zorder=3)
    bars.set(title="retrained from scratch: test accuracy", ylabel="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def mean_std(values: list[float]) -> str:
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.fmean(values):.1f} ± {100 * std:.1f}"


def format_table(result: dict) -> str:
    gain = statistics.fmean(result["derived_acc"]) - statistics.fmean(result["random_acc"])
    spread = max(statistics.stdev(v) if len(v) > 1 else 0.0
                 for v in (result["derived_acc"], result["random_acc"]))
    verdict = ("derived NOT better" if gain <= 0 else "derived better" if gain > spread
               else "derived better, but by less than the spread between runs")
    return "\n".join([
        "| architecture | parameters | test acc (%) over retrains | per run |",
        "|---|---|---|---|",
        f"| derived by DARTS search | {result['size']} | {mean_std(result['derived_acc'])} | "
        + ", ".join(f"{100 * a:.1f}" for a in result["derived_acc"]) + " |",
        f"| random, same size (one per run) | {result['size']} | "
        f"{mean_std(result['random_acc'])} | "
        + ", ".join(f"{100 * a:.1f}" for a in result["random_acc"]) + " |",
        f"\n{verdict}: {100 * gain:+.1f} points",
    ])


def describe(genotype: Genotype) -> str:
    return ", ".join(f"{'stem' if s == 0 else f'n{s - 1}'}->n{n}: {op}" for n, s, op in genotype)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="search steps (global)")
    parser.add_argument("--epochs", type=int, default=30, help="retraining epochs")
    parser.add_argument("--channels", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0, help="data split and search seed")
    parser.add_argument("--roll-back", action="store_true", help="EngineConfig(roll_back=True)")
    add_figure_arguments(parser, PLOT)
    parser.add_argument("--quick", action="store_true", help="a few seconds: smoke test")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # small convolutions: more threads only add overhead
    kwargs = {"steps": args.steps, "epochs": args.epochs, "channels": args.channels}
    if args.quick:
        kwargs = QUICK
    result = run(seed=args.seed, roll_back=args.roll_back, plot=figure_path(args, PLOT), **kwargs)

    for h in result["history"]:
        print(f"search step {h['step']:4d}  supernet search-validation acc {h['acc']:.3f}")
    print(f"derived:  {describe(result['derived'])}")
    for i, g in enumerate(result["random"]):
        print(f"random {i}: {describe(g)}")
    print(format_table(result))
    print(f"roll_back={result['roll_back']}; search {result['search_seconds']:.1f} s, "
          f"total {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
