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


def update_jacobian(owner: str, params: Sequence[Tensor], optimizer: Any,
                    last_grads: Sequence[Tensor | None] | None, strategy: Any,
                    into: list[Tensor] | None = None) -> list[Tensor]:
    """Diagonal ``P`` per parameter of ``params`` (0 where the optimizer does not step it).
    With ``into`` (vectors aligned with ``params``): those are multiplied by ``P`` in place
    and returned; on one process one parameter's ``P`` at a time (no list of ``P``)."""
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
        if strategy.world_size == 1:
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
