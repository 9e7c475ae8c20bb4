"""`Env`: the original Betty's environment base class (``from betty.envs import Env``).

An environment is an object the program steps itself, e.g. a task sampler that every problem
reads from: pass it as ``Engine(..., env=env)`` and each problem sees it as ``self.env``
(``engine.env`` too). The engine never calls it; a program's ``Engine.train_step`` override
usually calls ``self.env.step()`` before stepping the leaves, as the original's iMAML does.
"""

from __future__ import annotations

from typing import Any


class Env:
    """Base class of an environment: override `step` (and `reset` if it has state)."""

    def step(self, *args: Any, **kwargs: Any) -> Any:
        """Advance the environment (draw the next task, batch, observation ...)."""
        raise NotImplementedError(f"{type(self).__name__} must define step()")

    def reset(self) -> None:
        """Return to the initial state; the default does nothing."""


__all__ = ["Env"]
