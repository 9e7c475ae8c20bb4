"""Seeing a run: console lines, TensorBoard, wandb, CSV and a progress bar.

`make_logger` builds the `RunLogger` behind ``EngineConfig.logger_type``; the optional
packages (tensorboard, wandb, tqdm) are imported only when used. Everything is also written
to Python's ``logging`` under the ``betty`` logger name (INFO level), printed to standard
output by default as the original Betty does; users configure it like any other logger.
"""

from betty.logging.base import (
    Logger,
    Record,
    format_metrics,
    learning_rates,
    records_to_host,
    to_float,
    to_host,
)
from betty.logging.console import ConsoleLogger, ensure_console_output
from betty.logging.csv import CSVLogger
from betty.logging.progress import ProgressBar
from betty.logging.run import RunLogger, make_logger
from betty.logging.tensorboard import TensorBoardLogger
from betty.logging.wandb import WandbLogger

__all__ = [
    "CSVLogger",
    "ConsoleLogger",
    "Logger",
    "ProgressBar",
    "Record",
    "RunLogger",
    "TensorBoardLogger",
    "WandbLogger",
    "ensure_console_output",
    "format_metrics",
    "learning_rates",
    "make_logger",
    "records_to_host",
    "to_float",
    "to_host",
]
