"""Stand-in for the original example's model_search.py (the DARTS search space), with the
names and calls the program uses: ``Architecture(steps)()`` returns the architecture
weights (normal and reduce cells, one row per edge, one column per operation) and
``Network(C, num_classes, layers, criterion, steps)`` mixes its candidate operations with
their softmax; ``loss(x, alphas, target, acc=False)`` and ``genotype(alphas)``."""

import torch
import torch.nn as nn
import torch.nn.functional as F

OPS = ("conv_3x3", "conv_1x1", "avg_pool_3x3", "skip_connect")


class Architecture(nn.Module):
    def __init__(self, steps=4):
        super().__init__()
        edges = sum(2 + i for i in range(steps))
        self.alpha_normal = nn.Parameter(1e-3 * torch.randn(edges, len(OPS)))
        self.alpha_reduce = nn.Parameter(1e-3 * torch.randn(edges, len(OPS)))

    def forward(self):
        return [self.alpha_normal, self.alpha_reduce]


class Network(nn.Module):
    def __init__(self, C, num_classes, layers, criterion, steps=4):
        super().__init__()
        self.criterion = criterion
        self.stem = nn.Conv2d(3, C, 3, padding=1)
        self.conv3 = nn.Conv2d(C, C, 3, padding=1)
        self.conv1 = nn.Conv2d(C, C, 1)
        self.classifier = nn.Linear(C, num_classes)

    def forward(self, x, alphas):
        h = F.relu(self.stem(x))
        w = F.softmax(alphas[0], dim=-1).mean(0)  # one mixed edge stands for the cell
        h = (w[0] * self.conv3(h) + w[1] * self.conv1(h)
             + w[2] * F.avg_pool2d(h, 3, 1, 1) + w[3] * h)
        w = F.softmax(alphas[1], dim=-1).mean(0)
        h = F.relu(h) * (w[0] + w[1] + w[2] + w[3])
        return self.classifier(F.adaptive_avg_pool2d(h, 1).flatten(1))

    def loss(self, x, alphas, target, acc=False):
        logits = self(x, alphas)
        loss = self.criterion(logits, target)
        if acc:
            return loss, (logits.argmax(1) == target).sum().item()
        return loss

    def genotype(self, alphas):
        return [[OPS[i] for i in a.argmax(-1).tolist()] for a in alphas]
