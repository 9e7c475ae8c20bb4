"""F2SA: a fully first-order hop, with no Hessian-vector product and no double backward.

Kwon, Kwon, Wright & Nowak, "A Fully First-Order Method for Stochastic Bilevel
Optimization", ICML 2023 (`docs/math.md#f2sa`). Besides the lower's parameters ``z`` the
method keeps a penalized copy ``y``, a minimiser of ``f / lambda + g`` near ``z`` (``g``: the
lower loss; ``f``: the loss above, seen through ``v = df/dw`` at ``z``). The hop is

    hop(v) = lambda * (dg/dlam(x, y) - dg/dlam(x, z)),

two first-order gradients of ``g``. At convergence ``y - z = -H^-1 v / lambda + O(1/lambda^2)``
and the hop tends to ``-M H^-1 v`` (the implicit hypergradient) with an error O(1/lambda).

* ``y`` takes ``f2sa_steps`` steps per outer step,
  ``y <- y - f2sa_lr (u / lambda + dg/dw(y) - dg/dw(z))`` with ``u = v / ||v||`` (the hop
  is then multiplied by ``||v||``: the penalty acts at the same scale whatever the size of
  ``v``, e.g. under an fp16 loss scale): the gradient at ``z`` is
  subtracted, so the lower need not be at its minimum (its gradient there is not multiplied
  by ``lambda``) and every quantity is anchored at ``z``, where the other methods evaluate.
  The step size is that of ``g`` whatever ``lambda`` is (``f2sa_lr`` below ``2 / L_g``).
* ``y`` starts at ``z`` plus the previous outer step's ``y - z`` (kept in `Hop.memory`, saved
  in checkpoints; restarted at 0 when the shapes change), so across outer steps the solve
  is warm-started.
* ``lambda_k = f2sa_lambda + f2sa_lambda_growth * k`` at outer step ``k`` (the paper's
  increasing penalty schedule, ``lambda_{k+1} = lambda_k + delta``).
* ``f`` is linearised at ``z``: when ``g`` is quadratic in ``w`` with a mixed gradient
  linear in ``w``, ``T`` steps from ``y = z`` give exactly ``-M S v`` for the ``T``-term
  Neumann series ``S`` with ``alpha = f2sa_lr``, for any ``lambda``; otherwise the
  O(1/lambda) term comes from ``g``'s third derivatives.

Cost per outer step: ``f2sa_steps + 3`` first-order backward passes of the lower loss;
memory: ``y``, ``u / lambda - dg/dw(z)`` (in the storage of the chain's ``v``) and one
gradient (three parameter-sized vectors).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from betty.configs import Config
from betty.hypergradient.hop import Hop, OptionalVector, OwnedVector
from betty.linalg import unit_

MEMORY_SHIFT, MEMORY_STEP = "f2sa_shift", "f2sa_step"


def _previous_shift(hop: Hop) -> list[Tensor] | None:
    """The kept ``y - z``, taken out of the hop memory (the hop adds ``z`` to it in place and
    puts back the new shift at its end; a hop that fails restarts the next one at 0)."""
    memory = getattr(hop, "memory", None)
    stored = None if memory is None else memory.pop(MEMORY_SHIFT, None)
    if stored is None or len(stored) != len(hop.w) or any(
            s.shape != w.shape or s.dtype != w.dtype or s.device != w.device
            for s, w in zip(stored, hop.w)):
        return None
    return list(stored)


def f2sa(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """F2SA hop: ``lambda (dg/dlam(y) - dg/dlam(z'))`` (see the module docstring)."""
    memory = getattr(hop, "memory", None)
    step = int(memory.get(MEMORY_STEP, 0)) if memory is not None else 0
    lam = config.f2sa_lambda + config.f2sa_lambda_growth * step
    at_z_w, at_z = hop.grads_at(hop.w)
    assert at_z_w is not None and at_z is not None
    with torch.no_grad():
        # solved at unit scale (an fp16 loss scale on v would push y out of the region
        # where g is near quadratic), then scaled back: v / lambda becomes u / lambda.
        # The chain's own v is used in place (`OwnedVector`): one parameter-sized copy less
        owned = isinstance(v, OwnedVector)
        offset = list(v) if owned else [t.detach().clone() for t in v]
        if owned:
            v.clear()  # type: ignore[attr-defined]
        scale = unit_(offset)
        # u / lambda - dg/dw(z): what each step adds to dg/dw(y)
        torch._foreach_div_(offset, lam)
        torch._foreach_sub_(offset, at_z_w)
        del at_z_w
        penalized = _previous_shift(hop)  # y starts at z + the kept shift, in its storage
        if penalized is None:
            penalized = [w.detach().clone() for w in hop.w]
        else:
            torch._foreach_add_(penalized, [w.detach() for w in hop.w])
    lr = config.f2sa_lr
    for _ in range(config.f2sa_steps):
        grad_y, _ = hop.grads_at(penalized, upper=False)
        assert grad_y is not None
        with torch.no_grad():
            torch._foreach_add_(grad_y, offset)
            torch._foreach_add_(penalized, grad_y, alpha=-lr)
        del grad_y
    del offset
    _, at_y = hop.grads_at(penalized, lower=False)
    if memory is not None:
        with torch.no_grad():
            torch._foreach_sub_(penalized, [w.detach() for w in hop.w])
        memory[MEMORY_SHIFT] = penalized
        memory[MEMORY_STEP] = step + 1
    assert at_y is not None
    factor = lam * scale
    return [None if a is None and b is None else
            factor.to((a if a is not None else b).dtype)  # type: ignore[union-attr]
            * ((0.0 if a is None else a) - (0.0 if b is None else b))  # type: ignore[operator]
            for a, b in zip(at_y, at_z)]
