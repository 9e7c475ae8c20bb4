"""The ridge problem of benchmarks/accuracy_study.py, with its closed forms, one library hop
on it, and the table formatting the study prints (docs/math.md#ridge-regression)."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from betty.configs import Config
from betty.hypergradient import Hop

Vector = list[Tensor]


# -- the ridge problem ------------------------------------------------------------------------
class Ridge:
    """Inner ridge loss and outer least squares, in float64, with their closed forms."""

    def __init__(self, dim: int, samples: int, condition: float, seed: int, spike: int = 0
                 ) -> None:
        gen = torch.Generator().manual_seed(seed)
        d = torch.float64
        q1, _ = torch.linalg.qr(torch.randn(samples, dim, generator=gen, dtype=d))
        q2, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=d))
        # X^T X / n has eigenvalues s^2 in [1 / condition, 1]; lam adds a little. spike > 0:
        # ``spike`` eigenvalues in [0.1, 1] and the rest at 1 / condition (a low-rank H plus
        # a flat bulk, the shape Nystrom assumes)
        s = torch.logspace(0, -0.5 * math.log10(condition), dim, dtype=d)
        if spike:
            s = torch.cat([torch.logspace(0, -0.5, spike, dtype=d),
                           torch.full((dim - spike,), condition**-0.5, dtype=d)])
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

    def moved(self, lam: Tensor) -> Ridge:
        """The same data with the upper at ``lam``: w*, g, H and the exact hypergradient
        recomputed."""
        other = copy.copy(self)
        other.lam = lam
        other.h = self.x.T @ self.x / self.x.shape[0] + torch.diag(lam)
        other.w_star = torch.linalg.solve(other.h, self.x.T @ self.y / self.x.shape[0])
        other.g = self.xv.T @ (self.xv @ other.w_star - self.yv) / self.xv.shape[0]
        other.exact = -other.w_star * torch.linalg.solve(other.h, other.g)
        return other

    def loss(self, w: Tensor, lam: Tensor) -> Tensor:
        x, y = self.x.to(w.dtype), self.y.to(w.dtype)
        return 0.5 * ((x @ w - y) ** 2).mean() + 0.5 * (lam * w * w).sum()


def hop_result(problem: Ridge, method: Callable, config: Config, *, dtype=torch.float64,
               direction: Tensor | None = None, p: Tensor | None = None,
               memory: dict | None = None) -> Tensor:
    """One hop of ``method`` at ``w*`` with ``v = g`` (or ``direction``), as a float64 vector;
    ``memory``: what a warm-started solve keeps between outer steps (the chain gives each hop
    the lower problem's)."""
    w = problem.w_star.to(dtype).clone().requires_grad_()
    lam = problem.lam.to(dtype).clone().requires_grad_()
    hop = Hop([w], [lam], lambda: problem.loss(w, lam))
    if memory is not None:
        hop.memory = memory
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
