"""The parts of examples/imaml/main.py that meta-learn: few-shot tasks from the digits, iMAML's
and MAML's two levels as betty problems, and the scoring every method shares (adapt on a task's
support set, classify its query set), with an Engine that records the learning curve.
"""

from __future__ import annotations

import copy
import statistics

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.preprocessing import StandardScaler
from torch import nn

from betty import Engine
from betty.problems import ImplicitProblem, TaskBatchedProblem

META_TRAIN_CLASSES = (0, 1, 2, 3, 4)
META_TEST_CLASSES = (5, 6, 7, 8, 9)
Split = tuple[torch.Tensor, torch.Tensor]


# -- data: few-shot tasks from the digits ----------------------------------------------------
def class_pools() -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Images of each class, standardized with meta-training statistics: the meta-training
    pool holds digits 0-4 under the 4 rotations by 90 degrees, each also mirrored (40
    classes, as Omniglot's rotations make new classes); the meta-test pool holds digits 5-9
    as they are."""
    x, y = load_digits(return_X_y=True)
    images = x.reshape(-1, 8, 8)
    train = {}
    for digit in META_TRAIN_CLASSES:
        for quarter_turns in range(4):
            turned = np.rot90(images[y == digit], quarter_turns, axes=(1, 2))
            train[f"{digit} rot{90 * quarter_turns}"] = turned
            train[f"{digit} rot{90 * quarter_turns} mirrored"] = turned[:, :, ::-1]
    train = {name: a.reshape(len(a), 64) for name, a in train.items()}
    scaler = StandardScaler().fit(np.concatenate(list(train.values())))

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.tensor(scaler.transform(a), dtype=torch.float32)

    return ({name: tensor(a) for name, a in train.items()},
            {str(c): tensor(x[y == c]) for c in META_TEST_CLASSES})


class TaskSampler:
    """N-way K-shot tasks: N classes of ``pool`` with labels 0..N-1 in random order, K
    support and Q query images per class (distinct images), deterministic given ``seed``."""

    def __init__(self, pool: dict[int, torch.Tensor], *, ways: int, shots: int,
                 queries: int, seed: int) -> None:
        self.pool, self.classes = pool, sorted(pool)
        self.ways, self.shots, self.queries = ways, shots, queries
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> dict[str, Split]:
        picked = torch.randperm(len(self.classes), generator=self.generator)[: self.ways]
        support, query = [], []
        for index in picked.tolist():  # the i-th class drawn gets label i
            images = self.pool[self.classes[index]]
            order = torch.randperm(len(images), generator=self.generator)
            support.append(images[order[: self.shots]])
            query.append(images[order[self.shots: self.shots + self.queries]])

        def labelled(groups: list[torch.Tensor]) -> Split:
            labels = torch.arange(self.ways).repeat_interleave(len(groups[0]))
            return torch.cat(groups), labels

        return {"support": labelled(support), "query": labelled(query)}

    def sample_stacked(self, tasks: int) -> dict[str, Split]:
        """``tasks`` tasks with every tensor stacked on a leading task dimension."""
        drawn = [self.sample() for _ in range(tasks)]
        return {part: (torch.stack([t[part][0] for t in drawn]),
                       torch.stack([t[part][1] for t in drawn]))
                for part in ("support", "query")}


def mlp(ways: int, hidden: int = 64) -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, ways))


def proximal(module: nn.Module, anchor: nn.Module) -> torch.Tensor:
    """``||w - theta||^2`` summed over all parameters."""
    return sum((w - a).pow(2).sum() for w, a in zip(module.parameters(), anchor.parameters()))


# -- iMAML: the two levels -------------------------------------------------------------------
class IMAMLInner(ImplicitProblem):
    """Lower level: one task's support CE, kept near theta by the proximal term."""

    def __init__(self, *args, sampler: TaskSampler, lam: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampler, self.lam = sampler, lam

    def on_inner_loop_start(self):
        # a new task per unroll window, adapted from the current meta-parameters
        self.task = self.sampler.sample()
        self.module.load_state_dict(self.meta.module.state_dict())

    def get_batch(self):
        return self.task["support"]

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.module(x), y) + self.lam / 2 * proximal(self.module,
                                                                             self.meta.module)


class IMAMLMeta(ImplicitProblem):
    """Upper level: the adapted model's CE on the same task's query set."""

    def get_batch(self):
        return self.inner.task["query"]

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.inner(x), y)


# -- MAML: the two levels --------------------------------------------------------------------
class MAMLInner(TaskBatchedProblem):
    """Lower level: each task of the window adapted from theta by differentiable steps."""

    def __init__(self, *args, sampler: TaskSampler, tasks: int, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.sampler, self.tasks = sampler, tasks

    def initial_parameters(self):
        return self.meta.module

    def on_inner_loop_start(self):
        self.batch = self.sampler.sample_stacked(self.tasks)

    def get_batch(self):
        return self.batch["support"]

    def training_step(self, batch):  # written for ONE task; vmapped over the window's tasks
        x, y = batch
        return F.cross_entropy(self.module(x), y)


class MAMLMeta(ImplicitProblem):
    """Upper level: query CE of every adapted task, through the unrolled inner steps."""

    def get_batch(self):
        return self.inner.batch["query"]

    def training_step(self, batch):
        x, y = batch  # [tasks, n, 64], [tasks, n]
        return F.cross_entropy(self.inner(x).flatten(0, 1), y.flatten())


# -- scoring: adapt on the support set, classify the query set -------------------------------
def adapt_and_score(init: nn.Module, tasks: list[dict[str, Split]], *, steps: int, lr: float,
                    lam: float = 0.0) -> list[float]:
    """Per task: a copy of ``init`` trained by ``steps`` SGD steps on the support CE (plus
    ``lam/2 * ||w - init||^2``), then its query accuracy."""
    accuracies = []
    for task in tasks:
        model = copy.deepcopy(init)
        optimizer = torch.optim.SGD(model.parameters(), lr=lr)
        (xs, ys), (xq, yq) = task["support"], task["query"]
        for _ in range(steps):
            loss = F.cross_entropy(model(xs), ys)
            if lam:
                loss = loss + lam / 2 * proximal(model, init)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            accuracies.append((model(xq).argmax(1) == yq).float().mean().item())
    return accuracies


class FewShotEngine(Engine):
    """Adds `validation()`: meta-test accuracy of the current theta on a few fixed tasks
    (for the learning curve only; nothing is selected on it)."""

    def __init__(self, *args, curve_tasks: list, adapt: dict, tasks_per_step: float,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.curve_tasks, self.adapt, self.tasks_per_step = curve_tasks, adapt, tasks_per_step
        self.curve: list[tuple[float, float]] = []

    def validation(self):
        acc = statistics.fmean(adapt_and_score(self.meta.module, self.curve_tasks,
                                               **self.adapt))
        self.curve.append((self.global_step * self.tasks_per_step, acc))
        return {"acc": acc}
