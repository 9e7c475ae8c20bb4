"""The schedule of a program: each problem's window clock and the engine's ready flags.

A problem counts local steps (micro-batches). ``gradient_accumulation = k`` micro-batches make
one optimizer step; ``unroll_steps = n`` optimizer steps make one unroll window of ``n * k``
local steps. A window that ends after ``warmup_steps`` triggers the problem's uppers; an upper
steps once every lower on its ``l2u`` list has triggered it (its ready flags). With
``EngineConfig.roll_back``, a lower's window is a look-ahead: its start is snapshotted, and
after the uppers step the window is undone and replayed as one real step.

Everything here is plain integers and booleans, derived once from the graph and the configs
at set-up and saved in a checkpoint as one unit (`Schedule.state_dict`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol


class _Configured(Protocol):  # what the schedule reads of a problem
    name: str
    config: Any
    children: list[Any]
    parents: list[Any]


@dataclass
class WindowClock:
    """One problem's position in its unroll windows (``count`` is its local step)."""

    unroll_steps: int = 1
    micro_batches: int = 1
    warmup_steps: int = 0
    roll_back: bool = False  # EngineConfig.roll_back and the problem has uppers
    count: int = 0
    window_start: bool = True  # the next local step opens a new window

    @property
    def length(self) -> int:
        """Local steps per unroll window: ``unroll_steps * gradient_accumulation``."""
        return self.unroll_steps * self.micro_batches

    def open_window(self) -> tuple[bool, bool]:
        """Before the next local step: ``(opens, snapshot_due)``: whether it opens a window
        (the problem then runs ``on_inner_loop_start``), and whether a roll-back snapshot of
        the problem's state is due first."""
        opens = self.window_start
        # a warm-up window ends without triggering anything: its end is the next start
        snapshot = self.roll_back and (opens or self.count % self.length == 0)
        self.window_start = False
        return opens, snapshot

    def tick(self, training: bool) -> None:
        """Count the local step (steps in eval mode do not count)."""
        if training:
            self.count += 1

    def end_step(self, training: bool) -> bool:
        """After the local step: True when it ended a window that triggers the uppers."""
        ends = (training and self.count % self.length == 0
                and self.count > self.warmup_steps)
        if ends:
            self.window_start = True
        return ends

    @property
    def last_micro_batch(self) -> bool:
        """Whether the current local step completes an optimizer step."""
        return self.count % self.micro_batches == 0

    @property
    def step_in_window(self) -> int:
        """0-based index of the current optimizer step inside its window."""
        return ((self.count - 1) % self.length) // self.micro_batches

    @property
    def steps_into_window(self) -> int:
        """Local steps taken in the current window (0 at a window boundary)."""
        return self.count % self.length

    @property
    def window_complete(self) -> bool:
        """Whether the current local step is the last of a window (warm-up included)."""
        return self.count % self.length == 0

    @property
    def in_warmup(self) -> bool:
        return self.count <= self.warmup_steps

    def will_roll_back(self) -> bool:
        """Whether the current local step is a look-ahead that its window's end will undo
        (a warm-up window triggers nothing, so its steps are real ones)."""
        if not self.roll_back:
            return False
        return -(-self.count // self.length) * self.length > self.warmup_steps

    def state_dict(self) -> dict[str, Any]:
        return {"count": self.count, "window_start": self.window_start}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.count = int(state["count"])
        self.window_start = bool(state["window_start"])


def clock_for(config: Any, *, roll_back: bool) -> WindowClock:
    """The clock a problem with this `Config` runs on."""
    return WindowClock(unroll_steps=config.unroll_steps,
                       micro_batches=config.gradient_accumulation,
                       warmup_steps=config.warmup_steps, roll_back=roll_back)


class Schedule:
    """The program's clocks and ready flags, built once from the wired graph."""

    def __init__(self, problems: Sequence[_Configured], *, roll_back: bool) -> None:
        self.clocks = {p.name: clock_for(p.config, roll_back=roll_back and bool(p.parents))
                       for p in problems}
        # ready[upper][i]: lower number i of `upper.children` has triggered it
        self._children = {p.name: [c.name for c in p.children] for p in problems}
        self.ready = {p.name: [False] * len(p.children) for p in problems}

    def clock(self, name: str) -> WindowClock:
        return self.clocks[name]

    def trigger(self, upper: str, lower: str) -> bool:
        """Record that ``lower`` ended a window; True once every lower of ``upper`` has."""
        flags = self.ready[upper]
        flags[self._children[upper].index(lower)] = True
        return all(flags)

    def reset(self, upper: str) -> None:
        """``upper`` stepped: wait for all of its lowers again."""
        flags = self.ready[upper]
        flags[:] = [False] * len(flags)

    def state_dict(self) -> dict[str, Any]:
        return {"ready": {k: list(v) for k, v in self.ready.items()},
                "clocks": {k: c.state_dict() for k, c in self.clocks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name, flags in state["ready"].items():
            self.ready[name][:] = [bool(f) for f in flags]
        for name, clock in state["clocks"].items():
            self.clocks[name].load_state_dict(clock)
