"""Stand-in for the original example's model.py: ``resnet18()``/``resnet50()`` return a
classifier whose forward gives ``(outputs, ema_outputs)`` (logits of the model and of its
exponential moving average) and which has ``ema_update()``; ``MLP(in, hidden, out)`` is the
meta-weight net called as ``mlp(x, global_step)``, recording the global steps it is given."""

import copy

import torch
import torch.nn as nn


class EMAClassifier(nn.Module):
    def __init__(self, num_classes=1000, decay=0.9):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=4), nn.ReLU(), nn.Flatten(),
                                 nn.Linear(4 * 8 * 8, num_classes))
        self.ema = copy.deepcopy(self.net).requires_grad_(False)
        self.decay = decay

    def forward(self, x):
        return self.net(x), self.ema(x)

    @torch.no_grad()
    def ema_update(self):
        for ema, p in zip(self.ema.parameters(), self.net.parameters()):
            ema.mul_(self.decay).add_(p.detach(), alpha=1 - self.decay)


def resnet18():
    return EMAClassifier()


def resnet50():
    return EMAClassifier()


class MLP(nn.Module):
    def __init__(self, in_features, hidden, out_features):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_features), nn.Sigmoid())
        self.global_steps = []

    def forward(self, x, global_step):
        self.global_steps.append(global_step)
        return self.net(x)
