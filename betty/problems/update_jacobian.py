"""SAMA's ``P = du/dg``: the diagonal Jacobian of a problem's optimizer update.

Hypergradient hops through a problem with ``Config(type="sama")`` read it
(`docs/math.md#sama`); it is evaluated at the optimizer's current state and at the gradient
last stepped (unscaled, clipped, all micro-batches), which the problem keeps only when the
rule reads it (SGD's P does not).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from betty.errors import HypergradientError


def reads_gradient(config: Any, optimizer: Any) -> bool:
    """Whether SAMA's P of this problem depends on the stepped gradient."""
    return config.type == "sama" and not isinstance(optimizer, torch.optim.SGD)


def forms_p_locally(strategy: Any) -> bool:
    """Whether this rank can form P from its own optimizer, one parameter at a time."""
    return strategy.world_size == 1 or strategy.whole_optimizer_state


def update_jacobian(owner: str, params: Sequence[Tensor], optimizer: Any,
                    last_grads: Sequence[Tensor | None] | None, strategy: Any,
                    into: list[Tensor] | None = None) -> list[Tensor]:
    """Diagonal ``P`` per parameter of ``params`` (0 where the optimizer does not step it).
    With ``into`` (vectors aligned with ``params``): those are multiplied by ``P`` in place
    and returned, one parameter's ``P`` at a time (no list of ``P``) where the strategy holds
    the optimizer's whole state on each rank."""
    if optimizer is None:
        return [torch.zeros_like(p) for p in params] if into is None else \
            [x.zero_() for x in into]
    own = strategy.optimizer_parameters(optimizer)  # FSDP: the gathered copies of its shards
    if last_grads is not None:
        last = {id(p): g for p, g in zip(params, last_grads) if g is not None}
        grads = [last[id(p)] if id(p) in last else torch.zeros_like(p) for p in own]
    else:  # SGD's P does not read the gradient: pass the parameters, allocate nothing
        grads = list(own)
    if into is not None:
        if forms_p_locally(strategy):
            return _scale_in_place(owner, params, optimizer, own, grads, into)
        torch._foreach_mul_(into, update_jacobian(owner, params, optimizer, last_grads,
                                                  strategy))
        return into
    try:  # the strategy reads sharded optimizer state (ZeRO) where it must
        diag = strategy.update_jacobian_diag(optimizer, own, grads)
    except TypeError as err:
        raise HypergradientError(f"problem '{owner}' (Config.type='sama'): {err}") from None
    by_id = {id(p): d for p, d in zip(own, diag)}
    # not by_id.get(..., zeros_like(p)): that allocates a parameter-sized default every time
    return [by_id[id(p)] if id(p) in by_id else torch.zeros_like(p) for p in params]


def _scale_in_place(owner: str, params: Sequence[Tensor], optimizer: Any, own: list[Tensor],
                    grads: list[Tensor], into: list[Tensor]) -> list[Tensor]:
    from betty.optim import functional_optimizer

    position = {id(p): i for i, p in enumerate(params)}
    stepped = {id(p) for p in own}
    for p, x in zip(params, into):
        if id(p) not in stepped:
            x.zero_()
    vectors = [into[position[id(p)]] if id(p) in position else torch.zeros_like(p)
               for p in own]
    try:
        functional_optimizer(optimizer).scale_by_update_jacobian(vectors, own, grads)
    except TypeError as err:
        raise HypergradientError(f"problem '{owner}' (Config.type='sama'): {err}") from None
    return into


class HeadScaling:
    """``P v`` formed inside the reading upper's backward, one parameter as its ``v`` arrives.

    SAMA's hop scales the head vector ``v = dL_U/dw`` by ``P`` first thing. Formed after the
    backward, ``v`` and the kept gradient ``g`` that ``P`` reads are both whole at once: one
    parameter-sized vector above darts on an Adam-type lower. Here each parameter's ``v`` is
    scaled by a tensor hook when autograd produces it, and that parameter's ``g`` is dropped
    at once; the product has the same bits. The lower hands its kept gradient over only to its
    one reader (`sole_reader`), once per step of its own. (A lower's ``grad_callback`` that
    keeps the gradients it is given must clone them, as the in-place clip and unscale already
    require.)
    """

    def __init__(self, owner: str, params: Sequence[Tensor], optimizer: Any,
                 kept: Sequence[Tensor | None]) -> None:
        from betty.optim import functional_optimizer

        try:
            self._optimizer = functional_optimizer(optimizer)
        except TypeError as err:
            raise HypergradientError(f"problem '{owner}' (Config.type='sama'): {err}") from None
        stepped = {id(p) for p in self._optimizer.params}
        # a parameter the optimizer does not step gets P = 0; one it did not step with a
        # gradient gets P at g = 0, as in `update_jacobian`
        self._kept: dict[int, Tensor | None] = {
            id(p): (g if g is not None else torch.zeros_like(p)) if id(p) in stepped else None
            for p, g in zip(params, kept)}
        self._handles: list[Any] = []

    def attach(self, head: Sequence[Tensor]) -> None:
        """Scale the gradients autograd computes for ``head`` (the lower's parameters)."""
        self._handles.extend(p.register_hook(self._hook(p)) for p in head)

    def _hook(self, param: Tensor) -> Any:
        def scale(grad: Tensor) -> Tensor:
            g = self._kept.pop(id(param), None)
            if g is None:
                return torch.zeros_like(param, memory_format=torch.contiguous_format)
            # P v is written over g, which nothing reads after it (a hook must not write
            # into its argument: autograd may hand one tensor to several inputs)
            out = g if g.is_contiguous() and (g.shape, g.dtype) == (grad.shape, grad.dtype) else \
                torch.empty_like(param, memory_format=torch.contiguous_format)
            self._optimizer.scale_parameter_by_update_jacobian(param, grad, g, out=out)
            return out
        return scale

    def detach(self) -> None:
        """After the backward: remove the hooks, drop the gradients no ``v`` reached."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._kept.clear()


def sole_reader(problem: Any, problems: Sequence[Any]) -> str | None:
    """The upper whose hypergradient is the only reader of this sama problem's P, at the
    first hop of its one path through it (the head); None if there is no such upper. Every
    local step of that upper follows a window of this problem (`betty.schedule`), so it may
    consume the kept gradient."""
    if problem.config.type != "sama":
        return None
    reads = [(u, i) for u in problems if u.config.first_order for path in u.paths
             for i, q in enumerate(path[1:-1], 1) if q is problem]
    if len(reads) != 1 or reads[0][1] != 1:
        return None
    return reads[0][0].name
