"""Weights & Biases: one ``run.log`` call per global step, keys ``<source>/<key>``.

A run is started when the user has none (``wandb.init``; ``WANDB_MODE=offline`` and the other
``WANDB_*`` variables are honoured by wandb itself) and finished when training ends; a run the
user started is used as is and left open.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from betty.logging.base import Record


class WandbLogger:
    """Logs each global step's records in one call, so wandb's step axis is the global step.

    A record logged against another step (``Config.log_local_step``) adds ``<source>/step``.
    """

    def __init__(self, *, run_name: str | None = None, log_dir: str | None = None,
                 config: dict[str, Any] | None = None) -> None:
        import wandb  # optional dependency

        self.owns_run = wandb.run is None
        if self.owns_run:
            settings: dict[str, Any] = {"project": os.environ.get("WANDB_PROJECT", "betty")}
            if run_name is not None:
                settings["name"] = run_name
            if log_dir is not None:
                os.makedirs(log_dir, exist_ok=True)
                settings["dir"] = log_dir
            if config is not None:
                settings["config"] = config
            wandb.init(**settings)
        self.run = wandb.run

    def write(self, records: Sequence[Record], *, global_step: int) -> None:
        """One ``wandb.log`` call per logged global step, keys ``<source>/<key>``."""
        payload: dict[str, Any] = {}
        for record in records:
            for key, value in record.metrics.items():
                payload[f"{record.tag}/{key}"] = value
            if record.step is not None and record.step != global_step:
                payload[f"{record.tag}/step"] = record.step
        self.run.log(payload, step=global_step)

    def close(self) -> None:
        """Finish the run if this logger started it (a run the program started stays open)."""
        if self.owns_run:
            self.run.finish()
