"""Dense, hand-written references for the hypergradient tests (float64 matrices, no betty).

Everything here forms matrices explicitly and solves with `torch.linalg`, so it shares no code
path with the library's matrix-free vector-Jacobian products. Formulas follow docs/math.md.

Two families:

* ridge regression, ``L(w, lam) = 1/2 ||X w - y||^2 / n + 1/2 sum_i lam_i w_i^2``, in closed
  form: ``H = X^T X / n + diag(lam)``, ``w* = H^-1 X^T y / n``, ``d2L/dw dlam = diag(w)``;
* any smooth loss of several levels' parameters (flat vectors keyed by problem name), with
  ``H`` and the mixed block ``C = d2L/dw dlam`` read off the dense joint Hessian. One hop maps
  ``v`` to ``-C^T x`` with ``x`` the solver's approximation of ``H^-1 v`` (the identity for
  darts), and a path multiplies its hops right to left (docs/math.md#chaining).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor

Values = Mapping[str, Tensor]
Loss = Callable[[Values], Tensor]
Solver = Callable[[Tensor, Tensor], Tensor]  # (H, v) -> approximation of H^-1 v


# -- ridge regression, closed form ---------------------------------------------------------
def ridge_hessian(x: Tensor, lam: Tensor) -> Tensor:
    """``H = X^T X / n + diag(lam)``."""
    return x.T @ x / x.shape[0] + torch.diag(lam)


def ridge_solution(x: Tensor, y: Tensor, lam: Tensor) -> Tensor:
    """``w* = H^-1 X^T y / n``."""
    return torch.linalg.solve(ridge_hessian(x, lam), x.T @ y / x.shape[0])


def ridge_hypergradient(x: Tensor, y: Tensor, lam: Tensor, g: Tensor) -> Tensor:
    """Implicit hypergradient at ``w*`` for an outer gradient ``g``: ``-w* * (H^-1 g)``."""
    return -ridge_solution(x, y, lam) * torch.linalg.solve(ridge_hessian(x, lam), g)


def ridge_darts_hypergradient(x: Tensor, y: Tensor, lam: Tensor, g: Tensor) -> Tensor:
    """DARTS (identity for ``H^-1``) at ``w*``: ``-w* * g``."""
    return -ridge_solution(x, y, lam) * g


# -- solvers: what each method puts in place of H^-1 v ---------------------------------------
def exact_solve(h: Tensor, v: Tensor) -> Tensor:
    """``H^-1 v`` (converged CG or Neumann)."""
    return torch.linalg.solve(h, v)


def identity_solve(h: Tensor, v: Tensor) -> Tensor:
    """DARTS's assumption ``H = I``."""
    return v


def neumann_solve(iterations: int, alpha: float) -> Solver:
    """``alpha * sum_{k=0..K} (I - alpha H)^k v`` in closed form:
    ``H^-1 (I - (I - alpha H)^(K+1)) v`` (a geometric sum, no loop over terms)."""

    def solve(h: Tensor, v: Tensor) -> Tensor:
        eye = torch.eye(h.shape[0], dtype=h.dtype)
        remainder = torch.linalg.matrix_power(eye - alpha * h, iterations + 1)
        return torch.linalg.solve(h, v - remainder @ v)

    return solve


def krylov_solve(iterations: int) -> Solver:
    """The K-th conjugate-gradient iterate from ``x0 = 0``, as a Galerkin projection: the
    minimiser of ``||x - H^-1 v||_H`` over the Krylov space ``span{v, Hv, ..., H^(K-1) v}``,
    i.e. ``x = V (V^T H V)^-1 V^T v`` with ``V`` an orthonormal basis of that space."""

    def solve(h: Tensor, v: Tensor) -> Tensor:
        columns = [v]
        for _ in range(iterations - 1):
            columns.append(h @ columns[-1])
        basis, _ = torch.linalg.qr(torch.stack(columns, dim=1))
        return basis @ torch.linalg.solve(basis.T @ h @ basis, basis.T @ v)

    return solve


def neumann_iterations_for(h: Tensor, alpha: float, tol: float = 1e-15) -> int:
    """Terms after which ``||(I - alpha H)^(K+1)|| < tol`` (the Neumann remainder)."""
    eig = torch.linalg.eigvalsh(h)
    rate = max(abs(1 - alpha * float(eig[0])), abs(1 - alpha * float(eig[-1])))
    assert rate < 1, f"alpha={alpha} does not converge: spectrum [{eig[0]}, {eig[-1]}]"
    return math.ceil(math.log(tol) / math.log(rate))


# -- dense derivatives of a multilevel program ----------------------------------------------
def _joint(values: Values) -> tuple[list[str], list[slice], Tensor]:
    names = list(values)
    slices, start = [], 0
    for name in names:
        size = values[name].numel()
        slices.append(slice(start, start + size))
        start += size
    flat = torch.cat([values[name].detach().reshape(-1) for name in names])
    return names, slices, flat


def _as_function(loss: Loss, names: list[str], slices: list[slice]) -> Callable[[Tensor], Tensor]:
    return lambda flat: loss({n: flat[s] for n, s in zip(names, slices)})


def gradient(loss: Loss, values: Values, wrt: str) -> Tensor:
    """``dL/d values[wrt]`` (zeros if the loss does not use it)."""
    names, slices, flat = _joint(values)
    full = torch.autograd.functional.jacobian(_as_function(loss, names, slices), flat)
    return full[slices[names.index(wrt)]]


def second_derivatives(loss: Loss, values: Values, lower: str, upper: str
                       ) -> tuple[Tensor, Tensor]:
    """``H = d2L/dw2`` and ``C = d2L/dw dlam`` (rows: w, columns: lam) from the dense Hessian
    of ``L`` over every level's parameters at once; ``w = values[lower]``,
    ``lam = values[upper]``."""
    names, slices, flat = _joint(values)
    full = torch.autograd.functional.hessian(_as_function(loss, names, slices), flat)
    rows, cols = slices[names.index(lower)], slices[names.index(upper)]
    return full[rows, rows], full[rows, cols]


def hop(loss: Loss, values: Values, lower: str, upper: str, solver: Solver, v: Tensor
        ) -> Tensor:
    """One hop through ``lower`` towards ``upper``: ``-C^T solver(H, v)``."""
    h, c = second_derivatives(loss, values, lower, upper)
    return -c.T @ solver(h, v)


def path_hypergradient(losses: Mapping[str, Loss], values: Values, path: Sequence[str],
                       solvers: Mapping[str, Solver]) -> Tensor:
    """Hypergradient of ``path[0]`` along ``path = [U, L1, ..., Lk, U]``: start from
    ``dL_U/dw_{L1}`` and apply the hop of each ``L_i`` (its own loss and solver) in turn."""
    v = gradient(losses[path[0]], values, path[1])
    for lower, upper in zip(path[1:-1], path[2:]):
        v = hop(losses[lower], values, lower, upper, solvers[lower], v)
    return v


def total_gradient(losses: Mapping[str, Loss], values: Values, owner: str,
                   paths: Sequence[Sequence[str]], solvers: Mapping[str, Solver]) -> Tensor:
    """Direct gradient of ``owner``'s loss plus the hypergradient of every path (they add)."""
    total = gradient(losses[owner], values, owner)
    for path in paths:
        total = total + path_hypergradient(losses, values, path, solvers)
    return total
