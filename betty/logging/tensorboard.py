"""TensorBoard: scalars tagged ``<source>/<key>`` in an event file under the run's folder."""

from __future__ import annotations

from collections.abc import Sequence

from betty.logging.base import Record, is_number


class TensorBoardLogger:
    """Writes every numeric metric with ``SummaryWriter.add_scalar`` at the record's step."""

    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional: needs `tensorboard`

        self.log_dir = log_dir
        self.writer = SummaryWriter(log_dir=log_dir)

    def write(self, records: Sequence[Record], *, global_step: int) -> None:
        """One scalar per value, tagged ``<source>/<key>``, at the record's step."""
        for record in records:
            step = global_step if record.step is None else record.step
            for key, value in record.metrics.items():
                if is_number(value):
                    self.writer.add_scalar(f"{record.tag}/{key}", value, step)

    def close(self) -> None:
        """Flush and close the event file."""
        self.writer.close()
