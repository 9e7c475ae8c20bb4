# The original's examples/learning_to_reweight/main_iterative.py: main.py with the inner level
# a MetaIterativeProblem and reverse mode (first_order=False), rewritten with the same calls.
# The original imports model, data and utils with `*`; the stand-ins next to this file
# provide the names used here.
import argparse

import torch
import torch.nn.functional as F
import torch.optim as optim
from data import build_dataloader
from model import MLP, ResNet32
from utils import set_seed

from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import HigherIterativeProblem, ImplicitProblem, MetaIterativeProblem  # noqa: F401

parser = argparse.ArgumentParser(description="Meta_Weight_Net")
parser.add_argument("--device", type=str, default="cuda")
parser.add_argument("--fp16", action="store_true")
parser.add_argument("--distributed", action="store_true")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--meta_net_hidden_size", type=int, default=100)
parser.add_argument("--meta_net_num_layers", type=int, default=1)
parser.add_argument("--lr", type=float, default=0.1)
parser.add_argument("--momentum", type=float, default=0.9)
parser.add_argument("--dampening", type=float, default=0.0)
parser.add_argument("--nesterov", type=bool, default=False)
parser.add_argument("--weight_decay", type=float, default=5e-4)
parser.add_argument("--meta_lr", type=float, default=1e-5)
parser.add_argument("--meta_weight_decay", type=float, default=0.0)
parser.add_argument("--dataset", type=str, default="cifar10")
parser.add_argument("--num_meta", type=int, default=1000)
parser.add_argument("--imbalanced_factor", type=int, default=None)
parser.add_argument("--corruption_type", type=str, default=None)
parser.add_argument("--corruption_ratio", type=float, default=0.0)
parser.add_argument("--batch_size", type=int, default=100)
args = parser.parse_args()
print(args)
set_seed(args.seed)

train_dataloader, meta_dataloader, test_dataloader, imbalanced_num_list = build_dataloader(
    seed=args.seed,
    dataset=args.dataset,
    num_meta_total=args.num_meta,
    imbalanced_factor=args.imbalanced_factor,
    corruption_type=args.corruption_type,
    corruption_ratio=args.corruption_ratio,
    batch_size=args.batch_size,
)


class Outer(ImplicitProblem):
    def forward(self, x):
        return self.module(x)

    def training_step(self, batch):
        inputs, labels = batch
        inputs, labels = inputs.to(args.device), labels.to(args.device)
        outputs = self.inner(inputs)
        loss = F.cross_entropy(outputs, labels.long())
        acc = (outputs.argmax(dim=1) == labels.long()).float().mean().item() * 100
        return {"loss": loss, "acc": acc}

    def configure_train_data_loader(self):
        return meta_dataloader

    def configure_module(self):
        return MLP(hidden_size=args.meta_net_hidden_size,
                   num_layers=args.meta_net_num_layers).to(device=args.device)

    def configure_optimizer(self):
        return optim.Adam(self.module.parameters(), lr=args.meta_lr,
                          weight_decay=args.meta_weight_decay)


class Inner(MetaIterativeProblem):
    def training_step(self, batch):
        inputs, labels = batch
        inputs, labels = inputs.to(args.device), labels.to(args.device)
        outputs = self.forward(inputs)
        loss_vector = F.cross_entropy(outputs, labels.long(), reduction="none")
        loss_vector_reshape = torch.reshape(loss_vector, (-1, 1))
        weight = self.outer(loss_vector_reshape.data)
        return torch.mean(weight * loss_vector_reshape) / torch.mean(weight)

    def configure_train_data_loader(self):
        return train_dataloader

    def configure_module(self):
        return ResNet32(args.dataset == "cifar10" and 10 or 100).to(device=args.device)

    def configure_optimizer(self):
        return optim.SGD(self.module.parameters(), lr=args.lr, momentum=args.momentum,
                         dampening=args.dampening, weight_decay=args.weight_decay,
                         nesterov=args.nesterov)

    def configure_scheduler(self):
        return optim.lr_scheduler.MultiStepLR(self.optimizer, milestones=[10000, 13000],
                                              gamma=0.1)


best_acc = -1


class ReweightingEngine(Engine):
    @torch.no_grad()
    def validation(self):
        correct = 0
        total = 0
        global best_acc
        for x, target in test_dataloader:
            x, target = x.to(args.device), target.to(args.device)
            with torch.no_grad():
                out = self.inner(x)
            correct += (out.argmax(dim=1) == target).sum().item()
            total += x.size(0)
        acc = correct / total * 100
        if best_acc < acc:
            best_acc = acc
        return {"acc": acc, "best_acc": best_acc}


outer_config = Config(type="darts", fp16=args.fp16, first_order=False, log_step=100,
                      retain_graph=True)
inner_config = Config(type="darts", fp16=args.fp16, unroll_steps=1, retain_graph=True)
engine_config = EngineConfig(
    train_iters=15000,
    valid_step=100,
    distributed=args.distributed,
    roll_back=True,
    logger_type="tensorboard",
)
outer = Outer(name="outer", config=outer_config, device=args.device)
inner = Inner(name="inner", config=inner_config, device=args.device)

problems = [outer, inner]
u2l = {outer: [inner]}
l2u = {inner: [outer]}
dependencies = {"l2u": l2u, "u2l": u2l}

engine = ReweightingEngine(config=engine_config, problems=problems, dependencies=dependencies)
engine.run()
print(f"IF {args.imbalanced_factor} || Best Acc.: {best_acc}")
