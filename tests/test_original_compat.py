"""The original Betty's defaults and names that its programs rely on, checked directly.

A seeded program with shuffled loaders draws the original's batches (iterators created at
start-up, problem by problem), ``HigherIterativeProblem``/``MetaIterativeProblem`` are
`IterativeProblem` with a deprecation warning, `betty.envs.Env`, TensorBoard's default folder
and the console lines printed by default. The programs themselves run in
tests/test_original_programs.py.
"""

from __future__ import annotations

import io
import logging
import os
import re
import socket
from typing import Any

import pytest
import torch

from betty.configs import Config, EngineConfig
from betty.engine import Engine
from betty.problems import ImplicitProblem, IterativeProblem


# -- shuffled loaders: the original's order of random draws --------------------------------
class OrderInner(ImplicitProblem):
    def configure_module(self):
        return torch.nn.Linear(1, 1)  # drawn from the global generator at initialisation

    def configure_optimizer(self):
        return torch.optim.SGD(self.module.parameters(), lr=0.1)

    def training_step(self, batch):
        (a,), (b,) = batch
        self.seen[self.count] = (a.tolist(), b.tolist())  # darts' probes re-evaluate it
        return ((self.module(a[:, None]) - self.outer.module.weight * b[:, None]) ** 2).mean()


class OrderOuter(ImplicitProblem):
    def training_step(self, batch):
        (c,) = batch
        self.seen[self.count] = c.tolist()
        return (self.inner(c[:, None]) ** 2).mean()


def shuffled(n: int) -> torch.utils.data.DataLoader:
    data = torch.utils.data.TensorDataset(torch.arange(float(n)))
    return torch.utils.data.DataLoader(data, batch_size=4, shuffle=True)


def original_order_batches(steps: int, eager: bool) -> tuple[list, list]:
    """Plain torch in the original Betty's order: the program builds its loaders and the
    outer module; at start-up each problem, in ``problems`` order, builds its module and
    then calls ``iter()`` on each of its loaders; each global step draws the inner's
    batches, then the outer's. ``eager=False``: iterators made at the first batch instead."""
    torch.manual_seed(0)
    loaders = [shuffled(12), shuffled(8), shuffled(12)]  # inner (two), outer
    torch.nn.Linear(1, 1)  # the outer module, built by the program
    iterators: list[Any] = [None, None, None]
    if eager:
        iterators[2] = iter(loaders[2])
    torch.nn.Linear(1, 1)  # the inner's configure_module
    if eager:
        iterators[0], iterators[1] = iter(loaders[0]), iter(loaders[1])

    def draw(i: int) -> list[float]:
        if iterators[i] is None:
            iterators[i] = iter(loaders[i])
        try:
            return next(iterators[i])[0].tolist()
        except StopIteration:
            iterators[i] = iter(loaders[i])
            return next(iterators[i])[0].tolist()

    inner, outer = [], []
    for _ in range(steps):
        inner.append((draw(0), draw(1)))
        outer.append(draw(2))
    return inner, outer


def test_shuffled_loaders_give_the_original_batches():
    torch.manual_seed(0)
    inner_loaders = (shuffled(12), shuffled(8))
    outer_loader = shuffled(12)
    outer_module = torch.nn.Linear(1, 1)
    outer = OrderOuter("outer", Config(), outer_module,
                       torch.optim.SGD(outer_module.parameters(), lr=0.1),
                       train_data_loader=outer_loader)
    inner = OrderInner("inner", Config(type="darts"), train_data_loader=inner_loaders)
    outer.seen, inner.seen = {}, {}
    engine = Engine([outer, inner], EngineConfig(train_iters=5, progress_bar=False),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    engine.run()
    want_inner, want_outer = original_order_batches(5, eager=True)
    assert list(inner.seen.values()) == want_inner  # across the epoch ends of both loaders
    assert list(outer.seen.values()) == want_outer
    assert original_order_batches(5, eager=False) != (want_inner, want_outer)


# -- the names and defaults themselves ------------------------------------------------------
def test_original_iterative_names_warn_and_are_iterative_problems():
    from betty.problems import HigherIterativeProblem, MetaIterativeProblem

    for kind in (HigherIterativeProblem, MetaIterativeProblem):
        class Lower(kind):
            def training_step(self, batch):
                return self.module(batch).sum()

        with pytest.warns(DeprecationWarning, match=f"{kind.__name__} is the original"):
            # the original's order: device is the seventh argument
            problem = Lower("lower", Config(unroll_steps=3), torch.nn.Linear(1, 1), None,
                            None, None, "cpu")
        assert isinstance(problem, IterativeProblem) and problem.supports_reverse_mode
        assert problem.config.unroll_steps == 3


def test_env_base_class():
    from betty.envs import Env

    with pytest.raises(NotImplementedError, match="Env must define step"):
        Env().step()
    assert Env().reset() is None


def test_tensorboard_folder_defaults_to_the_originals():
    from betty.logging.run import tensorboard_folder

    parent, name = os.path.split(tensorboard_folder(None, None))
    assert parent == "betty_tensorboard"
    assert re.fullmatch(r"[A-Z][a-z]{2}\d\d_\d\d-\d\d-\d\d_" + re.escape(socket.gethostname()),
                        name), name
    assert tensorboard_folder(None, "run1") == os.path.join("betty_tensorboard", "run1")
    assert tensorboard_folder("logs", "run1") == os.path.join("logs", "run1")


@pytest.mark.parametrize("bar", [False, True])
def test_log_step_lines_print_to_stdout_by_default(monkeypatch, capsys, bar):
    if bar:
        pytest.importorskip("tqdm")
    monkeypatch.setattr("betty.logging.progress._isatty", lambda stream: True)
    logger = logging.getLogger("betty")  # as in a fresh interpreter (set here, at call time)
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    logger.manager._clear_cache()
    torch.manual_seed(0)
    outer_module, inner_module = torch.nn.Linear(1, 1), torch.nn.Linear(1, 1)
    data = [torch.ones(2, 1)]

    class Lower(ImplicitProblem):
        def training_step(self, batch):
            return ((self.module(batch) - self.upper.module.weight) ** 2).mean()

    class Upper(ImplicitProblem):
        def training_step(self, batch):
            return (self.lower(batch) ** 2).mean()

    upper = Upper("upper", Config(log_step=1), outer_module,
                  torch.optim.SGD(outer_module.parameters(), lr=0.1), train_data_loader=data)
    lower = Lower("lower", Config(), inner_module,
                  torch.optim.SGD(inner_module.parameters(), lr=0.1), train_data_loader=data)
    Engine([upper, lower], EngineConfig(train_iters=2, progress_bar=bar),
           {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}).run()
    out, err = capsys.readouterr()
    assert ("2/2" in err) == bar  # the progress bar stays (on standard error), lines go around
    lines = [line for line in out.splitlines() if "| upper" in line]
    stamp = r"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\] \[INFO\] "
    assert [re.match(stamp + r"step +(\d) \| upper +\| loss=", line).group(1)
            for line in lines] == ["1", "2"]
    assert len(logger.handlers) == 1  # the one default handler, to standard output


def test_configured_logging_is_left_alone(monkeypatch):
    from betty.logging import ensure_console_output

    logger, root = logging.getLogger("betty"), logging.getLogger()
    mine = logging.StreamHandler(io.StringIO())  # as after logging.basicConfig(level=WARNING)
    monkeypatch.setattr(root, "handlers", [mine])
    monkeypatch.setattr(root, "level", logging.WARNING)
    monkeypatch.setattr(logger, "handlers", [])
    monkeypatch.setattr(logger, "level", logging.NOTSET)
    logger.manager._clear_cache()
    ensure_console_output()  # what every logger_type does
    assert (logger.level, logger.handlers) == (logging.NOTSET, [])
    logger.info("not shown")
    assert mine.stream.getvalue() == ""
    ensure_console_output(explicit=True)  # logger_type="console"
    assert (logger.level, logger.handlers) == (logging.INFO, [])
    logger.info("shown")
    assert mine.stream.getvalue() == "shown\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the fallback without CUDA")
def test_device_argument_is_accepted_and_cuda_falls_back_on_a_cpu_machine(caplog):
    class Quadratic(ImplicitProblem):
        def training_step(self, batch):
            return (self.module.weight.sum() - 1.0) ** 2

    made = []
    for device in ("cuda", "cpu", None):
        net = torch.nn.Linear(1, 1, bias=False)
        made.append(Quadratic("p", module=net, device=device,
                              optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                              train_data_loader=[torch.zeros(1)]))
    with caplog.at_level(logging.WARNING, logger="betty"):
        for problem in made:
            Engine([problem], EngineConfig(train_iters=1, distributed=False)).run()
    assert [p.device for p in made] == [torch.device("cpu")] * 3
    assert "device=cuda requested but CUDA is not available" in caplog.text
    with pytest.raises(Exception, match="distributed='yes' must be True or False"):
        EngineConfig(distributed="yes")
