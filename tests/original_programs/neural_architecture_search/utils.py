"""The original example's utils.py function the program calls."""

import torchvision.transforms as transforms

MEAN, STD = [0.49139968, 0.48215827, 0.44653124], [0.24703233, 0.24348505, 0.26158768]


def data_transforms_cifar10(args):
    train = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                transforms.Normalize(MEAN, STD)])
    valid = transforms.Compose([transforms.ToTensor(), transforms.Normalize(MEAN, STD)])
    return train, valid
