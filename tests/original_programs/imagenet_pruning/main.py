# The original's examples/imagenet_pruning/main.py, rewritten with the same betty calls: a
# meta-weight net (outer) reweights each sample's loss of a classifier with an EMA teacher
# (inner), reading the global step inside the inner problem (self._global_step); validation
# reads the inner problem's device and saves both modules each epoch.
import argparse
import json
import os
import random

import numpy as np
import torch
import torch.nn.functional as F
import torch.optim as optim
from dataset import ImageNet, get_subset_data
from model import MLP, resnet18, resnet50
from torch.utils.data import DataLoader
from util import AverageMeter, Summary

from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem


def get_args():
    parser = argparse.ArgumentParser(description="PyTorch ResNet50 Example")
    parser.add_argument("--layers", type=int, default=50)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--gradient_accumulation", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=120)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--momentum", type=float, default=0.9)
    parser.add_argument("--weight_decay", type=float, default=1e-4)
    parser.add_argument("--precision", type=str, default="fp32")
    parser.add_argument("--baseline", action="store_true", default=False)
    parser.add_argument("--strategy", type=str, default="default")
    parser.add_argument("--nesterov", action="store_true", default=False)
    parser.add_argument("--prune", action="store_true", default=False)
    parser.add_argument("--prune_strategy", type=str, default="random")
    parser.add_argument("--frac_data_kept", type=float, default=1.0)
    parser.add_argument("--instance_weights_dir", type=str, default="")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--unroll_step", type=int, default=5)
    parser.add_argument("--log_step", type=int, default=100)
    parser.add_argument("--data_dir", default="./data", type=str)
    parser.add_argument("--imagenet-classes", default="metadata/imagenet_classes.json")
    parser.add_argument("--checkpoint_directory", type=str, default=".")
    parser.add_argument("--num_workers", type=int, default=4)
    return parser.parse_args()


args = get_args()
random.seed(args.seed)
np.random.seed(args.seed)
torch.manual_seed(args.seed)

with open(args.imagenet_classes) as f:
    classes = list(json.load(f)["classes"])

train_dataset = ImageNet(dataset_file=args.data_dir, sample_set="train", classes=classes,
                         transform_type="train", args=args)
if args.prune:
    train_dataset = get_subset_data(dataset=train_dataset, prune_strategy=args.prune_strategy,
                                    instance_weights_dir=args.instance_weights_dir,
                                    frac_data_kept=args.frac_data_kept)
test_dataset = ImageNet(dataset_file=args.data_dir, sample_set="val", classes=classes,
                        transform_type="val", args=args)

train_loader = DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True,
                          num_workers=args.num_workers, pin_memory=True)
meta_loader = DataLoader(train_dataset, batch_size=args.batch_size, shuffle=True,
                         num_workers=args.num_workers, pin_memory=True)
test_loader = DataLoader(test_dataset, batch_size=args.batch_size, shuffle=False,
                         num_workers=args.num_workers, pin_memory=True)

model = resnet18() if args.layers == 18 else resnet50()
optimizer = optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum,
                      weight_decay=args.weight_decay, nesterov=bool(args.nesterov))
meta_model = MLP(2, 100, 1)
meta_optimizer = optim.Adam(meta_model.parameters(), lr=1e-5)

WORLD_SIZE = int(os.environ.get("WORLD_SIZE", 1))
epoch_iter = int(len(train_dataset) / (WORLD_SIZE * args.batch_size
                                       * args.gradient_accumulation))
total_iter = int(epoch_iter * args.epochs)
scheduler = optim.lr_scheduler.MultiStepLR(
    optimizer, milestones=[int(epoch_iter * 40), int(epoch_iter * 80)], gamma=0.1)

checkpoint_directory = args.checkpoint_directory
os.makedirs(checkpoint_directory, exist_ok=True)


def accuracy(output, target, topk=(1,)):
    with torch.no_grad():
        _, pred = output.topk(max(topk), 1, True, True)
        correct = pred.t().eq(target.view(1, -1).expand_as(pred.t()))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True) * (100.0 / target.size(0))
                for k in topk]


class Outer(ImplicitProblem):
    def training_step(self, batch):
        inputs, labels = batch
        outputs, *_ = self.inner(inputs)
        return F.cross_entropy(outputs, labels.long())


class Inner(ImplicitProblem):
    def training_step(self, batch):
        inputs, labels = batch
        outputs, ema_outputs = self.forward(inputs)
        if args.baseline:
            return F.cross_entropy(outputs, labels.long())
        loss_vector = F.cross_entropy(outputs, labels.long(), reduction="none")
        loss_vector_reshape = torch.reshape(loss_vector, (-1, 1))
        ema_prob = F.softmax(ema_outputs, dim=-1)
        ema_loss_vector = torch.sum(-F.log_softmax(outputs, dim=-1) * ema_prob, dim=-1)
        ema_loss_vector_reshape = torch.reshape(ema_loss_vector, (-1, 1))
        meta_inputs = torch.cat([loss_vector_reshape.detach(),
                                 ema_loss_vector_reshape.detach()], dim=1)
        weight = self.outer(meta_inputs, self._global_step)
        return torch.mean(weight * loss_vector_reshape)

    def param_callback(self):
        if args.strategy == "default":
            self.module.ema_update()
        else:
            self.module.module.ema_update()


class ReweightingEngine(Engine):
    @torch.no_grad()
    def validation(self):
        correct = 0
        total = 0
        if not hasattr(self, "best_acc"):
            self.best_acc = -1
        top1 = AverageMeter("Acc@1", ":6.2f", Summary.AVERAGE)
        top5 = AverageMeter("Acc@5", ":6.2f", Summary.AVERAGE)
        for x, target in test_loader:
            x, target = x.to(self.inner.device), target.to(self.inner.device)
            with torch.no_grad():
                out, *_ = self.inner(x)
            acc1, acc5 = accuracy(out, target, topk=(1, 5))
            top1.update(acc1[0], x.size(0))
            top5.update(acc5[0], x.size(0))
            correct += (out.argmax(dim=1) == target).sum().item()
            total += x.size(0)
        acc = correct / total * 100
        if self.best_acc < acc:
            self.best_acc = acc
        classifier = self.inner.module
        if not args.baseline:
            reweighter = self.outer.module
        if args.strategy != "default":
            classifier = classifier.module
            if not args.baseline:
                reweighter = reweighter.module
        torch.save(classifier.state_dict(),
                   f"{checkpoint_directory}/cls_{self.global_step}.pt")
        if not args.baseline:
            torch.save(reweighter.state_dict(),
                       f"{checkpoint_directory}/mwn_{self.global_step}.pt")
        return {"acc": acc, "best_acc": self.best_acc, "Acc@1": top1.avg, "Acc@5": top5.avg}


inner_log_step = -1 if not args.baseline else args.log_step
outer_config = Config(precision=args.precision, log_step=int(args.log_step // args.unroll_step),
                      retain_graph=True)
inner_config = Config(type="darts", precision=args.precision, log_step=inner_log_step,
                      unroll_steps=args.unroll_step,
                      gradient_accumulation=args.gradient_accumulation)
engine_config = EngineConfig(train_iters=total_iter, valid_step=epoch_iter,
                             strategy=args.strategy)

outer = Outer(name="outer", module=meta_model, optimizer=meta_optimizer,
              train_data_loader=meta_loader, config=outer_config)
inner = Inner(name="inner", module=model, optimizer=optimizer, scheduler=scheduler,
              train_data_loader=train_loader, config=inner_config)

problems = [inner]
u2l, l2u = {}, {}
if not args.baseline:
    problems = [inner, outer]
    u2l = {outer: [inner]}
    l2u = {inner: [outer]}
dependencies = {"l2u": l2u, "u2l": u2l}

engine = ReweightingEngine(config=engine_config, problems=problems, dependencies=dependencies)
engine.run()
