"""The functional unroll window of a reverse-mode problem, and its differentiable update.

Inside a window the module's parameter slots hold functional tensors ``w_t``; each optimizer
step is the user's optimizer read as a pure function (`betty.optim.functional_optimizer`):
``w_{t+1}, s_{t+1} = step(w_t, g_t, s_t)``, out of place, so an upper in reverse mode
back-propagates through the whole window (`docs/math.md#reverse-mode`). At the window end
the values (and optimizer state) are written back into the real parameters. `IterativeProblem`
holds one `FunctionalWindow`; `TaskBatchedProblem` holds one whose tensors carry a leading
task dimension ``T`` and never enter the module's slots outside its vmapped forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from betty.errors import ProblemDefinitionError
from betty.problems import bindings
from betty.problems.pipeline import Clip, Grads

Slot = tuple[torch.nn.Module, str]

def detach_state(state: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v.detach() if isinstance(v, Tensor) else v for k, v in s.items()}
            for s in state]


def mark_stepped(optimizer: Any) -> None:
    """What ``optimizer.step()`` records for LR schedulers, which warn 'scheduler stepped
    before the optimizer' otherwise: functional steps never call ``optimizer.step()``."""
    optimizer._opt_called = True  # noqa: SLF001 - torch's own flag; no public setter


def parameter_slots(module: torch.nn.Module, buffers: bool = False) -> dict[int, list[Slot]]:
    """Every (submodule, attribute) that holds each parameter (or buffer) of ``module``."""
    named = module.named_buffers if buffers else module.named_parameters
    slots: dict[int, list[Slot]] = {}
    for full, tensor in named(remove_duplicate=False):
        owner, _, leaf = full.rpartition(".")
        slots.setdefault(id(tensor), []).append((module.get_submodule(owner), leaf))
    return slots


class FunctionalWindow:
    """The live window of one problem: its functional parameters ``w`` and optimizer state,
    the module slots they go into, and the write-back into the real parameters."""

    def __init__(self, owner: str, module: torch.nn.Module, fopt: Any) -> None:
        self.owner = owner
        self.fopt = fopt
        self.real: list[Tensor] = list(fopt.params)
        slots = parameter_slots(module)
        missing = [i for i, p in enumerate(self.real) if id(p) not in slots]
        if missing:
            raise ProblemDefinitionError(
                f"problem '{owner}': optimizer parameters {missing} are not parameters of "
                "its module; an IterativeProblem's optimizer must optimize its own module"
            )
        self.slots = [slots[id(p)] for p in self.real]
        names = {id(p): n for n, p in module.named_parameters()}
        self.names = [names[id(p)] for p in self.real]
        self.buffer_names = [n for n, _ in module.named_buffers()]
        self.buffers = [b for _, b in module.named_buffers()]
        buffer_slots = parameter_slots(module, buffers=True)
        self.buffer_slots = [buffer_slots[id(b)] for b in self.buffers]
        self.w: list[Tensor] | None = None
        self.state: list[dict[str, Any]] | None = None
        self.suspended = False  # cut by the end of Engine.run with its graph kept
        self._placeholders: list[Tensor] | None = None

    @property
    def open(self) -> bool:
        return self.w is not None

    def fresh_state(self, params: Sequence[Tensor]) -> list[dict[str, Any]]:
        """Optimizer state as at the first step (no history), one dict per parameter."""
        groups = [g for g in self.fopt.optimizer.param_groups for _ in g["params"]]
        return [self.fopt.rule.init(w, g) for w, g in zip(params, groups)]

    def start(self, w: list[Tensor], state: list[dict[str, Any]]) -> None:
        self.w, self.state, self.suspended = w, state, False

    def start_from_real(self) -> None:
        # clones, not detached views: writing back into the real parameters at the window
        # end must not bump the version of tensors saved in the window's graph
        self.start([p.detach().clone().requires_grad_(p.requires_grad) for p in self.real],
                   self.fopt.init_state(self.real))

    def close(self) -> None:
        self.w = self.state = None
        self.suspended = False

    # -- module slots --------------------------------------------------------------------
    def swap_in(self, tensors: Sequence[Tensor]) -> None:
        """Put ``tensors`` into the module's parameter slots (bypassing Parameter checks:
        inside a window the slots hold plain tensors in the autograd graph)."""
        bindings.forget_rebinding()
        for slots, tensor in zip(self.slots, tensors):
            for module, name in slots:
                module._parameters[name] = tensor  # type: ignore[assignment]  # noqa: SLF001

    def slot_contents(self) -> list[Tensor]:
        """The tensor each parameter's (first) slot holds now."""
        return [slots[0][0]._parameters[slots[0][1]]  # noqa: SLF001 - as swap_in
                for slots in self.slots]

    def placeholders(self) -> list[Tensor]:
        """`Unbound` tensors shaped as the parameters, on the meta device (no memory)."""
        if self._placeholders is None:
            cls = type("Unbound", (bindings.Unbound,), {"owner": self.owner})
            self._placeholders = [torch.empty(p.shape, dtype=p.dtype, device="meta")
                                  .as_subclass(cls) for p in self.real]
        return self._placeholders

    def swap_buffers(self, tensors: Sequence[Tensor]) -> None:
        for slots, tensor in zip(self.buffer_slots, tensors):
            for module, name in slots:
                module._buffers[name] = tensor  # noqa: SLF001 - as swap_in, for buffers

    def write_back(self) -> None:
        """Real parameters and optimizer state take the window's current values."""
        assert self.w is not None and self.state is not None
        with torch.no_grad():
            torch._foreach_copy_(self.real, [w.detach() for w in self.w])
        self.fopt.write_back(detach_state(self.state))


class FunctionalUpdate:
    """The update of the local-step pipeline for a window: clip -> (first-order
    stop-gradient) -> ``w, s = step(w, g, s)``, differentiable when the upper needs it."""

    def __init__(self, window: FunctionalWindow, *, first_order_updates: bool,
                 differentiable: Callable[[], bool], swap: bool) -> None:
        self.window = window
        self.first_order_updates = first_order_updates
        self.differentiable = differentiable
        self.swap = swap  # IterativeProblem: the module's slots hold the window's tensors
        if swap:
            bindings.SLOTTED.add(window)

    def __call__(self, total: Grads, clip: Clip) -> bool:
        window = self.window
        assert window.w is not None and window.state is not None
        grads = [torch.zeros_like(w) if g is None else g for g, w in zip(total, window.w)]
        grads = clip(grads)
        w, state = window.w, window.state
        differentiable = self.differentiable()
        if not differentiable:
            w, state, grads = [t.detach() for t in w], detach_state(state), \
                [g.detach() for g in grads]
        if differentiable and self.first_order_updates:
            # first-order MAML: each update is a constant, w_{t+1} = w_t + stopgrad(Δ_t), so
            # d w_K / d w_0 = I and the upper's gradient at w_K reaches w_0 unchanged
            base = [t.detach() for t in w]
            stepped, state = window.fopt.step(base, [g.detach() for g in grads],
                                              detach_state(state))
            w = [t + (new - old) for t, new, old in zip(w, stepped, base)]
        else:
            w, state = window.fopt.step(w, grads, state)
        mark_stepped(window.fopt.optimizer)
        if not differentiable:
            w = [t.requires_grad_(p.requires_grad) for t, p in zip(w, window.real)]
        window.w, window.state = w, state
        if self.swap:
            window.swap_in(w)
        return False  # param_callback runs at the write-back, on the real parameters
