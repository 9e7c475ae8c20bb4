"""Chaining hops along a path ``[U, L1, ..., Lk, U]``: vector-Jacobian products, right to left.

``v`` starts as ``dL_U/dw_{L1}``; hop ``i`` maps a vector w.r.t. ``L_i``'s parameters to one
w.r.t. the next problem's parameters with ``L_i``'s own `Config.type`. Several paths add up.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from betty.diagnostics import active_diagnostics, path_label
from betty.distributed.strategy import strategy_of
from betty.hypergradient import METHODS, Hop, OptionalVector
from betty.hypergradient.hop import OwnedVector

if TYPE_CHECKING:
    from betty.problems.problem import Problem


def _materialize(v: OptionalVector, like: Sequence[Tensor]) -> OwnedVector | None:
    """Zeros for unused entries; ``None`` when no entry was reached at all. The result is
    handed to the next hop, which may free it early or write into it (`OwnedVector`), so a
    tensor whose elements share memory (autograd returns the gradient of ``w.sum()`` as an
    expanded view) is made contiguous first."""
    if all(t is None for t in v):
        return None
    return OwnedVector(torch.zeros_like(p) if t is None else
                       t if t.is_contiguous() else t.contiguous() for t, p in zip(v, like))


def hop_through(lower: Problem, upper: Problem, v: Sequence[Tensor], *, memory_key: str = "",
                report: Callable[[str, Tensor], None] | None = None,
                prescaled: bool = False) -> OptionalVector:
    """Contribution of ``v`` (w.r.t. ``lower``'s parameters) to ``upper``'s parameters;
    the method reports its diagnostics to ``report`` (None: diagnostics off)."""
    from betty.problems.precision import full_precision  # lazy: betty.problems imports us

    kind = lower.config.type
    method = kind if callable(kind) else METHODS[kind]
    strategy = strategy_of(lower)
    hop = Hop(lower.parameter_list(), upper.parameter_list(),
              lower.hop_loss, buffers=lower.engine_buffers(), devices=lower.cuda_devices(),
              probe_context=full_precision,
              average=None if strategy.world_size == 1 else strategy.all_average)
    hop.update_jacobian = lower.update_jacobian
    hop.scale_by_update_jacobian = lambda vectors: lower.update_jacobian(into=vectors)
    hop.prescaled = prescaled
    # warm starts: kept by the lower per path and hop (two paths through one hop solve for
    # different vectors), checkpointed with it
    hop.memory = lower.hop_memory(memory_key or upper.name)
    hop.report = report
    with hop:
        return method(hop, v, lower.config)


def head_is_exclusive(path: Sequence[Problem]) -> bool:
    """Whether the head vector's tensors belong to this path alone, so that the first hop
    may reuse their storage (`OwnedVector`): not when another path of the owner starts at
    the same lower (the same gradient tensors), nor when that lower shares parameters with
    the owner (the owner's own gradient)."""
    owner, head = path[0], path[1]
    if sum(other[1] is head for other in owner.paths) > 1:
        return False
    own = {id(p) for p in owner.parameter_list()}
    return not any(id(p) in own for p in head.parameter_list())


def path_hypergradient(path: Sequence[Problem], v: OptionalVector, *, prescaled: bool = False
                       ) -> list[Tensor] | None:
    """Product of the hops along ``path`` applied to ``v`` (w.r.t. ``path[1]``'s
    parameters); ``None`` when the path carries nothing (an unused link). ``prescaled``: ``v``
    is multiplied by ``path[1]``'s update Jacobian already (`Hop.prescaled`)."""
    owner = path[0]
    diagnostics = active_diagnostics(owner.engine)
    vec = _materialize(v, path[1].parameter_list())
    if vec is not None and not head_is_exclusive(path):
        vec = list(vec)  # its tensors are shared: the first hop must not write into them
    if isinstance(v, list):
        v.clear()  # the caller's head vector is consumed: the hops may free it early
    hops = list(zip(path[1:-1], path[2:]))
    for i, (lower, upper) in enumerate(hops):
        if vec is None:
            return None
        report = None if diagnostics is None else diagnostics.reporter(owner.name, lower.name)
        key = f"{' > '.join(p.name for p in path)} #{i}"
        vec = _materialize(hop_through(lower, upper, vec, report=report, memory_key=key,
                                       prescaled=prescaled and i == 0),
                           upper.parameter_list())
        if vec is not None and i < len(hops) - 1:
            # several processes: the next hop needs the global vector (its probe radius and
            # solver are nonlinear in it); the last hop's output is averaged by the caller,
            # together with the problem's own gradient
            vec = OwnedVector(strategy_of(lower).all_average(vec))
    if diagnostics is not None and vec is not None:
        label = path_label([p.name for p in path])
        diagnostics.record_norm(owner.name, f"implicit_norm/{label}", vec)
    return vec
