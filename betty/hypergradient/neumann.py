"""Neumann series: H^-1 v ~ alpha * sum_{k=0..K} (I - alpha H)^k v, then hop(v) = -M (H^-1 v).

Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
Differentiation", AISTATS 2020, Algorithm 3. Converges iff 0 < alpha < 2 / lambda_max(H).
K = neumann_iterations Hessian-vector products + one mixed product.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from betty.configs import Config
from betty.hypergradient.hop import Hop, OptionalVector
from betty.linalg import axpy, neumann_series, spectral_radius, unit

POWER_ITERATIONS = 8  # diagnostics only: Hessian-vector products to estimate the radius


def neumann(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """Neumann hop: ``-M * neumann_series(H, v)``; with diagnostics on, reports an estimate
    of the spectral radius of ``I - alpha H`` (< 1 iff the series converges on ``v``) as
    ``neumann_rho``."""
    alpha = config.neumann_alpha
    direction, scale = unit(v)  # solve at unit scale (fp16 loss scales overflow HVPs)
    x = neumann_series(hop.hvp, direction, iterations=config.neumann_iterations, alpha=alpha)
    if hop.report is not None:
        hop.report("neumann_rho", spectral_radius(lambda p: axpy(-alpha, hop.hvp(p), p), v,
                                                  iterations=POWER_ITERATIONS))
    return [None if m is None else m * -scale.to(m.dtype) for m in hop.mixed(x)]
