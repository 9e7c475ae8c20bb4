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
message. The programs (`bilevel`, `chain3`, `maml`), the reference and the launcher are in
`distributed_programs.py`, shared with `test_fsdp.py`. Run a worker by hand: ``RANK=0
WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1 MASTER_PORT=29500 python
tests/test_distributed.py all <folder>``.
"""

from __future__ import annotations

import functools
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from distributed_programs import (
    DIM,
    HALF,
    ITERS,
    LOCAL_BATCH,
    TOL_F64,
    WORLD,
    Validating,
    assert_close,
    bilevel,
    build,
    fsdp_supported,
    launch,
    local_sizes,
    logs,
    maml,
    maml_results,
    parameters,
    reference,
    trained_counting_fused,
    trained_engine,
)
from torch.utils.data import DataLoader, RandomSampler, TensorDataset
from torch.utils.data.distributed import DistributedSampler

from betty.configs import EngineConfig
from betty.distributed import PeerFailure, Strategy, make_strategy
from betty.distributed.group import pick_backend
from betty.distributed.sampling import shard_loader
from betty.errors import ConfigError
from betty.problems.data import BatchSource

LAUNCH_DEADLINE_S = 150
STRATEGIES = ["distributed", "zero", "fsdp"]
# reinforce: the lower's sample weights are drawn (score_function_loss, leave-one-out)
METHODS = ["darts", "sama", "neumann", "cg", "cg-warm", "nystrom", "reinforce", "f2sa", "reverse",
           "chain3"]

pytestmark = [pytest.mark.slow,  # every test launches gloo process groups
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available")]


# -- the worker: one rank of a launch --------------------------------------------------------
def scenarios(folder: Path) -> list[tuple[str, Any]]:
    """(name, function returning the results to save) for every run of the main launch."""
    runs: list[tuple[str, Any]] = []
    for strategy in STRATEGIES:
        if strategy == "fsdp" and not fsdp_supported()[0]:
            continue
        for method in METHODS:
            runs.append((f"{strategy}-{method}", functools.partial(_trained, strategy, method)))
    for strategy in ("distributed", "zero"):
        runs.append((f"{strategy}-maml",
                     lambda s=strategy: maml_results(trained_engine(maml(s)))))
    for strategy, method in (("distributed", "darts"), ("zero", "sama")):
        runs.append((f"save-{strategy}", functools.partial(_save_half, strategy, method, folder)))
        runs.append((f"resume-{strategy}", functools.partial(_resume, strategy, method, folder)))
    runs.append(("validation", _validation))
    runs.append(("autograd", _autograd))
    return runs


def _trained(strategy: str, method: str) -> dict[str, Any]:
    engine, fused = trained_counting_fused(build(method, strategy, LOCAL_BATCH))
    return {**parameters(engine), "local_sizes": local_sizes(engine), "fused": fused}


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


# -- the launch and its results --------------------------------------------------------------
@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("distributed")
    for method in ("darts", "sama"):  # the single-process checkpoints the ranks resume from
        engine = bilevel(method, "default", WORLD * LOCAL_BATCH, iters=HALF)
        engine.run()
        engine.save_checkpoint(folder / f"single-{method}-step{HALF}.pt")
    codes = launch(__file__, "all", folder, LAUNCH_DEADLINE_S)
    assert codes == [0] * WORLD, logs(folder, "all")
    return folder


def result(folder: Path, name: str, rank: int = 0) -> Any:
    path = folder / f"{name}.rank{rank}.pt"
    if not path.exists():
        pytest.skip(f"{name} did not run: {fsdp_supported()[1]}")
    return torch.load(path, weights_only=True)


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
    if method == "sama":  # P v formed in the backward where each rank holds the whole state
        assert (ranks[0]["fused"] > 0) == (strategy == "distributed"), ranks[0]["fused"]


@pytest.mark.parametrize("strategy", ["distributed", "zero"])
def test_task_batched_maml_sharded_by_task_equals_one_process_on_all_tasks(
        launched: Path, strategy: str) -> None:
    """Reference: one process adapting all T tasks (`maml('default')`). Rank r adapts tasks
    r, r+2, ...: its adapted parameters must be the reference's rows for those tasks (the
    inner per-task gradients are NOT averaged across ranks), and after 3 meta-steps both
    ranks' meta-parameters must equal the reference's (the meta-gradient IS averaged, to
    the mean over all T tasks), in float64 to 1e-10."""
    ranks = [result(launched, f"{strategy}-maml", r) for r in range(WORLD)]
    want = maml_results(trained_engine(maml("default")))
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
    codes = launch(__file__, f"fail-{failing}", tmp_path, deadline_s=60)
    assert time.monotonic() - started < 45, "the ranks waited for the collective timeout"
    assert codes == [1, 1], logs(tmp_path, f"fail-{failing}")
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
