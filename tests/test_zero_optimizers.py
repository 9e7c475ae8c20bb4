"""ZeRO (``strategy='zero'``) with every optimizer `betty.optim` knows: SGD (momentum), Adam,
AdamW, RMSprop and Adagrad.

ZeRO rebuilds each `ImplicitProblem`'s optimizer as a `ZeroRedundancyOptimizer` of the same
class; it once passed ``optimizer.defaults`` to the class's constructor, which AdamW rejects
under recent PyTorch (``decoupled_weight_decay``). Here two gloo processes train a bilevel
program whose both levels use the optimizer under test, and after 6 global steps their
parameters must equal one process's on the union of the two ranks' batches (a DataLoader with
twice the batch size and no shuffling: rank r reads samples r, r+2, ...) to 1e-5, with the
optimizer's hyperparameters (per-group learning rates included) kept. Run a worker by hand:
``RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500
python tests/test_zero_optimizers.py all <folder>``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from distributed_programs import launch, logs
from torch.utils.data import DataLoader, TensorDataset

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem

WORLD, LOCAL_BATCH, DIM, ITERS, TOL = 2, 4, 3, 6, 1e-5
DEADLINE_S = 150
OPTIMIZERS: dict[str, Any] = {
    "SGD": lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-3),
    "Adam": lambda groups: torch.optim.Adam(groups, lr=0.05, betas=(0.8, 0.99)),
    "AdamW": lambda groups: torch.optim.AdamW(groups, lr=0.05, weight_decay=0.1),
    "RMSprop": lambda groups: torch.optim.RMSprop(groups, lr=0.01, alpha=0.9, momentum=0.5),
    "Adagrad": lambda groups: torch.optim.Adagrad(groups, lr=0.1, lr_decay=0.01),
}

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]


def loader(seed: int, n: int, batch: int) -> DataLoader:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen)
    y = x @ torch.randn(DIM, generator=gen) + 0.1 * torch.randn(n, generator=gen)
    return DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=False)


class Inner(ImplicitProblem):
    def training_step(self, batch: Any) -> torch.Tensor:
        x, y = batch
        weights = 2 * torch.sigmoid(x @ self.outer.module.scale)
        fit = (weights * (self.module(x).squeeze(-1) - y) ** 2).mean()
        return fit + 0.5 * (self.outer.module.log_lam.exp() * self.module.weight ** 2).sum()


class Outer(ImplicitProblem):
    def training_step(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.inner(x).squeeze(-1), y)


def program(name: str, strategy: str, batch: int) -> Engine:
    torch.manual_seed(0)
    model = torch.nn.Linear(DIM, 1)
    # two param groups, the bias at a tenth of the learning rate: groups must survive
    inner_opt = OPTIMIZERS[name]([{"params": [model.weight]},
                                  {"params": [model.bias], "lr": 0.01}])
    hyper = torch.nn.Module()
    hyper.scale = torch.nn.Parameter(torch.full((DIM,), 0.1))
    hyper.log_lam = torch.nn.Parameter(torch.full((1, DIM), -1.0))
    inner = Inner("inner", Config(unroll_steps=2), model, inner_opt,
                  train_data_loader=loader(1, 48, batch))
    outer = Outer("outer", Config(), hyper, OPTIMIZERS[name](hyper.parameters()),
                  train_data_loader=loader(2, 24, batch))
    config = EngineConfig(train_iters=ITERS, strategy=strategy, distributed_timeout=60,
                          progress_bar=False)
    return Engine([outer, inner], config, {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})


def trained(name: str, strategy: str, batch: int) -> dict[str, Any]:
    engine = program(name, strategy, batch)
    engine.run()
    inner_opt = engine.inner.optimizer
    return {"inner": torch.cat([p.detach().flatten() for p in engine.inner.module.parameters()]),
            "outer": torch.cat([p.detach().flatten() for p in engine.outer.module.parameters()]),
            "class": type(getattr(inner_opt, "optim", inner_opt)).__name__,
            "wrapper": type(inner_opt).__name__,
            "lrs": [group["lr"] for group in inner_opt.param_groups]}


def worker(folder: Path) -> int:
    rank = int(os.environ["RANK"])
    for name in OPTIMIZERS:
        torch.save(trained(name, "zero", LOCAL_BATCH), folder / f"{name}.rank{rank}.pt")
    return 0


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("zero")
    codes = launch(__file__, "all", folder, DEADLINE_S, world=WORLD)
    assert codes == [0] * WORLD, logs(folder, "all", WORLD)
    return folder


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_zero_equals_one_process_on_union_batch(launched: Path, name: str) -> None:
    want = trained(name, "default", WORLD * LOCAL_BATCH)
    assert want["class"] == name and want["lrs"] == [want["lrs"][0], 0.01]
    for rank in range(WORLD):
        got = torch.load(launched / f"{name}.rank{rank}.pt", weights_only=True)
        assert got["wrapper"] == "ZeroRedundancyOptimizer" and got["class"] == name
        assert got["lrs"] == want["lrs"]
        for level in ("inner", "outer"):
            err = (got[level] - want[level]).abs().max().item()
            assert err <= TOL, f"{name}, rank {rank}, {level}: off by {err:.2e}"
    start = program(name, "default", WORLD * LOCAL_BATCH)
    initial = torch.cat([p.detach().flatten() for p in start.inner.module.parameters()])
    assert (want["inner"] - initial).abs().min().item() > 1e-4  # every parameter trained


if __name__ == "__main__":  # a launched rank: ``test_zero_optimizers.py <job> <folder>``
    sys.exit(worker(Path(sys.argv[2])))
