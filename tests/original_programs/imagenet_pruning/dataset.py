"""Stand-in for the original example's dataset.py: `ImageNet` (an HDF5 file of images there)
with the same constructor, here seeded synthetic ``[3, 32, 32]`` images of ``len(classes)``
classes (16 for training, 8 for validation), and `get_subset_data`."""

import torch
from torch.utils.data import Dataset, Subset


class ImageNet(Dataset):
    def __init__(self, dataset_file, sample_set, classes, transform_type, args):
        gen = torch.Generator().manual_seed(0 if sample_set == "train" else 1)
        n = 16 if sample_set == "train" else 8
        self.targets = torch.randint(0, len(classes), (n,), generator=gen)
        self.images = torch.randn(n, 3, 32, 32, generator=gen)
        self.images[torch.arange(n), 0, self.targets] += 3.0  # a row per class

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


def get_subset_data(dataset, prune_strategy, instance_weights_dir, frac_data_kept):
    return Subset(dataset, range(int(len(dataset) * frac_data_kept)))
