"""Accuracy against cost: each hypergradient method's error as a function of its setting.

Ridge regression (MATH.md): ``L(w, lam) = 1/2 ||X w - y||^2 / n + 1/2 sum_i lam_i w_i^2``, so
``H = X^T X / n + diag(lam)``, ``w* = H^-1 X^T y / n`` and, for an outer loss with gradient
``g`` at ``w*``, the exact hypergradient is ``-w* * (H^-1 g)``. X has prescribed singular
values (condition number of H about ``--condition``), so the iterative solvers have something
to converge. Every number comes from the library's own code path: a `betty.hypergradient.Hop`
over the ridge loss and the functions `cg`, `neumann`, `darts`, `sama` with a `Config`.

Tables (relative error ``||h - h*|| / ||h*||`` and cosine to the exact ``h*``):

1. cg, K = 1 .. dim iterations (K Hessian-vector products each), and a few K > dim (in
   floating point, an ill-conditioned H needs more than dim iterations);
2. neumann, K terms for step sizes alpha = c * 2 / lambda_max(H), c in {0.25, 0.5, 0.95};
3. darts and sama against the radius: the error against the exact hypergradient (what the
   method costs in bias: darts puts I in place of H^-1, sama puts P = du/dg of the lower's
   optimizer there) and against the method's own target ``-M x`` (``x = v`` or ``P v``), in
   float64 and float32. ``dL/dlam = w^2 / 2`` is quadratic in w, so the central difference
   has no truncation error here: what varies with the radius is round-off;
4. the same radius sweep on a loss that is not quadratic in w (per-sample weights
   ``sigmoid(lam_i)`` on logistic losses), against ``-M v`` by double backward: truncation
   error grows like radius^2 and round-off like 1/radius.

    python benchmarks/accuracy_study.py
    python benchmarks/accuracy_study.py --dim 50 --condition 1e4 --samples 500
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from betty.configs import Config
from betty.hypergradient import Hop, cg, darts, neumann, sama
from betty.optim import update_jacobian_diag

Vector = list[Tensor]


# -- the ridge problem ------------------------------------------------------------------------
class Ridge:
    """Inner ridge loss and outer least squares, in float64, with their closed forms."""

    def __init__(self, dim: int, samples: int, condition: float, seed: int) -> None:
        gen = torch.Generator().manual_seed(seed)
        d = torch.float64
        q1, _ = torch.linalg.qr(torch.randn(samples, dim, generator=gen, dtype=d))
        q2, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=d))
        # X^T X / n has eigenvalues s^2 in [1 / condition, 1]; lam adds a little
        s = torch.logspace(0, -0.5 * math.log10(condition), dim, dtype=d)
        self.x = math.sqrt(samples) * q1 @ torch.diag(s) @ q2.T
        self.y = self.x @ torch.randn(dim, generator=gen, dtype=d) + torch.randn(
            samples, generator=gen, dtype=d)
        self.lam = (0.1 + 0.9 * torch.rand(dim, generator=gen, dtype=d)) / condition
        self.xv = torch.randn(samples, dim, generator=gen, dtype=d)
        self.yv = self.xv @ torch.randn(dim, generator=gen, dtype=d)
        self.h = self.x.T @ self.x / samples + torch.diag(self.lam)
        self.w_star = torch.linalg.solve(self.h, self.x.T @ self.y / samples)
        self.g = self.xv.T @ (self.xv @ self.w_star - self.yv) / samples
        self.exact = -self.w_star * torch.linalg.solve(self.h, self.g)
        eig = torch.linalg.eigvalsh(self.h)
        self.lambda_min, self.lambda_max = float(eig[0]), float(eig[-1])

    def loss(self, w: Tensor, lam: Tensor) -> Tensor:
        x, y = self.x.to(w.dtype), self.y.to(w.dtype)
        return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam * w * w).sum()


def hop_result(problem: Ridge, method: Callable, config: Config, *, dtype=torch.float64,
               direction: Tensor | None = None, p: Tensor | None = None) -> Tensor:
    """One hop of ``method`` at ``w*`` with ``v = g`` (or ``direction``), as a float64 vector."""
    w = problem.w_star.to(dtype).clone().requires_grad_()
    lam = problem.lam.to(dtype).clone().requires_grad_()
    hop = Hop([w], [lam], lambda: problem.loss(w, lam))
    if p is not None:
        hop.update_jacobian = lambda: [p.to(dtype)]
    v = (problem.g if direction is None else direction).to(dtype)
    with hop:
        (out,) = method(hop, [v], config)
    return out.detach().to(torch.float64)


def rel_err(a: Tensor, b: Tensor) -> float:
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def cosine(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a, b, dim=0))


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def sci(value: float) -> str:
    return f"{value:.1e}"


# -- the studies ------------------------------------------------------------------------------
def cg_table(problem: Ridge, dim: int, extra: Sequence[int]) -> str:
    rows = []
    for k in [*range(1, dim + 1), *extra]:
        h = hop_result(problem, cg, Config(type="cg", cg_iterations=k))
        rows.append((k, sci(rel_err(h, problem.exact)), f"{cosine(h, problem.exact):.6f}"))
    return table(["cg_iterations K", "rel. error", "cosine"], rows)


def neumann_table(problem: Ridge, iterations: Sequence[int]) -> str:
    fractions = (0.25, 0.5, 0.95)
    header = ["neumann_iterations K"] + [
        f"alpha = {c} * 2/lambda_max = {c * 2 / problem.lambda_max:.3g}" for c in fractions]
    rows = []
    for k in iterations:
        row: list[object] = [k]
        for c in fractions:
            alpha = c * 2 / problem.lambda_max
            h = hop_result(problem, neumann,
                           Config(type="neumann", neumann_iterations=k, neumann_alpha=alpha))
            row.append(sci(rel_err(h, problem.exact)))
        rows.append(row)
    return table(header, rows)


def trained_adam_p(problem: Ridge, steps: int, lr: float) -> Tensor:
    """P of Adam after ``steps`` Adam steps on the ridge loss from w = 0 (a realistic state)."""
    w = torch.zeros_like(problem.w_star, requires_grad=True)
    opt = torch.optim.Adam([w], lr=lr)
    grad = torch.zeros_like(w)
    for _ in range(steps):
        opt.zero_grad()
        problem.loss(w, problem.lam).backward()
        grad = w.grad.detach().clone()
        opt.step()
    (p,) = update_jacobian_diag(opt, [w], [grad])
    return p


def radius_table(problem: Ridge, radii: Sequence[float], adam_p: Tensor, sgd_lr: float
                 ) -> str:
    """darts and sama (SGD, Adam) against the radius, float64 and float32."""
    sgd_p = torch.full_like(problem.w_star, sgd_lr)
    targets = {  # each method's own target -M x, x = v or P v (M x = w* * x here)
        "darts": (None, -problem.w_star * problem.g),
        "sama (SGD)": (sgd_p, -problem.w_star * (sgd_p * problem.g)),
        "sama (Adam)": (adam_p, -problem.w_star * (adam_p * problem.g)),
    }
    header = ["radius"]
    for name in targets:
        header += [f"{name} vs own target, fp64", f"{name} vs own target, fp32"]
    rows = []
    for radius in radii:
        row: list[object] = [f"{radius:g}"]
        for p, target in targets.values():
            method, config = (darts, Config(type="darts", darts_alpha=radius)) if p is None \
                else (sama, Config(type="sama", sama_adam_alpha=radius))
            for dtype in (torch.float64, torch.float32):
                h = hop_result(problem, method, config, dtype=dtype, p=p)
                row.append(sci(rel_err(h, target)))
        rows.append(row)
    bias_rows = []
    for name, (_, target) in targets.items():
        bias_rows.append((name, sci(rel_err(target, problem.exact)),
                          f"{cosine(target, problem.exact):.4f}"))
    return (table(header, rows) + "\n\nBias of the approximation itself (any radius):\n\n"
            + table(["method", "rel. error vs exact h*", "cosine vs exact h*"], bias_rows))


def nonquadratic_table(radii: Sequence[float], seed: int) -> str:
    """Per-sample weights: L(w, lam) = mean(sigmoid(lam_i) * logistic_loss_i(w)); the central
    difference against -M v by double backward, in float64 and float32."""
    gen = torch.Generator().manual_seed(seed)
    n, dim = 200, 20
    x = torch.randn(n, dim, generator=gen, dtype=torch.float64)
    y = (x @ torch.randn(dim, generator=gen, dtype=torch.float64) > 0).to(torch.float64)
    w0 = torch.randn(dim, generator=gen, dtype=torch.float64)
    lam0 = torch.randn(n, generator=gen, dtype=torch.float64)
    v0 = torch.randn(dim, generator=gen, dtype=torch.float64)

    def loss(w: Tensor, lam: Tensor) -> Tensor:
        per_sample = F.binary_cross_entropy_with_logits(x.to(w.dtype) @ w, y.to(w.dtype),
                                                        reduction="none")
        return (torch.sigmoid(lam) * per_sample).mean()

    w, lam = w0.clone().requires_grad_(), lam0.clone().requires_grad_()
    (grad_w,) = torch.autograd.grad(loss(w, lam), w, create_graph=True)
    (mixed,) = torch.autograd.grad(grad_w, lam, grad_outputs=v0)
    target = -mixed.detach()
    rows = []
    for radius in radii:
        row: list[object] = [f"{radius:g}"]
        for dtype in (torch.float64, torch.float32):
            wd = w0.to(dtype).clone().requires_grad_()
            ld = lam0.to(dtype).clone().requires_grad_()
            hop = Hop([wd], [ld], lambda wd=wd, ld=ld: loss(wd, ld))
            with hop:
                (out,) = darts(hop, [v0.to(dtype)], Config(type="darts", darts_alpha=radius))
            row.append(sci(rel_err(out.detach().to(torch.float64), target)))
        rows.append(row)
    return table([f"radius (‖w‖ = {float(w0.norm()):.2f})", "rel. error fp64",
                  "rel. error fp32"], rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=20)
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--condition", type=float, default=1e3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--cg-extra", type=int, nargs="*", default=[25, 30, 40],
                        help="cg iterations beyond dim")
    parser.add_argument("--neumann-iterations", type=int, nargs="+",
                        default=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000])
    parser.add_argument("--radii", type=float, nargs="+",
                        default=[1e-8, 1e-6, 1e-4, 1e-2, 1e-1, 1.0, 10.0])
    parser.add_argument("--sgd-lr", type=float, default=0.1)
    parser.add_argument("--adam-steps", type=int, default=500)
    parser.add_argument("--adam-lr", type=float, default=0.01)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    problem = Ridge(args.dim, args.samples, args.condition, args.seed)
    print(f"Ridge: dim {args.dim}, {args.samples} samples, H eigenvalues in "
          f"[{problem.lambda_min:.3g}, {problem.lambda_max:.3g}] (condition "
          f"{problem.lambda_max / problem.lambda_min:.3g}), ‖w*‖ = "
          f"{float(problem.w_star.norm()):.3g}; errors relative to the exact -w* * (H^-1 g).")
    print("\n### 1. cg\n")
    print(cg_table(problem, args.dim, args.cg_extra))
    print("\n### 2. neumann\n")
    print(neumann_table(problem, args.neumann_iterations))
    print(f"\n### 3. darts and sama against the radius (sama: SGD lr {args.sgd_lr}; Adam lr "
          f"{args.adam_lr} after {args.adam_steps} steps on this loss)\n")
    print(radius_table(problem, args.radii, trained_adam_p(problem, args.adam_steps,
                                                           args.adam_lr), args.sgd_lr))
    print("\n### 4. darts radius on a loss not quadratic in w (per-sample weights on logistic "
          "losses), against -M v by double backward\n")
    print(nonquadratic_table(args.radii, args.seed))


if __name__ == "__main__":
    main()
