"""A tqdm progress bar over global steps: it/s and the latest loss of each problem.

Off when ``EngineConfig.progress_bar`` is False, when tqdm is not installed, or when the
output is not a terminal (a log file or CI stays clean). The losses are read from the device
only when the bar shows them (at most every ``interval`` seconds), never once per step.
While the bar is shown, console log lines are routed around it (``tqdm.write``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

from betty.logging.base import to_host


class ProgressBar:
    """``update()`` once per global step; ``close()`` at the end of training.

    Args:
        problems: the program's problems (their latest losses are shown).
        total: the last global step (``train_iters``); initial: the step training starts from.
        enabled: ``EngineConfig.progress_bar``.
        file: where to draw (default ``sys.stderr``); it must be a terminal.
        interval: seconds between two readings of the losses.
    """

    def __init__(self, problems: Sequence[Any], *, total: int, initial: int = 0,
                 enabled: bool = True, file: IO[str] | None = None,
                 interval: float = 0.5) -> None:
        self.problems = list(problems)
        self.interval = interval
        self._next_read = 0.0
        self._bar: Any = None
        self._redirect: contextlib.ExitStack | None = None
        stream = file if file is not None else sys.stderr
        if not (enabled and _isatty(stream) and importlib.util.find_spec("tqdm")):
            return
        import logging

        from tqdm import tqdm
        from tqdm.contrib.logging import logging_redirect_tqdm

        self._bar = tqdm(total=total, initial=initial, file=stream,
                         dynamic_ncols=True, mininterval=interval)
        self._redirect = contextlib.ExitStack()
        self._redirect.enter_context(logging_redirect_tqdm(
            loggers=[logging.getLogger(), logging.getLogger("betty")]))

    @property
    def shown(self) -> bool:
        return self._bar is not None

    def losses(self) -> str:
        """``name=loss`` of every problem that has stepped (one host read for all)."""
        named = [(p.name, p.last_loss.detach()) for p in self.problems
                 if p.last_loss is not None]
        values = to_host([loss for _, loss in named])
        return ", ".join(f"{name}={value:.4g}" for (name, _), value in zip(named, values))

    @property
    def active(self) -> bool:
        """Whether a bar is shown (the per-step loop skips `update` otherwise)."""
        return self._bar is not None

    def update(self) -> None:
        """One more global step; refresh the losses only when the bar is due to redraw."""
        if self._bar is None:
            return
        now = time.monotonic()
        if now >= self._next_read:
            self._next_read = now + self.interval
            self._bar.set_postfix_str(self.losses(), refresh=False)
        self._bar.update(1)

    def close(self) -> None:
        """Show the final losses on the bar and close it (nothing when there is no bar)."""
        if self._bar is None:
            return
        self._bar.set_postfix_str(self.losses(), refresh=False)
        self._bar.close()
        self._bar = None
        if self._redirect is not None:
            self._redirect.close()


def _isatty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty()) if isatty is not None else False
    except ValueError:  # a closed stream
        return False
