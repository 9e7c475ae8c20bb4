"""Conjugate gradient: solve H x = v with K CG iterations, then hop(v) = -M x.

Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019,
Section 3.2. CG runs on (cg_alpha * H) x = cg_alpha * v, whose solution is H^-1 v for any
cg_alpha > 0; a vanished residual stops progress without NaN. K = cg_iterations Hessian-vector
products + one mixed product.

Memory: four parameter-sized vectors (solution, residual, search direction, its product with
H; the residual takes over ``v``'s storage when the chain hands ``v`` over), and the graph of
``<dL/dw, p>`` (`Hop.bind`), which does not keep ``dL/dw`` itself.

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
from betty.linalg import norm, solve_cg, unit_

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


def cg(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """CG hop: ``-M * solve_cg(cg_alpha * H, cg_alpha * v)``; with diagnostics on, reports
    the relative residual ``||v - H x|| / ||v||`` as ``cg_residual``."""
    alpha = config.cg_alpha

    def matvec(p: list[Tensor]) -> list[Tensor]:
        product = hop.hvp(p)
        torch._foreach_mul_(product, alpha)
        return product

    owned = isinstance(v, OwnedVector)
    b = list(v) if owned else [t.clone() for t in v]
    if owned:
        v.clear()  # type: ignore[attr-defined]  # b (then the residual) holds its tensors
    scale = unit_(b)  # solve at unit scale (fp16 loss scales overflow HVPs)
    torch._foreach_mul_(b, alpha)
    warm = bool(getattr(config, "warm_start", False))
    x0 = previous_solution(hop, MEMORY_KEY, b) if warm else None
    b_norm = norm(b) if hop.report is not None else None
    direction = [torch.empty_like(t) for t in b]
    hop.bind(direction)
    x, residual = solve_cg(matvec, b, iterations=config.cg_iterations, x0=x0,
                           return_residual=True, in_place=True, direction=direction)
    del b
    if b_norm is not None and hop.report is not None:
        tiny = torch.finfo(residual.dtype).tiny
        hop.report("cg_residual", residual / torch.clamp_min(b_norm, tiny))
    torch._foreach_copy_(direction, x)  # the mixed product reads the bound vector
    if warm:
        remember(hop, MEMORY_KEY, x)
    del x
    return [None if m is None else m * -scale.to(m.dtype) for m in hop.mixed(direction)]
