"""DARTS: the identity in place of the inverse Hessian, with a finite-difference mixed product.

    hop(v) = -M v,   M v ~ [dL/dlam(w + eps v) - dL/dlam(w - eps v)] / (2 eps),
    eps = r / ||v||,  r = max(darts_alpha, PROBE_ULPS * u * ||w||).

Liu, Simonyan & Yang, "DARTS: Differentiable Architecture Search", ICLR 2019, eq. (7)-(8).
Two first-order backward passes; no second-order graph is built.

Numerics of the probes (shared with sama through `central_difference`):

* the radius ``r = ||eps v||`` never drops below ``PROBE_ULPS`` units of the resolution ``u``
  (``torch.finfo(dtype).eps``, the coarsest dtype among the lower parameters) of ``||w||``,
  so a probe cannot vanish in rounding when ``w`` is stored in bf16/fp16 or is very large;
  for float32/float64 weights of ordinary size the floor is far below ``darts_alpha``;
* the probes themselves run in fp32 when the lower problem uses autocast (`Hop`'s
  ``probe_context``), and the difference is formed in at least fp32 and then cast to the
  upper parameters' dtype;
* ``v = 0`` gives 0 (no division by ``||v|| = 0``), without reading a value on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from betty.configs import Config
from betty.hypergradient.hop import Hop, OptionalVector, OwnedVector
from betty.linalg import norm

PROBE_ULPS = 4.0
"""Smallest probe radius, in units of the lower parameters' resolution times ``||w||``."""


def _wide(t: Tensor) -> Tensor:
    """``t`` in at least float32 (float64 stays float64; no copy for float32)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def wide_norm(ts: Sequence[Tensor]) -> Tensor:
    """``norm(ts)`` computed in at least float32; a bf16/fp16 tensor is widened one at a time
    (no widened copy of the whole vector)."""
    if all(t.dtype in (torch.float32, torch.float64) for t in ts):
        return norm(ts)
    return torch.linalg.vector_norm(torch.stack(
        [torch.linalg.vector_norm(_wide(t)) for t in ts]))


def probe_radius(w: Sequence[Tensor], radius: float) -> Tensor:
    """``max(radius, PROBE_ULPS * u * ||w||)``, ``u`` the resolution of ``w``'s coarsest
    dtype, as a 0-d tensor on ``w``'s device."""
    resolution = max(torch.finfo(p.dtype).eps for p in w)
    with torch.no_grad():
        floor = PROBE_ULPS * resolution * wide_norm([p.detach() for p in w])
    return torch.clamp(floor, min=radius)


def central_difference(hop: Hop, v: Sequence[Tensor], radius: float, *, restore: bool = True
                       ) -> OptionalVector:
    """``-[dL/dlam(w + eps v) - dL/dlam(w - eps v)] / (2 eps)``, ``eps = r / ||v||`` with
    ``r = probe_radius(w, radius)``; 0 where ``v = 0``. ``restore=False`` leaves the lower
    parameters at the last probe (``*_multitask``)."""
    v = v if isinstance(v, OwnedVector) else list(v)  # an owned vector is freed early
    v_norm = wide_norm(v)
    r = probe_radius(hop.w, radius)
    nonzero = v_norm > 0
    eps = torch.where(nonzero, r / v_norm, 0.0)
    half_inverse = torch.where(nonzero, v_norm / (2 * r), 0.0)  # 1 / (2 eps), 0 for v = 0
    plus, minus = hop.upper_grads_at(v, [eps, -eps], restore=restore)
    out: OptionalVector = []
    for gp, gm in zip(plus, minus):
        if gp is None and gm is None:
            out.append(None)
            continue
        like = gp if gp is not None else gm
        assert like is not None
        high = _wide(gm) if gm is not None else 0.0
        low = _wide(gp) if gp is not None else 0.0
        out.append(((high - low) * half_inverse).to(like.dtype))  # type: ignore[operator]
    return out


def darts(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """DARTS hop: ``-M v`` by a central difference of radius ``config.darts_alpha``."""
    return central_difference(hop, v, config.darts_alpha, restore=not config.darts_multitask)
