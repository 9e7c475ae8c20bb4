"""Chaining hops along a path ``[U, L1, ..., Lk, U]``: vector-Jacobian products, right to left.

``v`` starts as ``dL_U/dw_{L1}``; hop ``i`` maps a vector w.r.t. ``L_i``'s parameters to one
w.r.t. the next problem's parameters with ``L_i``'s own `Config.type`. Several paths add up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from betty.hypergradient import METHODS, Hop, OptionalVector

if TYPE_CHECKING:
    from betty.problems.problem import Problem


def _materialize(v: OptionalVector, like: Sequence[Tensor]) -> list[Tensor] | None:
    """Zeros for unused entries; ``None`` when no entry was reached at all."""
    if all(t is None for t in v):
        return None
    return [torch.zeros_like(p) if t is None else t for t, p in zip(v, like)]


def hop_through(lower: Problem, upper: Problem, v: Sequence[Tensor]) -> OptionalVector:
    """Contribution of ``v`` (w.r.t. ``lower``'s parameters) to ``upper``'s parameters."""
    if hasattr(lower, "reverse_hop"):
        custom = lower.reverse_hop(upper, v)  # reverse mode through an unrolled window
        if custom is not NotImplemented:
            return custom
    method = METHODS[lower.config.type]
    hop = Hop(lower.trainable_parameters(), upper.trainable_parameters(),
              lower.hop_loss, buffers=lower.engine_buffers(), devices=lower.cuda_devices())
    hop.update_jacobian = lower.update_jacobian
    with hop:
        return method(hop, v, lower.config)


def path_hypergradient(path: Sequence[Problem], v: OptionalVector) -> list[Tensor] | None:
    """Product of the hops along ``path`` applied to ``v`` (w.r.t. ``path[1]``'s
    parameters); ``None`` when the path carries nothing (an unused link)."""
    vec = _materialize(v, path[1].trainable_parameters())
    for lower, upper in zip(path[1:-1], path[2:]):
        if vec is None:
            return None
        vec = _materialize(hop_through(lower, upper, vec), upper.trainable_parameters())
    return vec
