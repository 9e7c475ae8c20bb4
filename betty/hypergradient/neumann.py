"""Neumann series: H^-1 v ~ alpha * sum_{k=0..K} (I - alpha H)^k v, then hop(v) = -M (H^-1 v).

Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
Differentiation", AISTATS 2020, Algorithm 3. Converges iff 0 < alpha < 2 / lambda_max(H).
K = neumann_iterations Hessian-vector products + one mixed product.

Memory: two parameter-sized vectors (the current term, which takes over ``v``'s storage when
the chain hands ``v`` over, and H times it) and the graph of ``<dL/dw, term>`` (`Hop.bind`),
which does not keep ``dL/dw`` itself. The sum is not formed: ``M x = alpha sum_k M term_k`` is
accumulated instead (upper-sized), each ``M term_k`` from the backward pass that gives
``H term_k``.

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
from betty.hypergradient.cg import accumulate, previous_solution, remember
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
        v.clear()  # type: ignore[attr-defined]  # the term takes over its tensors
    scale = unit_(direction)  # solve at unit scale (fp16 loss scales overflow HVPs)
    if hop.report is not None:
        hop.report("neumann_rho", spectral_radius(lambda p: axpy(-alpha, hop.hvp(p), p),
                                                  direction, iterations=POWER_ITERATIONS))
    warm = bool(getattr(config, "warm_start", False))
    x0 = previous_solution(hop, MEMORY_KEY, direction) if warm else None
    if x0 is not None:  # continue the series from the previous solution (Richardson)
        hop.bind(x0)
        x = richardson(hop.hvp, direction, x0, iterations=config.neumann_iterations,
                       alpha=alpha)
        del direction
        remember(hop, MEMORY_KEY, x)
        return [None if m is None else m * -scale.to(m.dtype) for m in hop.mixed(x)]
    if warm and getattr(hop, "memory", None) is not None:
        # a first warm solve: form the sum, for the next solve to start from
        term = [torch.empty_like(t) for t in direction]
        hop.bind(term)
        x = neumann_series(hop.hvp, direction, iterations=config.neumann_iterations,
                           alpha=alpha, in_place=True, term=term)
        torch._foreach_copy_(term, x)  # the mixed product reads the bound vector
        remember(hop, MEMORY_KEY, x)
        return [None if m is None else m * -scale.to(m.dtype) for m in hop.mixed(term)]
    # M x = alpha sum_k M term_k: each M term_k comes from the backward pass that gives
    # H term_k, so neither the sum nor v is kept (one vector, the term, bound to the hop)
    term = direction
    hop.bind(term)
    mixed_x: OptionalVector | None = None
    for _ in range(config.neumann_iterations):
        product, mixed = hop.hvp_and_mixed(term)
        mixed_x = accumulate(mixed_x, mixed)
        torch._foreach_add_(term, product, alpha=-alpha)
        del product
    mixed_x = accumulate(mixed_x, hop.mixed(term))
    return [None if m is None else m * (-alpha * scale).to(m.dtype) for m in mixed_x]
