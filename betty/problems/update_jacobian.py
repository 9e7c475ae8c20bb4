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
                    last_grads: Sequence[Tensor | None] | None, strategy: Any) -> list[Tensor]:
    """Diagonal ``P`` per parameter of ``params`` (0 where the optimizer does not step it)."""
    if optimizer is None:
        return [torch.zeros_like(p) for p in params]
    own = strategy.optimizer_parameters(optimizer)  # FSDP: the gathered copies of its shards
    if last_grads is not None:
        last = {id(p): g for p, g in zip(params, last_grads) if g is not None}
        grads = [last[id(p)] if id(p) in last else torch.zeros_like(p) for p in own]
    else:  # SGD's P does not read the gradient: pass the parameters, allocate nothing
        grads = list(own)
    try:  # the strategy reads sharded optimizer state (ZeRO) where it must
        diag = strategy.update_jacobian_diag(optimizer, own, grads)
    except TypeError as err:
        raise HypergradientError(f"problem '{owner}' (Config.type='sama'): {err}") from None
    by_id = {id(p): d for p, d in zip(own, diag)}
    # not by_id.get(..., zeros_like(p)): that allocates a parameter-sized default every time
    return [by_id[id(p)] if id(p) in by_id else torch.zeros_like(p) for p in params]
