"""Tutorial 1, quick start: Meta-Weight-Net learns to ignore wrong labels.

A bilevel program on scikit-learn's bundled 8x8 digits, 40% of whose training labels are
replaced by a wrong class:

* ``classifier`` (lower) trains an MLP on the noisy training set; each sample's loss is
  weighted by the output of the upper problem's network.
* ``reweight`` (upper) is that network, a Meta-Weight-Net (Shu et al., NeurIPS 2019): a
  1-100-1 MLP from a sample's loss to its weight. It minimises the classifier's loss on a
  small CLEAN meta set, which depends on the weights only through the classifier's training,
  so its gradient is a hypergradient.

    python examples/tutorials/quick_start.py
    python examples/tutorials/quick_start.py --steps 300
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem

Split = tuple[torch.Tensor, torch.Tensor]


# --8<-- [start:data]
def load_noisy_digits(seed: int = 0, noise: float = 0.4) -> dict[str, Split]:
    """Digits split into test (500), clean meta (100), clean validation (200) and training
    (997) sets; a ``noise`` fraction of the training labels is replaced by another class."""
    x, y = load_digits(return_X_y=True)
    x = (x / 16.0).astype(np.float32)  # pixel values are 0..16
    x, x_test, y, y_test = train_test_split(x, y, test_size=500, stratify=y, random_state=seed)
    x, x_meta, y, y_meta = train_test_split(x, y, test_size=100, stratify=y, random_state=seed)
    x, x_val, y, y_val = train_test_split(x, y, test_size=200, stratify=y, random_state=seed)
    rng = np.random.default_rng(seed)
    flipped = rng.random(len(y)) < noise
    y_noisy = np.where(flipped, (y + rng.integers(1, 10, len(y))) % 10, y)  # a wrong class

    def split(xs: np.ndarray, ys: np.ndarray) -> Split:
        return torch.from_numpy(xs), torch.from_numpy(ys).long()

    return {"train": split(x, y_noisy), "meta": split(x_meta, y_meta),
            "val": split(x_val, y_val), "test": split(x_test, y_test)}


def loader(split: Split, batch_size: int, seed: int) -> DataLoader:
    """Shuffled mini-batches; the order depends only on ``seed``."""
    return DataLoader(TensorDataset(*split), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))
# --8<-- [end:data]


# --8<-- [start:problems]
class Classifier(ImplicitProblem):
    """Lower level: the per-sample losses, weighted by the upper level's network."""

    def training_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        # self.reweight is the problem named "reweight"; calling it runs its module.
        # The losses enter detached: the weights depend on their values, not their graph.
        weights = self.reweight(losses.detach().unsqueeze(1)).squeeze(1)
        return (weights * losses).mean()


class Reweight(ImplicitProblem):
    """Upper level: the classifier's loss on the clean meta set."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)
# --8<-- [end:problems]


# --8<-- [start:make_problems]
def make_problems(data: dict[str, Split], seed: int = 0,
                  classifier_config: Config | None = None,
                  reweight_config: Config | None = None,
                  batch_size: int = 100,
                  reweight_class: type[Reweight] = Reweight) -> tuple[Classifier, Reweight]:
    """The two levels with their modules, optimizers and data (later tutorials reuse it)."""
    torch.manual_seed(seed)
    mlp = nn.Sequential(nn.Linear(64, 100), nn.ReLU(), nn.Linear(100, 10))
    weight_net = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())
    classifier = Classifier(
        name="classifier",
        module=mlp,
        optimizer=torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-3),
        train_data_loader=loader(data["train"], batch_size=batch_size, seed=seed),
        # type: how reweight differentiates through THIS problem's training. warmup_steps:
        # the classifier trains alone for 100 steps before reweight starts stepping.
        config=classifier_config or Config(type="darts", warmup_steps=100),
    )
    reweight = reweight_class(
        name="reweight",
        module=weight_net,
        optimizer=torch.optim.Adam(weight_net.parameters(), lr=1e-3, weight_decay=1e-4),
        train_data_loader=loader(data["meta"], batch_size=100, seed=seed + 1),
        config=reweight_config or Config(),
    )
    return classifier, reweight


# u2l: reweight's parameters enter classifier's loss (hypergradients flow there).
# l2u: after each classifier step (its unroll_steps, default 1), reweight steps once.
def dependencies(classifier: Classifier, reweight: Reweight) -> dict:
    return {"u2l": {reweight: [classifier]}, "l2u": {classifier: [reweight]}}
# --8<-- [end:make_problems]


@torch.no_grad()
def accuracy(module: nn.Module, split: Split) -> float:
    """Fraction of ``split`` that ``module`` classifies correctly."""
    x, y = split
    return (module(x).argmax(1) == y).float().mean().item()


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="global steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # small MLPs: more threads only add overhead

    # --8<-- [start:run]
    data = load_noisy_digits(seed=args.seed)
    classifier, reweight = make_problems(data, seed=args.seed)
    engine = Engine(
        problems=[classifier, reweight],
        config=EngineConfig(train_iters=args.steps),
        dependencies=dependencies(classifier, reweight),
    )
    engine.run()
    test_acc = accuracy(classifier.module, data["test"])
    print(f"test accuracy: {test_acc:.4f}")
    # --8<-- [end:run]
    return test_acc


if __name__ == "__main__":
    main()
