"""`TaskBatchedProblem`: T tasks adapted at once by one vectorised inner loop (MAML-style).

The user writes ``training_step`` (and ``forward``) for ONE task, with ``self.module(x)`` as
usual; the problem's batch holds the tasks stacked (every tensor has a leading dim T). Each
unroll window starts every task from ``initial_parameters()`` (for MAML, the upper's
meta-initialisation), differentiably: ``w_0 = θ`` expanded to T copies. A local step is

    losses = vmap(task_loss)(w, batch)     # one vectorised forward over the T tasks
    g = autograd.grad(losses.sum(), w)     # one backward: task t's gradient in row t
    w, s = step(w, g, s)                   # the user's optimizer, read as a pure function

where ``step`` is `betty.optim.functional_optimizer(optimizer)` applied to the stacked
tensors: every supported rule is elementwise with a shared step counter, so this equals T
separate per-task steps. The backward builds its graph (``create_graph``), so an upper with
``Config(first_order=False)`` back-propagates through the K steps to ``θ`` (exact MAML).
After the window, ``self.<name>(x)`` runs ``forward`` vmapped over the tasks with their
adapted parameters, so the upper's query loss is one line. Optimizer state starts fresh each
window (each task is trained from scratch); BatchNorm statistics are kept per task; random
operations (dropout) draw independently per task.

Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning", ICML 2017.

Example:
    >>> class Inner(TaskBatchedProblem):
    ...     def initial_parameters(self):
    ...         return self.meta.module          # every window starts from θ
    ...     def training_step(self, batch):      # ONE task's support set
    ...         x, y = batch
    ...         return F.mse_loss(self.module(x), y)
    >>> class Meta(ImplicitProblem):             # Config(first_order=False)
    ...     def training_step(self, batch):      # query sets, stacked [T, n, ...]
    ...         x, y = batch
    ...         return F.mse_loss(self.inner(x), y)
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.func import vmap

from betty.errors import ConfigError, TrainingError
from betty.problems.iterative import IterativeProblem
from betty.problems.pipeline import Clip
from betty.problems.window import FunctionalUpdate

if TYPE_CHECKING:
    from betty.engine import Engine


def count_tasks(owner: str, tree: Any) -> int:
    """T, the leading dim shared by every tensor of ``tree``; a clear error otherwise."""
    tensors = [t for t in pytree.tree_leaves(tree) if isinstance(t, Tensor)]
    sizes = {t.shape[0] if t.dim() else None for t in tensors}
    if len(sizes) != 1 or None in sizes:
        raise TrainingError(
            f"problem '{owner}': a TaskBatchedProblem takes tensors stacked per task, all "
            f"with the same leading dimension T (the number of tasks); got shapes "
            f"{[tuple(t.shape) for t in tensors]}. Stack each task's tensors with torch.stack"
        )
    return int(tensors[0].shape[0])


def vmap_tasks(fn: Any, params: Sequence[Tensor], buffers: Sequence[Tensor], tree: Any) -> Any:
    """``vmap(fn)(params, buffers, tree)`` over the leading task dim of every tensor.

    The arguments go to vmap as one flat tuple of tensors with ``in_dims=0`` (non-tensor
    leaves of ``tree`` are closed over), so vmap does no pytree work of its own: on a small
    network that bookkeeping costs as much as the forward pass.
    """
    leaves, spec = pytree.tree_flatten(tree)
    where = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    n_params, n_buffers = len(params), len(buffers)

    def flat_fn(*flat: Tensor) -> Any:
        task_leaves = list(leaves)
        for i, t in zip(where, flat[n_params + n_buffers:]):
            task_leaves[i] = t
        return fn(flat[:n_params], flat[n_params:n_params + n_buffers],
                  pytree.tree_unflatten(task_leaves, spec))

    return vmap(flat_fn, randomness="different")(
        *params, *buffers, *(leaves[i] for i in where))


class TaskBatchedProblem(IterativeProblem):
    """A level that adapts T copies of its parameters to T tasks at once (reverse mode)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._task_buffers: list[Tensor] | None = None
        self._tasks = 0

    # -- the hook this problem type adds ------------------------------------------------
    def initial_parameters(self) -> torch.nn.Module | Mapping[str, Tensor] | None:
        """Where every task's adaptation starts, read at each window start (and once before
        training, to check names and shapes).

        Return a module with this problem's parameter names (e.g. ``self.meta.module`` for
        MAML: gradients then flow to it), or a mapping from parameter names to tensors, or
        None (the default) for this problem's own module. Buffers come from a returned
        module when it has them, else from this problem's module.
        """
        return None

    # -- set-up --------------------------------------------------------------------------
    def initialize(self, engine: Engine, device: torch.device) -> None:
        """`IterativeProblem.initialize`; refuses first-order uppers and lowers of its own."""
        super().initialize(engine, device)
        forward_uppers = [p.name for p in self.parents if p.config.first_order]
        if forward_uppers:
            raise ConfigError(
                f"problem '{self.name}' is a TaskBatchedProblem, differentiated only in "
                f"reverse mode, but its uppers {forward_uppers} have first_order=True; set "
                "Config(first_order=False) on them"
            )
        if self.children:
            raise ConfigError(
                f"problem '{self.name}' is a TaskBatchedProblem with lower problems "
                f"{[p.name for p in self.children]}; it can only be a lower level"
            )

    def _make_clip(self) -> Clip:
        return Clip(self.config.gradient_clipping, per_task=True)

    def _window_is_module(self) -> bool:
        return False  # per-task copies: the module keeps its own parameters

    def _restarts_windows(self) -> bool:
        return True  # None from initial_parameters() means this problem's own module

    # -- window: per-task copies ---------------------------------------------------------
    def _open_window(self) -> None:
        self._close_window()  # T is known from the first batch only: _resume_window starts

    def _close_window(self) -> None:
        assert self._window is not None
        self._window.close()
        self._task_buffers = None

    def _resume_window(self, batch: Any) -> None:
        assert self._window is not None
        if not self._window.open:
            self._start(count_tasks(self.name, batch))

    def _start(self, tasks: int) -> None:
        """Window start: T copies of the initial values (a view of them: differentiable)."""
        window = self._window
        assert window is not None
        params, buffers = self.initial_values()
        self._tasks = tasks
        w = [p.unsqueeze(0).expand(tasks, *p.shape) for p in params]
        self._task_buffers = [
            (own if b is None else b).detach().unsqueeze(0).expand(tasks, *own.shape).clone()
            for b, own in zip(buffers, window.buffers)]
        window.start(w, window.fresh_state(w))

    @contextmanager
    def _task_slots(self, params: Sequence[Tensor], buffers: Sequence[Tensor]
                    ) -> Iterator[None]:
        """The module holds one task's tensors (inside vmap) and its own ones afterwards."""
        window = self._window
        assert window is not None
        window.swap_in(params)
        window.swap_buffers(buffers)
        try:
            yield
        finally:
            window.swap_in(window.real)
            window.swap_buffers(window.buffers)

    # -- one vectorised local step -------------------------------------------------------
    def _window_gradients(self, batch: Any, create_graph: bool
                          ) -> tuple[list[Tensor | None], dict[str, Any]]:
        """Per-task gradients ``[T, ...]`` and per-task logged values averaged over tasks."""
        window = self._window
        assert window is not None and window.w is not None
        assert self._task_buffers is not None
        if count_tasks(self.name, batch) != self._tasks:
            raise TrainingError(
                f"problem '{self.name}': this window adapts {self._tasks} tasks but the batch "
                f"holds {count_tasks(self.name, batch)}; keep T fixed within a window"
            )
        # The forward runs vmapped; the backward is ONE ordinary autograd pass over the sum
        # of the T task losses: the tasks share no tensor, so d(sum)/d w[t] is task t's own
        # gradient. This builds a plain autograd graph (no functorch grad levels), which is
        # both faster than vmap(grad(...)) and what reverse mode back-propagates through.
        if create_graph:
            w = [t if t.requires_grad else t.detach().requires_grad_() for t in window.w]
        else:
            w = [t.detach().requires_grad_() for t in window.w]

        def task_loss(params: tuple[Tensor, ...], buffers: tuple[Tensor, ...],
                      task_batch: Any) -> tuple[Tensor, Any]:
            with self._task_slots(params, buffers):
                loss, extras = self.compute_loss(task_batch)
            if len(extras) == 1:  # only the loss: a bare tensor is cheaper for vmap's pytrees
                return loss
            return loss, {k: v.detach() for k, v in extras.items() if isinstance(v, Tensor)}

        with torch.enable_grad():
            out = vmap_tasks(task_loss, w, self._task_buffers, batch)
            losses, logged = (out, out.detach()) if isinstance(out, Tensor) else out
            micro = self.config.gradient_accumulation
            total = losses.sum() if micro == 1 else losses.sum() / micro
            grads = torch.autograd.grad(total, w, create_graph=create_graph,
                                        allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(w, grads)]
        # Several processes: NO all-reduce here (unlike IterativeProblem). Each rank adapts
        # its own tasks, so row t is one task's gradient on this rank only; the upper's
        # gradient is averaged over the ranks (docs/distributed.md, "MAML").
        if isinstance(logged, Tensor):
            loss_dict = {"loss": logged.mean(0)}
        else:
            loss_dict = {k: (v if v.is_floating_point() else v.double()).mean(0)
                         for k, v in logged.items()}
        self._last_loss = loss_dict["loss"]
        if self._guard is not None and self._guard.active:
            self.observe_loss()
            self._guard.observe(self.name, self.count, "gradient", grads)
        return list(grads), loss_dict

    # -- what users call -----------------------------------------------------------------
    def adapt(self, batch: Any, *, steps: int | None = None) -> dict[str, Tensor]:
        """Adapt to the stacked tasks of ``batch`` from ``initial_parameters()``.

        Takes ``steps`` (default ``Config.unroll_steps``) vectorised steps with fresh
        optimizer state, differentiably unless grad mode is off, and makes the result the
        adapted state ``self(x)`` uses; the step count and scheduler do not move. For
        evaluation on new tasks, e.g. in ``Engine.validation``.
        """
        assert self._local_step is not None
        self._close_window()
        self._start(count_tasks(self.name, batch))
        differentiable = torch.is_grad_enabled()
        update = FunctionalUpdate(self._window, differentiable=lambda: differentiable,
                                  first_order_updates=self.config.first_order_updates,
                                  swap=False)
        for _ in range(self.config.unroll_steps if steps is None else steps):
            grads = self._window_gradients(batch, differentiable)[0]
            update(grads, self._local_step.clip)
        return self.adapted_parameters()

    def adapted_parameters(self) -> dict[str, Tensor]:
        """Every task's current parameters by name, stacked with a leading dim T."""
        window = self._window
        if window is None or window.w is None:
            raise TrainingError(
                f"problem '{self.name}' has no adapted parameters yet: they exist from the "
                "first local step of a window on (or after adapt(batch))"
            )
        return dict(zip(window.names, window.w))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``forward`` of each task's adapted model on that task's inputs (vmapped over the
        leading dim T of every tensor argument); the output is stacked the same way."""
        params = list(self.adapted_parameters().values())
        assert self._task_buffers is not None
        if count_tasks(self.name, (args, kwargs)) != self._tasks:
            raise TrainingError(
                f"problem '{self.name}' holds {self._tasks} adapted tasks but was called with "
                f"{count_tasks(self.name, (args, kwargs))}; stack one input per task"
            )

        def task_forward(params: tuple[Tensor, ...], buffers: tuple[Tensor, ...],
                         inputs: tuple[tuple[Any, ...], dict[str, Any]]) -> Any:
            with self._task_slots(params, buffers):
                return self.forward(*inputs[0], **inputs[1])

        return vmap_tasks(task_forward, params, self._task_buffers, (args, kwargs))
