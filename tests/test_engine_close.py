"""`Engine.close()`: the data loaders' worker processes exit at once, and a later `run()`
continues exactly where the closed one stopped (the same batches, mid-epoch or at an epoch's
end, the same random stream), bit for bit against a run never closed.

Why it exists: a DataLoader iterator that dies inside a reference cycle (an engine and its
problems refer to each other) is collected with its queues closed first, and torch then waits
5 s for each worker before killing it; with six loaders of six workers that stalled a process
for three minutes.
"""

from __future__ import annotations

import multiprocessing
import time

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem

pytestmark = pytest.mark.slow  # starts worker processes


class Lower(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        self.seen.append(y.clone())
        noise = 0.01 * torch.rand(x.shape)  # draws from torch's stream: order matters
        return ((self.module(x + noise).squeeze(-1) - y) ** 2).mean() \
            + self.upper.module.weight.sum() * self.module.weight.pow(2).sum()


class Upper(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return ((self.lower(x).squeeze(-1) - y) ** 2).mean()


def engine(workers: int) -> Engine:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(32, 3, generator=gen), torch.arange(32.0))
    loader = DataLoader(data, batch_size=4, shuffle=True, num_workers=workers,
                        generator=torch.Generator().manual_seed(2))
    lower_net, upper_net = torch.nn.Linear(3, 1), torch.nn.Linear(1, 1, bias=False)
    lower = Lower("lower", Config(type="darts"), lower_net,
                  torch.optim.SGD(lower_net.parameters(), lr=0.01), train_data_loader=loader)
    upper = Upper("upper", Config(), upper_net, torch.optim.SGD(upper_net.parameters(), lr=0.01),
                  train_data_loader=[(torch.randn(4, 3, generator=gen), torch.zeros(4))])
    lower.seen = []
    return Engine([upper, lower], EngineConfig(train_iters=0, progress_bar=False),
                  {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})


def run_to(e: Engine, step: int) -> None:
    e.config.train_iters = step
    e.run()


@pytest.mark.parametrize("stop", [3, 8], ids=["mid-epoch", "epoch-end"])
def test_close_frees_the_workers_and_run_continues_bit_for_bit(stop):
    straight = engine(workers=2)
    run_to(straight, 20)
    straight.close()
    closed = engine(workers=2)
    run_to(closed, stop)
    assert multiprocessing.active_children()  # the loader's workers
    start = time.monotonic()
    closed.close()
    while multiprocessing.active_children() and time.monotonic() - start < 4:
        time.sleep(0.05)
    assert not multiprocessing.active_children(), "workers still alive after close()"
    run_to(closed, 20)
    assert len(closed.lower.seen) == len(straight.lower.seen) >= 20  # darts re-evaluates it
    for a, b in zip(closed.lower.seen, straight.lower.seen):
        assert torch.equal(a, b)
    for name in ("lower", "upper"):
        for p, q in zip(getattr(closed, name).module.parameters(),
                        getattr(straight, name).module.parameters()):
            assert torch.equal(p, q), name
    closed.close()


def test_a_checkpoint_saved_after_close_resumes_bit_for_bit(tmp_path):
    """close() mid-epoch, then save: the checkpoint still records the loader as started at
    its position, so a fresh engine resumes the same batches."""
    straight = engine(workers=0)
    run_to(straight, 12)
    closed = engine(workers=2)
    run_to(closed, 5)
    closed.close()
    path = closed.save_checkpoint(tmp_path / "closed.pt")
    resumed = engine(workers=2)
    resumed.load_checkpoint(path)
    run_to(resumed, 12)
    resumed.close()
    assert torch.equal(torch.cat(resumed.lower.seen),
                       torch.cat(straight.lower.seen[len(closed.lower.seen):]))
    for p, q in zip(resumed.lower.module.parameters(), straight.lower.module.parameters()):
        assert torch.equal(p, q)
