"""Conjugate gradient: solve H x = v with K CG iterations, then hop(v) = -M x.

Rajeswaran, Finn, Kakade & Levine, "Meta-Learning with Implicit Gradients", NeurIPS 2019,
Section 3.2. CG runs on (cg_alpha * H) x = cg_alpha * v, whose solution is H^-1 v for any
cg_alpha > 0; a vanished residual stops progress without NaN. K = cg_iterations Hessian-vector
products + one mixed product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from betty.configs import Config
from betty.hypergradient.hop import Hop, OptionalVector
from betty.linalg import norm, solve_cg, unit


def cg(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """CG hop: ``-M * solve_cg(cg_alpha * H, cg_alpha * v)``; with diagnostics on, reports
    the relative residual ``||v - H x|| / ||v||`` as ``cg_residual``."""
    alpha = config.cg_alpha

    def matvec(p: list[Tensor]) -> list[Tensor]:
        return torch._foreach_mul(hop.hvp(p), alpha)

    direction, scale = unit(v)  # solve at unit scale (fp16 loss scales overflow HVPs)
    b = torch._foreach_mul(direction, alpha)
    if hop.report is None:
        x = solve_cg(matvec, b, iterations=config.cg_iterations)
    else:
        x, residual = solve_cg(matvec, b, iterations=config.cg_iterations,
                               return_residual=True)
        tiny = torch.finfo(residual.dtype).tiny
        hop.report("cg_residual", residual / torch.clamp_min(norm(b), tiny))
    return [None if m is None else m * -scale.to(m.dtype) for m in hop.mixed(x)]
