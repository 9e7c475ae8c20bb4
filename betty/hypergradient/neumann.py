"""Neumann series: H^-1 v ~ alpha * sum_{k=0..K} (I - alpha H)^k v, then hop(v) = -M (H^-1 v).

Lorraine, Vicol & Duvenaud, "Optimizing Millions of Hyperparameters by Implicit
Differentiation", AISTATS 2020, Algorithm 3. Converges iff 0 < alpha < 2 / lambda_max(H).
K = neumann_iterations Hessian-vector products + one mixed product.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from betty.configs import Config
from betty.hypergradient.hop import Hop, OptionalVector
from betty.linalg import neumann_series


def neumann(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """Neumann hop: ``-M * neumann_series(H, v)``."""
    x = neumann_series(hop.hvp, v, iterations=config.neumann_iterations,
                       alpha=config.neumann_alpha)
    return [None if m is None else torch.neg(m) for m in hop.mixed(x)]
