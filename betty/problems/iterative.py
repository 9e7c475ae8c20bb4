"""`IterativeProblem`: differentiable unrolled updates, for reverse-mode hypergradients.

The user's code is the same as for an `ImplicitProblem` (``self.module(x)`` inside
``training_step``). The problem holds a `FunctionalWindow` (`betty.problems.window`): inside
an unroll window the module's parameter slots hold functional tensors ``w_t``, and the
pipeline's update is the user's optimizer read as a pure function, out of place. When an
upper has ``Config(first_order=False)`` the gradients are taken with ``create_graph=True``,
so the upper's loss back-propagates through the whole window (exact reverse mode,
MAML-style); ``Config.truncation_steps = N`` keeps only the last N updates in the graph. At
each window end the values are written back to the real parameters, and the graph is cut when
the next window starts, so memory stays flat. Buffers (BatchNorm statistics) are the
module's own and are updated in place as usual.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from betty.errors import ConfigError, ProblemDefinitionError
from betty.optim import functional_optimizer
from betty.problems.problem import LIBRARY_PARAMETERS, Problem
from betty.problems.window import FunctionalUpdate, FunctionalWindow, detach_state

if TYPE_CHECKING:
    from betty.engine import Engine


class IterativeProblem(Problem):
    """A level whose updates inside an unroll window are differentiable (reverse mode)."""

    supports_reverse_mode = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._window: FunctionalWindow | None = None
        self._reverse = False  # an upper back-propagates through the windows
        self._restarts = False  # every window starts from initial_parameters()

    # -- the hook this problem type adds ------------------------------------------------
    def initial_parameters(self) -> torch.nn.Module | Mapping[str, Tensor] | None:
        """Where each unroll window starts, read at every window start (and once before
        training, to check names and shapes).

        None (the default): from this problem's current parameters and optimizer state, so
        training simply continues across windows. A module with this problem's parameter
        names (e.g. ``self.meta.module`` for MAML) or a mapping name -> tensor: every window
        restarts from those tensors, with fresh optimizer state and, when the returned
        module has them, its buffer values. Under an upper with ``Config(first_order=False)``
        the start is differentiable (``w_0`` is a clone in the graph), so the upper's
        gradient reaches the returned tensors: one task per window is MAML.
        """
        return None

    # -- set-up --------------------------------------------------------------------------
    def initialize(self, engine: Engine, device: torch.device) -> None:
        """`Problem.initialize`, then the functional window over the user's optimizer."""
        if self.config.precision == "fp16":
            raise ConfigError(
                f"problem '{self.name}': {type(self).__name__} does not support "
                "precision='fp16' (a loss scaler cannot act inside a differentiable update); "
                "use 'bf16' or 'fp32'"
            )
        super().initialize(engine, device)
        if self.optimizer is None:
            raise ProblemDefinitionError(f"problem '{self.name}': IterativeProblem needs an "
                                         "optimizer")
        try:
            fopt = functional_optimizer(self.optimizer)
        except TypeError as err:
            raise ProblemDefinitionError(f"problem '{self.name}': {err}") from None
        assert self.module is not None and self._local_step is not None
        self._window = FunctionalWindow(self.name, self.module, fopt)
        self.refresh_parameters()
        self._local_step.update = FunctionalUpdate(
            self._window, first_order_updates=self.config.first_order_updates,
            differentiable=self._differentiable_now, swap=self._window_is_module())
        self._restarts = self._restarts_windows()
        if self._restarts:
            if self.clock.roll_back:
                raise ConfigError(
                    f"problem '{self.name}' restarts every window from "
                    "initial_parameters(), so EngineConfig.roll_back has nothing to replay; "
                    "set roll_back=False"
                )
            self.initial_values()  # names and shapes: fail before training
        reverse = [p for p in self.parents if not p.config.first_order]
        if reverse and len(reverse) != len(self.parents):
            raise ConfigError(
                f"problem '{self.name}': its uppers mix first_order=False "
                f"({[p.name for p in reverse]}) and first_order=True; use one mode for all "
                "uppers of an IterativeProblem"
            )
        self._reverse = bool(reverse)

    def _window_is_module(self) -> bool:
        """Whether the window's tensors are this module's parameters (written back at the
        window end); a `TaskBatchedProblem`'s are per-task copies that never are."""
        return True

    def _restarts_windows(self) -> bool:
        return self.initial_parameters() is not None

    def initial_values(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """``initial_parameters()`` as this problem's parameters and buffers, in order (a
        buffer the source lacks is None); a clear error for missing names or shapes."""
        assert self.module is not None and self._window is not None
        window = self._window
        source = self.initial_parameters()
        source = self.module if source is None else source
        if isinstance(source, torch.nn.Module):
            params, buffers = dict(source.named_parameters()), dict(source.named_buffers())
        elif isinstance(source, Mapping):
            params, buffers = dict(source), {}
        else:
            raise ProblemDefinitionError(
                f"problem '{self.name}': initial_parameters() returned "
                f"{type(source).__name__}; return a module, a dict name -> tensor, or None"
            )
        missing = [n for n, p in zip(window.names, window.real)
                   if n not in params or params[n].shape != p.shape]
        if missing:
            raise ProblemDefinitionError(
                f"problem '{self.name}': initial_parameters() lacks parameters {missing} of "
                "the shapes this problem's module has; return a module of the same "
                "architecture (e.g. the upper's module) or a dict name -> tensor"
            )
        return ([params[n] for n in window.names],
                [buffers.get(n) for n in window.buffer_names])

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The real parameters (the slots may hold functional tensors inside a window)."""
        if self._window is not None:
            return list(self._window.real)  # type: ignore[arg-type]
        return super().trainable_parameters()

    def window_parameters(self) -> list[Tensor] | None:
        """The functional parameters of the live window (None outside a window)."""
        return None if self._window is None else self._window.w

    # -- the window ----------------------------------------------------------------------
    def _close_window(self) -> None:
        """Put the real parameters back in the module and drop the window's graph."""
        window = self._window
        if window is not None and window.open:
            window.swap_in(window.real)
            window.close()

    def _open_window(self) -> None:
        window = self._window
        assert window is not None
        if not self._restarts:
            window.start_from_real()
        else:
            params, buffers = self.initial_values()
            w = [p.clone() if self._reverse and p.requires_grad
                 else p.detach().clone().requires_grad_(real.requires_grad)
                 for p, real in zip(params, window.real)]
            window.start(w, window.fresh_state(w))
            with torch.no_grad():
                for real, start in zip(window.buffers, buffers):
                    if start is not None and start is not real:
                        real.copy_(start)
        window.swap_in(window.w or [])

    def _mid_window(self) -> bool:
        """Inside an unroll window whose start matters: one an upper differentiates, or one
        restarted from initial_parameters()."""
        return ((self._reverse or self._restarts) and not self.clock.window_start
                and self.clock.steps_into_window != 0)

    def settle(self) -> None:
        """Training stops: write a partial window's progress into the real parameters and
        give the module its parameters back. A window whose start matters keeps its graph
        (and any micro-batch gradients not yet applied), suspended, so that the next
        `Engine.run` continues it exactly; any other window's graph is dropped."""
        window = self._window
        if window is None or not window.open or not self._window_is_module():
            return
        window.write_back()
        assert self._local_step is not None
        if self._mid_window() or self._local_step.accumulator.pending:
            window.swap_in(window.real)
            window.suspended = True
            return
        self._close_window()

    def checkpoint_blocker(self) -> str | None:
        """Mid-window, a window whose start matters (differentiated by an upper, or restarted
        from initial_parameters()) cannot be saved: its history is a graph back to w_0."""
        assert self._local_step is not None
        if self._local_step.accumulator.pending:
            return (f"problem '{self.name}' holds gradients of micro-batches not yet applied "
                    "(Config.gradient_accumulation) inside its unroll window")
        if not self._mid_window():
            return None
        return (f"problem '{self.name}' is {self.clock.steps_into_window} local steps into "
                f"its {self.clock.length}-step unroll window, whose differentiable history "
                "(the graph back to the window start) a checkpoint cannot hold")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """`Problem.load_state_dict`, after closing any window."""
        self._close_window()  # a loaded state starts from the real parameters
        super().load_state_dict(state)

    # -- one differentiable local step ---------------------------------------------------
    def _differentiable_now(self) -> bool:
        if not self._reverse:
            return False
        keep = self.config.truncation_steps
        return keep <= 0 or self.clock.step_in_window >= self.config.unroll_steps - keep

    def _descend(self, batch: Any, *, step_scheduler: bool = True) -> dict[str, Any]:
        assert self._local_step is not None
        self._resume_window(batch)
        differentiable = self._differentiable_now()
        create_graph = differentiable and not self.config.first_order_updates
        grads, loss_dict = self._window_gradients(batch, create_graph)
        _, total = self._local_step(grads, last=self.clock.last_micro_batch)
        if total is None:
            return loss_dict
        self._keep_stepped_gradient([None if g is None else g.detach() for g in total])
        if step_scheduler and not self.clock.will_roll_back() and self.scheduler is not None:
            self.scheduler.step()
        if self.clock.window_complete and self._window_is_module():
            self._write_back()
        return loss_dict

    def _resume_window(self, batch: Any) -> None:
        """Open the window at its first local step, or continue a suspended one."""
        window = self._window
        assert window is not None
        if not window.open:
            self._open_window()
        elif window.suspended:  # a window cut by the end of the last run: continue it
            window.swap_in(window.w or [])
            window.suspended = False

    def _window_gradients(self, batch: Any, create_graph: bool
                          ) -> tuple[list[Tensor | None], dict[str, Any]]:
        """This micro-batch's gradient at the window's parameters, and the dict to log."""
        window = self._window
        assert window is not None and window.w is not None and self._gradients is not None
        loss, loss_dict = self.compute_loss(batch)
        self._last_loss = loss.detach()
        if self._guard.active:
            self.observe_loss()
        micro = self.config.gradient_accumulation
        grads = self._gradients(loss if micro == 1 else loss / micro, window.w,
                                create_graph=create_graph, retain_graph=self._retain_graph)
        return grads, loss_dict

    def _write_back(self) -> None:
        """Window end: real parameters and optimizer state take the functional values."""
        assert self._window is not None
        self._window.write_back()
        if self.hooks.param_callback is not None:
            self.hooks.param_callback(self._window.real)
        if not self._reverse or self.clock.in_warmup:
            # no upper back-propagates through this window: the real parameters serve
            self._close_window()

    def roll_back_step(self) -> bool:
        """`Problem.roll_back_step` from the real parameters (the window closed)."""
        self._close_window()
        return super().roll_back_step()

    def hop_loss(self) -> Tensor:
        """Implicit hops through this problem perturb the real parameters: use them."""
        window = self._window
        live = None if window is None or window.suspended or not self._window_is_module() \
            else window.w
        if live is not None:
            window.swap_in(window.real)  # type: ignore[union-attr]
        try:
            return super().hop_loss()
        finally:
            if live is not None:
                window.swap_in(live)  # type: ignore[union-attr]

    def state_dict(self) -> dict[str, Any]:
        """`Problem.state_dict`, with a live window's optimizer state written back."""
        window = self._window
        if window is not None and window.state is not None and self._window_is_module():
            window.fopt.write_back(detach_state(window.state))
        return super().state_dict()


LIBRARY_PARAMETERS.add(IterativeProblem.trainable_parameters)
