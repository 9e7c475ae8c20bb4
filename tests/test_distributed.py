"""Distributed strategies (`betty.distributed`): 2 processes against 1 on the union batch.

Reference for exactness: the same program run by ONE process on the union of the two ranks'
batches (a DataLoader with twice the batch size: `DistributedSampler` without shuffling gives
rank r the samples r, r+2, ..., so the ranks' step-k batches together are exactly the
single process's step-k batch, and the mean loss of the union is the mean of the two local
means). After 8 global steps (4 outer steps, two of them across an epoch end of each
loader) the upper and lower parameters of both ranks must equal the reference's to 1e-5 in
float32, for darts, sama (lower Adam), neumann, cg, nystrom, reverse mode and a three-level chain
whose path hops twice, under strategy='distributed', 'zero' and (where this PyTorch's FSDP2
runs on gloo) 'fsdp'. MAML with a `TaskBatchedProblem` shards tasks instead of samples: each
rank adapts its own T/2 of the T tasks, and must end where one process adapting all T ends
(float64, 1e-10).

The two ranks are real processes launched as torchrun does (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR=127.0.0.1, MASTER_PORT; gloo on the loopback interface); each launch has a
deadline after which both are killed, so a hang fails the test instead of blocking CI. One
launch runs every scenario; a second checks that an error on one rank ends both with its
message. Run a worker by hand: ``RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1
MASTER_PORT=29500 python tests/test_distributed.py all <folder>``.
"""

from __future__ import annotations

import functools
import os
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.distributed import PeerFailure, Strategy, make_strategy
from betty.distributed.group import pick_backend
from betty.distributed.sampling import shard_loader
from betty.errors import ConfigError
from betty.hypergradient import score_function_loss
from betty.problems import ImplicitProblem, IterativeProblem, TaskBatchedProblem
from betty.problems.data import BatchSource

WORLD = 2
LOCAL_BATCH = 4
DIM = 4
ITERS = 8  # global steps; the lowers unroll 2 steps, so the uppers step 4 times
HALF = 4  # where checkpoints are saved and resumed
TOL = 1e-5
LAUNCH_DEADLINE_S = 150
STRATEGIES = ["distributed", "zero", "fsdp"]
# reinforce: the lower's sample weights are drawn (score_function_loss, leave-one-out)
METHODS = ["darts", "sama", "neumann", "cg", "cg-warm", "nystrom", "reinforce", "f2sa", "reverse",
           "chain3"]

pytestmark = [pytest.mark.slow,  # every test launches gloo process groups
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]


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


# -- the worker: one rank of a launch --------------------------------------------------------
def fsdp_supported() -> tuple[bool, str]:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as err:
        return False, f"this PyTorch has no FSDP2 fully_shard ({err})"
    return True, ""


def scenarios(folder: Path) -> list[tuple[str, Any]]:
    """(name, function returning the results to save) for every run of the main launch."""
    runs: list[tuple[str, Any]] = []
    for strategy in STRATEGIES:
        if strategy == "fsdp" and not fsdp_supported()[0]:
            continue
        for method in METHODS:
            runs.append((f"{strategy}-{method}", functools.partial(_trained, strategy, method)))
    for strategy in ("distributed", "zero"):
        runs.append((f"{strategy}-maml", lambda s=strategy: maml_results(_run(maml(s)))))
    for strategy, method in (("distributed", "darts"), ("zero", "sama")):
        runs.append((f"save-{strategy}", functools.partial(_save_half, strategy, method, folder)))
        runs.append((f"resume-{strategy}", functools.partial(_resume, strategy, method, folder)))
    runs.append(("validation", _validation))
    runs.append(("autograd", _autograd))
    return runs


def _run(engine: Engine) -> Engine:
    engine.run()
    return engine


def _trained(strategy: str, method: str) -> dict[str, Any]:
    engine = _run(build(method, strategy, LOCAL_BATCH))
    return {**parameters(engine), "local_sizes": local_sizes(engine)}


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


def _save_half(strategy: str, method: str, folder: Path) -> dict[str, Any]:
    engine = bilevel(method, strategy, LOCAL_BATCH, iters=HALF)
    engine.run()
    path = engine.save_checkpoint(folder / f"{strategy}-step{HALF}.pt")
    engine.config.train_iters = ITERS
    engine.run()
    return {"path": str(path), **parameters(engine)}


def _resume(strategy: str, method: str, folder: Path) -> dict[str, Any]:
    engine = bilevel(method, strategy, LOCAL_BATCH)
    engine.load_checkpoint(folder / f"single-{method}-step{HALF}.pt")
    engine.run()
    return parameters(engine)


def _validation() -> dict[str, Any]:
    engine = bilevel("darts", "distributed", LOCAL_BATCH, engine_type=Validating,
                     valid_step=2, early_stopping=True, early_stopping_tolerance=1)
    engine.ran = []
    engine.run()
    return {"ran": list(engine.ran), "global_step": engine.global_step,
            "stopped": engine.stopped_early}


def _autograd() -> dict[str, Any]:
    """d/dx_r of sum_s c_s * mean(x): the differentiable average's backward."""
    strategy = make_strategy(EngineConfig(strategy="distributed", distributed_timeout=60))
    x = torch.full((3,), float(strategy.rank + 1), requires_grad=True)
    c = torch.tensor([1.0, 2.0, 3.0]) * (strategy.rank + 1)
    (mean,) = strategy.all_average([x], differentiable=True)
    (grad,) = torch.autograd.grad((c * mean).sum(), x)
    return {"mean": mean.detach(), "grad": grad}


def worker(job: str, folder: Path) -> int:
    rank = int(os.environ["RANK"])
    # a scheduler left pointing at a replaced optimizer (ZeRO, FSDP) warns like this
    warnings.filterwarnings("error", message=".*optimizer.step\\(\\)")
    if job == "all":
        for name, run in scenarios(folder):
            torch.save(run(), folder / f"{name}.rank{rank}.pt")
        return 0
    fail_on = int(job.split("-")[1])  # "fail-<rank>"
    try:
        bilevel("darts", "distributed", LOCAL_BATCH, extra={"fail_on_rank": fail_on}).run()
    except BaseException as err:  # reported to the test, which checks the message
        (folder / f"error.rank{rank}.txt").write_text(f"{type(err).__name__}: {err}")
        return 1
    return 0


# -- launching -------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch(job: str, folder: Path, deadline_s: float = LAUNCH_DEADLINE_S) -> list[int]:
    """Start WORLD ranks of ``job`` as torchrun would; kill both at the deadline."""
    port = free_port()
    procs = []
    for rank in range(WORLD):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(WORLD),
               "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": str(WORLD),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
               "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "",
               "PYTHONFAULTHANDLER": "1"}
        log = open(folder / f"{job}.rank{rank}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((subprocess.Popen([sys.executable, __file__, job, str(folder)], env=env,
                                       stdout=log, stderr=subprocess.STDOUT), log))
    end = time.monotonic() + deadline_s
    codes = []
    try:
        for proc, _ in procs:
            codes.append(proc.wait(timeout=max(end - time.monotonic(), 1)))
    except subprocess.TimeoutExpired:
        logs = "\n".join((folder / f"{job}.rank{r}.log").read_text()[-3000:]
                         for r in range(WORLD))
        pytest.fail(f"launch {job!r} did not finish within {deadline_s} s:\n{logs}")
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    return codes


def _logs(folder: Path, job: str) -> str:
    return "\n".join(f"--- rank {r}\n" + (folder / f"{job}.rank{r}.log").read_text()[-4000:]
                     for r in range(WORLD))


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("distributed")
    for method in ("darts", "sama"):  # the single-process checkpoints the ranks resume from
        engine = bilevel(method, "default", WORLD * LOCAL_BATCH, iters=HALF)
        engine.run()
        engine.save_checkpoint(folder / f"single-{method}-step{HALF}.pt")
    codes = launch("all", folder)
    assert codes == [0] * WORLD, _logs(folder, "all")
    return folder


def result(folder: Path, name: str, rank: int = 0) -> Any:
    path = folder / f"{name}.rank{rank}.pt"
    if not path.exists():
        pytest.skip(f"{name} did not run: {fsdp_supported()[1]}")
    return torch.load(path, weights_only=True)


@functools.cache
def reference(method: str) -> dict[str, torch.Tensor]:
    """One process on the union batch."""
    return parameters(_run(build(method, "default", WORLD * LOCAL_BATCH)))


def assert_close(got: dict[str, Any], want: dict[str, torch.Tensor], what: str) -> None:
    for name, value in want.items():
        err = (got[name] - value).abs().max().item()
        assert err <= TOL, f"{what}: problem '{name}' differs from the reference by {err:.2e}"


# -- exactness -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_two_ranks_equal_one_process_on_union_batch(launched: Path, strategy: str,
                                                    method: str) -> None:
    """Reference: `reference(method)`, one process on the union batch. Both ranks end with
    the same parameters (bit for bit) and they equal the reference to 1e-5."""
    ranks = [result(launched, f"{strategy}-{method}", r) for r in range(WORLD)]
    start = parameters(build(method, "default", WORLD * LOCAL_BATCH))
    for name in start:
        assert torch.equal(ranks[0][name], ranks[1][name]), f"ranks disagree on {name}"
    moved = {n: (ranks[0][n] - start[n]).abs().max().item() for n in start}
    assert all(m > 1e-3 for m in moved.values()), f"a level did not train: {moved}"
    assert_close(ranks[0], reference(method), f"{strategy}/{method}")


@pytest.mark.parametrize("strategy", ["distributed", "zero"])
def test_task_batched_maml_sharded_by_task_equals_one_process_on_all_tasks(
        launched: Path, strategy: str) -> None:
    """Reference: one process adapting all T tasks (`maml('default')`). Rank r adapts tasks
    r, r+2, ...: its adapted parameters must be the reference's rows for those tasks (the
    inner per-task gradients are NOT averaged across ranks), and after 3 meta-steps both
    ranks' meta-parameters must equal the reference's (the meta-gradient IS averaged, to
    the mean over all T tasks), in float64 to 1e-10."""
    ranks = [result(launched, f"{strategy}-maml", r) for r in range(WORLD)]
    want = maml_results(_run(maml("default")))
    start = parameters(maml("default"))["meta"]
    assert (want["meta"] - start).abs().max() > 1e-3, "the meta-parameters did not train"
    assert torch.equal(ranks[0]["meta"], ranks[1]["meta"]), "ranks disagree on theta"
    for rank, got in enumerate(ranks):
        err = (got["meta"] - want["meta"]).abs().max().item()
        assert err <= TOL_F64, f"{strategy}, rank {rank}: theta differs by {err:.2e}"
        rows = want["adapted"][rank::WORLD]
        err = (got["adapted"] - rows).abs().max().item()
        assert got["adapted"].shape == rows.shape and err <= TOL_F64, \
            f"{strategy}, rank {rank}: adapted tasks differ from the reference's by {err:.2e}"


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_what_each_rank_stores(launched: Path, strategy: str) -> None:
    """'distributed' replicates parameters and optimizer state; 'zero' splits the state
    between the ranks; 'fsdp' splits both."""
    full = result(launched, "distributed-darts")["local_sizes"][:2]
    sizes = [result(launched, f"{strategy}-darts", r)["local_sizes"][:2] for r in range(WORLD)]
    total = sizes[0] + sizes[1]
    if strategy == "distributed":
        assert torch.equal(sizes[0], full) and torch.equal(sizes[1], full)
    if strategy == "zero":
        assert sizes[0][0] == sizes[1][0] == full[0] and total[1] == full[1]
        assert sizes[0][1] < full[1] and sizes[1][1] < full[1]
    if strategy == "fsdp":
        assert torch.equal(total, full) and (sizes[0] < full).all() and (sizes[1] < full).all()


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_warm_start_memory_is_kept_like_the_parameters(launched: Path, strategy: str) -> None:
    """cg with warm_start: the solution kept between outer steps (one vector the size of the
    lower's parameters) is whole on every rank where the parameters are ('distributed',
    'zero'), and split between the ranks under 'fsdp' (each rank half of it, rounded up)."""
    full = result(launched, "distributed-cg-warm")["local_sizes"][2]
    sizes = [result(launched, f"{strategy}-cg-warm", r)["local_sizes"][2] for r in range(WORLD)]
    assert full == DIM + 1  # the inner Linear(DIM, 1): weight and bias
    if strategy == "fsdp":
        assert sizes == [-(-full // WORLD)] * WORLD
    else:
        assert sizes == [full] * WORLD


def test_differentiable_average_backward_averages_the_upstream_gradients(launched: Path
                                                                         ) -> None:
    """y = mean_r x_r, loss_r = <c_r, y>: dloss/dx_r summed over ranks' losses is
    mean_r c_r on every rank (c_0 = [1,2,3], c_1 = [2,4,6])."""
    for rank in range(WORLD):
        got = result(launched, "autograd", rank)
        assert torch.allclose(got["mean"], torch.full((3,), 1.5))
        assert torch.allclose(got["grad"], torch.tensor([1.5, 3.0, 4.5]))


# -- rank 0 validates, logs and writes; checkpoints cross the process count ------------------
def test_validation_runs_on_rank_0_and_early_stopping_is_common(launched: Path) -> None:
    rank0, rank1 = (result(launched, "validation", r) for r in range(WORLD))
    assert rank0["ran"] == [2, 4] and rank1["ran"] == []
    assert rank0["global_step"] == rank1["global_step"] == 4
    assert rank0["stopped"] and rank1["stopped"]


@pytest.mark.parametrize("strategy,method", [("distributed", "darts"), ("zero", "sama")])
def test_checkpoint_saved_by_ranks_resumes_in_one_process(launched: Path, strategy: str,
                                                           method: str) -> None:
    """Reference: the uninterrupted single-process run. The checkpoint the 2-rank run saved
    at step 4 (ZeRO: optimizer state gathered on rank 0), resumed by one process on the
    union batch, ends where the reference ends."""
    saved = result(launched, f"save-{strategy}")
    assert_close(saved, reference(method), f"{strategy} run around its checkpoint")
    engine = bilevel(method, "default", WORLD * LOCAL_BATCH)
    engine.load_checkpoint(saved["path"])
    assert engine.global_step == HALF
    engine.run()
    assert_close(parameters(engine), reference(method), f"{strategy} checkpoint, 1 process")


@pytest.mark.parametrize("strategy,method", [("distributed", "darts"), ("zero", "sama")])
def test_single_process_checkpoint_resumes_on_two_ranks(launched: Path, strategy: str,
                                                        method: str) -> None:
    for rank in range(WORLD):
        assert_close(result(launched, f"resume-{strategy}", rank), reference(method),
                     f"1-process checkpoint resumed under {strategy}, rank {rank}")


# -- an error on one rank ends all ranks with its message ------------------------------------
@pytest.mark.parametrize("failing", [0, 1])
def test_error_on_one_rank_ends_every_rank_with_its_message(tmp_path: Path, failing: int
                                                            ) -> None:
    """Rank ``failing`` raises in its third local step while the other waits in a
    collective; both must exit (well before the 60 s collective timeout) with the message.
    Rank 0 hosts the store the message travels through, so both directions are checked."""
    started = time.monotonic()
    codes = launch(f"fail-{failing}", tmp_path, deadline_s=60)
    assert time.monotonic() - started < 45, "the ranks waited for the collective timeout"
    assert codes == [1, 1], _logs(tmp_path, f"fail-{failing}")
    errors = [(tmp_path / f"error.rank{r}.txt").read_text() for r in range(WORLD)]
    assert errors[failing] == f"ValueError: boom on rank {failing}"
    other = errors[1 - failing]
    assert other.startswith(PeerFailure.__name__), other
    assert f"rank {failing}: ValueError: boom on rank {failing}" in other


# -- sharding data (no process group needed) -------------------------------------------------
class Rank(Strategy):
    """A strategy that only says which rank it is (for sharding data in one process)."""

    name = "distributed"

    def __init__(self, rank: int, world_size: int) -> None:
        super().__init__()
        self.rank, self.world_size = rank, world_size


def epoch(data: DataLoader) -> list[int]:
    return [int(i) for batch in data for i in batch[0]]


@pytest.mark.parametrize("n", [12, 13])
@pytest.mark.parametrize("shuffle", [False, True])
def test_shards_cover_each_epoch_once_with_equal_batch_counts(n: int, shuffle: bool) -> None:
    """Reference: DistributedSampler semantics. Ranks get disjoint shards of equal length
    whose union is the dataset (13 samples: one sample repeated to fill the last round);
    each epoch ``set_epoch`` reshuffles, identically on every rank."""
    data = DataLoader(TensorDataset(torch.arange(n)), batch_size=2, shuffle=shuffle,
                      generator=torch.Generator().manual_seed(7))
    shards = [shard_loader(data, Rank(r, WORLD), owner="p") for r in range(WORLD)]
    assert all(isinstance(s.sampler, DistributedSampler) for s in shards)
    firsts = [epoch(s) for s in shards]
    assert len(firsts[0]) == len(firsts[1]) == -(-n // WORLD)
    assert len(shards[0]) == len(shards[1])
    union = sorted(firsts[0] + firsts[1])
    assert set(union) == set(range(n)) and len(union) == n + n % WORLD
    if n % WORLD == 0:
        assert not set(firsts[0]) & set(firsts[1])
    for s in shards:
        s.sampler.set_epoch(1)
    seconds = [epoch(s) for s in shards]
    assert set(seconds[0] + seconds[1]) == set(range(n))
    assert len(seconds[0]) == len(seconds[1]) == len(firsts[0])
    assert (seconds != firsts) == shuffle


def test_batch_source_sets_the_epoch_at_each_restart() -> None:
    shard = shard_loader(DataLoader(TensorDataset(torch.arange(8)), batch_size=2,
                                    shuffle=True), Rank(1, WORLD), owner="p")
    source = BatchSource("p", shard, lambda: None)
    for _ in range(5):  # 2 batches per epoch: the fifth batch is in epoch 2
        source.next_batch()
    assert shard.sampler.epoch == 2


def test_users_own_distributed_sampler_and_non_loaders_are_kept() -> None:
    ds = TensorDataset(torch.arange(8))
    own = DataLoader(ds, batch_size=2, sampler=DistributedSampler(ds, num_replicas=2, rank=1))
    assert shard_loader(own, Rank(0, WORLD), owner="p") is own
    batches = [torch.zeros(2)]
    assert shard_loader(batches, Rank(0, WORLD), owner="p") is batches


def test_custom_sampler_is_an_error_that_names_the_fix() -> None:
    ds = TensorDataset(torch.arange(8))
    custom = DataLoader(ds, sampler=RandomSampler(ds, replacement=True, num_samples=4))
    with pytest.raises(ConfigError, match="problem 'inner'.*DistributedSampler"):
        shard_loader(custom, Rank(0, WORLD), owner="inner")


# -- configuration ---------------------------------------------------------------------------
def test_distributed_strategy_without_torchrun_names_the_launcher(
        monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    with pytest.raises(ConfigError, match="torchrun --nproc_per_node"):
        bilevel("darts", "distributed", LOCAL_BATCH)


def test_nccl_falls_back_to_gloo_on_cpu() -> None:
    assert pick_backend("nccl", torch.device("cpu")) == "gloo"
    assert pick_backend("nccl", torch.device("cuda", 0)) == "nccl"
    assert pick_backend("gloo", torch.device("cuda", 0)) == "gloo"


def test_single_process_strategy_is_the_identity() -> None:
    engine = bilevel("darts", "default", LOCAL_BATCH, iters=1)
    strategy = engine.strategy
    assert strategy.is_main and strategy.world_size == 1
    t = [torch.ones(2)]
    assert strategy.all_average(t)[0] is t[0]
    assert strategy.average_optional([None, t[0]]) == [None, t[0]]


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], Path(sys.argv[2])))
