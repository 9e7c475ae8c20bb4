"""The gradient of one local step: the problem's own plus the hypergradient of every path.

Written once for every kind of problem. For an upper ``U`` with paths ``[U, L1, ..., U]``,
one backward of ``U``'s loss gives both ``dL_U/dw_U`` (direct) and, per path, the head
``dL_U/dw_L1``; `betty.hypergradient.chain` carries each head down the path and back up
(`docs/math.md#chaining`). In reverse mode (``Config(first_order=False)``) the lowers'
unrolled updates are in the loss's graph and autograd covers them: no implicit path runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor

from betty.errors import HypergradientError, TrainingError
from betty.hypergradient.chain import head_is_exclusive, path_hypergradient
from betty.problems.bindings import unbound_windows

Grads = list[Tensor | None]


def checked_loss(owner: str, out: Any, count: int) -> tuple[Tensor, dict[str, Any]]:
    """The scalar loss of ``training_step``'s output (a tensor, or a dict with "loss") and
    the dict to log; a clear error for anything else."""
    loss, extras = (out.get("loss"), out) if isinstance(out, dict) else (out, None)
    if extras is not None and "loss" not in extras:
        raise TrainingError(
            f"problem '{owner}': training_step returned a dict without key 'loss' (keys: "
            f"{sorted(extras)}); put the scalar loss under 'loss'"
        )
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, Tensor) else type(loss).__name__
        raise TrainingError(
            f"problem '{owner}': training_step must return a scalar loss tensor, got {shape} "
            f"at local step {count}; reduce it, e.g. with .mean()"
        )
    loss = loss if loss.dim() == 0 else loss.reshape(())
    return loss, ({"loss": loss} if extras is None else {**extras, "loss": loss})


class PathGradients:
    """Direct gradient + hypergradients of one problem (``owner``) at each local step."""

    def __init__(self, owner: Any, strategy: Any, diagnostics: Any, guard: Any,
                 scaled: bool = False) -> None:
        self.owner = owner
        self.config = owner.config  # fixed at set-up, read every step
        self.strategy = strategy
        self.diagnostics = diagnostics
        # betty.guard.FiniteGuard; an fp16 loss scaler checks (and skips) its own gradients,
        # whose overflow is expected while it searches for the scale
        self.guard = guard
        self.checks = guard.active and not scaled
        self.seen = False  # a hypergradient reached this problem at least once
        self.moved = False  # a gradient (direct or not) reached its parameters once

    def __call__(self, loss: Tensor, wrt: Sequence[Tensor], *, create_graph: bool = False,
                 retain_graph: bool = False) -> Grads:
        """Gradients of ``loss`` w.r.t. ``wrt`` (the problem's parameters, or the functional
        parameters of its window) plus every path's hypergradient, averaged over ranks."""
        owner, strategy, config = self.owner, self.strategy, self.config
        if not loss.requires_grad:
            raise TrainingError(
                f"problem '{owner.name}': the loss does not depend on any parameter that "
                "requires grad; training_step must use this problem's module"
            )
        reached = False
        all_paths = owner.paths
        reverse = bool(all_paths) and not config.first_order
        if reverse and not self.seen:
            with unbound_windows():
                reached = reverse_paths_reach(all_paths, loss, wrt)
        paths = all_paths if config.first_order else []
        guard = self.guard
        if not all_paths and strategy.world_size == 1 and not create_graph:
            direct = self._direct_only(loss, wrt, retain_graph)
            if self.checks:
                guard.observe(owner.name, owner.count, "gradient", direct)
            return direct
        # reverse mode: the backward runs through the lowers' windows, whose module slots
        # must not be read meanwhile (betty.problems.bindings)
        with unbound_windows() if reverse else nullcontext():
            direct, heads, prescaled = self._direct_and_heads(loss, wrt, paths, create_graph,
                                                              retain_graph)
        if self.checks:
            guard.observe(owner.name, owner.count, "gradient", direct)
        if strategy.world_size > 1:  # several processes: one all-reduce for all heads
            heads = strategy.average_nested(heads)
        if self.diagnostics is not None and owner.paths:  # EngineConfig.diagnostics
            self.diagnostics.record_norm(owner.name, "direct_norm", direct)
        total = direct
        for path, head, scaled in zip(paths, heads, prescaled):
            hyper = path_hypergradient(path, head, prescaled=scaled)
            if hyper is None:
                continue
            reached = True
            if self.checks:
                guard.observe(owner.name, owner.count, "hypergradient", hyper)
            total = [h if d is None else d + h for d, h in zip(total, hyper)]
        if owner.paths and not reached and not self.seen:
            names = [" -> ".join(p.name for p in path) for path in owner.paths]
            raise HypergradientError(
                f"problem '{owner.name}': every hypergradient path ({names}) carries nothing: "
                f"the loss of '{owner.name}' does not use the parameters of the lower "
                "problems on its paths, or those problems' losses do not use the parameters "
                f"of '{owner.name}'. Fix training_step or dependencies['u2l']"
            )
        self.seen = self.seen or reached
        if strategy.world_size > 1:
            # one all-reduce of direct + hypergradients; inside the graph in reverse mode, so
            # back-propagation through the update averages the upper's gradients too
            if create_graph:
                return strategy.all_average(total, differentiable=True)
            return strategy.average_optional(total)
        return total

    def _direct_only(self, loss: Tensor, wrt: Sequence[Tensor], retain: bool) -> Grads:
        grads = list(torch.autograd.grad(loss, list(wrt), retain_graph=retain,
                                         allow_unused=True))
        if not self.config.allow_unused:
            self._check_used(grads)
        if not self.moved:
            self._check_moves(grads)
        return grads

    def _check_moves(self, grads: Grads) -> None:
        """Checked at the first step only: with no hypergradient path, a loss that uses none
        of the problem's own parameters would leave them where they are forever."""
        if any(g is not None for g in grads):
            self.moved = True
            return
        owner = self.owner
        lowers = [c.name for c in owner.children]
        fix = (f"its lowers {lowers} have no dependencies['u2l'] entry from "
               f"'{owner.name}', so no hypergradient reaches it; add "
               f"dependencies['u2l'] = {{'{owner.name}': {lowers}}} if its parameters enter "
               "their losses" if lowers else "use them in training_step")
        raise TrainingError(
            f"problem '{owner.name}': its loss uses none of its own trainable parameters, "
            f"so they would never move; {fix}"
        )

    def _direct_and_heads(self, loss: Tensor, wrt: Sequence[Tensor], paths: list[list[Any]],
                          create_graph: bool, retain: bool
                          ) -> tuple[Grads, list[Grads], list[bool]]:
        """One backward for the direct gradient and every path's first vector (two when the
        direct part must stay differentiable: the heads never need a graph), and whether
        each head came out multiplied by its sama lower's P already (`HeadScaling`)."""
        heads = [path[1].parameter_list() for path in paths]
        if create_graph:
            flat = [p for head in heads for p in head]
            got = iter(torch.autograd.grad(loss, flat, retain_graph=True, allow_unused=True)
                       if flat else ())
            head_grads = [[next(got) for _ in head] for head in heads]
            direct = list(torch.autograd.grad(loss, list(wrt), create_graph=True,
                                              allow_unused=True, materialize_grads=True))
            return direct, head_grads, [False] * len(heads)
        inputs: list[Tensor] = list(wrt)
        index: dict[int, int] = {id(p): i for i, p in enumerate(inputs)} if heads else {}
        for head in heads:
            for p in head:
                if id(p) not in index:
                    index[id(p)] = len(inputs)
                    inputs.append(p)
        scalings = [path[1].head_scaling(self.owner.name) if head_is_exclusive(path) else None
                    for path in paths]
        try:
            for scaling, head in zip(scalings, heads):
                if scaling is not None:
                    scaling.attach(head)
            grads = torch.autograd.grad(loss, inputs, retain_graph=retain, allow_unused=True)
        finally:
            for scaling in scalings:
                if scaling is not None:
                    scaling.detach()
        direct = list(grads[: len(wrt)])
        self._check_used(direct)
        return (direct, [[grads[index[id(p)]] for p in head] for head in heads],
                [s is not None for s in scalings])

    def _check_used(self, direct: Grads) -> None:
        if self.owner.config.allow_unused or all(g is not None for g in direct):
            return
        unused = [i for i, g in enumerate(direct) if g is None]
        raise TrainingError(
            f"problem '{self.owner.name}': parameters {unused} of trainable_parameters() are "
            "not used by the loss and Config.allow_unused=False; use them or set "
            "allow_unused=True"
        )

    def state_dict(self) -> dict[str, Any]:
        return {"hypergradient_seen": self.seen}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seen = bool(state["hypergradient_seen"])


def reverse_paths_reach(paths: list[list[Any]], loss: Tensor, params: Sequence[Tensor]
                        ) -> bool:
    """Reverse mode, checked once: does the loss reach ``params`` through the unrolled
    window of a lower on a path (not only directly)?"""
    for path in paths:
        # a window tensor may be a constant (e.g. a head that initial_parameters() fixes)
        window = [w for w in path[1].window_parameters() or [] if w.requires_grad]
        if not window:
            continue
        v = torch.autograd.grad(loss, window, retain_graph=True, allow_unused=True)
        pairs = [(w, g) for w, g in zip(window, v) if g is not None]
        if not pairs:
            continue
        back = torch.autograd.grad([w for w, _ in pairs], list(params),
                                   grad_outputs=[g for _, g in pairs],
                                   retain_graph=True, allow_unused=True)
        if any(b is not None for b in back):
            return True
    return False
