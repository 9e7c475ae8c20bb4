"""Pure linear algebra on vectors stored as lists of tensors (one tensor per parameter).

Nothing here knows about problems or configs. Loops run a fixed number of iterations and
never read a tensor value on the host, so they add no CPU-GPU synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal, overload

import torch
from torch import Tensor

Vector = list[Tensor]
MatVec = Callable[[Vector], Vector]


def dot(a: Sequence[Tensor], b: Sequence[Tensor]) -> Tensor:
    """Inner product of two tensor lists, as a 0-d tensor."""
    if len(a) == 1:
        return torch.sum(a[0] * b[0])
    return torch.stack([torch.sum(x * y) for x, y in zip(a, b)]).sum()


def norm(a: Sequence[Tensor]) -> Tensor:
    """Euclidean norm of a tensor list (all entries as one vector), as a 0-d tensor."""
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(list(a))))


def unit(a: Sequence[Tensor]) -> tuple[Vector, Tensor]:
    """``(a / ||a||, ||a||)``; a zero vector stays zero (scale 0, no NaN, no host read).

    Second-order hops solve on the unit vector and scale the result back: the vectors they
    receive carry the fp16 loss scale (thousands), which would overflow Hessian-vector
    products evaluated under autocast."""
    scale = norm(a)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return torch._foreach_div(list(a), safe), scale


def axpy(alpha: Tensor | float, x: Sequence[Tensor], y: Sequence[Tensor]) -> Vector:
    """``y + alpha * x`` as a new list."""
    if isinstance(alpha, Tensor):
        return torch._foreach_add(list(y), torch._foreach_mul(list(x), alpha))
    return torch._foreach_add(list(y), list(x), alpha=alpha)


def _safe_div(num: Tensor, den: Tensor) -> Tensor:
    """``num / den``, and 0 where ``den`` is 0 (an exactly converged solve stays finite):
    0/0 and x/0 give NaN and inf, which become 0 (two kernels instead of six)."""
    return torch.nan_to_num(num / den, nan=0.0, posinf=0.0, neginf=0.0)


@overload
def solve_cg(matvec: MatVec, b: Sequence[Tensor], *, iterations: int, x0: Vector | None = None,
             return_residual: Literal[False] = False) -> Vector: ...


@overload
def solve_cg(matvec: MatVec, b: Sequence[Tensor], *, iterations: int, x0: Vector | None = None,
             return_residual: Literal[True]) -> tuple[Vector, Tensor]: ...


def solve_cg(matvec: MatVec, b: Sequence[Tensor], *, iterations: int, x0: Vector | None = None,
             return_residual: bool = False) -> Vector | tuple[Vector, Tensor]:
    """Conjugate gradient for ``A x = b`` with ``A`` symmetric positive definite.

    Runs exactly ``iterations`` steps. Once the residual vanishes the step sizes become 0, so
    more iterations than dimensions return the solution instead of NaN. With
    ``return_residual``, also returns the final residual norm ``||b - A x||`` (CG's recursive
    residual, a 0-d tensor; no extra matrix-vector product).
    """
    b = list(b)
    x = [torch.zeros_like(t) for t in b] if x0 is None else list(x0)
    r = b if x0 is None else axpy(-1.0, matvec(x), b)
    p = list(r)
    rr = dot(r, r)
    for _ in range(iterations):
        ap = matvec(p)
        step = _safe_div(rr, dot(p, ap))
        x = axpy(step, p, x)
        r = axpy(-step, ap, r)
        rr_new = dot(r, r)
        beta = _safe_div(rr_new, rr)
        p = axpy(beta, p, r)
        rr = rr_new
    if return_residual:
        return x, torch.sqrt(rr)
    return x


def neumann_series(matvec: MatVec, b: Sequence[Tensor], *, iterations: int, alpha: float
                   ) -> Vector:
    """``alpha * sum_{k=0..K} (I - alpha A)^k b``, which tends to ``A^{-1} b``.

    The series converges iff ``0 < alpha < 2 / lambda_max(A)`` for ``A`` positive definite.
    """
    term = list(b)
    total = list(b)
    for _ in range(iterations):
        term = axpy(-alpha, matvec(term), term)
        total = torch._foreach_add(total, term)
    return torch._foreach_mul(total, alpha)


def spectral_radius(matvec: MatVec, x0: Sequence[Tensor], *, iterations: int) -> Tensor:
    """Estimate of the largest ``|eigenvalue|`` of a symmetric ``A``: ``||A x_K||`` after ``K``
    power iterations ``x_{k+1} = A x_k / ||A x_k||`` from ``x0`` normalised (a 0-d tensor).

    It approaches the radius from below, along the eigenvectors ``x0`` has components on.
    """
    x = torch._foreach_div(list(x0), torch.clamp_min(norm(x0), torch.finfo(x0[0].dtype).tiny))
    estimate = torch.zeros((), dtype=x0[0].dtype, device=x0[0].device)
    for _ in range(iterations):
        y = matvec(x)
        estimate = norm(y)
        x = torch._foreach_div(y, torch.clamp_min(estimate, torch.finfo(estimate.dtype).tiny))
    return estimate
