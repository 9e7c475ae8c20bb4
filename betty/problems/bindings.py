"""Which step's weights a module's parameter slots hold, for computations that run later.

An `IterativeProblem`'s window puts a new tensor ``w_t`` into its module's parameter slots at
every step, and an upper in reverse mode back-propagates through all of them after the window
has moved on. Anything recomputed during that backward (activation checkpointing) must read
the weights of the step it belongs to, not the slots as they are then:

* `RecordedBindings` (around every ``training_step`` while such a window is open): each
  tensor saved for backward carries what the slots held, and unpacking it puts that back;
* `Bound` (``betty.recompute_context``): the same for one checkpointed forward anywhere;
* `unbound_windows` (around an upper's backward through the windows): the slots hold
  `Unbound` placeholders, so a read nothing recorded raises instead of using wrong weights.

`docs/reverse_mode.md#activation-checkpointing`.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from betty.errors import TrainingError

if TYPE_CHECKING:
    from betty.problems.window import FunctionalWindow

# windows whose tensors go into their module's parameter slots (an IterativeProblem's):
# activation checkpointing must see, when it recomputes, what those slots held at its forward
SLOTTED: weakref.WeakSet[FunctionalWindow] = weakref.WeakSet()


class Unbound(Tensor):
    """What a window's parameter slots hold while an upper back-propagates through it: a
    recomputation that reads them without a recorded binding (`RecordedBindings`, `Bound`)
    would run with the window's last weights instead of those of the step it recomputes, so
    any use raises."""

    owner = ""

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        raise TrainingError(
            f"problem '{cls.owner}': its module ran during the backward of an upper in reverse "
            "mode, and nothing recorded which step of the unroll window that forward belongs "
            "to (a forward outside training_step, recomputed by activation checkpointing?). "
            "Run the module inside training_step, or pass context_fn=betty.recompute_context "
            "(and use_reentrant=False) to torch.utils.checkpoint.checkpoint"
        )


def slot_snapshot() -> list[tuple[FunctionalWindow, list[Tensor]]]:
    """What the slots of every open slotted window hold now."""
    return [(w, w.slot_contents()) for w in list(SLOTTED) if w.open]


# the snapshot the slots hold through `_rebind`; None once anything else swaps them
_REBOUND: list[Any] = [None]
_NOTHING = contextlib.nullcontext()


def forget_rebinding() -> None:
    """The slots were swapped by someone else: the next `_rebind` swaps again."""
    _REBOUND[0] = None


def _rebind(snapshot: list[tuple[FunctionalWindow, list[Tensor]]]) -> None:
    if _REBOUND[0] is not snapshot:
        for window, tensors in snapshot:
            window.swap_in(tensors)
        _REBOUND[0] = snapshot


class RecordedBindings(torch.autograd.graph.saved_tensors_hooks):
    """Around a forward beside open slotted windows: each tensor it saves for backward
    carries what the windows' slots held, and unpacking it puts that back (once per change).
    A non-reentrant ``torch.utils.checkpoint`` saves its segment's inputs this way before it
    takes the segment's own saved tensors over, and unpacks them right before recomputing the
    segment, so the recomputation reads the weights of the step it belongs to."""

    def __init__(self, snapshot: list[tuple[FunctionalWindow, list[Tensor]]]) -> None:
        def pack(tensor: Tensor) -> tuple[Tensor, Any]:
            # detached, as torch's own recomputation hook does: an op's saved output held
            # with its grad_fn would tie the graph in a reference cycle (freed only by gc)
            return tensor.detach(), snapshot

        def unpack(packed: tuple[Tensor, Any]) -> Tensor:
            _rebind(packed[1])
            return packed[0]

        super().__init__(pack, unpack)


def recording_bindings() -> contextlib.AbstractContextManager[Any]:
    """`RecordedBindings` of the open slotted windows, or nothing when there are none."""
    snapshot = slot_snapshot() if SLOTTED else None
    return RecordedBindings(snapshot) if snapshot else _NOTHING


class Bound:
    """Re-enterable context (a checkpoint may recompute once per backward): the slots hold
    ``snapshot``'s tensors inside, what they held before after."""

    def __init__(self, snapshot: list[tuple[FunctionalWindow, list[Tensor]]]) -> None:
        self.snapshot = snapshot
        self.before: list[list[tuple[FunctionalWindow, list[Tensor]]]] = []

    def __enter__(self) -> None:
        self.before.append([(w, w.slot_contents()) for w, _ in self.snapshot])
        for window, tensors in self.snapshot:
            window.swap_in(tensors)

    def __exit__(self, *exc: object) -> None:
        for window, tensors in self.before.pop():
            window.swap_in(tensors)


@contextmanager
def unbound_windows() -> Iterator[None]:
    """Every open slotted window's slots hold `Unbound` placeholders inside (an upper's
    backward through the windows), their tensors after."""
    with Bound([(w, w.placeholders()) for w, _ in slot_snapshot()]):
        yield
