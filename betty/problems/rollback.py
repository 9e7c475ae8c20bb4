"""Roll-back (``EngineConfig.roll_back``): a lower's unroll window as a look-ahead.

At each window start the lower's module and optimizer state are snapshotted; after its uppers
have stepped on the look-ahead, the window is undone and replayed as one real step on its
last batch, with the uppers' new parameters (`betty.schedule` says when).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from betty.problems.data import move_to


class RollBack:
    """The snapshot of one problem's window start (owned state: ``cache``)."""

    def __init__(self) -> None:
        self.cache: dict[str, Any] | None = None

    def snapshot(self, module: torch.nn.Module, optimizer: Any) -> None:
        state = {"module": {k: v.detach().clone() for k, v in module.state_dict().items()}}
        if optimizer is not None:
            state["optimizer"] = copy.deepcopy(optimizer.state_dict())
        self.cache = state

    def restore(self, module: torch.nn.Module, optimizer: Any) -> bool:
        """Load the snapshot into ``module`` and ``optimizer``; False if there is none."""
        if self.cache is None:
            return False
        module.load_state_dict(self.cache["module"])
        if optimizer is not None and "optimizer" in self.cache:
            optimizer.load_state_dict(self.cache["optimizer"])
        self.cache = None
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"cache": self.cache}

    def load_state_dict(self, state: dict[str, Any], device: torch.device) -> None:
        self.cache = move_to(state["cache"], device)
