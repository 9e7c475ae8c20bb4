"""Loggers behind `EngineConfig.logger_type`, imported lazily (tensorboard, wandb optional).

Everything also goes to Python's ``logging`` under the ``betty`` logger name.
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch

log = logging.getLogger("betty")


def to_float(value: Any) -> Any:
    """A loggable Python value (a one-element tensor becomes a float: one host read)."""
    if isinstance(value, torch.Tensor):
        return float(value.detach()) if value.numel() == 1 else value.detach().cpu().tolist()
    return value


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        value = to_float(value)
        parts.append(f"{key}: {value:.6g}" if isinstance(value, float) else f"{key}: {value}")
    return " | ".join(parts)


class Logger(Protocol):
    def log(self, metrics: dict[str, Any], *, tag: str, step: int | None) -> None: ...

    def close(self) -> None: ...


class ConsoleLogger:
    """One line per logged step under the ``betty`` logger."""

    def log(self, metrics: dict[str, Any], *, tag: str, step: int | None) -> None:
        if log.isEnabledFor(logging.INFO):  # formatting reads values from the device
            log.info("[%s] [step %s] %s", tag, step, format_metrics(metrics))

    def close(self) -> None:
        pass


class TensorBoardLogger(ConsoleLogger):
    """Scalars to a TensorBoard event file under ``log_dir``, tagged ``<tag>/<key>``."""

    def __init__(self, log_dir: str | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=log_dir)

    def log(self, metrics: dict[str, Any], *, tag: str, step: int | None) -> None:
        super().log(metrics, tag=tag, step=step)
        for key, value in metrics.items():
            value = to_float(value)
            if isinstance(value, (int, float)):
                self.writer.add_scalar(f"{tag}/{key}", value, step)

    def close(self) -> None:
        self.writer.close()


class WandbLogger(ConsoleLogger):
    """wandb: starts a run if the user has none (WANDB_MODE=offline honoured)."""

    def __init__(self, project: str = "betty", name: str | None = None) -> None:
        import wandb

        self.wandb = wandb
        self.owns_run = wandb.run is None
        if self.owns_run:
            wandb.init(project=project, name=name)

    def log(self, metrics: dict[str, Any], *, tag: str, step: int | None) -> None:
        super().log(metrics, tag=tag, step=step)
        values = {f"{tag}/{k}": to_float(v) for k, v in metrics.items()}
        self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.owns_run and self.wandb.run is not None:
            self.wandb.finish()


class NullLogger:
    def log(self, metrics: dict[str, Any], *, tag: str, step: int | None) -> None:
        pass

    def close(self) -> None:
        pass


def make_logger(logger_type: str) -> Logger:
    if logger_type == "tensorboard":
        return TensorBoardLogger()
    if logger_type == "wandb":
        return WandbLogger()
    if logger_type == "console":
        return ConsoleLogger()
    return ConsoleLogger()
