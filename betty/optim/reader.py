"""Read a user's torch.optim optimizer as pure functions: state in, state out.

The optimizer object stays the single source of truth for hyperparameters: its param groups
are read at every call (so schedulers and per-group learning rates apply), its ``state`` is
read by `FunctionalOptimizer.init_state` and written by
`FunctionalOptimizer.write_back`, after which ``optimizer.step()`` continues exactly
where the functional steps stopped. Parameters are matched by position: the flat order of
``optimizer.param_groups``, so the functional parameters may be any tensors of those shapes
(non-leaf copies inside an unrolled, differentiable window).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

from betty.optim import jacobian, steps
from betty.optim.steps import Group, State


class Rule(NamedTuple):
    """The pure functions behind one torch.optim class (see `betty.optim.steps`)."""

    name: str
    init: Callable[[Tensor, Group], State]
    update: Callable[[Tensor, Tensor, State, Group], tuple[Tensor, State]]
    diag: Callable[[Tensor, Tensor, State, Group], Tensor]


# AdamW precedes Adam: lookup walks the optimizer's class hierarchy, most derived first.
RULES: dict[type[torch.optim.Optimizer], Rule] = {
    torch.optim.SGD: Rule("SGD", steps.sgd_init, steps.sgd_update, jacobian.sgd_diag),
    torch.optim.AdamW: Rule("AdamW", steps.adam_init, steps.adamw_update, jacobian.adamw_diag),
    torch.optim.Adam: Rule("Adam", steps.adam_init, steps.adam_update, jacobian.adam_diag),
    torch.optim.RMSprop: Rule(
        "RMSprop", steps.rmsprop_init, steps.rmsprop_update, jacobian.rmsprop_diag
    ),
    torch.optim.Adagrad: Rule(
        "Adagrad", steps.adagrad_init, steps.adagrad_update, jacobian.adagrad_diag
    ),
}


def find_rule(optimizer: torch.optim.Optimizer) -> Rule:
    """The rule for ``optimizer``'s class or its nearest supported base class.

    Raises:
        TypeError: the optimizer is not (a subclass of) a supported torch.optim class.
    """
    for cls in type(optimizer).__mro__:
        if cls in RULES:
            return RULES[cls]
    supported = ", ".join(f"torch.optim.{rule.name}" for rule in RULES.values())
    raise TypeError(
        f"{type(optimizer).__module__}.{type(optimizer).__qualname__} has no differentiable "
        f"functional form in betty.optim; supported optimizers: {supported}. Build the "
        "problem's optimizer with one of them, or (for ImplicitProblem) use a method that "
        "does not differentiate through the optimizer."
    )


class FunctionalOptimizer:
    """A torch.optim optimizer seen as pure, differentiable functions.

    Args:
        optimizer: an SGD, Adam, AdamW, RMSprop or Adagrad optimizer (or a subclass); it is
            read, never modified, except by `write_back`.

    Raises:
        TypeError: another optimizer type; the message names the supported ones.

    Example:
        >>> model = torch.nn.Linear(3, 1)
        >>> opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        >>> fopt = functional_optimizer(opt)
        >>> params = [p.detach().clone().requires_grad_() for p in model.parameters()]
        >>> state = fopt.init_state(params)
        >>> loss = sum((p**2).sum() for p in params)
        >>> grads = torch.autograd.grad(loss, params, create_graph=True)
        >>> params, state = fopt.step(params, grads, state)  # differentiable in params, grads
        >>> fopt.write_back(state)  # opt.step() now continues from here
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.rule = find_rule(optimizer)
        self.optimizer = optimizer
        self._group_of: dict[int, Group] | None = None  # by id of a parameter, when asked

    def __repr__(self) -> str:
        return f"FunctionalOptimizer({self.rule.name}, {self.size} parameters)"

    @property
    def params(self) -> list[Tensor]:
        """The optimizer's own parameters, in the flat order of its param groups."""
        return [p for group in self.optimizer.param_groups for p in group["params"]]

    @property
    def size(self) -> int:
        """How many parameter tensors the optimizer holds (over all param groups)."""
        return sum(len(group["params"]) for group in self.optimizer.param_groups)

    def _groups(self) -> Iterator[tuple[int, Tensor, Group]]:
        index = 0
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                yield index, param, group
                index += 1

    def _check(self, what: str, values: Sequence[object]) -> None:
        if len(values) != self.size:
            raise ValueError(
                f"{what} has {len(values)} entries but the {self.rule.name} optimizer holds "
                f"{self.size} parameters; pass one per parameter, in the flat order of "
                "optimizer.param_groups."
            )

    def init_state(self, params: Sequence[Tensor] | None = None, *, clone: bool = True
                   ) -> list[State]:
        """The optimizer's current state, one dict per parameter, as detached clones.

        A parameter torch.optim has not stepped yet gets the state torch.optim would create
        before its first step. ``params`` (default: the optimizer's own) only serves to
        check shapes and to place fresh state.

        Raises:
            ValueError: ``params`` has another length, or a tensor another shape, than the
                optimizer's parameters.
            TypeError: a complex parameter.
        """
        params = self.params if params is None else list(params)
        self._check("params", params)
        state: list[State] = []
        for index, own, group in self._groups():
            param = params[index]
            if torch.is_complex(param):
                raise TypeError(
                    f"params[{index}] is complex; betty.optim's rules handle real tensors only "
                    "(view it as real pairs with torch.view_as_real)."
                )
            if param.shape != own.shape:
                raise ValueError(
                    f"params[{index}] has shape {tuple(param.shape)} but the optimizer's "
                    f"parameter {index} has shape {tuple(own.shape)}."
                )
            state.append(self._state_of(own, group, param, clone))
        return state

    def _state_of(self, own: Tensor, group: Group, param: Tensor, clone: bool) -> State:
        stored = self.optimizer.state.get(own)
        if stored:
            return {k: _copy(v) if clone else v  # no copy for read-only use
                    for k, v in stored.items() if v is not None}
        return self.rule.init(param, group)

    def step(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        state: Sequence[State],
    ) -> tuple[list[Tensor], list[State]]:
        """One optimizer step, out of place and differentiable; nothing is mutated.

        Args:
            params: one tensor per parameter, in the flat order of the param groups.
            grads: their gradients; ``None`` leaves that parameter and its state as they
                are, as torch.optim skips parameters without ``.grad``.
            state: from `init_state` or a previous `step`.

        Returns:
            The new parameters and the new state.

        Raises:
            ValueError: ``params``, ``grads`` or ``state`` has not one entry per parameter.
        """
        for what, values in (("params", params), ("grads", grads), ("state", state)):
            self._check(what, values)
        if self._plain_sgd() and all(g is not None for g in grads):
            # plain SGD (the MAML inner loop): one multi-tensor kernel per param group
            return self._plain_sgd_step(params, grads), list(state)  # type: ignore[arg-type]
        new_params: list[Tensor] = []
        new_state: list[State] = []
        for index, _, group in self._groups():
            grad = grads[index]
            if grad is None:
                new_params.append(params[index])
                new_state.append(state[index])
                continue
            param, param_state = self.rule.update(params[index], grad, state[index], group)
            new_params.append(param)
            new_state.append(param_state)
        return new_params, new_state

    def _plain_sgd(self) -> bool:
        """SGD without momentum, weight decay or maximize, with float learning rates."""
        if self.rule.name != "SGD":
            return False
        return all(not group.get("momentum") and not group.get("weight_decay")
                   and not group.get("maximize") and isinstance(group["lr"], float)
                   for group in self.optimizer.param_groups)

    def _plain_sgd_step(self, params: Sequence[Tensor], grads: Sequence[Tensor]
                        ) -> list[Tensor]:
        out: list[Tensor] = []
        start = 0
        for group in self.optimizer.param_groups:
            end = start + len(group["params"])
            out.extend(torch._foreach_add(list(params[start:end]), list(grads[start:end]),
                                          alpha=-group["lr"]))
            start = end
        return out

    def update_jacobian_diag(
        self,
        params: Sequence[Tensor],
        grads: Sequence[Tensor | None],
        state: Sequence[State] | None = None,
    ) -> list[Tensor]:
        """SAMA's ``P = ∂u/∂g`` (detached), for the step the optimizer would take next.

        ``state`` defaults to the optimizer's current state (`init_state`). A ``None``
        gradient gives zeros, as that parameter would not move. See
        `betty.optim.jacobian` for the formulas.

        Raises:
            ValueError: ``params``, ``grads`` or ``state`` has not one entry per parameter.
        """
        state = self.init_state(params, clone=False) if state is None else state  # reads only
        for what, values in (("params", params), ("grads", grads), ("state", state)):
            self._check(what, values)
        diags: list[Tensor] = []
        for index, _, group in self._groups():
            param, grad = params[index], grads[index]
            if grad is None:
                diags.append(torch.zeros_like(param))
            else:
                diags.append(self.rule.diag(param, grad, state[index], group))
        return diags

    def scale_by_update_jacobian(self, vectors: Sequence[Tensor], params: Sequence[Tensor],
                                 grads: Sequence[Tensor | None]) -> None:
        """``vectors[i] *= P_i`` in place, one parameter's P at a time, so no list of P is
        ever alive (SAMA on a parameter-dominated model: one parameter-sized vector less)."""
        state = self.init_state(params, clone=False)  # reads only
        for what, values in (("params", params), ("grads", grads), ("vectors", vectors)):
            self._check(what, values)
        for index, _, group in self._groups():
            self._scale(vectors[index], params[index], grads[index], state[index], group)

    def scale_parameter_by_update_jacobian(self, param: Tensor, vector: Tensor,
                                           grad: Tensor | None, *, out: Tensor | None = None
                                           ) -> None:
        """``vector *= P`` of one of the optimizer's own parameters, in place: for a caller
        that gets its vectors one parameter at a time (SAMA inside the upper's backward).
        The same bits as `scale_by_update_jacobian` gives that parameter's vector.
        ``out``: write ``P vector`` there instead, ``vector`` unchanged; it may be ``grad``
        itself, given up by the caller (each chunk's P is formed before it is overwritten).

        Raises:
            KeyError: ``param`` is not one of the optimizer's parameters.
        """
        if self._group_of is None:
            self._group_of = {id(own): group for _, own, group in self._groups()}
        group = self._group_of[id(param)]
        self._scale(vector, param, grad, self._state_of(param, group, param, False), group,
                    out)

    def _scale(self, vector: Tensor, param: Tensor, grad: Tensor | None, state: State,
               group: Group, out: Tensor | None = None) -> None:
        if grad is None:
            (vector if out is None else out).zero_()
            return
        for p, s, g, x, o in _chunks(param, state, grad, vector, vector if out is None else out):
            torch.mul(x, self.rule.diag(p, g, s, group), out=o)

    def write_back(self, state: Sequence[State]) -> None:
        """Store ``state`` (detached clones) into ``optimizer.state`` for torch.optim to go on.

        Only the state is written; copying the parameter values is the caller's business.

        Raises:
            ValueError: ``state`` has not one entry per parameter.
        """
        self._check("state", state)
        for index, own, _ in self._groups():
            if state[index]:
                self.optimizer.state[own] = {k: _copy(v) for k, v in state[index].items()}
            else:
                self.optimizer.state.pop(own, None)


# elements of one parameter whose P is formed at a time: a rule's P takes several temporaries
# the size of its input (Adam: about six), which for an embedding matrix would be several
# parameter-sized tensors of the largest kind; P is elementwise, so chunks give the same bits
DIAG_CHUNK = 1 << 16


def _chunks(p: Tensor, state: State, *tensors: Tensor) -> Iterator[tuple[Any, ...]]:
    """``(p, state, *tensors)`` (tensors shaped like ``p``) as views over at most
    `DIAG_CHUNK` elements at a time (whole if small or not all contiguous)."""
    shaped = [k for k, v in state.items() if isinstance(v, Tensor) and v.shape == p.shape]
    if p.numel() <= DIAG_CHUNK or not all(
            t.is_contiguous() for t in (p, *tensors, *(state[k] for k in shaped))):
        yield (p, state, *tensors)
        return
    flat = [t.view(-1) for t in (p, *tensors)]
    for start in range(0, p.numel(), DIAG_CHUNK):
        part = slice(start, start + DIAG_CHUNK)
        chunk = {**state, **{k: state[k].view(-1)[part] for k in shaped}}
        yield (flat[0][part], chunk, *(t[part] for t in flat[1:]))


def _copy(value: object) -> object:
    # A clone, so that torch.optim's in-place updates never reach a tensor autograd saved.
    return value.detach().clone() if isinstance(value, Tensor) else value


def functional_optimizer(optimizer: torch.optim.Optimizer) -> FunctionalOptimizer:
    """Wrap a torch.optim optimizer (SGD, Adam, AdamW, RMSprop, Adagrad) as pure functions.

    Args:
        optimizer: the optimizer to read (see `FunctionalOptimizer`).

    Returns:
        A `FunctionalOptimizer` over it.

    Raises:
        TypeError: another optimizer type; the message names the supported ones.
    """
    return FunctionalOptimizer(optimizer)


def update_jacobian_diag(
    optimizer: torch.optim.Optimizer,
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    *,
    state: Sequence[State] | None = None,
) -> list[Tensor]:
    """SAMA's diagonal ``P = ∂u/∂g`` of the update ``optimizer`` would apply next.

    ``u`` is the update of one step at the optimizer's current state (or ``state``), so the
    new parameters would be ``p - u(g)``; P has one tensor per parameter, in the flat order
    of ``optimizer.param_groups``. Formulas: `betty.optim.jacobian`.

    Args:
        optimizer: an SGD, Adam, AdamW, RMSprop or Adagrad optimizer.
        params: one tensor per parameter of ``optimizer``, in its flat order.
        grads: their gradients (``None``: that parameter would not move, P is 0).
        state: the optimizer state to use instead of its current one.

    Example:
        >>> w = torch.nn.Parameter(torch.ones(2))
        >>> update_jacobian_diag(torch.optim.SGD([w], lr=0.1), [w], [torch.ones(2)])
        [tensor([0.1000, 0.1000])]

    Raises:
        TypeError: an optimizer other than SGD, Adam, AdamW, RMSprop or Adagrad.
        ValueError: ``params`` or ``grads`` has not one entry per parameter.
    """
    return FunctionalOptimizer(optimizer).update_jacobian_diag(params, grads, state)
