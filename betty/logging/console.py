"""Console lines through Python's ``logging`` under the ``betty`` logger name.

One line per record (a problem, or ``validation``, at one step), aligned in columns::

    step     120 | inner      | loss=0.693147    acc=0.5         lr=0.1
    step     120 | outer      | loss=0.25        lr=0.001
    local     12 | meta       | loss=1.5                       (Config.log_local_step)

As in the original Betty, these lines are on by default: the first engine gives the ``betty``
logger the INFO level and a handler printing to standard output in the original's format
(``[2024-01-31 12:00:00] [INFO] step 120 | inner | loss=...``), unless logging was configured
already (a handler on ``betty`` or the root logger: then its levels decide). Users configure
it like any logger, e.g. ``logging.getLogger("betty").setLevel("WARNING")`` for silence, or
``logging.getLogger("betty").setLevel("INFO")`` to see the lines under their own handlers.
Nothing is formatted (and no tensor is read) unless that logger is enabled for INFO.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Sequence
from typing import IO, Any

from betty.logging.base import Record, format_value

log = logging.getLogger("betty")

VALUE_WIDTH = 11  # fits "%.6g" of most floats, e.g. -1.23457e-05
_HANDLER_MARK = "_betty_console"
LINE_FORMAT = "[%(asctime)s] [%(levelname)s] %(message)s"  # the original Betty's
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class StdoutHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever ``sys.stdout`` is when a line is emitted (so
    ``contextlib.redirect_stdout``, notebooks and test capture see the lines)."""

    def __init__(self) -> None:
        super().__init__(sys.stdout)

    @property  # type: ignore[override]
    def stream(self) -> IO[str]:
        return sys.stdout

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it
        pass


def ensure_console_output(*, explicit: bool = False) -> None:
    """Make INFO lines of the ``betty`` logger visible, unless the user configured logging.

    When no handler would receive the lines (none on ``betty`` or an ancestor, e.g. none from
    ``logging.basicConfig``), adds a standard-output handler and, if ``betty`` has no level of
    its own, sets INFO. When logging is configured, it is left alone: a root level of WARNING
    keeps betty quiet too. ``explicit`` (``logger_type="console"``) also sets INFO then, when
    ``betty`` has no level of its own.
    """
    configured = log.hasHandlers()
    if log.level == logging.NOTSET and (explicit or not configured):
        log.setLevel(logging.INFO)
    if not configured:
        handler = StdoutHandler()
        handler.setFormatter(logging.Formatter(LINE_FORMAT, DATE_FORMAT))
        setattr(handler, _HANDLER_MARK, True)
        log.addHandler(handler)


class ConsoleLogger:
    """One aligned line per record, at INFO level on the ``betty`` logger."""

    def __init__(self, names: Iterable[str] = ()) -> None:
        self.order = {name: i for i, name in enumerate(names)}  # lines of a step in this order
        self.name_width = max([10, *(len(n) for n in self.order)])
        self.step_width = 6

    @staticmethod
    def enabled() -> bool:
        """Whether the ``betty`` logger prints INFO lines (else lines are not even built)."""
        return log.isEnabledFor(logging.INFO)

    def line(self, record: Record, *, global_step: int) -> str:
        """The console line of one record: its step, its source and its values, aligned
        with the lines before it."""
        step = global_step if record.step is None else record.step
        self.step_width = max(self.step_width, len(str(step)))
        self.name_width = max(self.name_width, len(record.tag))
        where = "local" if step != global_step else "step"  # Config.log_local_step
        cells = [f"{key}={format_value(value):<{VALUE_WIDTH}}"
                 for key, value in record.metrics.items()]
        return (f"{where:<5} {step:>{self.step_width}} | {record.tag:<{self.name_width}} | "
                + " ".join(cells)).rstrip()

    def write(self, records: Sequence[Record], *, global_step: int) -> None:
        """Log one line per record to the ``betty`` logger at INFO."""
        if not self.enabled():
            return
        last = len(self.order)
        for record in sorted(records, key=lambda r: self.order.get(r.tag, last)):
            log.info("%s", self.line(record, global_step=global_step))

    def close(self) -> None:
        """Nothing to release: lines are written as they come."""
