"""Stand-in for the original example's data.py: `build_dataloader` with the same arguments
and returns, over seeded synthetic CIFAR-shaped data (``[N, 3, 32, 32]``, 10 classes) instead
of a CIFAR download; long-tailed when ``imbalanced_factor`` is given, as the original."""

import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset


def _images(rng, n):
    labels = rng.integers(0, 10, size=n)
    x = rng.normal(size=(n, 3, 32, 32)).astype(np.float32)
    for i, label in enumerate(labels):
        x[i, label % 3, 3 * label:3 * label + 3] += 2.0  # a class-specific stripe
    return torch.from_numpy(x), torch.from_numpy(labels)


def build_dataloader(seed=1, dataset="cifar10", num_meta_total=1000, imbalanced_factor=None,
                     corruption_type=None, corruption_ratio=0.0, batch_size=100):
    np.random.seed(seed)
    rng = np.random.default_rng(seed)
    x, y = _images(rng, 240)
    meta = np.arange(min(num_meta_total, 40))
    train = np.arange(len(meta), len(y))
    imbalanced_num_list = None
    if imbalanced_factor is not None:
        counts = [int(200 / imbalanced_factor ** (c / 9)) for c in range(10)]
        np.random.shuffle(counts)
        imbalanced_num_list = counts
        train = np.concatenate([train[y[train] == c][:counts[c]] for c in range(10)])
    test_x, test_y = _images(rng, 50)
    train_dataloader = DataLoader(TensorDataset(x[train], y[train]), batch_size=batch_size,
                                  shuffle=True)
    meta_dataloader = DataLoader(TensorDataset(x[meta], y[meta]), batch_size=batch_size,
                                 shuffle=True)
    test_dataloader = DataLoader(TensorDataset(test_x, test_y), batch_size=batch_size)
    return train_dataloader, meta_dataloader, test_dataloader, imbalanced_num_list
