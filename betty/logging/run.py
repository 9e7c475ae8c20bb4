"""`RunLogger`: what the engine logs through; it buffers a global step and emits it once.

During a global step, problems (at their ``Config.log_step``), validation and diagnostics add
records with `RunLogger.log`; nothing is read from the device then. `RunLogger.flush` (called
by the engine at the end of each global step, and whenever the global step moved on) reads
all values at once and hands the step's records to every backend in one call each.
"""

from __future__ import annotations

import importlib.util
import os
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime
from typing import Any

from betty.errors import ConfigError
from betty.logging.base import Logger, Record, detach, records_to_host
from betty.logging.console import ConsoleLogger, ensure_console_output

Factory = Callable[[], Logger]

_NEEDS = {"tensorboard": ("tensorboard", "tensorboard"), "wandb": ("wandb", "wandb")}


class RunLogger:
    """Buffers records per global step. `Engine.run` opens the backends when it starts
    and closes them when it ends (a later run opens them again).

    Args:
        factories: one callable per backend (TensorBoard, wandb, CSV), called lazily.
        console: the console lines (Python logging, ``betty`` logger), or None.
        clock: the current global step (the engine's), to flush when it moves on.
    """

    def __init__(self, factories: Sequence[Factory] = (), *,
                 console: ConsoleLogger | None = None,
                 clock: Callable[[], int] | None = None) -> None:
        self.factories = list(factories)
        self.console = console
        self.clock = clock
        self.backends: list[Logger] | None = None
        self._pending: list[Record] = []
        self._pending_step = 0

    @property
    def active(self) -> bool:
        """Whether anything would receive a record (else `log` does no work at all)."""
        return bool(self.factories) or (self.console is not None and self.console.enabled())

    def log(self, metrics: dict[str, Any], *, tag: str, step: int | None) -> None:
        """Buffer ``metrics`` (tensors stay on the device) of source ``tag`` at ``step``."""
        if not self.active:
            return
        now = self.clock() if self.clock is not None else (step or 0)
        if self._pending and now != self._pending_step:
            self.flush()
        self._pending_step = now
        self._pending.append(Record(tag, step, detach(metrics)))

    def has_pending(self) -> bool:
        """Whether records wait to be emitted (a cheap check for the per-step loop)."""
        return bool(self._pending)

    def flush(self) -> None:
        """Emit the buffered records: one host read, then one call per backend."""
        if not self._pending:
            return
        pending, self._pending = self._pending, []
        records = records_to_host(pending)
        if self.console is not None:
            self.console.write(records, global_step=self._pending_step)
        for backend in self.open():
            backend.write(records, global_step=self._pending_step)

    def open(self) -> list[Logger]:
        """Open the backends (start a wandb run, ...) unless open; else done on first use."""
        if self.backends is None and self.factories:
            opened: list[Logger] = []
            try:
                for factory in self.factories:
                    opened.append(factory())
            except BaseException:
                for backend in opened:
                    backend.close()
                raise
            self.backends = opened
        return self.backends or []

    def close(self) -> None:
        """Flush, then close the backends (finishes a wandb run this logger started)."""
        try:
            self.flush()
        finally:
            backends, self.backends = self.backends or [], None
            for backend in backends:
                backend.close()


def default_run_name() -> str:
    """A run's name when none is given: the local time, ``YYYYmmdd-HHMMSS``."""
    return time.strftime("%Y%m%d-%H%M%S")


def check_available(logger_type: str) -> None:
    """Raise `ConfigError` before training if the backend's package is not installed."""
    if logger_type in _NEEDS:
        module, package = _NEEDS[logger_type]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(
                f"EngineConfig.logger_type={logger_type!r} needs the '{package}' package; "
                f"install it (pip install {package}, or pip install 'betty-ml[logging]') or "
                "choose logger_type 'console', 'csv' or 'none'"
            )


def is_rank_zero() -> bool:
    """Whether this process prints (only rank 0 of a process group does, as in the original)."""
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def tensorboard_folder(log_dir: str | None, run_name: str | None) -> str:
    """``<log_dir>/<run_name or a time stamp>``; without ``log_dir`` the original Betty's
    ``betty_tensorboard/<Mon DD_HH-MM-SS>_<host name>`` (``run_name`` replaces the last part)."""
    if log_dir is not None:
        return os.path.join(log_dir, run_name or default_run_name())
    stamp = f"{datetime.now().strftime('%b%d_%H-%M-%S')}_{socket.gethostname()}"
    return os.path.join("betty_tensorboard", run_name or stamp)


def make_logger(logger_type: str = "none", *, log_dir: str | None = None,
                run_name: str | None = None, names: Iterable[str] = (),
                config: dict[str, Any] | None = None,
                clock: Callable[[], int] | None = None) -> RunLogger:
    """The `RunLogger` for ``EngineConfig.logger_type``.

    Every type writes console lines, as the original Betty does: `ensure_console_output`
    turns them on unless the user configured logging (``"console"`` turns them on then too,
    at the ``betty`` logger's level); only rank 0 of a process group prints.
    ``"tensorboard"`` writes under `tensorboard_folder`; ``"csv"`` under
    ``<log_dir or "runs">/<run_name or a time stamp>``; ``"wandb"`` passes ``run_name`` and
    ``log_dir`` to ``wandb.init``. ``"none"`` and ``"console"`` write nothing else.
    """
    check_available(logger_type)
    main = is_rank_zero()
    if main:
        ensure_console_output(explicit=logger_type == "console")
    folder = os.path.join(log_dir or "runs", run_name or default_run_name())
    factories: list[Factory] = []
    if logger_type == "tensorboard":
        from betty.logging.tensorboard import TensorBoardLogger

        board = tensorboard_folder(log_dir, run_name)
        factories.append(lambda: TensorBoardLogger(board))
    elif logger_type == "csv":
        from betty.logging.csv import CSVLogger

        factories.append(lambda: CSVLogger(os.path.join(folder, "metrics.csv")))
    elif logger_type == "wandb":
        from betty.logging.wandb import WandbLogger

        factories.append(lambda: WandbLogger(run_name=run_name, log_dir=log_dir, config=config))
    return RunLogger(factories, console=ConsoleLogger(names) if main else None, clock=clock)
