"""`IterativeProblem`: differentiable unrolled updates, for reverse-mode hypergradients.

The user's code is the same as for an `ImplicitProblem` (``self.module(x)`` inside
``training_step``). Inside an unroll window the module's parameter slots hold functional
tensors ``w_t``; each local step computes ``g = dL/dw(w_t)`` and the user's optimizer, read
as a pure function (`betty.optim.functional_optimizer`), gives ``w_{t+1} = step(w_t, g)`` out
of place. When an upper has ``Config(first_order=False)`` the gradients are taken with
``create_graph=True``, so the upper's loss back-propagates through the whole window (exact
reverse mode, MAML-style); ``Config.truncation_steps = N`` keeps only the last N updates in
the graph. At each window end the values (and optimizer state) are written back to the real
parameters, and the graph is cut when the next window starts, so memory stays flat.
Buffers (BatchNorm statistics) are the module's own and are updated in place as usual.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from betty.distributed.strategy import strategy_of
from betty.errors import ConfigError, ProblemDefinitionError
from betty.hypergradient.chain import path_hypergradient
from betty.optim import functional_optimizer
from betty.problems.problem import Problem

if TYPE_CHECKING:
    from betty.engine import Engine

Slot = tuple[torch.nn.Module, str]


def _detach(state: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v.detach() if isinstance(v, Tensor) else v for k, v in s.items()}
            for s in state]


def _mark_stepped(optimizer: Any) -> None:
    """What ``optimizer.step()`` records for LR schedulers, which warn 'scheduler stepped
    before the optimizer' otherwise: functional steps never call ``optimizer.step()``."""
    optimizer._opt_called = True


class IterativeProblem(Problem):
    """A level whose updates inside an unroll window are differentiable (reverse mode)."""

    supports_reverse_mode = True

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._w: list[Tensor] | None = None  # functional parameters of the live window
        self._fstate: list[dict[str, Any]] | None = None
        self._acc: list[Tensor] | None = None
        self._real: list[torch.nn.Parameter] = []
        self._slots: dict[int, list[Slot]] = {}
        self._names: list[str] = []
        self._buffer_names: list[str] = []
        self._buffer_real: list[Tensor] = []
        self._reverse = False
        self._restarts = False
        self._suspended = False  # a window cut by the end of Engine.run, graph kept

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
        super().initialize(engine, device)
        if self.config.precision == "fp16":
            raise ConfigError(
                f"problem '{self.name}': IterativeProblem does not support precision='fp16' "
                "(a loss scaler cannot act inside a differentiable update); use 'bf16' or "
                "'fp32'"
            )
        if self.optimizer is None:
            raise ProblemDefinitionError(f"problem '{self.name}': IterativeProblem needs an "
                                         "optimizer")
        try:
            self._fopt = functional_optimizer(self.optimizer)
        except TypeError as err:
            raise ProblemDefinitionError(f"problem '{self.name}': {err}") from None
        assert self.module is not None
        slots: dict[int, list[Slot]] = {}
        for full, param in self.module.named_parameters(remove_duplicate=False):
            owner, _, leaf = full.rpartition(".")
            slots.setdefault(id(param), []).append((self.module.get_submodule(owner), leaf))
        self._real = self._fopt.params
        missing = [i for i, p in enumerate(self._real) if id(p) not in slots]
        if missing:
            raise ProblemDefinitionError(
                f"problem '{self.name}': optimizer parameters {missing} are not parameters of "
                "its module; an IterativeProblem's optimizer must optimize its own module"
            )
        self._slots = slots
        names = {id(p): n for n, p in self.module.named_parameters()}
        self._names = [names[id(p)] for p in self._real]
        self._buffer_names, self._buffer_real = [], []
        for full, buf in self.module.named_buffers():
            self._buffer_names.append(full)
            self._buffer_real.append(buf)
        self._restarts = self._restarts_windows()
        if self._restarts:
            if self._rolls_back():
                raise ConfigError(
                    f"problem '{self.name}' restarts every window from "
                    "initial_parameters(), so EngineConfig.roll_back has nothing to replay; "
                    "set roll_back=False"
                )
            self._initial_values()  # names and shapes: fail before training
        reverse = [p for p in self.parents if not p.config.first_order]
        if reverse and len(reverse) != len(self.parents):
            raise ConfigError(
                f"problem '{self.name}': its uppers mix first_order=False "
                f"({[p.name for p in reverse]}) and first_order=True; use one mode for all "
                "uppers of an IterativeProblem"
            )
        self._reverse = bool(reverse)
        for parent in reverse:
            parent._shares_window_graph = len(reverse) > 1

    def _restarts_windows(self) -> bool:
        return self.initial_parameters() is not None

    def _initial_values(self) -> tuple[list[Tensor], list[Tensor | None]]:
        """``initial_parameters()`` as this problem's parameters and buffers, in order (a
        buffer the source lacks is None); a clear error for missing names or shapes."""
        assert self.module is not None
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
        missing = [n for n, p in zip(self._names, self._real)
                   if n not in params or params[n].shape != p.shape]
        if missing:
            raise ProblemDefinitionError(
                f"problem '{self.name}': initial_parameters() lacks parameters {missing} of "
                "the shapes this problem's module has; return a module of the same "
                "architecture (e.g. the upper's module) or a dict name -> tensor"
            )
        return ([params[n] for n in self._names],
                [buffers.get(n) for n in self._buffer_names])

    def _fresh_state(self, params: list[Tensor]) -> list[dict[str, Any]]:
        """Optimizer state as at the first step (no history), one dict per parameter."""
        groups = [g for g in self._fopt.optimizer.param_groups for _ in g["params"]]
        return [self._fopt.rule.init(w, g) for w, g in zip(params, groups)]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The real parameters (the slots may hold functional tensors inside a window)."""
        if self._real:
            return list(self._real)
        return super().trainable_parameters()

    def window_parameters(self) -> list[Tensor] | None:
        """The functional parameters of the live window (None outside a window)."""
        return self._w

    # -- parameter slots -----------------------------------------------------------------
    def _swap_in(self, tensors: list[Tensor] | list[torch.nn.Parameter]) -> None:
        for param, tensor in zip(self._real, tensors):
            for module, name in self._slots[id(param)]:
                module._parameters[name] = tensor  # type: ignore[assignment]

    def _end_previous_window(self) -> None:
        """Put the real parameters back in the module and drop the window's graph."""
        self._suspended = False
        if self._w is not None:
            self._swap_in(self._real)
            self._w, self._fstate, self._acc = None, None, None

    def _mid_window(self) -> bool:
        """Inside an unroll window whose start matters: one an upper differentiates, or one
        restarted from initial_parameters()."""
        length = self.config.unroll_steps * self.config.gradient_accumulation
        return ((self._reverse or self._restarts) and not self._window_start
                and self._count % length != 0)

    def _settle(self) -> None:
        """Training stops: write a partial window's progress into the real parameters and
        give the module its parameters back. A window whose start matters keeps its graph
        (and any micro-batch gradients not yet applied), suspended, so that the next
        `Engine.run` continues it exactly; any other window's graph is dropped."""
        if self._w is not None and self._fstate is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._real, [w.detach() for w in self._w])
            self._fopt.write_back(_detach(self._fstate))
        if self._w is not None and (self._mid_window() or self._acc is not None):
            self._swap_in(self._real)
            self._suspended = True
            return
        self._end_previous_window()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._end_previous_window()  # a loaded state starts from the real parameters
        super().load_state_dict(state)

    def _unsaveable_window(self) -> str | None:
        """Mid-window, a window whose start matters (differentiated by an upper, or restarted
        from initial_parameters()) cannot be saved: its history is a graph back to w_0."""
        if self._acc is not None:
            return (f"problem '{self.name}' holds gradients of micro-batches not yet applied "
                    "(Config.gradient_accumulation) inside its unroll window")
        if not self._mid_window():
            return None
        length = self.config.unroll_steps * self.config.gradient_accumulation
        return (f"problem '{self.name}' is {self._count % length} local steps into its "
                f"{length}-step unroll window, whose differentiable history (the graph back "
                "to the window start) a checkpoint cannot hold")

    def _begin_window(self) -> None:
        super()._begin_window()
        self._open_functional_state()

    def _open_functional_state(self) -> None:
        # clones, not detached views: writing back into the real parameters at the window
        # end must not bump the version of tensors saved in the window's graph
        if not self._restarts:
            self._w = [p.detach().clone().requires_grad_(p.requires_grad) for p in self._real]
            self._fstate = self._fopt.init_state(self._real)
        else:
            params, buffers = self._initial_values()
            self._w = [
                w.clone() if self._reverse and w.requires_grad
                else w.detach().clone().requires_grad_(p.requires_grad)
                for w, p in zip(params, self._real)
            ]
            self._fstate = self._fresh_state(self._w)
            with torch.no_grad():
                for real, start in zip(self._buffer_real, buffers):
                    if start is not None and start is not real:
                        real.copy_(start)
        self._swap_in(self._w)

    # -- one differentiable local step ---------------------------------------------------
    def _optimizer_step_index(self) -> int:
        """0-based index of the current optimizer step inside its unroll window."""
        gas = self.config.gradient_accumulation
        return ((self._count - 1) % (self.config.unroll_steps * gas)) // gas

    def _differentiable_now(self) -> bool:
        if not self._reverse:
            return False
        keep = self.config.truncation_steps
        return keep <= 0 or self._optimizer_step_index() >= self.config.unroll_steps - keep

    def _grads(self, loss: Tensor, create_graph: bool) -> list[Tensor]:
        """dL/dw at the functional parameters, plus this problem's own hypergradients."""
        assert self._w is not None
        paths = self._implicit_paths()
        heads: list[list[Tensor | None]] = []
        if paths:
            head_params = [path[1].trainable_parameters() for path in paths]
            flat = [p for head in head_params for p in head]
            got = iter(torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True))
            heads = [[next(got) for _ in head] for head in head_params]
        strategy = strategy_of(self)  # several processes: one all-reduce for all heads
        heads = strategy.average_nested(heads)
        grads = list(torch.autograd.grad(loss, self._w, create_graph=create_graph,
                                         allow_unused=True, materialize_grads=True))
        for path, head in zip(paths, heads):
            hyper = path_hypergradient(path, head)
            if hyper is not None:
                grads = [g + h for g, h in zip(grads, hyper)]
        # one all-reduce; inside the graph in reverse mode, so that back-propagation through
        # the update also averages the upper's gradients over the ranks
        return strategy.all_average(grads, differentiable=create_graph)

    def _clip(self, grads: list[Tensor]) -> list[Tensor]:
        """Differentiable global-norm clipping: g * min(1, c / ||g||)."""
        limit = self.config.gradient_clipping
        total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g)
                                                      for g in grads]))
        factor = torch.clamp(limit / (total + 1e-6), max=1.0)
        return [g * factor for g in grads]

    def _descend(self, batch: Any, *, step_scheduler: bool = True) -> dict[str, Any]:
        if self._w is None:
            self._open_functional_state()
        elif self._suspended:  # a window cut by the end of the last run: continue it
            self._swap_in(self._w)
            self._suspended = False
        assert self._w is not None and self._fstate is not None
        loss, loss_dict = self._loss_and_dict(batch)
        self._last_loss = loss.detach()
        gas = self.config.gradient_accumulation
        differentiable = self._differentiable_now()
        first_order = differentiable and self.config.first_order_updates
        create_graph = differentiable and not first_order
        grads = self._grads(loss if gas == 1 else loss / gas, create_graph)
        if gas > 1:
            grads = grads if self._acc is None else [a + g for a, g in zip(self._acc, grads)]
            self._acc = grads
            if self._count % gas != 0:
                return loss_dict
            self._acc = None
        if self.config.gradient_clipping > 0:
            grads = self._clip(grads)
        self.grad_callback(grads)
        self._last_grads = [g.detach() for g in grads]
        if first_order:
            # first-order MAML: each update is a constant, w_{t+1} = w_t + stopgrad(Δ_t), so
            # d w_K / d w_0 = I and the upper's gradient at w_K reaches w_0 unchanged
            base = [w.detach() for w in self._w]
            stepped, new_state = self._fopt.step(base, grads, _detach(self._fstate))
            new_w = [w + (new - old) for w, new, old in zip(self._w, stepped, base)]
        else:
            new_w, new_state = self._fopt.step(self._w, grads, self._fstate)
        _mark_stepped(self.optimizer)
        if not differentiable:
            new_w = [w.detach().requires_grad_(p.requires_grad)
                     for w, p in zip(new_w, self._real)]
            new_state = _detach(new_state)
        self._w, self._fstate = new_w, new_state
        self._swap_in(self._w)
        if step_scheduler and not self._will_roll_back() and self.scheduler is not None:
            self.scheduler.step()
        if self._count % (self.config.unroll_steps * gas) == 0:
            self._write_back()
        return loss_dict

    def _write_back(self) -> None:
        """Window end: real parameters and optimizer state take the functional values."""
        assert self._w is not None and self._fstate is not None
        with torch.no_grad():
            torch._foreach_copy_(self._real, [w.detach() for w in self._w])
        self._fopt.write_back(_detach(self._fstate))
        self.run_param_callback(self._real)
        if not self._reverse or self._count <= self.config.warmup_steps:
            # no upper back-propagates through this window: the real parameters serve
            self._end_previous_window()

    def roll_back_step(self) -> bool:
        self._end_previous_window()
        return super().roll_back_step()

    def hop_loss(self) -> Tensor:
        """Implicit hops through this problem perturb the real parameters: use them."""
        live = None if self._suspended else self._w
        if live is not None:
            self._swap_in(self._real)
        try:
            return super().hop_loss()
        finally:
            if live is not None:
                self._swap_in(live)

    def state_dict(self) -> dict[str, Any]:
        if self._fstate is not None:
            self._fopt.write_back(_detach(self._fstate))
        return super().state_dict()
