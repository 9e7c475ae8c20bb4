"""Accuracy against cost: each hypergradient method's error as a function of its setting.

Ridge regression (docs/math.md#ridge-regression): ``L(w, lam) = 1/2 ||X w - y||^2 / n + 1/2
sum_i lam_i w_i^2``, so ``H = X^T X / n + diag(lam)``, ``w* = H^-1 X^T y / n`` and, for an
outer loss with gradient ``g`` at ``w*``, the exact hypergradient is ``-w* * (H^-1 g)``. X has
prescribed singular values (condition number of H about ``--condition``), so the iterative
solvers have something to converge. Every number comes from the library's own code path: a
`betty.hypergradient.Hop` over the ridge loss and the functions `cg`, `neumann`, `darts`,
`sama`, `nystrom` with a `Config`.

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
   error grows like radius^2 and round-off like 1/radius;
5. nystrom against its rank k (k Hessian-vector products) and damping rho, on the ridge
   above (a spread spectrum) and on a spiked ridge (a few large eigenvalues over a flat bulk,
   the low-rank shape the method assumes);
6. cg, neumann and nystrom at equal numbers of Hessian-vector products, with time per hop,
   on both;
7. reinforce on Bernoulli samples (not ridge): the root-mean-square error of the hop against
   the closed form over many batches, against the batch size N, with and without baseline;
8. cg with K iterations per outer step, cold and warm-started (``Config(warm_start=True)``),
   along a run in which the upper moves slowly;
9. f2sa (no Hessian-vector products: first-order backward passes only) against its penalty
   lambda, its copy warm-started over outer steps: the error and error * lambda (constant
   when the O(1/lambda) bias dominates; ``dL/dlam = w^2 / 2`` is quadratic in w), with time.

    python benchmarks/accuracy_study.py
    python benchmarks/accuracy_study.py --dim 50 --condition 1e4 --samples 500
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from betty.configs import Config
from betty.hypergradient import (
    Hop,
    cg,
    darts,
    f2sa,
    neumann,
    nystrom,
    reinforce,
    sama,
    score_function_loss,
)
from betty.optim import update_jacobian_diag

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _ridge_study import Ridge, cosine, hop_result, rel_err, sci, table  # noqa: E402


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


def nystrom_table(problem: Ridge, ranks: Sequence[int], rhos: Sequence[float]) -> str:
    """nystrom against its rank k (k Hessian-vector products) and damping rho, fixed seed."""
    rows = []
    for k in ranks:
        row: list[object] = [k]
        for rho in rhos:
            config = Config(type="nystrom", nystrom_rank=k, nystrom_rho=rho, nystrom_seed=0)
            row.append(sci(rel_err(hop_result(problem, nystrom, config), problem.exact)))
        rows.append(row)
    return table(["nystrom_rank k"] + [f"rho = {rho:g}" for rho in rhos], rows)


def milliseconds(problem: Ridge, method: Callable, config: Config, repeats: int = 7) -> float:
    """Fastest of ``repeats`` wall times of one hop (gradient graph, solve, mixed product):
    the minimum, as other processes on a shared machine only ever add time."""
    hop_result(problem, method, config)  # warm-up: first calls pay for lazy set-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        hop_result(problem, method, config)
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def budget_table(problem: Ridge, budgets: Sequence[int], rho: float) -> str:
    """cg, neumann (alpha = 0.95 * 2 / lambda_max) and nystrom (rank k, damping rho) at the
    same number of Hessian-vector products; error against the exact hypergradient, and time."""
    alpha = 0.95 * 2 / problem.lambda_max
    rows = []
    for k in budgets:
        for name, method, config in (
                ("cg", cg, Config(type="cg", cg_iterations=k)),
                ("neumann", neumann, Config(type="neumann", neumann_iterations=k,
                                            neumann_alpha=alpha)),
                ("nystrom", nystrom, Config(type="nystrom", nystrom_rank=k, nystrom_rho=rho,
                                            nystrom_seed=0))):
            h = hop_result(problem, method, config)
            rows.append((k, name, sci(rel_err(h, problem.exact)), f"{cosine(h, problem.exact):.4f}",
                         f"{milliseconds(problem, method, config):.2f}"))
    return table(["HVPs", "method", "rel. error", "cosine", "ms / hop"], rows)


def warm_start_table(problem: Ridge, iterations: Sequence[int], steps: Sequence[int],
                     drift: float) -> str:
    """cg with K iterations per outer step, cold (from 0) and warm (from the previous step's
    solution, ``Config(warm_start=True)``), while the upper moves: ``lam_t = lam_0 (1 + drift
    t)``. Error against each step's exact hypergradient."""
    header = ["outer step t"]
    for k in iterations:
        header += [f"cg K={k} cold", f"cg K={k} warm"]
    memories: dict[int, dict] = {k: {} for k in iterations}
    rows = []
    for t in range(max(steps) + 1):
        moved = problem.moved(problem.lam * (1 + drift * t))
        row: list[object] = [t]
        for k in iterations:
            cold = hop_result(moved, cg, Config(type="cg", cg_iterations=k))
            warm = hop_result(moved, cg, Config(type="cg", cg_iterations=k, warm_start=True),
                              memory=memories[k])
            row += [sci(rel_err(cold, moved.exact)), sci(rel_err(warm, moved.exact))]
        if t in steps:
            rows.append(row)
    return table(header, rows)


def reinforce_table(sizes: Sequence[int], repeats: int, seed: int) -> str:
    """REINFORCE on Bernoulli(sigmoid(phi)) samples, L(w, s) = 1/2 (w - a_s)^2 (a = 4, 5):
    root-mean-square error of the hop over ``repeats`` batches against the closed form
    sigmoid'(phi) (a_1 - a_0) v, with and without the leave-one-out baseline."""
    phi, w0, v, a = 0.4, 0.3, 1.5, (4.0, 5.0)
    sig = 1 / (1 + math.exp(-phi))
    exact = sig * (1 - sig) * (a[1] - a[0]) * v
    rows = []
    for n in sizes:
        row: list[object] = [n]
        for baseline in ("none", "leave_one_out"):
            squared = 0.0
            for r in range(repeats):
                gen = torch.Generator().manual_seed(seed * 100003 + 1000 * n + r)
                samples = (torch.rand(n, generator=gen, dtype=torch.float64) < sig).double()
                target = torch.where(samples > 0, a[1], a[0])
                phi_t = torch.tensor([phi], dtype=torch.float64, requires_grad=True)
                w = torch.tensor([w0], dtype=torch.float64, requires_grad=True)
                log_prob = samples * F.logsigmoid(phi_t) + (1 - samples) * F.logsigmoid(-phi_t)
                hop = Hop([w], [phi_t], lambda w=w, t=target, lp=log_prob, b=baseline:
                          score_function_loss(0.5 * (w - t) ** 2, lp, b))
                with hop:
                    (out,) = reinforce(hop, [torch.tensor([v], dtype=torch.float64)],
                                       Config(type="reinforce"))
                squared += (float(out) - exact) ** 2
            rms = math.sqrt(squared / repeats)
            row += [sci(rms), f"{rms * math.sqrt(n):.3f}"]
        rows.append(row)
    return table(["samples N", "RMS error, no baseline", "x sqrt(N)",
                  "RMS error, leave-one-out", "x sqrt(N)"], rows)


def f2sa_table(problem: Ridge, lambdas: Sequence[float], steps: int, outer: int) -> str:
    """f2sa with ``steps`` paired steps per outer step (step size 1 / lambda_max), ``outer``
    outer steps at a fixed upper; backward passes per hop: steps + 3."""
    rows = []
    for lam in lambdas:
        config = Config(type="f2sa", f2sa_lambda=lam, f2sa_lambda_growth=0.0, f2sa_steps=steps,
                        f2sa_lr=1.0 / problem.lambda_max)
        memory: dict = {}
        for _ in range(outer):
            h = hop_result(problem, f2sa, config, memory=memory)
        error = rel_err(h, problem.exact)
        rows.append((f"{lam:g}", sci(error), sci(error * lam), f"{cosine(h, problem.exact):.4f}",
                     f"{milliseconds(problem, f2sa, config):.2f}"))
    return table(["lambda", "rel. error", "error * lambda", "cosine", "ms / hop"], rows)


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
    parser.add_argument("--nystrom-ranks", type=int, nargs="+", default=[1, 2, 5, 10, 15, 20])
    parser.add_argument("--nystrom-rhos", type=float, nargs="+",
                        default=[1.0, 1e-1, 1e-2, 1e-3, 1e-4])
    parser.add_argument("--budgets", type=int, nargs="+", default=[2, 5, 10, 20])
    parser.add_argument("--spike", type=int, default=5,
                        help="large eigenvalues of the second (spiked) ridge in tables 5-6")
    parser.add_argument("--budget-rho", type=float, default=1e-3,
                        help="nystrom's rho in the equal-budget table")
    parser.add_argument("--warm-iterations", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--warm-steps", type=int, nargs="+",
                        default=[0, 1, 2, 5, 10, 20, 50, 100, 200])
    parser.add_argument("--warm-drift", type=float, default=1e-3,
                        help="the upper's relative move per outer step in table 8")
    parser.add_argument("--reinforce-sizes", type=int, nargs="+", default=[16, 64, 256, 1024])
    parser.add_argument("--reinforce-repeats", type=int, default=200)
    parser.add_argument("--f2sa-lambdas", type=float, nargs="+",
                        default=[1.0, 10.0, 100.0, 1e3, 1e4, 1e5])
    parser.add_argument("--f2sa-steps", type=int, default=20)
    parser.add_argument("--f2sa-outer", type=int, default=200,
                        help="outer steps of table 9 (the penalized copy is warm-started)")
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
    spiked = Ridge(args.dim, args.samples, args.condition, args.seed, spike=args.spike)
    problems = {"the ridge above": problem,
                f"a spiked ridge ({args.spike} eigenvalues of X^T X / n in [0.1, 1], the "
                f"other {args.dim - args.spike} at {1 / args.condition:g}; H eigenvalues in "
                f"[{spiked.lambda_min:.3g}, {spiked.lambda_max:.3g}])": spiked}
    for part, (name, p) in zip("ab", problems.items()):
        print(f"\n### 5{part}. nystrom against rank and rho (nystrom_seed 0), {name}\n")
        print(nystrom_table(p, args.nystrom_ranks, args.nystrom_rhos))
    for part, (name, p) in zip("ab", problems.items()):
        print(f"\n### 6{part}. equal budgets of Hessian-vector products (nystrom rho "
              f"{args.budget_rho:g}, neumann alpha 0.95 * 2/lambda_max), {name}\n")
        print(budget_table(p, args.budgets, args.budget_rho))
    print(f"\n### 7. reinforce on Bernoulli samples, {args.reinforce_repeats} batches per N\n")
    print(reinforce_table(args.reinforce_sizes, args.reinforce_repeats, args.seed))
    print(f"\n### 8. warm-started cg while the upper moves (lam_t = lam_0 (1 + {args.warm_drift:g}"
          " t)), the ridge above\n")
    print(warm_start_table(problem, args.warm_iterations, args.warm_steps, args.warm_drift))
    print(f"\n### 9. f2sa against lambda ({args.f2sa_steps} steps per outer step, after "
          f"{args.f2sa_outer} outer steps), the ridge above\n")
    print(f2sa_table(problem, args.f2sa_lambdas, args.f2sa_steps, args.f2sa_outer))


if __name__ == "__main__":
    main()
