"""Data and small helpers shared by the benchmark scripts.

Everything is generated from a seed, so the library run and the hand-written run of a program
see bit-identical tensors in the same order.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor]


# -- (a) the original Betty regression test: synthetic logistic regression ------------------
def logistic_data(seed: int = 0, n: int = 1000, dim: int = 20,
                  device: str = "cpu") -> tuple[Batch, Batch]:
    """``x`` in R^{n x dim}, ``y = [x w_gt + 0.1 noise > 0]``, split half train, half valid
    (the data of the original Betty's `test/test_regression.py`, with a fixed seed)."""
    rng = np.random.default_rng(seed)
    w_gt = rng.standard_normal(dim)
    x = rng.standard_normal((n, dim))
    y = (x @ w_gt + 0.1 * rng.standard_normal(n) > 0).astype(np.float64)
    perm = rng.permutation(n)
    train, valid = perm[: n // 2], perm[n // 2:]

    def tensors(idx: np.ndarray) -> Batch:
        return (torch.from_numpy(x[idx]).float().to(device),
                torch.from_numpy(y[idx]).float().to(device))

    return tensors(train), tensors(valid)


# -- (b) long-tailed, label-noisy digits for Meta-Weight-Net --------------------------------
def noisy_digits(seed: int = 0, imbalance: float = 10.0, noise: float = 0.2,
                 meta_per_class: int = 20, test_per_class: int = 30,
                 device: str = "cpu") -> dict[str, Batch]:
    """sklearn's digits (1797 x 64, 10 classes), features scaled to [0, 1], split per class
    into a clean balanced meta set, a clean balanced test set, and a training set that is
    long-tailed (class c keeps ``n_max * imbalance^(-c/9)`` samples) with ``noise`` symmetric
    label noise (a noisy label is drawn uniformly from the other nine classes)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    x_all = digits.data.astype(np.float32) / 16.0
    y_all = digits.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    meta, test, train = [], [], []
    pools = [rng.permutation(np.flatnonzero(y_all == c)) for c in range(10)]
    n_max = min(len(p) for p in pools) - meta_per_class - test_per_class
    for c, pool in enumerate(pools):
        meta.append(pool[:meta_per_class])
        test.append(pool[meta_per_class: meta_per_class + test_per_class])
        keep = max(1, int(n_max * imbalance ** (-c / 9)))
        rest = pool[meta_per_class + test_per_class:]
        train.append(rest[:keep])
    meta_idx, test_idx, train_idx = (np.concatenate(s) for s in (meta, test, train))
    y_train = y_all[train_idx].copy()
    flip = rng.random(len(y_train)) < noise
    shift = rng.integers(1, 10, size=len(y_train))
    y_train[flip] = (y_train[flip] + shift[flip]) % 10

    def tensors(idx: np.ndarray, y: np.ndarray | None = None) -> Batch:
        y = y_all[idx] if y is None else y
        return (torch.from_numpy(x_all[idx]).to(device), torch.from_numpy(y).to(device))

    return {"train": tensors(train_idx, y_train), "meta": tensors(meta_idx),
            "test": tensors(test_idx), "clean_train_labels": tensors(train_idx)}


def batch_list(data: Batch, batch_size: int, steps: int, seed: int) -> list[Batch]:
    """``steps`` mini-batches drawn epoch by epoch from seeded permutations (last partial
    batch of an epoch dropped), so every consumer sees exactly the same batches."""
    x, y = data
    n = x.shape[0]
    size = min(batch_size, n)
    per_epoch = n // size
    gen = torch.Generator().manual_seed(seed)
    out: list[Batch] = []
    while len(out) < steps:
        perm = torch.randperm(n, generator=gen).to(x.device)
        for i in range(per_epoch):
            if len(out) == steps:
                break
            idx = perm[i * size: (i + 1) * size]
            out.append((x[idx], y[idx]))
    return out


# -- timing helpers -------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "thread": time.thread_time}


def timed(fn: Callable[[], Any], device: str, clock: str = "wall") -> tuple[float, Any]:
    """Seconds of ``fn()`` (with device synchronisation) and its result.

    ``clock="wall"`` is wall-clock time, the real figure on a quiet machine. ``"thread"`` is the
    CPU time of the calling thread, which leaves out the time the thread waits while other
    processes run, so it is far steadier on a busy machine; it is only meaningful on CPU with
    one torch thread (there, the autograd engine runs CPU backward passes on the calling
    thread, so all the work is counted)."""
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    result = fn()
    synchronize(device)
    return now() - start, result


def median(values: list[float]) -> float:
    return statistics.median(values)


def max_abs_diff(a: list[Tensor], b: list[Tensor]) -> float:
    """Largest elementwise |a - b| over two lists of tensors of matching shapes."""
    return max(float((x.detach().double() - y.detach().double()).abs().max())
               for x, y in zip(a, b))


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs of each variant (alternating); medians are reported")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall: wall-clock time; thread: CPU time of this thread (steadier "
                        "on a busy machine; CPU and --threads 1 only)")


def setup(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    if args.clock == "thread" and (args.device != "cpu" or args.threads != 1):
        raise SystemExit("--clock thread needs --device cpu and --threads 1")
