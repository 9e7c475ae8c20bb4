"""Data helpers shared by the examples: scikit-learn's 8x8 digits, split, long-tailed, noisy.

Everything is deterministic given a seed, so every method of an example sees the same data.
Features are standardized with the statistics of the training pool only.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch.utils.data import DataLoader, TensorDataset

Split = tuple[torch.Tensor, torch.Tensor]
NUM_CLASSES = 10


def digits_splits(seed: int, *, test_size: int = 500, meta_per_class: int = 10,
                  val_size: int = 0) -> dict[str, Split]:
    """Digits split into a balanced clean ``meta`` set (``meta_per_class`` per class; none if
    0), an optional stratified ``val`` set of ``val_size``, a stratified ``test`` set and the
    ``train`` pool (the rest)."""
    x, y = load_digits(return_X_y=True)
    x_pool, x_test, y_pool, y_test = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=seed)
    rng = np.random.default_rng(seed)
    meta = np.concatenate([rng.choice(np.flatnonzero(y_pool == c), meta_per_class,
                                      replace=False) for c in range(NUM_CLASSES)])
    rest = np.setdiff1d(np.arange(len(y_pool)), meta)
    parts = {"meta": meta} if meta_per_class else {}
    if val_size:
        rest, val = train_test_split(rest, test_size=val_size, stratify=y_pool[rest],
                                     random_state=seed)
        parts["val"] = val
    parts["train"] = rest
    scaler = StandardScaler().fit(x_pool[rest])

    def tensors(xs: np.ndarray, ys: np.ndarray) -> Split:
        return (torch.tensor(scaler.transform(xs), dtype=torch.float32),
                torch.tensor(ys, dtype=torch.long))

    out = {name: tensors(x_pool[idx], y_pool[idx]) for name, idx in parts.items()}
    out["test"] = tensors(x_test, y_test)
    return out


def long_tail(split: Split, imbalance: float, seed: int) -> Split:
    """Keep ``n_max * imbalance ** (-c / 9)`` samples of class ``c`` (class 0 the most
    frequent, class 9 ``imbalance`` times rarer), at least one per class."""
    x, y = split
    counts = torch.bincount(y, minlength=NUM_CLASSES)
    n_max = int(counts.min())
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for c in range(NUM_CLASSES):
        wanted = max(1, int(n_max * imbalance ** (-c / (NUM_CLASSES - 1))))
        members = torch.nonzero(y == c).flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:wanted]])
    index = torch.cat(keep)
    return x[index], y[index]


def flip_labels(labels: torch.Tensor, rate: float, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace the labels of a random ``rate`` fraction of samples by a different class drawn
    uniformly; returns the noisy labels and the boolean mask of flipped samples."""
    generator = torch.Generator().manual_seed(seed)
    n = len(labels)
    flipped = torch.zeros(n, dtype=torch.bool)
    flipped[torch.randperm(n, generator=generator)[: round(rate * n)]] = True
    offset = torch.randint(1, NUM_CLASSES, (n,), generator=generator)
    noisy = torch.where(flipped, (labels + offset) % NUM_CLASSES, labels)
    return noisy, flipped


def loader(*tensors: torch.Tensor, batch_size: int, seed: int) -> DataLoader:
    """Shuffled mini-batches of equal-length tensors; the order depends only on ``seed``."""
    return DataLoader(TensorDataset(*tensors), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def accuracy(model: torch.nn.Module, split: Split) -> float:
    """Fraction of ``split`` that ``model`` classifies correctly (model in eval mode)."""
    was_training = model.training
    model.eval()
    x, y = split
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was_training)
    return acc


# -- figures ---------------------------------------------------------------------------------
# A run writes its figure under outputs/<example>/ (git-ignored), so trying an example never
# overwrites the figure committed next to its README; --refresh-figures rewrites that one.
OUTPUT_DIR = Path("outputs")


def add_figure_arguments(parser: argparse.ArgumentParser, committed: Path) -> None:
    """``--plot PATH`` ('' for none) and ``--refresh-figures`` for the figure ``committed``."""
    default = OUTPUT_DIR / committed.parent.name / committed.name
    parser.add_argument("--plot", default=None,
                        help=f"PNG path ('' for none; default {default})")
    parser.add_argument("--refresh-figures", action="store_true",
                        help=f"write the figure committed next to the README ({committed.name})")


def figure_path(args: argparse.Namespace, committed: Path) -> str | None:
    """Where to write the figure (its folder created), or None for no figure."""
    if args.refresh_figures:
        return str(committed)
    if args.plot == "":
        return None
    path = Path(args.plot) if args.plot else OUTPUT_DIR / committed.parent.name / committed.name
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(path)
