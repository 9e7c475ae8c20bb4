"""Conjugate gradient: solve H x = v with K CG iterations, then hop(v) = -M x.

Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019,
Section 3.2. CG runs on (cg_alpha * H) x = cg_alpha * v, whose solution is H^-1 v for any
cg_alpha > 0; a vanished residual stops progress without NaN. K = cg_iterations backward
passes, each giving a Hessian-vector product and a mixed product.

Memory: three parameter-sized vectors (residual, search direction, its product with H; the
residual takes over ``v``'s storage when the chain hands ``v`` over) and the graph of
``<dL/dw, p>`` (`Hop.bind`), which does not keep ``dL/dw`` itself. The solution is not formed:
``M x_K = sum_k a_k M p_k`` is accumulated instead (upper-sized), each ``M p_k`` from the
backward pass that gives ``H p_k``, so K iterations cost K backward passes in all.

Warm start (``Config(warm_start=True)``, AmIGO / SOBA-style): the previous outer step's solution
(at unit scale, kept on the device in ``hop.memory["cg"]``) is CG's initial guess; the first
solve, or one after the parameters' shapes changed, starts from 0. It costs one more
parameter-sized vector, kept between outer steps, and one more Hessian-vector product per solve.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from betty.configs import Config
from betty.hypergradient.hop import Hop, OptionalVector, OwnedVector
from betty.linalg import conjugate_directions, dot, norm, unit_

MEMORY_KEY = "cg"


def previous_solution(hop: Hop, key: str, like: Sequence[Tensor]) -> list[Tensor] | None:
    """``hop.memory[key]`` when it matches ``like`` (count, shapes, dtypes, devices), else
    None (no memory, a first solve, or a program whose shapes changed)."""
    memory = getattr(hop, "memory", None)
    stored = None if memory is None else memory.get(key)
    if stored is None or len(stored) != len(like):
        return None
    if any(s.shape != t.shape or s.dtype != t.dtype or s.device != t.device
           for s, t in zip(stored, like)):
        return None
    return list(stored)


def remember(hop: Hop, key: str, solution: list[Tensor]) -> None:
    memory = getattr(hop, "memory", None)
    if memory is not None:
        memory[key] = solution


def accumulate(total: OptionalVector | None, part: OptionalVector, scale: Tensor | float = 1.0
               ) -> OptionalVector:
    """``total + scale * part`` entrywise, ``None`` meaning 0; in place where ``total`` has a
    tensor."""
    if total is None:
        return [None if t is None else t * scale for t in part]
    out: OptionalVector = []
    for acc, t in zip(total, part):
        if t is None:
            out.append(acc)
        elif acc is None:
            out.append(t * scale)
        else:
            out.append(acc.add_(t * scale))
    return out


def cg(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """CG hop: ``-M * solve_cg(cg_alpha * H, cg_alpha * v)``; with diagnostics on, reports
    the relative residual ``||v - H x|| / ||v||`` as ``cg_residual``.

    ``M x_K = sum_k a_k M p_k`` is accumulated along the iterations (each ``M p_k`` comes
    from the backward pass of ``H p_k``), so ``x_K`` itself is only formed for a warm start."""
    alpha = config.cg_alpha
    latest_mixed: list[OptionalVector] = []

    def matvec(p: list[Tensor]) -> list[Tensor]:
        product, mixed = hop.hvp_and_mixed(p)
        latest_mixed[:] = [mixed]
        torch._foreach_mul_(product, alpha)
        return product

    owned = isinstance(v, OwnedVector)
    r = list(v) if owned else [t.clone() for t in v]
    if owned:
        v.clear()  # type: ignore[attr-defined]  # the residual takes over its tensors
    scale = unit_(r)  # solve at unit scale (fp16 loss scales overflow HVPs)
    torch._foreach_mul_(r, alpha)  # r = b - A x0 with x0 = 0
    b_norm = norm(r) if hop.report is not None else None
    warm = bool(getattr(config, "warm_start", False))
    x = previous_solution(hop, MEMORY_KEY, r) if warm else None
    p = [torch.empty_like(t) for t in r]
    hop.bind(p)
    mixed_x: OptionalVector | None = None
    if x is not None:  # r = b - A x0, and M x0 from the same backward pass
        torch._foreach_copy_(p, x)
        torch._foreach_sub_(r, matvec(p))
        mixed_x = accumulate(None, latest_mixed[0])
    elif warm:
        x = [torch.zeros_like(t) for t in r]
    torch._foreach_copy_(p, r)
    for step in conjugate_directions(matvec, r, p, iterations=config.cg_iterations):
        mixed_x = accumulate(mixed_x, latest_mixed[0], step)
        if x is not None:
            for xi, pi in zip(x, p):
                xi.addcmul_(pi, step)
    latest_mixed.clear()
    if b_norm is not None and hop.report is not None:
        tiny = torch.finfo(b_norm.dtype).tiny
        hop.report("cg_residual", torch.sqrt(dot(r, r)) / torch.clamp_min(b_norm, tiny))
    if x is not None:
        remember(hop, MEMORY_KEY, x)
    assert mixed_x is not None
    return [None if m is None else m * -scale.to(m.dtype) for m in mixed_x]
