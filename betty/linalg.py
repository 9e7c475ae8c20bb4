"""Pure linear algebra on vectors stored as lists of tensors (one tensor per parameter).

Nothing here knows about problems or configs. Loops run a fixed number of iterations and
never read a tensor value on the host, so they add no CPU-GPU synchronisation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
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


def unit_(a: Sequence[Tensor]) -> Tensor:
    """`unit` in place: scale ``a`` to norm 1 (a zero vector stays zero); returns ``||a||``."""
    scale = norm(a)
    torch._foreach_div_(list(a), torch.where(scale > 0, scale, torch.ones_like(scale)))
    return scale


def _addcmul_(y: Sequence[Tensor], x: Sequence[Tensor], alpha: Tensor, sign: float = 1.0
              ) -> None:
    """``y += sign * alpha * x`` in place, ``alpha`` a 0-d tensor (no host read, no
    temporary)."""
    for yi, xi in zip(y, x):
        yi.addcmul_(xi, alpha, value=sign)


def conjugate_directions(matvec: MatVec, r: Vector, p: Vector, *, iterations: int
                         ) -> Iterator[Tensor]:
    """The CG recursion for ``A x = b`` on the residual ``r = b - A x_0`` and the search
    direction ``p`` (both updated in place; ``p`` must hold ``r`` on entry): each of the
    ``iterations`` steps calls ``matvec(p)`` and yields the step size ``a_k`` while ``p``
    still holds ``p_k``, so that the caller forms ``x_{k+1} = x_k + a_k p_k`` (or any linear
    image of it) itself. Once the residual vanishes the step sizes become 0 (no NaN)."""
    rr = dot(r, r)
    for _ in range(iterations):
        ap = matvec(p)
        step = _safe_div(rr, dot(p, ap))
        yield step
        _addcmul_(r, ap, step, -1.0)
        del ap
        rr_new = dot(r, r)
        torch._foreach_mul_(p, _safe_div(rr_new, rr))  # p <- r + beta p
        torch._foreach_add_(p, r)
        rr = rr_new


@overload
def solve_cg(matvec: MatVec, b: Sequence[Tensor], *, iterations: int, x0: Vector | None = None,
             return_residual: Literal[False] = False, in_place: bool = False,
             direction: Vector | None = None) -> Vector: ...


@overload
def solve_cg(matvec: MatVec, b: Sequence[Tensor], *, iterations: int, x0: Vector | None = None,
             return_residual: Literal[True], in_place: bool = False,
             direction: Vector | None = None) -> tuple[Vector, Tensor]: ...


def solve_cg(matvec: MatVec, b: Sequence[Tensor], *, iterations: int, x0: Vector | None = None,
             return_residual: bool = False, in_place: bool = False,
             direction: Vector | None = None) -> Vector | tuple[Vector, Tensor]:
    """Conjugate gradient for ``A x = b`` with ``A`` symmetric positive definite, from ``x0``
    (default 0).

    Runs exactly ``iterations`` steps (`conjugate_directions`); more iterations than
    dimensions return the solution instead of NaN. With ``return_residual``, also returns the
    final residual norm ``||b - A x||`` (CG's recursive residual, a 0-d tensor; no extra
    matrix-vector product).

    Memory: four vectors (``x``, the residual, the search direction ``p``, ``A p``), all
    updated in place. ``matvec`` is only ever called with the search-direction list (also for
    ``A x0``), whose contents change between calls; it must not return aliases of it. Pass
    ``direction`` (a list of tensors shaped like ``b``) to choose that storage, e.g. one a
    `Hop` is bound to. ``in_place=True`` lets the solver use ``b`` as the residual's storage
    and ``x0`` as the solution's (both are overwritten).
    """
    r = list(b) if in_place else [t.clone() for t in b]
    p = [torch.empty_like(t) for t in r] if direction is None else direction
    if x0 is None:
        x = [torch.zeros_like(t) for t in r]
    else:
        x = list(x0) if in_place else [t.clone() for t in x0]
        torch._foreach_copy_(p, x)
        torch._foreach_sub_(r, matvec(p))
    torch._foreach_copy_(p, r)
    for step in conjugate_directions(matvec, r, p, iterations=iterations):
        _addcmul_(x, p, step)
    if return_residual:
        return x, torch.sqrt(dot(r, r))
    return x


def neumann_series(matvec: MatVec, b: Sequence[Tensor], *, iterations: int, alpha: float,
                   in_place: bool = False, term: Vector | None = None) -> Vector:
    """``alpha * sum_{k=0..K} (I - alpha A)^k b``, which tends to ``A^{-1} b``.

    The series converges iff ``0 < alpha < 2 / lambda_max(A)`` for ``A`` positive definite.
    Memory: three vectors (the sum, the current term, ``A`` times it). ``matvec`` is only
    called with the term's list, updated in place between calls (``term``: its storage, e.g.
    one a `Hop` is bound to); ``in_place=True`` lets the sum use ``b``'s storage.
    """
    total = list(b) if in_place else [t.clone() for t in b]
    current = [torch.empty_like(t) for t in total] if term is None else term
    torch._foreach_copy_(current, total)
    for _ in range(iterations):
        product = matvec(current)
        torch._foreach_add_(current, product, alpha=-alpha)
        del product
        torch._foreach_add_(total, current)
    torch._foreach_mul_(total, alpha)
    return total


def richardson(matvec: MatVec, b: Sequence[Tensor], x0: Vector, *, iterations: int,
               alpha: float) -> Vector:
    """``iterations`` steps of ``x <- x + alpha (b - A x)`` from ``x0``, in place on ``x0``
    (the Neumann series continued from ``x0``: from 0, K + 1 steps give the series of K
    terms). ``matvec`` is only called with ``x0``'s list. Three vectors: ``x``, ``b``,
    ``A x``."""
    for _ in range(iterations):
        step = matvec(x0)
        torch._foreach_sub_(step, list(b))  # A x - b
        torch._foreach_add_(x0, step, alpha=-alpha)
        del step
    return x0


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
