"""Checkpoints (`betty.checkpoint`): exact resume, atomic writes, checked loads, Ctrl-C.

Reference for exact resume: the same program trained for 2N global steps without stopping.
A run of N steps, saved, then resumed in a fresh Python process for N more must end with
bitwise-identical parameters, optimizer, scheduler and scaler states, step counters, data
positions and early-stopping state. The program has what makes this hard: shuffled
DataLoaders (one on torch's global generator, one on its own), dropout, numpy and Python
random draws, LR schedulers, an unroll window and a checkpoint in the middle of an epoch and
of a window (and, in some variants, of gradient accumulation and of a roll-back window).

The program is `build` (tests/checkpoint_program.py); the fresh process runs this file as a
script, with tests/ first on sys.path.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import pytest
import torch
from checkpoint_program import Hyper, N, build

from betty import Engine
from betty.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints
from betty.configs import EngineConfig
from betty.errors import ConfigError
from betty.problems import IterativeProblem

# One entry per (lower problem class, variant) checkpointed at global step N. An
# IterativeProblem's in-window graph (reverse mode) and micro-batch gradients cannot be
# saved, so those variants checkpoint at the window end instead (tests below).
RESUME_CASES = [("implicit", "plain"), ("implicit", "rollback-accumulation-warmup"),
                ("implicit", "fp16-bf16-clipping"), ("iterative", "plain")]


def final_state(engine: Engine) -> dict[str, Any]:
    """Everything that must match bitwise between a resumed run and an uninterrupted one."""
    state: dict[str, Any] = {**engine.loop_state_dict(),
                             "schedule": engine.schedule.state_dict()}
    for p in engine.problems:
        training = p.training_state()
        state[p.name] = {**p.state_dict(), "skipped": p.skipped_steps,
                         "grads": [q.grad for q in p.trainable_parameters()],
                         "accumulated": training["accumulated"],
                         "data": training["data"]["positions"] + training["data"]["epochs"]}
    return state


def assert_same(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype, where
        assert torch.equal(a, b), f"{where} differs by {(a.double() - b.double()).abs().max()}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a) == sorted(b), where
        for key in a:
            assert_same(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (u, v) in enumerate(zip(a, b)):
            assert_same(u, v, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


_REFERENCES: dict[tuple[str, str], dict[str, Any]] = {}


def reference(kind: str, variant: str) -> dict[str, Any]:
    """Final state after 2N global steps without stopping (cached per program)."""
    if (kind, variant) not in _REFERENCES:
        engine = build(kind, variant)
        engine.run()
        _REFERENCES[kind, variant] = final_state(engine)
    return _REFERENCES[kind, variant]


# -- exact resume ------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize(("kind", "variant"), RESUME_CASES)
def test_resume_in_a_fresh_process_is_bitwise_exact(tmp_path, kind, variant):
    first = build(kind, variant, train_iters=N, checkpoint_dir=str(tmp_path), checkpoint_step=N)
    first.run()
    assert latest_checkpoint(tmp_path) == os.path.join(tmp_path, f"step_{N:08d}.pt")
    out = tmp_path / "resumed.pt"
    done = subprocess.run([sys.executable, __file__, kind, variant, str(tmp_path), str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = torch.load(out, weights_only=True)
    assert resumed["global_step"] == 2 * N
    assert_same(resumed, reference(kind, variant))


@pytest.mark.parametrize(("variant", "why"), [
    ("reverse", r"'lower' is 1 local steps into its 2-step unroll window"),
    ("accumulation", r"'lower' holds gradients of micro-batches not yet applied"),
])
@pytest.mark.slow
def test_unsaveable_checkpoint_waits_for_the_window_end_and_resumes_exactly(tmp_path, variant,
                                                                            why):
    """Global step N is mid-window in reverse mode (or mid-accumulation in an iterative
    lower): the periodic checkpoint is written one step later, when that ends; an explicit
    save at N is refused; a fresh process resumes from the deferred checkpoint bitwise equal
    to the uninterrupted run; and a run that stopped at N continues exactly."""
    first = build("iterative", variant, train_iters=N + 1, checkpoint_dir=str(tmp_path),
                  checkpoint_step=N)
    first.run()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [N + 1]
    out = tmp_path / "resumed.pt"
    done = subprocess.run([sys.executable, __file__, "iterative", variant, str(tmp_path),
                           str(out)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = torch.load(out, weights_only=True)
    assert resumed["global_step"] == 2 * N
    assert_same(resumed, reference("iterative", variant))
    mid = build("iterative", variant, train_iters=N)
    mid.run()
    with pytest.raises(CheckpointError, match=rf"global step 7: problem {why}"):
        mid.save_checkpoint(tmp_path / "mid.pt")
    assert not (tmp_path / "mid.pt").exists()
    mid.config.train_iters = 2 * N  # the cut window continues where it stopped
    mid.run()
    assert_same(final_state(mid), reference("iterative", variant))


def test_a_mid_window_reverse_checkpoint_would_not_resume_exactly(tmp_path, monkeypatch):
    """Why the refusal above: forced through, a mid-window save loses the window's graph,
    and the resumed run differs from the uninterrupted one."""
    mid = build("iterative", "reverse", train_iters=N)
    mid.run()
    monkeypatch.setattr(IterativeProblem, "checkpoint_blocker", lambda self: None)
    path = mid.save_checkpoint(tmp_path / "mid.pt")
    engine = build("iterative", "reverse")
    engine.load_checkpoint(path)
    engine.run()
    with pytest.raises(AssertionError):
        assert_same(final_state(engine), reference("iterative", "reverse"))


def test_the_reference_is_sensitive_to_the_data_order():
    """Guard against a vacuous comparison: another shuffle gives another end state."""
    engine = build()
    torch.manual_seed(1)  # the loaders draw their first shuffle from here
    engine.run()
    with pytest.raises(AssertionError):
        assert_same(final_state(engine), reference("implicit", "plain"))


def test_load_checkpoint_in_process_then_run_continues_to_train_iters(tmp_path):
    first = build(train_iters=N)
    first.run()
    path = first.save_checkpoint(tmp_path / "mid.pt")
    engine = build()
    engine.load_checkpoint(path)
    assert engine.global_step == N and engine.lower.count == N
    engine.run()
    assert engine.global_step == 2 * N
    assert_same(final_state(engine), reference("implicit", "plain"))


# -- Ctrl-C ------------------------------------------------------------------------------
@pytest.fixture
def terminal_sigint():
    """SIGINT as a terminal delivers it (Python's KeyboardInterrupt handler): a process
    started in the background by a shell (``nohup ... &``, some CI runners) inherits SIGINT
    ignored, and betty leaves an ignored signal alone, so Ctrl-C could not reach it."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.usefixtures("terminal_sigint")
def test_ctrl_c_saves_a_loadable_checkpoint_at_the_end_of_the_step(tmp_path):
    engine = build(checkpoint_dir=str(tmp_path), interrupt_at=(5, 1))
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    assert engine.global_step == 5
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert [step for step, _ in list_checkpoints(tmp_path)] == [5]
    resumed = build(checkpoint_dir=str(tmp_path), resume_from="latest")
    resumed.run()
    assert_same(final_state(resumed), reference("implicit", "plain"))


@pytest.mark.usefixtures("terminal_sigint")
def test_ctrl_c_mid_reverse_window_saves_when_the_window_ends(tmp_path):
    engine = build("iterative", "reverse", checkpoint_dir=str(tmp_path), interrupt_at=(5, 1))
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    assert engine.global_step == 6  # step 5 is the first of a 2-step window
    assert [step for step, _ in list_checkpoints(tmp_path)] == [6]
    resumed = build("iterative", "reverse", checkpoint_dir=str(tmp_path), resume_from="latest")
    resumed.run()
    assert_same(final_state(resumed), reference("iterative", "reverse"))


def test_sigterm_saves_and_exits_cleanly_and_the_resumed_run_is_bitwise_equal(tmp_path):
    """What schedulers, ``kill`` and container runtimes send: like Ctrl-C, then SystemExit
    with the conventional status 128 + 15."""
    engine = build(checkpoint_dir=str(tmp_path), interrupt_at=(5, 1, "term"))
    with pytest.raises(SystemExit) as stopped:
        engine.run()
    assert stopped.value.code == 143 and engine.global_step == 5
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert [step for step, _ in list_checkpoints(tmp_path)] == [5]
    resumed = build(checkpoint_dir=str(tmp_path), resume_from="latest")
    resumed.run()
    assert_same(final_state(resumed), reference("implicit", "plain"))


@pytest.mark.usefixtures("terminal_sigint")
def test_a_second_ctrl_c_stops_at_once_without_saving(tmp_path):
    engine = build(checkpoint_dir=str(tmp_path), checkpoint_step=2, interrupt_at=(5, 2))
    with pytest.raises(KeyboardInterrupt):
        engine.run()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [2, 4]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp")]


# -- files: atomic writes, checked loads -------------------------------------------------
@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "a.pt"
    engine = build(train_iters=3)
    engine.run()
    engine.save_checkpoint(path)
    return path


def test_truncated_checkpoint_is_refused(saved, tmp_path):
    data = saved.read_bytes()
    for size in (len(data) // 2, len(data) - 1, 10):
        cut = tmp_path / f"cut{size}.pt"
        cut.write_bytes(data[:size])
        with pytest.raises(CheckpointError, match="truncated"):
            build().load_checkpoint(cut)


def test_corrupt_checkpoint_is_refused(saved, tmp_path):
    data = bytearray(saved.read_bytes())
    data[len(data) // 3] ^= 0x01
    bad = tmp_path / "bad.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt|truncated"):
        build().load_checkpoint(bad)


def test_a_crash_mid_write_keeps_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    path.write_bytes(saved.read_bytes())

    def crash(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        build(train_iters=1).save_checkpoint(path)
    monkeypatch.undo()
    assert path.read_bytes() == saved.read_bytes()
    assert os.listdir(tmp_path) == ["c.pt"]
    build().load_checkpoint(path)


def test_unsafe_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"format": "betty-checkpoint", "payload": Hyper()}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        build().load_checkpoint(path)


def test_other_files_are_refused(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"w": torch.ones(2)}, path)
    with pytest.raises(CheckpointError, match="not a betty checkpoint"):
        build().load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        build().load_checkpoint(tmp_path / "missing.pt")


def test_checkpoint_of_another_program_is_refused(saved):
    with pytest.raises(CheckpointError, match=r"problem 'lower'.*\[16, 6\].*\[17, 6\]"):
        build(hidden=17).load_checkpoint(saved)
    with pytest.raises(CheckpointError, match=r"another program.*\['lower', 'upper'\]"):
        build(lower_name="student").load_checkpoint(saved)


# -- EngineConfig: periodic saves, keep, latest ------------------------------------------
def test_periodic_saves_keep_the_newest_and_resume_from_latest(tmp_path):
    build(train_iters=9, checkpoint_dir=str(tmp_path), checkpoint_step=2,
          keep_checkpoints=2).run()
    assert [step for step, _ in list_checkpoints(tmp_path)] == [6, 8]
    engine = build(train_iters=9, checkpoint_dir=str(tmp_path), resume_from="latest")
    engine._resume()
    assert engine.global_step == 8 and engine.lower.count == 8


def test_resume_from_latest_in_an_empty_folder_starts_afresh(tmp_path):
    engine = build(train_iters=2, checkpoint_dir=str(tmp_path / "new"), resume_from="latest")
    engine.run()
    assert engine.global_step == 2


def test_resume_from_a_missing_path_fails_with_a_message(tmp_path):
    engine = build(train_iters=2, resume_from=str(tmp_path / "nope.pt"))
    with pytest.raises(CheckpointError, match="does not exist"):
        engine.run()


@pytest.mark.parametrize(("fields", "message"), [
    ({"checkpoint_step": 10}, "checkpoint_step=10 needs a folder"),
    ({"resume_from": "latest"}, "resume_from='latest' needs a folder"),
    ({"keep_checkpoints": 3}, "keep_checkpoints=3 needs a folder"),
    ({"checkpoint_dir": "c", "checkpoint_step": -1}, "checkpoint_step=-1 must be an integer"),
    ({"checkpoint_dir": "c", "keep_checkpoints": 1.5}, "keep_checkpoints=1.5 must be"),
    ({"checkpoint_dir": 3}, "checkpoint_dir=3 must be a path"),
])
def test_engine_config_checks_checkpoint_fields(fields, message):
    with pytest.raises(ConfigError, match=message):
        EngineConfig(**fields)


def _resume_main(kind: str, variant: str, directory: str, out: str) -> None:
    """The fresh process: rebuild the program, resume from the latest checkpoint, finish."""
    engine = build(kind, variant, checkpoint_dir=directory, resume_from="latest")
    engine.run()
    torch.save(final_state(engine), out)


if __name__ == "__main__":
    _resume_main(*sys.argv[1:5])
