# The original's examples/neural_architecture_search/train_search.py (DARTS), rewritten with
# the same betty calls: architecture weights (outer, Adam) and network weights (inner, SGD
# with cosine schedule) on two halves of CIFAR-10's training set, roll_back=True.
import argparse
import os

import numpy as np
import torch
import torch.nn as nn
import torchvision.datasets as dset
import utils
from model_search import Architecture, Network
from torch import optim

from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem

parser = argparse.ArgumentParser("cifar")
parser.add_argument("--data", type=str, default="../data")
parser.add_argument("--batchsz", type=int, default=64)
parser.add_argument("--lr", type=float, default=0.025)
parser.add_argument("--lr_min", type=float, default=0.001)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--wd", type=float, default=3e-4)
parser.add_argument("--report_freq", type=int, default=100)
parser.add_argument("--gpu", type=int, default=0)
parser.add_argument("--epochs", type=int, default=50)
parser.add_argument("--init_ch", type=int, default=16)
parser.add_argument("--layers", type=int, default=8)
parser.add_argument("--train_portion", type=float, default=0.5)
parser.add_argument("--arch_lr", type=float, default=3e-4)
parser.add_argument("--arch_wd", type=float, default=1e-3)
parser.add_argument("--arch_steps", type=int, default=4)
parser.add_argument("--unroll_steps", type=int, default=1)
args = parser.parse_args()

os.environ["CUDA_VISIBLE_DEVICES"] = str(args.gpu)
device = torch.device("cuda")

train_transform, valid_transform = utils.data_transforms_cifar10(args)
train_data = dset.CIFAR10(root=args.data, train=True, download=True, transform=train_transform)
valid_data = dset.CIFAR10(root=args.data, train=False, download=True,
                          transform=valid_transform)
test_queue = torch.utils.data.DataLoader(valid_data, batch_size=args.batchsz, shuffle=False,
                                         pin_memory=True, num_workers=2)

num_train = len(train_data)
indices = list(range(num_train))
split = int(np.floor(args.train_portion * num_train))
train_iters = int(args.epochs * (num_train * args.train_portion // args.batchsz + 1)
                  * args.unroll_steps)

arch_net = Architecture(steps=args.arch_steps)
arch_optimizer = optim.Adam(arch_net.parameters(), lr=args.arch_lr, betas=(0.5, 0.999),
                            weight_decay=args.arch_wd)
arch_loader = torch.utils.data.DataLoader(
    train_data, batch_size=args.batchsz,
    sampler=torch.utils.data.sampler.SubsetRandomSampler(indices[split:]),
    pin_memory=True, num_workers=2)

criterion = nn.CrossEntropyLoss().to(device)
classifier_net = Network(args.init_ch, 10, args.layers, criterion, steps=args.arch_steps)
classifier_optimizer = optim.SGD(classifier_net.parameters(), lr=args.lr,
                                 momentum=args.momentum, weight_decay=args.wd)
classifier_scheduler = optim.lr_scheduler.CosineAnnealingLR(
    classifier_optimizer, float(train_iters // args.unroll_steps), eta_min=args.lr_min)
classifier_loader = torch.utils.data.DataLoader(
    train_data, batch_size=args.batchsz,
    sampler=torch.utils.data.sampler.SubsetRandomSampler(indices[:split]),
    pin_memory=True, num_workers=2)


class Arch(ImplicitProblem):
    def training_step(self, batch):
        x, target = batch
        alphas = self.forward()
        return self.classifier.module.loss(x, alphas, target)


class Classifier(ImplicitProblem):
    def training_step(self, batch):
        x, target = batch
        alphas = self.arch()
        return self.module.loss(x, alphas, target)


class NASEngine(Engine):
    @torch.no_grad()
    def validation(self):
        corrects = 0
        total = 0
        for x, target in test_queue:
            x, target = x.to(device), target.to(device, non_blocking=True)
            alphas = self.arch()
            _, correct = self.classifier.module.loss(x, alphas, target, acc=True)
            corrects += correct
            total += x.size(0)
        acc = corrects / total
        alphas = self.arch()
        torch.save({"genotype": self.classifier.module.genotype(alphas)}, "genotype.t7")
        return {"acc": acc}


outer_config = Config(retain_graph=True)
inner_config = Config(type="darts", unroll_steps=args.unroll_steps)
engine_config = EngineConfig(valid_step=args.report_freq * args.unroll_steps,
                             train_iters=train_iters, roll_back=True)
outer = Arch(name="arch", module=arch_net, optimizer=arch_optimizer,
             train_data_loader=arch_loader, config=outer_config, device=device)
inner = Classifier(name="classifier", module=classifier_net, optimizer=classifier_optimizer,
                   scheduler=classifier_scheduler, train_data_loader=classifier_loader,
                   config=inner_config, device=device)

problems = [outer, inner]
l2u = {inner: [outer]}
u2l = {outer: [inner]}
dependencies = {"l2u": l2u, "u2l": u2l}

engine = NASEngine(config=engine_config, problems=problems, dependencies=dependencies)
engine.run()
