"""DARTS: the identity in place of the inverse Hessian, with a finite-difference mixed product.

    hop(v) = -M v,   M v ~ [dL/dlam(w + eps v) - dL/dlam(w - eps v)] / (2 eps),
    eps = darts_alpha / ||v||.

Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search", ICLR 2019, eq. (7)-(8).
Two first-order backward passes; no second-order graph is built.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from betty.configs import Config
from betty.hypergradient.hop import Hop, OptionalVector
from betty.linalg import norm


def central_difference(hop: Hop, v: Sequence[Tensor], radius: float, *, restore: bool = True
                       ) -> OptionalVector:
    """``-[dL/dlam(w + eps v) - dL/dlam(w - eps v)] / (2 eps)`` with ``eps = radius/||v||``."""
    eps = radius / norm(v)
    plus, minus = hop.upper_grads_at(v, [eps, -eps], restore=restore)
    out: OptionalVector = []
    for gp, gm in zip(plus, minus):
        if gp is None and gm is None:
            out.append(None)
            continue
        gp = gp if gp is not None else 0.0 * gm  # type: ignore[operator]
        gm = gm if gm is not None else 0.0 * gp
        out.append((gm - gp) / (2 * eps))
    return out


def darts(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """DARTS hop: ``-M v`` by a central difference of radius ``config.darts_alpha``."""
    return central_difference(hop, v, config.darts_alpha, restore=not config.darts_multitask)
