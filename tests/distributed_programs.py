"""The programs and launch machinery that tests/test_distributed.py and tests/test_fsdp.py share.

The programs are built the same way by the 2-rank workers and by the single-process
references (one process on the union of the ranks' batches): a bilevel reweighted
regression for every hypergradient method (`bilevel`), a three-level chain whose path hops
twice (`chain3`), MAML over a `TaskBatchedProblem` (`maml`) and `bilevel` under mixed
precision (`mixed`). `launch` starts the ranks as torchrun does, each re-running the
calling test file as a script (whose folder, tests/, is then first on sys.path, so this
module imports there as it does under pytest).
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.hypergradient import score_function_loss
from betty.problems import ImplicitProblem, IterativeProblem, TaskBatchedProblem
from betty.problems.update_jacobian import HeadScaling

WORLD = 2
LOCAL_BATCH = 4
DIM = 4
ITERS = 8  # global steps; the lowers unroll 2 steps, so the uppers step 4 times
HALF = 4  # where checkpoints are saved and resumed
TOL = 1e-5


# -- the programs (shared by the workers and the single-process references) ------------------
def dataset(seed: int, n: int) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, DIM, generator=gen)
    y = x @ torch.randn(DIM, generator=gen) + 0.1 * torch.randn(n, generator=gen)
    return TensorDataset(x, y)


def loader(seed: int, n: int, batch: int) -> DataLoader:
    return DataLoader(dataset(seed, n), batch_size=batch, shuffle=False)


class Decay(torch.nn.Module):
    """The upper's parameters: sample weights ``2 sigmoid(x . scale)``, a log weight decay
    per feature and one for the bias."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.full((DIM,), 0.1))
        self.log_lam = torch.nn.Parameter(torch.full((DIM,), -1.0))
        self.log_bias = torch.nn.Parameter(torch.tensor([-1.0]))


def lower_loss(problem: Any, batch: Any, decay: Decay) -> torch.Tensor:
    """Reweighted log-cosh regression plus weight decay: not quadratic in the weights (so a
    probe's radius matters) and with mixed derivatives that depend on the batch (so each
    rank's hop differs from the global one unless the ranks average where they must)."""
    x, y = batch
    model = problem.module
    if problem.config.type == "reinforce":
        # the weights are drawn: 1 + s, s ~ Bernoulli(sigmoid(x . scale)), with uniforms fixed
        # per example (the same on any rank); the leave-one-out baseline spans every rank
        logits = x @ decay.scale
        s = (torch.frac(x[:, 0].abs() * 997) < torch.sigmoid(logits).detach()).to(x.dtype)
        log_prob = s * F.logsigmoid(logits) + (1 - s) * F.logsigmoid(-logits)
        per_sample = (1 + s) * torch.log(torch.cosh(model(x).squeeze(-1) - y))
        fit = score_function_loss(per_sample, log_prob)
    else:
        weights = 2 * torch.sigmoid(x @ decay.scale)
        fit = (weights * torch.log(torch.cosh(model(x).squeeze(-1) - y))).mean()
    penalty = (decay.log_lam.exp() * model.weight.squeeze(0) ** 2).sum() + \
        decay.log_bias.exp() * (model.bias**2).sum()
    return fit + 0.5 * penalty


class Inner(ImplicitProblem):
    def training_step(self, batch: Any) -> torch.Tensor:
        fail = (self.cfg or {}).get("fail_on_rank")
        if fail is not None and self.engine.strategy.rank == fail and self.count == 3:
            raise ValueError(f"boom on rank {fail}")
        return lower_loss(self, batch, self.outer.module)


class IterInner(IterativeProblem):
    def training_step(self, batch: Any) -> torch.Tensor:
        return lower_loss(self, batch, self.outer.module)


class Outer(ImplicitProblem):
    def training_step(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.inner(x).squeeze(-1), y)


class Validating(Engine):
    """Validation that records where it ran and gets worse each time (early stopping)."""

    ran: list[int]

    def validation(self) -> dict[str, Any]:
        self.ran.append(self.global_step)
        return {"loss": float(self.global_step)}


def bilevel(method: str, strategy: str, batch: int, *, iters: int = ITERS,
            engine_type: type[Engine] = Engine, extra: dict[str, Any] | None = None,
            **engine_kwargs: Any) -> Engine:
    torch.manual_seed(0)
    reverse = method == "reverse"
    settings = {"darts": {}, "sama": {}, "reverse": {}, "reinforce": {},
                "neumann": {"neumann_iterations": 3, "neumann_alpha": 0.2},
                "cg": {"cg_iterations": 3},
                "nystrom": {"nystrom_rank": 3},  # default seed: one stream per hop
                "f2sa": {"f2sa_steps": 3, "f2sa_lr": 0.2},
                "cg-warm": {"cg_iterations": 1, "warm_start": True}}[method]
    model = torch.nn.Linear(DIM, 1)
    opt = torch.optim.Adam(model.parameters(), lr=0.05) if method == "sama" else \
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    kind = IterInner if reverse else Inner
    inner = kind("inner", Config(type="darts" if reverse else method.split("-")[0],
                                 unroll_steps=2,
                                 **settings), model, opt,
                 train_data_loader=loader(1, 48, batch), extra_config=extra)
    decay = Decay()
    outer_opt = torch.optim.Adam(decay.parameters(), lr=0.05)
    outer = Outer("outer", Config(first_order=not reverse), decay, outer_opt,
                  torch.optim.lr_scheduler.StepLR(outer_opt, step_size=2, gamma=0.5),
                  train_data_loader=loader(2, 24, batch))
    config = EngineConfig(train_iters=iters, strategy=strategy, distributed_timeout=60,
                          progress_bar=False, **engine_kwargs)
    return engine_type([outer, inner], config, {"u2l": {outer: [inner]},
                                                "l2u": {inner: [outer]}})


class Bottom(ImplicitProblem):
    def training_step(self, batch: Any) -> torch.Tensor:
        return lower_loss(self, batch, self.top.module)


class Middle(ImplicitProblem):
    def training_step(self, batch: Any) -> torch.Tensor:
        x, _ = batch
        return F.mse_loss(self.module(x), self.bottom(x)) + 0.05 * (self.module.weight**2).sum()


class Top(ImplicitProblem):
    def training_step(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.middle(x).squeeze(-1), y)


def chain3(strategy: str, batch: int) -> Engine:
    """Top's parameters enter Bottom's loss only: Top's one path hops through Middle
    (darts), then through Bottom (cg), so the vector between the hops must be global."""
    torch.manual_seed(0)
    bottom_model, middle_model, decay = torch.nn.Linear(DIM, 1), torch.nn.Linear(DIM, 1), Decay()
    bottom = Bottom("bottom", Config(type="cg", cg_iterations=2), bottom_model,
                    torch.optim.SGD(bottom_model.parameters(), lr=0.1),
                    train_data_loader=loader(3, 48, batch))
    middle = Middle("middle", Config(type="darts"), middle_model,
                    torch.optim.SGD(middle_model.parameters(), lr=0.1),
                    train_data_loader=loader(4, 32, batch))
    top = Top("top", Config(), decay, torch.optim.Adam(decay.parameters(), lr=0.05),
              train_data_loader=loader(5, 24, batch))
    config = EngineConfig(train_iters=ITERS, strategy=strategy, distributed_timeout=60,
                          progress_bar=False)
    return Engine([top, middle, bottom], config,
                  {"u2l": {top: [bottom]}, "l2u": {bottom: [middle], middle: [top]}})


# MAML: T tasks per meta-step, each rank adapting its own T/W of them (strided, as
# DistributedSampler would shard a loader of tasks)
TASKS, SHOTS, INNER_STEPS, META_STEPS = 4, 5, 2, 3
TOL_F64 = 1e-10


def maml_tasks(meta_step: int) -> tuple[torch.Tensor, ...]:
    """Meta-step ``meta_step``'s T sinusoid tasks, the same on every rank: support and query
    sets ``(x_s, y_s, x_q, y_q)``, each ``[T, SHOTS, 1]`` in float64."""
    gen = torch.Generator().manual_seed(100 + meta_step)
    x = torch.rand(TASKS, 2 * SHOTS, 1, generator=gen, dtype=torch.float64) * 4 - 2
    amp, phase = (torch.rand(2, TASKS, 1, 1, generator=gen, dtype=torch.float64) * 2 + 0.5)
    y = amp * torch.sin(x + phase)
    return x[:, :SHOTS], y[:, :SHOTS], x[:, SHOTS:], y[:, SHOTS:]


class TaskInner(TaskBatchedProblem):
    def initial_parameters(self) -> torch.nn.Module:
        return self.meta.module

    def on_inner_loop_start(self) -> None:
        strategy = self.engine.strategy
        everything = maml_tasks(self.windows)
        self.windows += 1
        self.tasks = tuple(t[strategy.rank::strategy.world_size] for t in everything)

    def get_batch(self) -> Any:
        return self.tasks[0], self.tasks[1]

    def training_step(self, batch: Any) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.module(x), y)


class TaskMeta(ImplicitProblem):
    def get_batch(self) -> Any:
        return self.inner.tasks[2], self.inner.tasks[3]

    def training_step(self, batch: Any) -> torch.Tensor:
        x, y = batch  # [T/W, SHOTS, 1]: the mean over this rank's tasks
        return F.mse_loss(self.inner(x), y)


def maml(strategy: str) -> Engine:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(),
                              torch.nn.Linear(8, 1)).double()
    template = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(),
                                   torch.nn.Linear(8, 1)).double()
    meta = TaskMeta("meta", Config(first_order=False), net,
                    torch.optim.Adam(net.parameters(), lr=0.02))
    inner = TaskInner("inner", Config(unroll_steps=INNER_STEPS), template,
                      torch.optim.SGD(template.parameters(), lr=0.1, momentum=0.9))
    inner.windows = 0
    config = EngineConfig(train_iters=INNER_STEPS * META_STEPS, strategy=strategy,
                          distributed_timeout=60, progress_bar=False)
    return Engine([meta, inner], config, {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}})


def maml_results(engine: Engine) -> dict[str, torch.Tensor]:
    """The meta-parameters, and the last window's adapted parameters of this rank's tasks
    (one row per task)."""
    inner = next(p for p in engine.problems if p.name == "inner")
    adapted = [a.detach().reshape(a.shape[0], -1) for a in inner.adapted_parameters().values()]
    return {"meta": parameters(engine)["meta"], "adapted": torch.cat(adapted, 1)}


def build(method: str, strategy: str, batch: int, **kwargs: Any) -> Engine:
    return chain3(strategy, batch) if method == "chain3" else \
        bilevel(method, strategy, batch, **kwargs)


def parameters(engine: Engine) -> dict[str, torch.Tensor]:
    """Every problem's parameters, flattened, as full tensors."""
    out = {}
    for problem in engine.problems:
        assert problem.module is not None
        tensors = [p.full_tensor() if hasattr(p, "full_tensor") else p
                   for p in problem.module.parameters()]
        out[problem.name] = torch.cat([t.detach().reshape(-1) for t in tensors])
    return out


def mixed(method: str, precision: str, strategy: str, batch: int) -> Engine:
    """`bilevel`'s program with both problems under ``precision``; the upper's optimizer is
    AdamW with weight decay (FSDP rebuilds it over the shards from its param groups)."""
    torch.manual_seed(0)
    model, decay = torch.nn.Linear(DIM, 1), Decay()
    settings = {"cg_iterations": 3} if method == "cg" else {}
    inner = Inner("inner", Config(type=method, unroll_steps=2, precision=precision,
                                  **settings),
                  model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                  train_data_loader=loader(1, 48, batch))
    outer_opt = torch.optim.AdamW(decay.parameters(), lr=0.05, weight_decay=0.1)
    outer = Outer("outer", Config(precision=precision), decay, outer_opt,
                  train_data_loader=loader(2, 24, batch))
    config = EngineConfig(train_iters=ITERS, strategy=strategy, distributed_timeout=60,
                          progress_bar=False)
    return Engine([outer, inner], config, {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})


# -- running and comparing -------------------------------------------------------------------
def trained_engine(engine: Engine) -> Engine:
    engine.run()
    return engine


def trained_counting_fused(engine: Engine) -> tuple[Engine, int]:
    """Train, counting the upper backwards that formed sama's ``P v`` as each gradient
    arrived (`HeadScaling`: where each rank holds the lower optimizer's whole state)."""
    fused, attach = [], HeadScaling.attach
    HeadScaling.attach = lambda self, head: (fused.append(1), attach(self, head))[1]
    try:
        return trained_engine(engine), len(fused)
    finally:
        HeadScaling.attach = attach


def trained(engine: Engine) -> dict[str, Any]:
    return parameters(trained_engine(engine))


@functools.cache
def reference(method: str) -> dict[str, torch.Tensor]:
    """One process on the union batch."""
    return parameters(trained_engine(build(method, "default", WORLD * LOCAL_BATCH)))


def assert_close(got: dict[str, Any], want: dict[str, torch.Tensor], what: str) -> None:
    for name, value in want.items():
        err = (got[name] - value).abs().max().item()
        assert err <= TOL, f"{what}: problem '{name}' differs from the reference by {err:.2e}"


def local_sizes(engine: Engine) -> torch.Tensor:
    """Elements this rank stores: of the parameters, of the optimizers' state, and of the hop
    memories (warm starts)."""
    def numel(t: Any) -> int:
        return t.to_local().numel() if hasattr(t, "to_local") else t.numel()

    def memory_numel(value: Any) -> int:  # a hop memory entry: whole tensors or a shard
        if hasattr(value, "local"):
            return value.local.numel()
        return sum(t.numel() for t in value) if isinstance(value, list) else 0

    params = sum(numel(p) for p in engine.problems for p in p.module.parameters())
    memory = sum(memory_numel(v) for problem in engine.problems
                 for m in problem.hop_memories().values() for v in m.values())
    state = 0
    for problem in engine.problems:
        optimizer = problem.optimizer
        local = getattr(optimizer, "optim", optimizer)  # ZeRO: this rank's optimizer
        state += sum(numel(v) for s in local.state.values() for k, v in s.items()
                     if isinstance(v, torch.Tensor) and k != "step")
    return torch.tensor([params, state, memory])


# -- launching -------------------------------------------------------------------------------
def fsdp_supported() -> tuple[bool, str]:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        return False, f"this PyTorch has no FSDP2 fully_shard ({err})"
    return True, ""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(script: str, job: str, folder: Path, deadline_s: float, world: int = WORLD
           ) -> list[int]:
    """Start ``world`` ranks running ``script job folder`` as torchrun would (gloo on the
    loopback); kill them all at the deadline. Each rank logs to ``<job>.rank<r>.log``."""
    port = free_port()
    procs = []
    for rank in range(world):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONFAULTHANDLER": "1"}
        log = open(folder / f"{job}.rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen([sys.executable, script, job, str(folder)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    end = time.monotonic() + deadline_s
    try:
        return [proc.wait(timeout=max(end - time.monotonic(), 1)) for proc, _ in procs]
    except subprocess.TimeoutExpired:
        pytest.fail(f"launch {job!r} did not finish within {deadline_s} s:\n"
                    + logs(folder, job, world))
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()


def logs(folder: Path, job: str, world: int = WORLD) -> str:
    """The end of every rank's log of ``job``."""
    return "\n".join(f"--- rank {r}\n" + (folder / f"{job}.rank{r}.log").read_text()[-4000:]
                     for r in range(world))
