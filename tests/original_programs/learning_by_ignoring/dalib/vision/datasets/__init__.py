"""Stand-in for the original example's dalib datasets: `Office31` and `OfficeHome` with the
same constructor (``root, task, download, transform``), ``num_classes`` and items
``(image, target, index)``, over seeded synthetic ``[3, 32, 32]`` images; each domain
(``Ar``, ``Cl``, ...) shifts the images, each class lights up one row."""

import zlib

import torch
from torch.utils.data import Dataset


class _Domains(Dataset):
    num_classes = 5

    def __init__(self, root, task, download=False, transform=None):
        domain, split = task.split("_")
        gen = torch.Generator().manual_seed(zlib.crc32(task.encode()))
        n = 24 if split == "train" else 12
        self.targets = torch.randint(0, self.num_classes, (n,), generator=gen)
        self.images = torch.randn(n, 3, 32, 32, generator=gen) + 0.1 * len(domain)
        self.images[torch.arange(n), :, 2 * self.targets] += 2.0
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = self.images[index]
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index]), index


class Office31(_Domains):
    num_classes = 4


class OfficeHome(_Domains):
    num_classes = 5
