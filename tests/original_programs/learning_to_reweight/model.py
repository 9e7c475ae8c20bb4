"""Stand-in for the original example's model.py: the names and shapes the program uses.

``ResNet32(num_classes)`` maps ``[B, 3, 32, 32]`` to ``[B, num_classes]`` (a small conv net
with BatchNorm here, not 32 layers, to keep the test fast); ``MLP(hidden_size, num_layers)``
is the original's Meta-Weight-Net: a loss ``[B, 1]`` to a weight in (0, 1)."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class ResNet32(nn.Module):
    def __init__(self, num_classes=10):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.linear = nn.Linear(8, num_classes)

    def forward(self, x):
        out = F.relu(self.bn(self.conv(x)))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class HiddenLayer(nn.Module):
    def __init__(self, input_size, output_size):
        super().__init__()
        self.fc = nn.Linear(input_size, output_size)

    def forward(self, x):
        return F.relu(self.fc(x))


class MLP(nn.Module):
    def __init__(self, hidden_size=100, num_layers=1):
        super().__init__()
        self.first_hidden_layer = HiddenLayer(1, hidden_size)
        self.rest_hidden_layers = nn.Sequential(
            *[HiddenLayer(hidden_size, hidden_size) for _ in range(num_layers - 1)])
        self.output_layer = nn.Linear(hidden_size, 1)

    def forward(self, x):
        x = self.rest_hidden_layers(self.first_hidden_layer(x))
        return torch.sigmoid(self.output_layer(x))
