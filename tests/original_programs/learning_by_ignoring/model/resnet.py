"""Stand-in for the original example's model/resnet.py: ``build_model(num_classes)`` (a
ResNet-50 there; a small conv net whose last layer is named ``fc`` here, as the program's
regularizer skips ``fc``), ``build_optimizer(module, args)`` (SGD, features at
``args.features_lr``, ``fc`` at ``args.classifier_lr``) and ``MLP``."""

import torch
import torch.nn as nn


class Backbone(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, stride=4)
        self.fc = nn.Linear(4 * 8 * 8, num_classes)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def build_model(num_classes):
    return Backbone(num_classes)


def build_optimizer(module, args):
    features = [p for n, p in module.named_parameters() if not n.startswith("fc")]
    return torch.optim.SGD([{"params": features, "lr": args.features_lr},
                            {"params": module.fc.parameters(), "lr": args.classifier_lr}],
                           lr=args.classifier_lr, momentum=0.9,
                           weight_decay=args.weight_decay)


class MLP(nn.Module):
    def __init__(self, in_features=1, hidden=100, out_features=1):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_features, hidden), nn.ReLU(),
                                 nn.Linear(hidden, out_features))

    def forward(self, x):
        return self.net(x)
