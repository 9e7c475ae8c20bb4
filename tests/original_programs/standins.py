"""Small synthetic stand-ins for what the original's programs download, same shapes.

`torchvision_module()` builds a ``torchvision`` package (``datasets.MNIST`` / ``CIFAR10``
and the few ``transforms`` the programs compose) whose datasets hold seeded random images of
the real shapes (uint8 ``[N, 28, 28]`` or ``[N, 32, 32, 3]``) and labels learnable from
them, so no download happens. The harness (tests/test_original_programs.py) installs it in
``sys.modules`` while a program runs.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np
import torch

SIZES = {"MNIST": (2000, 200), "CIFAR10": (64, 32)}  # (train, test) samples


class _Images(torch.utils.data.Dataset):
    """Random images whose label is the brightest of 10 horizontal bands."""

    shape: tuple[int, ...] = ()
    name = ""

    def __init__(self, root: str = "", train: bool = True, download: bool = False,
                 transform: Any = None, **_: Any) -> None:
        n = SIZES[self.name][0 if train else 1]
        rng = np.random.default_rng(0 if train else 1)
        self.data = rng.integers(0, 200, size=(n, *self.shape), dtype=np.uint8)
        self.targets = [int(t) for t in rng.integers(0, 10, size=n)]
        band = self.shape[0] // 10
        for i, t in enumerate(self.targets):
            self.data[i, t * band:(t + 1) * band] = 255
        self.classes = [str(c) for c in range(10)]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self.data[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


class MNIST(_Images):
    shape, name = (28, 28), "MNIST"


class CIFAR10(_Images):
    shape, name = (32, 32, 3), "CIFAR10"


class ToTensor:
    """uint8 ``[H, W]`` or ``[H, W, C]`` -> float ``[C, H, W]`` in [0, 1]."""

    def __call__(self, image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image)).float() / 255.0
        return x.unsqueeze(0) if x.dim() == 2 else x.permute(2, 0, 1)


class Normalize:
    def __init__(self, mean: Any, std: Any) -> None:
        self.mean = torch.tensor(mean).view(-1, 1, 1)
        self.std = torch.tensor(std).view(-1, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class Compose:
    def __init__(self, steps: list[Any]) -> None:
        self.steps = steps

    def __call__(self, x: Any) -> Any:
        for step in self.steps:
            x = step(x)
        return x


class _Identity:
    """Augmentations (random crop, flip): the identity, so batches stay deterministic."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, x: Any) -> Any:
        return x


def torchvision_module() -> types.ModuleType:
    package = types.ModuleType("torchvision")
    datasets = types.ModuleType("torchvision.datasets")
    datasets.MNIST, datasets.CIFAR10 = MNIST, CIFAR10
    datasets.CIFAR100 = CIFAR10
    transforms = types.ModuleType("torchvision.transforms")
    transforms.ToTensor, transforms.Normalize, transforms.Compose = ToTensor, Normalize, Compose
    transforms.RandomCrop = transforms.RandomHorizontalFlip = _Identity
    package.datasets, package.transforms = datasets, transforms
    return package


def torchvision_modules() -> dict[str, types.ModuleType]:
    """The ``sys.modules`` entries that make ``import torchvision...`` find the stand-in."""
    package = torchvision_module()
    return {"torchvision": package, "torchvision.datasets": package.datasets,
            "torchvision.transforms": package.transforms}
