"""Seeing a run: console lines, TensorBoard, wandb and CSV read back from what they wrote, and
the progress bar.

Reference for every backend: the values the engine was handed (a problem's loss dict at its
``log_step``, captured by `Spy.log_metrics`, and the dict `Spy.validation` returned), and
learning rates from the StepLR schedule in closed form (0.1 * 0.5 ** (local step // 2)).
The program and `Spy` are in tests/logged_program.py.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import struct
import sys
import time

import pytest
import torch
from logged_program import STEPS, Spy, program

from betty.configs import Config, EngineConfig
from betty.errors import ConfigError
from betty.logging import ProgressBar, RunLogger


def expected(engine: Spy) -> dict[str, dict[int, float]]:
    """``{"<tag>/<key>": {step: value}}`` of everything the engine was asked to log."""
    out: dict[str, dict[int, float]] = {}
    for (tag, step), metrics in engine.seen.items():
        for key, value in metrics.items():
            out.setdefault(f"{tag}/{key}", {})[step] = value
    for step in range(1, STEPS + 1):  # local step == global step here
        out.setdefault("inner/lr", {})[step] = 0.1 * 0.5 ** (step // 2)
    for step in range(2, STEPS + 1, 2):
        out.setdefault("outer/lr", {})[step] = 0.01
    return out


def assert_same(stored: dict[str, dict[int, float]], engine: Spy) -> None:
    want = expected(engine)
    assert {"inner/loss", "inner/target", "outer/loss", "validation/loss",
            "validation/acc"} <= set(want)
    for key, series in want.items():
        assert key in stored, key
        assert stored[key] == pytest.approx(series, rel=1e-6), key


@pytest.fixture
def betty_logger():
    """The ``betty`` logger's level and handlers, restored after the test."""
    logger = logging.getLogger("betty")
    level, handlers = logger.level, list(logger.handlers)
    yield logger
    logger.setLevel(level)
    logger.handlers[:] = handlers


# -- TensorBoard ---------------------------------------------------------------------------
def test_tensorboard_values_read_back(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    engine = program(logger_type="tensorboard", log_dir=str(tmp_path), run_name="run1")
    engine.run()
    files = glob.glob(str(tmp_path / "run1" / "events.out.tfevents.*"))
    assert len(files) == 1
    stored: dict[str, dict[int, float]] = {}
    for event in EventFileLoader(files[0]).Load():
        for value in event.summary.value:
            number = value.simple_value if value.HasField("simple_value") else \
                float(torch.tensor(list(value.tensor.float_val))[0])
            stored.setdefault(value.tag, {})[event.step] = number
    assert_same(stored, engine)


# -- wandb (offline run files) -------------------------------------------------------------
def wandb_records(path: str) -> list[bytes]:
    """The records of a ``.wandb`` file: a 7-byte header (``:W&B``, magic, version), then
    LevelDB-log chunks in 32 KiB blocks, each ``crc32 (4) | length (2) | type (1) | data``
    with type 1 = full, 2/3/4 = first/middle/last piece of a record."""
    with open(path, "rb") as file:
        data = file.read()
    assert data[:4] == b":W&B"
    block, pos, out, piece = 32768, 7, [], b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # the block's tail is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            break
        piece += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            out.append(piece)
            piece = b""
    return out


def wandb_history(run_dir: str) -> list[tuple[int, dict[str, float]]]:
    from google.protobuf.message import DecodeError
    from wandb.proto import wandb_internal_pb2 as pb

    files = glob.glob(os.path.join(run_dir, "wandb", "offline-run-*", "run-*.wandb"))
    assert len(files) == 1
    records: list = []
    deadline = time.monotonic() + 30.0
    while not records or records[-1].WhichOneof("record_type") != "exit":
        assert time.monotonic() < deadline, "wandb never wrote the end of its run file"
        time.sleep(0.05)  # wandb's service writes the file after `finish` returns
        records = []
        for raw in wandb_records(files[0]):
            records.append(pb.Record())
            try:
                records[-1].ParseFromString(raw)
            except DecodeError:  # a record still being written
                records = []
                break
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                     for item in record.history.item}
            rows.append((record.history.step.num, items))
    return rows


@pytest.fixture
def wandb_offline(monkeypatch):
    wandb = pytest.importorskip("wandb")
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true",
                       "WANDB_CONSOLE": "off", "WANDB_DISABLE_GIT": "true"}.items():
        monkeypatch.setenv(key, value)
    yield wandb
    if wandb.run is not None:
        wandb.finish()


@pytest.mark.slow
def test_wandb_offline_one_row_per_global_step(tmp_path, wandb_offline):
    engine = program(logger_type="wandb", log_dir=str(tmp_path), run_name="offline-test")
    engine.run()
    assert wandb_offline.run is None  # the engine started the run, and finished it
    rows = wandb_history(str(tmp_path))
    assert [step for step, _ in rows] == list(range(1, STEPS + 1))  # one log call per step
    stored: dict[str, dict[int, float]] = {}
    for step, items in rows:
        for key, value in items.items():
            if not key.startswith("_"):
                stored.setdefault(key, {})[step] = value
    assert_same(stored, engine)


def test_wandb_keeps_the_users_run(tmp_path, wandb_offline):
    run = wandb_offline.init(project="mine", dir=str(tmp_path))
    engine = program(logger_type="wandb")
    engine.run()
    assert wandb_offline.run is run  # not finished by the engine
    run.finish()
    assert [step for step, _ in wandb_history(str(tmp_path))] == list(range(1, STEPS + 1))


# -- CSV -----------------------------------------------------------------------------------
def test_csv_one_row_per_step_with_the_union_of_keys(tmp_path):
    engine = program(logger_type="csv", log_dir=str(tmp_path), run_name="r")
    engine.run()
    with open(tmp_path / "r" / "metrics.csv", newline="") as file:
        reader = csv.DictReader(file)
        header, rows = reader.fieldnames, list(reader)
    assert header[0] == "step"
    assert [int(r["step"]) for r in rows] == list(range(1, STEPS + 1))
    stored: dict[str, dict[int, float]] = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and value != "":
                stored.setdefault(key, {})[int(row["step"])] = float(value)
    assert set(stored) == set(header[1:])  # the header holds exactly the keys seen
    assert_same(stored, engine)
    assert rows[0]["outer/loss"] == "" and rows[0]["validation/acc"] == ""  # logged later


def test_csv_continues_its_file_on_a_second_run(tmp_path):
    engine = program(logger_type="csv", log_dir=str(tmp_path), run_name="r")
    engine.run()
    engine.config.train_iters = STEPS + 2
    engine.run()
    with open(tmp_path / "r" / "metrics.csv", newline="") as file:
        steps = [int(r["step"]) for r in csv.DictReader(file)]
    assert steps == list(range(1, STEPS + 3))


def test_local_step_is_kept_next_to_the_global_step(tmp_path):
    engine = program(outer_config=Config(log_step=1, log_local_step=True),
                     inner_config=Config(log_step=1, unroll_steps=2),
                     logger_type="csv", log_dir=str(tmp_path), run_name="r")
    engine.run()
    with open(tmp_path / "r" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    outer = [(int(r["step"]), int(r["outer/step"])) for r in rows if r["outer/loss"]]
    assert outer == [(2, 1), (4, 2), (6, 3)]  # (global, local) steps of the upper


# -- console -------------------------------------------------------------------------------
def test_console_one_aligned_line_per_problem_and_step(caplog, betty_logger):
    caplog.set_level(logging.INFO, logger="betty")
    engine = program(logger_type="console")
    caplog.clear()
    engine.run()
    lines = [r.getMessage() for r in caplog.records if "| loss=" in r.getMessage()]
    expected_lines = [(tag, step) for step in range(1, STEPS + 1)
                      for tag in ("outer", "inner", "validation")  # the order of `problems`
                      if (tag, step) in engine.seen]
    assert len(lines) == len(expected_lines)
    for line, (tag, step) in zip(lines, expected_lines):
        cells = [c.strip() for c in line.split("|")]
        assert cells[0].split() == ["step", str(step)]
        assert cells[1] == tag
        loss = float(cells[2].split()[0].removeprefix("loss="))
        assert loss == pytest.approx(engine.seen[(tag, step)]["loss"], rel=1e-5)
    assert len({line.index("loss=") for line in lines}) == 1  # aligned columns
    inner = [line for line in lines if "| inner" in line]
    assert len({line.index("lr=") for line in inner}) == 1


def test_console_type_makes_lines_visible_without_configuration(monkeypatch, betty_logger):
    monkeypatch.setattr(logging.getLogger(), "handlers", [])  # as in a fresh interpreter
    betty_logger.setLevel(logging.NOTSET)
    betty_logger.handlers.clear()
    program(logger_type="none")  # on by default, as in the original Betty
    assert betty_logger.isEnabledFor(logging.INFO) and len(betty_logger.handlers) == 1
    program(logger_type="console")
    assert betty_logger.isEnabledFor(logging.INFO) and len(betty_logger.handlers) == 1
    program(logger_type="console")
    assert len(betty_logger.handlers) == 1  # not once per engine


def test_none_does_no_work(monkeypatch, betty_logger):
    betty_logger.setLevel(logging.WARNING)
    import betty.logging.run as run

    def forbidden(*args):
        raise AssertionError("logger_type='none' formatted or read a value")

    monkeypatch.setattr(run, "records_to_host", forbidden)
    engine = program(outer_config=Config(log_step=1))
    assert not engine.logger.active
    engine.run()
    assert engine.logger.backends is None  # nothing was ever opened


def test_one_host_read_and_one_backend_call_per_step(monkeypatch, betty_logger):
    betty_logger.setLevel(logging.WARNING)
    import betty.logging.run as run

    reads = []
    real = run.records_to_host
    monkeypatch.setattr(run, "records_to_host", lambda records: reads.append(1) or real(records))

    class Fake:
        def __init__(self) -> None:
            self.calls: list[tuple[int, list[str]]] = []
            self.closed = False

        def write(self, records, *, global_step):
            self.calls.append((global_step, [r.tag for r in records]))

        def close(self):
            self.closed = True

    fake = Fake()
    engine = program()
    engine.logger = RunLogger([lambda: fake], clock=lambda: engine.global_step)
    engine.run()
    assert [step for step, _ in fake.calls] == list(range(1, STEPS + 1))
    assert fake.calls[1] == (2, ["inner", "outer"])
    assert fake.calls[2] == (3, ["inner", "validation"])
    assert len(reads) == STEPS and fake.closed


def test_records_are_detached_until_emitted():
    logger = RunLogger([lambda: None], clock=lambda: 1)  # never flushed here
    w = torch.tensor(2.0, requires_grad=True)
    logger.log({"loss": w * 3}, tag="p", step=1)
    assert not logger._pending[0].metrics["loss"].requires_grad


def test_missing_optional_package_fails_before_training(monkeypatch):
    import betty.logging.run as run

    monkeypatch.setattr(run.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="logger_type='wandb' needs the 'wandb' package"):
        program(logger_type="wandb")


def test_new_engine_config_fields_are_checked():
    with pytest.raises(ConfigError, match="progress_bar"):
        EngineConfig(progress_bar="yes")
    with pytest.raises(ConfigError, match="log_dir"):
        EngineConfig(log_dir=3)
    with pytest.raises(ConfigError, match="csv"):
        EngineConfig(logger_type="csvv")


# -- progress bar --------------------------------------------------------------------------
class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_reads_losses_only_when_shown(monkeypatch):
    pytest.importorskip("tqdm")
    engine = program()
    reads = []
    real = ProgressBar.losses
    monkeypatch.setattr(ProgressBar, "losses", lambda self: reads.append(1) or real(self))
    screen = Terminal()
    bar = ProgressBar(engine.problems, total=50, file=screen, interval=3600.0)
    for step in range(1, 51):
        engine.global_step = step
        engine.train_step()
        bar.update()
    bar.close()
    assert len(reads) == 2  # the first refresh and the final one, not one per step
    out = screen.getvalue()
    assert "50/50" in out and "it/s" in out
    assert "inner=" in out and "outer=" in out


def test_progress_bar_is_off_without_a_terminal_or_when_disabled(monkeypatch):
    pytest.importorskip("tqdm")
    problems = program().problems
    assert not ProgressBar(problems, total=5, file=io.StringIO()).shown
    assert not ProgressBar(problems, total=5, file=Terminal(), enabled=False).shown
    assert ProgressBar(problems, total=5, file=Terminal()).shown


def test_engine_draws_the_bar_on_a_terminal(monkeypatch):
    pytest.importorskip("tqdm")
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    program().run()
    assert f"{STEPS}/{STEPS}" in screen.getvalue()
    screen = Terminal()
    monkeypatch.setattr(sys, "stderr", screen)
    program(progress_bar=False).run()
    assert screen.getvalue() == ""
