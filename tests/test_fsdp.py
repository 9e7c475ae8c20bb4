"""strategy='fsdp' (FSDP2) beyond plain training: sharded checkpoints, mixed precision, SAMA
and reverse mode, each on 2 gloo processes against 1 process on the union batch.

The programs, the reference (one process on the union of the ranks' batches, which a
non-shuffling `DistributedSampler` splits strided) and the exactness argument are those of
`test_distributed.py` (shared through `distributed_programs.py`); this file adds the scenarios
that strategy used to refuse. One launch of 2 ranks runs every scenario; the single-process
checkpoint it resumes from is written by the test process first, and the sharded checkpoint
it writes is resumed here by one process.

Run a worker by hand: ``RANK=0 WORLD_SIZE=1 LOCAL_RANK=0 MASTER_ADDR=127.0.0.1
MASTER_PORT=29500 python tests/test_fsdp.py all <folder>``.
"""

from __future__ import annotations

import functools
import os
import sys
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
    TOL,
    WORLD,
    assert_close,
    bilevel,
    fsdp_supported,
    launch,
    logs,
    maml,
    maml_results,
    mixed,
    parameters,
    reference,
    trained,
    trained_engine,
)

from betty import Engine, checkpoint
from betty.checkpoint import CheckpointError

LAUNCH_DEADLINE_S = 240

pytestmark = [pytest.mark.slow,  # launches gloo process groups
              pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                 reason="torch.distributed with gloo is not available"),
              pytest.mark.skipif(not fsdp_supported()[0], reason=fsdp_supported()[1])]


# (method, precision) of the mixed-precision runs: fp16 through darts (loss scaling and
# unscaling), bf16 through cg (Hessian-vector products under autocast)
MIXED = [("darts", "fp16"), ("cg", "bf16")]
ROUNDING = {"fp16": 2.0**-10, "bf16": 2.0**-7}  # unit roundoff (measured: 1.4e-4, 1.4e-3)


# -- the worker: one rank of the launch ------------------------------------------------------
def _save_half(folder: Path) -> dict[str, Any]:
    """darts under fsdp, checkpointing every 2 steps into a folder that keeps only the
    newest; the run continues past its checkpoint to ITERS."""
    engine = bilevel("darts", "fsdp", LOCAL_BATCH, iters=1,
                     checkpoint_dir=str(folder / "ckpt"), checkpoint_step=2, keep_checkpoints=1)
    engine.run()
    engine.save_checkpoint(folder / "step1.dcp")  # the upper's Adam has not stepped yet
    engine.config.train_iters = HALF
    engine.run()
    listed = [os.path.basename(p) for _, p in checkpoint.list_checkpoints(folder / "ckpt")]
    explicit = engine.save_checkpoint(folder / "explicit.pt")
    engine.config.train_iters, engine.config.checkpoint_step = ITERS, 0  # keep step 4's
    engine.run()
    return {**parameters(engine), "listed": listed, "explicit": explicit}


def _steps_taken(engine: Engine) -> list[int]:
    """Record the global steps ``engine`` trains (a resumed run starts after its checkpoint:
    without the record, a load that did nothing would pass as an uninterrupted run)."""
    taken: list[int] = []
    step = engine.train_step

    def counted() -> None:
        taken.append(engine.global_step)
        step()

    engine.train_step = counted  # type: ignore[method-assign]
    return taken


def _resume_latest(folder: Path) -> dict[str, Any]:
    engine = bilevel("darts", "fsdp", LOCAL_BATCH, checkpoint_dir=str(folder / "ckpt"),
                     resume_from="latest")
    taken = _steps_taken(engine)
    engine.run()
    return {**parameters(engine), "steps": torch.tensor(taken)}


def _resume(folder: Path, name: str, batch: int = LOCAL_BATCH) -> dict[str, Any]:
    engine = bilevel("darts", "fsdp", batch)
    taken = _steps_taken(engine)
    engine.load_checkpoint(folder / name)
    engine.run()
    return {**parameters(engine), "steps": torch.tensor(taken)}


def _save_on_one_rank(folder: Path) -> None:
    """strategy='fsdp' launched as ONE process (on the union batch): a sharded folder too."""
    engine = bilevel("darts", "fsdp", WORLD * LOCAL_BATCH, iters=HALF)
    engine.run()
    engine.save_checkpoint(folder / "one-rank.dcp")


def _reverse(folder: Path) -> dict[str, Any]:
    """Reverse mode under fsdp, checkpointed at a window end (step 4): the replicated
    IterativeProblem's state goes into the folder beside the sharded upper's."""
    engine = bilevel("reverse", "fsdp", LOCAL_BATCH, iters=HALF)
    engine.run()
    engine.save_checkpoint(folder / "reverse.dcp")
    engine.config.train_iters = ITERS
    return trained(engine)


def _warm_start(folder: Path) -> dict[str, Any]:
    """cg with warm_start under fsdp, checkpointed at step 4: the kept solution, sharded
    between steps, is gathered into the folder's small state."""
    engine = bilevel("cg-warm", "fsdp", LOCAL_BATCH, iters=HALF)
    engine.run()
    engine.save_checkpoint(folder / "cg-warm.dcp")
    engine.config.train_iters = ITERS
    return trained(engine)


def _roll_back(folder: Path) -> dict[str, Any]:
    """roll_back under fsdp; a checkpoint inside a window (step 1) is refused, one at its end
    (step 2) is written."""
    engine = bilevel("darts", "fsdp", LOCAL_BATCH, iters=1, roll_back=True)
    engine.run()
    try:
        engine.save_checkpoint(folder / "mid-window.dcp")
        refusal = ""
    except CheckpointError as err:
        refusal = str(err)
    engine.config.train_iters = 2
    engine.run()
    written = engine.save_checkpoint(folder / "window-end.dcp")
    engine.config.train_iters = ITERS
    engine.run()
    return {**parameters(engine), "refusal": refusal, "written": written}


def scenarios(folder: Path) -> list[tuple[str, Any]]:
    return [("save", functools.partial(_save_half, folder)),
            ("resume-latest", functools.partial(_resume_latest, folder)),
            ("resume-single", functools.partial(_resume, folder, f"single-darts-step{HALF}.pt")),
            ("resume-one-rank", functools.partial(_resume, folder, "one-rank.dcp")),
            ("resume-step1", functools.partial(_resume, folder, "step1.dcp"))] + [
        (f"{strategy}-{method}-{precision}",
         functools.partial(lambda s, m, p: trained(mixed(m, p, s, LOCAL_BATCH)), strategy,
                           method, precision))
        for method, precision in MIXED for strategy in ("fsdp", "distributed")] + [
        ("fsdp-sama", lambda: trained(bilevel("sama", "fsdp", LOCAL_BATCH))),
        ("fsdp-reverse", functools.partial(_reverse, folder)),
        ("fsdp-cg-warm", functools.partial(_warm_start, folder)),
        ("fsdp-maml", lambda: maml_results(trained_engine(maml("fsdp")))),
        ("fsdp-roll-back", functools.partial(_roll_back, folder))]


def worker(job: str, folder: Path) -> int:
    rank = int(os.environ["RANK"])
    warnings.filterwarnings("error", message=".*optimizer.step\\(\\)")
    if job == "one":
        _save_on_one_rank(folder)
        return 0
    for name, run in scenarios(folder):
        torch.save(run(), folder / f"{name}.rank{rank}.pt")
    return 0


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp")
    engine = bilevel("darts", "default", WORLD * LOCAL_BATCH, iters=HALF)
    engine.run()
    engine.save_checkpoint(folder / f"single-darts-step{HALF}.pt")
    litter = folder / "ckpt" / f".step_00000002.dcp.{'0' * 32}.tmp"  # a killed save's
    litter.mkdir(parents=True)
    (litter / "__0_0.distcp").write_bytes(b"partial")
    assert launch(__file__, "one", folder, LAUNCH_DEADLINE_S, world=1) == [0], \
        logs(folder, "one", world=1)
    codes = launch(__file__, "all", folder, LAUNCH_DEADLINE_S)
    assert codes == [0] * WORLD, logs(folder, "all")
    return folder


def result(folder: Path, name: str, rank: int = 0) -> Any:
    return torch.load(folder / f"{name}.rank{rank}.pt", weights_only=True)


def both_ranks(folder: Path, name: str) -> dict[str, Any]:
    ranks = [result(folder, name, r) for r in range(WORLD)]
    for key, value in ranks[0].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, ranks[1][key]), f"{name}: ranks disagree on {key}"
    return ranks[0]


# -- checkpoints -----------------------------------------------------------------------------
def test_sharded_checkpoint_folders_are_listed_and_pruned(launched: Path) -> None:
    """checkpoint_step=2, keep_checkpoints=1: steps 2 and 4 were written, step 2 pruned; the
    folder a killed save had left there is gone."""
    saved = both_ranks(launched, "save")
    assert saved["listed"] == [f"step_{HALF:08d}.dcp"]
    folder = launched / "ckpt" / f"step_{HALF:08d}.dcp"
    shards = sorted(p.name for p in folder.iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp", "betty_state.pt"]
    assert not [p for p in (launched / "ckpt").iterdir() if p.name.endswith(".tmp")]


def test_resume_on_the_same_ranks_is_bitwise_the_uninterrupted_run(launched: Path) -> None:
    """2 ranks save at steps 1 (the upper's Adam not stepped yet: saving must not create
    its state, as torch's get_state_dict would by stepping it with zero gradients) and 4, and
    go on to 8, where the reference ends; 2 fresh ranks resume either folder (step 4's by
    resume_from='latest') and must end bit for bit where the first run ended."""
    saved = both_ranks(launched, "save")
    assert_close(saved, reference("darts"), "fsdp run around its checkpoints")
    for scenario, start in (("resume-latest", HALF), ("resume-step1", 1)):
        resumed = both_ranks(launched, scenario)
        assert resumed["steps"].tolist() == list(range(start + 1, ITERS + 1))
        for name in reference("darts"):
            assert torch.equal(resumed[name], saved[name]), f"{scenario}: '{name}' differs"


def test_sharded_checkpoint_of_two_ranks_resumes_in_one_process(launched: Path) -> None:
    """Reference: the uninterrupted single process on the union batch. One process
    (strategy='default', no process group) reads the 2 ranks' shards and ends there."""
    engine = bilevel("darts", "default", WORLD * LOCAL_BATCH)
    engine.load_checkpoint(launched / "ckpt" / f"step_{HALF:08d}.dcp")
    assert engine.global_step == HALF
    engine.run()
    assert_close(parameters(engine), reference("darts"), "fsdp shards resumed by 1 process")


@pytest.mark.parametrize("saved_by", ["single", "one-rank"])
def test_one_process_checkpoint_resumes_on_two_sharded_ranks(launched: Path, saved_by: str
                                                             ) -> None:
    """Reference: the uninterrupted single process on the union batch. Saved by one
    process: strategy='default' (one file), or strategy='fsdp' launched as one rank (a
    sharded folder); 2 ranks under fsdp resume it from step 4."""
    if saved_by == "one-rank":
        assert (launched / "one-rank.dcp" / ".metadata").is_file()
    resumed = both_ranks(launched, f"resume-{saved_by}")
    assert resumed["steps"].tolist() == list(range(HALF + 1, ITERS + 1))
    assert_close(resumed, reference("darts"), f"{saved_by} checkpoint resumed under fsdp")


def test_sharded_checkpoint_of_another_program_is_refused(launched: Path) -> None:
    engine = bilevel("sama", "default", WORLD * LOCAL_BATCH)  # Adam lower, not SGD
    with pytest.raises(CheckpointError, match="optimizer SGD"):
        engine.load_checkpoint(launched / "explicit.pt")


# -- mixed precision -------------------------------------------------------------------------
@pytest.mark.parametrize("method,precision", MIXED)
def test_mixed_precision_under_fsdp_equals_one_process_on_union_batch(
        launched: Path, method: str, precision: str) -> None:
    """References: 2 ranks under strategy='distributed' (replicated, the same local
    arithmetic: bit for bit equal), and one process on the union batch, same precision (a
    batch of 8 rounds differently from two of 4: equal to the format's unit roundoff, at
    parameters of magnitude ~1). fp16: the scaler unscales the gathered, averaged gradient
    (what one process unscales) before the shards take their slice; a scaler that unscaled
    nothing would step with gradients 65536 times too large."""
    got = both_ranks(launched, f"fsdp-{method}-{precision}")
    replicated = both_ranks(launched, f"distributed-{method}-{precision}")
    want = trained(mixed(method, precision, "default", WORLD * LOCAL_BATCH))
    start = parameters(mixed(method, precision, "default", WORLD * LOCAL_BATCH))
    for name in want:
        assert (want[name] - start[name]).abs().max() > 1e-3, f"'{name}' did not train"
        assert torch.equal(got[name], replicated[name]), f"'{name}': fsdp != distributed"
        err = (got[name] - want[name]).abs().max().item()
        assert err <= ROUNDING[precision], f"'{name}' differs from one process by {err:.1e}"


# -- SAMA ------------------------------------------------------------------------------------
def test_sama_under_fsdp_equals_one_process_on_union_batch(launched: Path) -> None:
    """Reference: one process on the union batch. The lower's optimizer is Adam, whose P
    reads its moments: each shard's are gathered; P of the shards' values alone (or zeros,
    what the optimizer's sharded parameters matched against the gathered ones would give)
    would move the upper elsewhere."""
    got = both_ranks(launched, "fsdp-sama")
    start = parameters(bilevel("sama", "default", WORLD * LOCAL_BATCH))
    assert all((got[n] - start[n]).abs().max() > 1e-3 for n in start), "a level did not train"
    assert_close(got, reference("sama"), "fsdp/sama")


# -- reverse mode ----------------------------------------------------------------------------
def test_reverse_mode_under_fsdp_equals_one_process_on_union_batch(launched: Path) -> None:
    """Reference: one process on the union batch. The IterativeProblem stays replicated;
    the upper is sharded: its gathered parameters, which the window's graph holds across
    the window's two global steps, are freed between them and refilled with the same values
    (the upper steps only when the window closes). Its checkpoint at step 4 (replicated
    lower, sharded upper) resumed by one process ends there too."""
    got = both_ranks(launched, "fsdp-reverse")
    start = parameters(bilevel("reverse", "default", WORLD * LOCAL_BATCH))
    assert all((got[n] - start[n]).abs().max() > 1e-3 for n in start), "a level did not train"
    assert_close(got, reference("reverse"), "fsdp/reverse")
    resumed = bilevel("reverse", "default", WORLD * LOCAL_BATCH)
    resumed.load_checkpoint(launched / "reverse.dcp")
    assert resumed.global_step == HALF
    assert_close(trained(resumed), reference("reverse"), "fsdp/reverse resumed by 1 process")


def test_warm_start_under_fsdp_checkpoints_and_resumes_in_one_process(launched: Path) -> None:
    """cg, one iteration per outer step, warm-started: 2 sharded ranks end where one process
    on the union batch ends, and so does one process that resumes their step-4 folder (the
    kept solution included: without it the resumed solve would start from zero)."""
    want = reference("cg-warm")
    assert_close(both_ranks(launched, "fsdp-cg-warm"), want, "fsdp cg warm start")
    engine = bilevel("cg-warm", "default", WORLD * LOCAL_BATCH)
    engine.load_checkpoint(launched / "cg-warm.dcp")
    (memory,) = engine.inner.hop_memories().values()
    assert [t.numel() for t in memory["cg"]] == [DIM, 1]  # whole again
    engine.run()
    assert_close(parameters(engine), want, "fsdp warm-start folder resumed by 1 process")
    cold = bilevel("cg-warm", "default", WORLD * LOCAL_BATCH)
    cold.load_checkpoint(launched / "cg-warm.dcp")
    cold.inner.hop_memories().clear()
    cold.run()
    assert (parameters(cold)["outer"] - want["outer"]).abs().max() > 10 * TOL


def test_task_batched_maml_under_fsdp_equals_one_process_on_all_tasks(launched: Path) -> None:
    """Reference: one process adapting all T tasks, float64; each rank adapts its own T/2
    (windows restarted from the sharded meta-module's gathered parameters)."""
    ranks = [result(launched, "fsdp-maml", r) for r in range(WORLD)]
    want = maml_results(trained_engine(maml("default")))
    for rank, got in enumerate(ranks):
        err = (got["meta"] - want["meta"]).abs().max().item()
        assert err <= 1e-10, f"rank {rank}: theta differs by {err:.2e}"
        rows = want["adapted"][rank::WORLD]
        assert got["adapted"].shape == rows.shape
        assert (got["adapted"] - rows).abs().max().item() <= 1e-10


# -- roll_back -------------------------------------------------------------------------------
def test_roll_back_under_fsdp_equals_one_process_on_union_batch(launched: Path) -> None:
    """Reference: one process on the union batch with roll_back (which ends 0.1-0.7 away from
    the run without it). The window-start snapshot and its restore go through the module's
    state_dict, i.e. its shards; the module is gathered again right after. Inside a window a
    checkpoint is refused (the snapshot is per-rank shards), at its end it is written."""
    got = both_ranks(launched, "fsdp-roll-back")
    want = trained(bilevel("darts", "default", WORLD * LOCAL_BATCH, roll_back=True))
    assert all((want[n] - reference("darts")[n]).abs().max() > 1e-2 for n in want)
    assert_close(got, want, "fsdp/roll_back")
    assert "problem 'inner' holds the roll_back snapshot" in got["refusal"]
    assert not (launched / "mid-window.dcp").exists()
    assert (launched / "window-end.dcp" / ".metadata").is_file()


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1], Path(sys.argv[2])))
