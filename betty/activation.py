"""Activation checkpointing that every hypergradient method differentiates exactly.

`torch.utils.checkpoint` (non-reentrant) recomputes a segment's forward when a backward needs
its activations, reading the module's parameters as they are *then*. With the implicit
methods that is the same tensor as at the forward. In reverse mode it is not: an
`IterativeProblem` puts a new tensor ``w_t`` into its module's slots at every step of the
unroll window, and the upper's backward recomputes every step's segments after the window
has moved on (`docs/reverse_mode.md#activation-checkpointing`). Inside ``training_step`` betty
records, with every tensor a forward saves, what the windows' slots held, and a checkpoint's
saved inputs put it back right before the recomputation (`betty.problems.bindings
.RecordedBindings`): a plain ``torch.utils.checkpoint`` is exact there. `recompute_context`
does the same for a checkpoint whose forward runs anywhere else; `activation_checkpoint` is
the non-reentrant checkpoint with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch.utils.checkpoint

from betty.problems.bindings import Bound, slot_snapshot

__all__ = ["activation_checkpoint", "recompute_context"]


def recompute_context() -> tuple[contextlib.AbstractContextManager[None],
                                 contextlib.AbstractContextManager[None]]:
    """A ``context_fn`` for ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``:
    the recomputation runs with the module parameters the forward ran with.

    Outside a reverse-mode window it changes nothing, so a module checkpointed this way
    gives the same result under every method. Hugging Face models take it as
    ``model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant":
    False, "context_fn": betty.recompute_context})`` (``gradient_checkpointing_enable(
    gradient_checkpointing_kwargs=...)`` before transformers 5.2x).
    """
    return contextlib.nullcontext(), Bound(slot_snapshot())


def activation_checkpoint(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
    context_fn=recompute_context, **kwargs)``: drop ``function``'s activations after the
    forward and recompute them in the backward, exactly under every method."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                             context_fn=recompute_context, **kwargs)
