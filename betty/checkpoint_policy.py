"""When a running engine saves: every ``checkpoint_step`` global steps, and when it is asked
to stop (Ctrl-C, SIGTERM from a scheduler, ``kill`` or a container runtime).

A stop request only sets a flag; the engine finishes its global step, saves (when
``checkpoint_dir`` is set) and then stops: ``KeyboardInterrupt`` for Ctrl-C, ``SystemExit``
(status 143) for SIGTERM. A second Ctrl-C stops at once without saving. A save that falls
inside an unroll window a file cannot hold (reverse mode, accumulation inside a window) waits
for the window to end. `betty.checkpoint` itself only writes, reads and verifies files.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from betty.engine import Engine

log = logging.getLogger("betty")

SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_stop(enabled: bool) -> Iterator[Callable[[], int | None]]:
    """While active, a first SIGINT or SIGTERM only records the signal, read by the yielded
    function (None until one came); a second SIGINT raises `KeyboardInterrupt` at once.
    Inactive when not ``enabled``, off the main thread, or for a signal that already has a
    handler of the program's own."""
    hit: list[int] = []
    defaults = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    usable = enabled and threading.current_thread() is threading.main_thread()
    mine = [s for s in SIGNALS if usable and signal.getsignal(s) is defaults[s]]

    def handler(signum: int, frame: Any) -> None:
        if hit and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if not hit:
            hit.append(signum)
        log.warning("%s: saving a checkpoint at the end of this global step (or of the "
                    "unroll window it is in), then stopping%s", signal.Signals(signum).name,
                    " (press Ctrl-C again to stop at once without saving)"
                    if signum == signal.SIGINT else "")

    for s in mine:
        signal.signal(s, handler)
    try:
        yield lambda: hit[0] if hit else None
    finally:
        for s in mine:
            signal.signal(s, defaults[s])


def checkpoint_blockers(problems: list[Any]) -> list[str]:
    """Why the program cannot be checkpointed at this global step (empty: it can)."""
    return [why for p in problems if (why := p.checkpoint_blocker()) is not None]


class CheckpointPolicy:
    """Decides, after each global step of `Engine.run`, whether to save and whether to stop."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.config = engine.config
        self.due = False  # a periodic checkpoint waiting for an unroll window to end
        self.waiting_since: int | None = None

    @contextlib.contextmanager
    def watching(self) -> Iterator[None]:
        """Stop requests are deferred to the end of a global step inside this context."""
        with deferred_stop(self.config.checkpoint_dir is not None) as received:
            self._received = received
            yield

    def after_step(self, step: int) -> None:
        """Save if due or asked to stop (once the window allows); then stop if asked."""
        engine, config = self.engine, self.config
        # several processes stop together: one rank's signal stops them all
        signum = self._received() if config.checkpoint_dir is not None else None
        stop = engine.strategy.any(signum is not None)
        self.due = self.due or bool(config.checkpoint_step and step % config.checkpoint_step
                                    == 0)
        if not (stop or self.due) or self._must_wait(step):
            return
        path = engine.save_checkpoint()
        self.due = False
        if not stop:
            return
        log.warning("stopped: checkpoint saved to %s", path)
        if signum == signal.SIGTERM:
            raise SystemExit(128 + signal.SIGTERM)
        raise KeyboardInterrupt

    def _must_wait(self, step: int) -> bool:
        blockers = checkpoint_blockers(self.engine.problems)
        if not blockers:
            self.waiting_since = None
            return False
        if self.waiting_since is None:
            self.waiting_since = step
            log.info("checkpoint of global step %d deferred to the end of the unroll window: "
                     "%s", step, "; ".join(blockers))
        return True
