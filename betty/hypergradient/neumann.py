"""Neumann series: H^-1 v ~ alpha * sum_{k=0..K} (I - alpha H)^k v, then hop(v) = -M (H^-1 v).

Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
Differentiation", AISTATS 2020, Algorithm 3. Converges iff 0 < alpha < 2 / lambda_max(H).
K = neumann_iterations Hessian-vector products + one mixed product.

Memory: three parameter-sized vectors (the sum, which takes over ``v``'s storage when the
chain hands ``v`` over; the current term; H times it) and the graph of ``<dL/dw, term>``
(`Hop.bind`), which does not keep ``dL/dw`` itself.

Warm start (``Config(warm_start=True)``): the series is the Richardson iteration
``x <- x + alpha (v - H x)`` from ``x = 0``; with warm start it continues from the previous
outer step's solution (unit scale, ``hop.memory["neumann"]``) for K steps of K Hessian-vector
products. A first solve, or one after the shapes changed, is the plain series.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from betty.configs import Config
from betty.hypergradient.cg import previous_solution, remember
from betty.hypergradient.hop import Hop, OptionalVector, OwnedVector
from betty.linalg import axpy, neumann_series, richardson, spectral_radius, unit_

POWER_ITERATIONS = 8  # diagnostics only: Hessian-vector products to estimate the radius
MEMORY_KEY = "neumann"


def neumann(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """Neumann hop: ``-M * neumann_series(H, v)``; with diagnostics on, reports an estimate
    of the spectral radius of ``I - alpha H`` (< 1 iff the series converges on ``v``) as
    ``neumann_rho``."""
    alpha = config.neumann_alpha
    owned = isinstance(v, OwnedVector)
    direction = list(v) if owned else [t.clone() for t in v]
    if owned:
        v.clear()  # type: ignore[attr-defined]  # the sum takes over its tensors
    scale = unit_(direction)  # solve at unit scale (fp16 loss scales overflow HVPs)
    if hop.report is not None:
        hop.report("neumann_rho", spectral_radius(lambda p: axpy(-alpha, hop.hvp(p), p),
                                                  direction, iterations=POWER_ITERATIONS))
    warm = bool(getattr(config, "warm_start", False))
    x0 = previous_solution(hop, MEMORY_KEY, direction) if warm else None
    if x0 is None:
        term = [torch.empty_like(t) for t in direction]
        hop.bind(term)
        x = neumann_series(hop.hvp, direction, iterations=config.neumann_iterations,
                           alpha=alpha, in_place=True, term=term)
        torch._foreach_copy_(term, x)  # the mixed product reads the bound vector
        del x
        x = term
    else:
        hop.bind(x0)
        x = richardson(hop.hvp, direction, x0, iterations=config.neumann_iterations,
                       alpha=alpha)
    del direction
    if warm:
        remember(hop, MEMORY_KEY, x)
    return [None if m is None else m * -scale.to(m.dtype) for m in hop.mixed(x)]
