"""The parts of examples/maml/main.py that do the learning: the task families (sinusoids,
few-shot digits), MAML and first-order MAML as a betty program (`meta_train`), the
joint-training baseline, and the fine-tuning every model is scored by (`adaptation_curve`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem, TaskBatchedProblem

Tasks = tuple[Tensor, Tensor, Tensor, Tensor]  # x_support, y_support, x_query, y_query


# -- tasks: every tensor stacked per task (leading dim T) ------------------------------------
class Sinusoids:
    """y = a sin(x + b), one random (a, b) per task; x and y are [T, points, 1]."""

    kind, metric = "regression", "query MSE"

    def __init__(self, shots: int = 10, queries: int = 10) -> None:
        self.shots, self.queries = shots, queries

    def sample(self, count: int, gen: torch.Generator) -> Tasks:
        a = torch.empty(count, 1, 1).uniform_(0.1, 5.0, generator=gen)
        b = torch.empty(count, 1, 1).uniform_(0.0, math.pi, generator=gen)
        x = torch.empty(count, self.shots + self.queries, 1).uniform_(-5.0, 5.0, generator=gen)
        y = a * torch.sin(x + b)
        return x[:, :self.shots], y[:, :self.shots], x[:, self.shots:], y[:, self.shots:]

    def network(self, outputs: int = 1) -> nn.Module:
        return nn.Sequential(nn.Linear(1, 40), nn.ReLU(), nn.Linear(40, 40), nn.ReLU(),
                             nn.Linear(40, outputs))

    @staticmethod
    def loss(prediction: Tensor, target: Tensor) -> Tensor:
        return F.mse_loss(prediction, target)

    @staticmethod
    def score(prediction: Tensor, target: Tensor) -> Tensor:
        """Query MSE of each task: [T]."""
        return (prediction - target).pow(2).mean(dim=(1, 2))


class FewShotDigits:
    """5-way k-shot tasks drawn from a pool of classes (a list of [n, 64] image tensors); the
    task's classes get the labels 0..4 in a random order. x is [T, 5 * points, 64]."""

    kind, metric = "classification", "query accuracy"
    ways = 5

    def __init__(self, classes: list[Tensor], shots: int, queries: int = 15) -> None:
        self.classes, self.shots, self.queries = classes, shots, queries

    def sample(self, count: int, gen: torch.Generator) -> Tasks:
        tasks = []
        for _ in range(count):
            chosen = torch.randperm(len(self.classes), generator=gen)[:self.ways].tolist()
            picks = [self.classes[c][torch.randperm(len(self.classes[c]), generator=gen)
                                     [:self.shots + self.queries]] for c in chosen]
            tasks.append((torch.cat([p[:self.shots] for p in picks]),
                          torch.arange(self.ways).repeat_interleave(self.shots),
                          torch.cat([p[self.shots:] for p in picks]),
                          torch.arange(self.ways).repeat_interleave(self.queries)))
        return tuple(torch.stack(parts) for parts in zip(*tasks))  # type: ignore[return-value]

    def network(self, outputs: int = 5) -> nn.Module:
        return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, outputs))

    @staticmethod
    def loss(prediction: Tensor, target: Tensor) -> Tensor:
        return F.cross_entropy(prediction.reshape(-1, prediction.shape[-1]), target.reshape(-1))

    @staticmethod
    def score(prediction: Tensor, target: Tensor) -> Tensor:
        """Query accuracy of each task: [T]."""
        return (prediction.argmax(-1) == target).float().mean(-1)


def digit_classes(train_digits=range(5), test_digits=range(5, 10), *, transform_test=False
                  ) -> tuple[list[Tensor], list[Tensor]]:
    """Images by class, pixels in [0, 1]. Meta-training classes: each of ``train_digits``
    rotated by 0, 90, 180, 270 degrees, and mirrored (8 classes a digit). Test classes: the
    upright ``test_digits``, or (``transform_test``) their 8 variants each too."""
    x, y = load_digits(return_X_y=True)
    images = torch.tensor(x, dtype=torch.float32).reshape(-1, 8, 8) / 16.0
    labels = torch.tensor(y)

    def variants(digit: int, transform: bool) -> list[Tensor]:
        if not transform:
            return [images[labels == digit].reshape(-1, 64)]
        out = []
        for quarter_turns in range(4):
            rotated = torch.rot90(images[labels == digit], quarter_turns, dims=(1, 2))
            out += [rotated.reshape(-1, 64), rotated.flip(2).reshape(-1, 64)]
        return out

    train = [c for d in train_digits for c in variants(d, True)]
    test = [c for d in test_digits for c in variants(d, transform_test)]
    return train, test


Family = Sinusoids | FewShotDigits


# -- MAML with betty -------------------------------------------------------------------------
class Inner(TaskBatchedProblem):
    """Adapts theta to every task of the meta-batch; ``training_step`` is ONE task's loss."""

    zero_head = False  # few-shot classification: every task starts from a zero head

    def initial_parameters(self):
        if not self.zero_head:
            return self.meta.module  # every window starts from theta
        # the "zeroing trick" (Kao et al., ICLR 2022): labels are shuffled per task, so a
        # meta-learned head can only be a bias; theta's head is zero and stays zero (its
        # meta-gradient through ``* 0`` is zero, and so is Adam's step)
        start = dict(self.meta.module.named_parameters())
        head = self.meta.module.head_names
        return {n: p * 0 if n in head else p for n, p in start.items()}

    def on_inner_loop_start(self):
        self.tasks = self.family.sample(self.tasks_per_step, self.generator)  # new tasks

    def get_batch(self):
        x_support, y_support, _, _ = self.tasks
        return x_support, y_support  # the same support sets at each of the K steps

    def training_step(self, batch):
        x, y = batch
        return self.family.loss(self.module(x), y)


class Meta(ImplicitProblem):
    """Holds theta; its loss is the adapted models' query loss, over all tasks."""

    def get_batch(self):
        _, _, x_query, y_query = self.inner.tasks
        return x_query, y_query

    def training_step(self, batch):
        x, y = batch
        return self.inner.family.loss(self.inner(x), y)  # self.inner(x): each adapted model


@dataclass
class Settings:
    inner_lr: float
    meta_steps: int
    inner_steps: int = 5
    tasks_per_step: int = 16
    meta_lr: float = 1e-3


def meta_train(family: Family, s: Settings, *, first_order: bool, seed: int
               ) -> tuple[nn.Module, Inner]:
    """theta after ``s.meta_steps`` meta-steps of MAML, or of first-order MAML; and the
    inner problem, which can adapt theta to new tasks."""
    torch.manual_seed(seed)
    theta, template = family.network(), family.network()
    zero_head = family.kind == "classification"
    if zero_head:
        nn.init.zeros_(theta[-1].weight)
        nn.init.zeros_(theta[-1].bias)
        theta.head_names = {f"{len(theta) - 1}.weight", f"{len(theta) - 1}.bias"}
    meta = Meta("meta", Config(first_order=False), module=theta,
                optimizer=torch.optim.Adam(theta.parameters(), lr=s.meta_lr))
    inner = Inner("inner", Config(unroll_steps=s.inner_steps, first_order_updates=first_order),
                  module=template,  # only the architecture: theta comes from meta
                  optimizer=torch.optim.SGD(template.parameters(), lr=s.inner_lr))
    inner.family, inner.tasks_per_step, inner.zero_head = family, s.tasks_per_step, zero_head
    inner.generator = torch.Generator().manual_seed(seed)
    engine = Engine([meta, inner],  # one window of K inner steps, then one meta-step
                    EngineConfig(train_iters=s.inner_steps * s.meta_steps, progress_bar=False),
                    {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}})
    engine.run()
    return theta, inner


# -- the baselines ---------------------------------------------------------------------------
def joint_train(family: Family, s: Settings, *, seed: int) -> nn.Module:
    """Adam on the pooled meta-training data, as many steps and examples as MAML sees."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    if isinstance(family, Sinusoids):  # regress y on x over the mixture of tasks
        net = family.network()

        def batch():
            xs, ys, xq, yq = family.sample(s.tasks_per_step, gen)
            return torch.cat([xs, xq], 1), torch.cat([ys, yq], 1)
    else:  # one classifier over all meta-training classes
        net = family.network(outputs=len(family.classes))
        x = torch.cat(family.classes)
        y = torch.cat([torch.full((len(c),), i) for i, c in enumerate(family.classes)])
        size = s.tasks_per_step * family.ways * (family.shots + family.queries)

        def batch():
            pick = torch.randint(len(y), (size,), generator=gen)
            return x[pick], y[pick]
    opt = torch.optim.Adam(net.parameters(), lr=s.meta_lr)
    for _ in range(s.meta_steps):
        inputs, targets = batch()
        loss = family.loss(net(inputs), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    if not isinstance(family, Sinusoids):  # new classes: a new head, all zeros
        net[-1] = nn.Linear(net[-1].in_features, family.ways)
        nn.init.zeros_(net[-1].weight)
        nn.init.zeros_(net[-1].bias)
    return net


# -- evaluation: the same fine-tuning for every model ----------------------------------------
def adaptation_curve(family: Family, net: nn.Module, tasks: Tasks, lr: float, steps: int
                     ) -> list[float]:
    """Mean query score over ``tasks`` after 0, 1, ..., ``steps`` plain SGD steps (learning
    rate ``lr``) from ``net``'s parameters on each task's support set."""
    def support_loss(params, x, y):
        return family.loss(functional_call(net, params, (x,)), y)

    def predictions_along_the_way(params, x_support, y_support, x_query):
        out = [functional_call(net, params, (x_query,))]
        for _ in range(steps):
            g = grad(support_loss)(params, x_support, y_support)
            params = {n: p - lr * g[n] for n, p in params.items()}
            out.append(functional_call(net, params, (x_query,)))
        return torch.stack(out)

    x_support, y_support, x_query, y_query = tasks
    start = {n: p.detach() for n, p in net.named_parameters()}
    with torch.no_grad():  # torch.func.grad still differentiates inside
        out = vmap(predictions_along_the_way, in_dims=(None, 0, 0, 0))(
            start, x_support, y_support, x_query)
        return [family.score(out[:, k], y_query).mean().item() for k in range(steps + 1)]


def pick_lr(family: Family, net: nn.Module, tasks: Tasks, steps: int,
            grid: tuple[float, ...]) -> float:
    """The grid's learning rate with the best score after ``steps`` steps on ``tasks``."""
    better = -1.0 if family.kind == "classification" else 1.0  # minimise MSE, -accuracy
    return min(grid, key=lambda lr: better * adaptation_curve(family, net, tasks, lr, steps)[-1])
