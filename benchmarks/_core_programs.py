"""The two programs of `bench_core.py`, each built through betty and written by hand.

(a) ``logreg-cg``: logistic-regression HPO with the CG hypergradient; (b) ``mwn-darts``:
Meta-Weight-Net with the DARTS hypergradient (`bench_core.py`'s docstring gives the math).
Each ``*_library`` / ``*_hand`` function builds its variant from the same initialisation and
batches and returns a function that trains it and reports the final numbers (`Result`).
`bench_hvp.py` reuses the losses and networks.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _data import batch_list
from torch import Tensor, nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem

Result = dict[str, Any]


def _engine_config(args: argparse.Namespace, steps: int) -> EngineConfig:
    strategy = "gpu" if args.device.startswith("cuda") else "cpu"
    kwargs = {} if getattr(args, "nonfinite", None) is None else {"nonfinite": args.nonfinite}
    return EngineConfig(train_iters=steps, strategy=strategy, progress_bar=False, **kwargs)


# == (a) logistic-regression HPO with the CG hypergradient ==================================
def logreg_inner_loss(x: Tensor, y: Tensor, w: Tensor, lam: Tensor) -> Tensor:
    """BCE + 0.5 w^T diag(lam) w, written as in the original Betty test."""
    return (F.binary_cross_entropy_with_logits(x @ w, y)
            + 0.5 * (w.unsqueeze(0) @ torch.diag(lam) @ w.unsqueeze(1)).sum())


def logreg_valid_loss(x: Tensor, y: Tensor, w: Tensor) -> Tensor:
    return F.binary_cross_entropy_with_logits(x @ w, y)


class ChildNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(20))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return x @ self.w, self.w


class ParentNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.ones(20))

    def forward(self) -> Tensor:
        return self.w


class LogregOuter(ImplicitProblem):
    def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.inner(x)[0], y)

    def param_callback(self) -> None:
        for p in self.trainable_parameters():
            p.data.clamp_(min=1e-8)


class LogregInner(ImplicitProblem):
    def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return logreg_inner_loss(x, y, self.module.w, self.outer())

    def on_inner_loop_start(self) -> None:
        self.module.w.data.zero_()


def logreg_library(args: argparse.Namespace, data: Any, steps: int) -> Callable[[], Result]:
    """Build the betty program; return a function that trains it and reports final numbers."""
    train, valid = data
    outer_net, inner_net = ParentNet().to(args.device), ChildNet().to(args.device)
    outer = LogregOuter(
        "outer", Config(), module=outer_net,
        optimizer=torch.optim.SGD(outer_net.parameters(), lr=1.0, momentum=0.9),
        train_data_loader=[valid])
    inner = LogregInner(
        "inner", Config(type="cg", cg_iterations=3, cg_alpha=args.cg_alpha,
                        unroll_steps=args.unroll),
        module=inner_net, optimizer=torch.optim.SGD(inner_net.parameters(), lr=0.1),
        train_data_loader=[train])
    engine = Engine([outer, inner], _engine_config(args, steps),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})

    def run() -> Result:
        engine.run()
        return logreg_result(inner_net.w, outer_net.w, valid)

    return run


def logreg_hand(args: argparse.Namespace, data: Any, steps: int) -> Callable[[], Result]:
    """The same program in plain PyTorch."""
    (x_tr, y_tr), (x_va, y_va) = data
    w = torch.zeros(20, device=args.device, requires_grad=True)
    lam = torch.ones(20, device=args.device, requires_grad=True)
    inner_opt = torch.optim.SGD([w], lr=0.1)
    outer_opt = torch.optim.SGD([lam], lr=1.0, momentum=0.9)
    alpha, unroll = args.cg_alpha, args.unroll

    def hypergradient() -> Tensor:
        v, = torch.autograd.grad(logreg_valid_loss(x_va, y_va, w), [w])
        g, = torch.autograd.grad(logreg_inner_loss(x_tr, y_tr, w, lam), [w], create_graph=True)

        def scaled_hvp(p: Tensor) -> Tensor:
            return alpha * torch.autograd.grad(g, [w], p, retain_graph=True)[0]

        x = torch.zeros_like(v)  # CG on (alpha H) x = alpha v
        r = alpha * v
        p = r
        rr = torch.dot(r, r)
        for _ in range(3):
            ap = scaled_hvp(p)
            step = rr / torch.dot(p, ap)
            x = x + step * p
            r = r - step * ap
            rr_new = torch.dot(r, r)
            p = r + (rr_new / rr) * p
            rr = rr_new
        mixed, = torch.autograd.grad(g, [lam], x)
        return -mixed

    def run() -> Result:
        for _ in range(steps // unroll):
            with torch.no_grad():
                w.zero_()
            for _ in range(unroll):
                loss = logreg_inner_loss(x_tr, y_tr, w, lam)
                loss.backward(inputs=[w])
                inner_opt.step()
                inner_opt.zero_grad()
            lam.grad = hypergradient()
            outer_opt.step()
            with torch.no_grad():
                lam.clamp_(min=1e-8)
            outer_opt.zero_grad()
        return logreg_result(w, lam, (x_va, y_va))

    return run


def logreg_result(w: Tensor, lam: Tensor, valid: Any) -> Result:
    with torch.no_grad():
        loss = logreg_valid_loss(*valid, w)
    return {"params": [w.detach().clone(), lam.detach().clone()], "losses": [loss.detach()],
            "summary": f"valid BCE {float(loss):.5f}"}


# == (b) Meta-Weight-Net with the DARTS hypergradient ========================================
def classifier_net() -> nn.Module:
    return nn.Sequential(nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                         nn.Linear(512, 10))


def weight_net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())


def mwn_train_loss(clf: nn.Module, wnet: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    losses = F.cross_entropy(clf(x), y, reduction="none")
    weights = wnet(losses.detach().unsqueeze(1)).squeeze(1)
    return (weights * losses).mean()


def mwn_modules(args: argparse.Namespace) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(args.seed)
    return classifier_net().to(args.device), weight_net().to(args.device)


def mwn_batches(args: argparse.Namespace, data: dict[str, Any], steps: int
                ) -> tuple[list[Any], list[Any]]:
    return (batch_list(data["train"], args.batch, steps, seed=args.seed + 1),
            batch_list(data["meta"], args.batch, steps, seed=args.seed + 2))


class MWNClassifier(ImplicitProblem):
    def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return mwn_train_loss(self.module, self.meta.module, x, y)


class MWNMeta(ImplicitProblem):
    def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)


def mwn_library(args: argparse.Namespace, data: dict[str, Any], steps: int
                ) -> Callable[[], Result]:
    clf, wnet = mwn_modules(args)
    train_batches, meta_batches = mwn_batches(args, data, steps)
    lower = MWNClassifier(
        "classifier", Config(type="darts", darts_alpha=args.darts_alpha, unroll_steps=1),
        module=clf, optimizer=torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9),
        train_data_loader=train_batches)
    upper = MWNMeta("meta", Config(), module=wnet,
                    optimizer=torch.optim.Adam(wnet.parameters(), lr=1e-3),
                    train_data_loader=meta_batches)
    engine = Engine([upper, lower], _engine_config(args, steps),
                    {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})

    def run() -> Result:
        engine.run()
        return mwn_result(clf, wnet, data)

    return run


def mwn_hand(args: argparse.Namespace, data: dict[str, Any], steps: int
             ) -> Callable[[], Result]:
    clf, wnet = mwn_modules(args)
    train_batches, meta_batches = mwn_batches(args, data, steps)
    w, lam = list(clf.parameters()), list(wnet.parameters())
    clf_opt = torch.optim.SGD(w, lr=0.1, momentum=0.9)
    wnet_opt = torch.optim.Adam(lam, lr=1e-3)
    alpha = torch.tensor(args.darts_alpha, device=args.device)

    def darts(x: Tensor, y: Tensor, v: list[Tensor]) -> list[Tensor]:
        v_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v)))
        eps = alpha / v_norm
        origin = [p.detach().clone() for p in w]
        with torch.no_grad():
            torch._foreach_copy_(w, torch._foreach_add(origin, torch._foreach_mul(v, eps)))
        g_plus = torch.autograd.grad(mwn_train_loss(clf, wnet, x, y), lam)
        with torch.no_grad():  # w - eps v as the mirror of the first probe's perturbation
            torch._foreach_copy_(w, torch._foreach_add(
                torch._foreach_mul(torch._foreach_sub(w, origin), -1.0), origin))
        g_minus = torch.autograd.grad(mwn_train_loss(clf, wnet, x, y), lam)
        with torch.no_grad():
            torch._foreach_copy_(w, origin)
        half_inverse = v_norm / (2 * alpha)  # 1 / (2 eps)
        return [(gm - gp) * half_inverse for gp, gm in zip(g_plus, g_minus)]

    def run() -> Result:
        for (x, y), (xm, ym) in zip(train_batches, meta_batches):
            mwn_train_loss(clf, wnet, x, y).backward(inputs=w)
            clf_opt.step()
            clf_opt.zero_grad()
            v = list(torch.autograd.grad(F.cross_entropy(clf(xm), ym), w))
            for p, g in zip(lam, darts(x, y, v)):
                p.grad = g
            wnet_opt.step()
            wnet_opt.zero_grad()
        return mwn_result(clf, wnet, data)

    return run


def mwn_result(clf: nn.Module, wnet: nn.Module, data: dict[str, Any]) -> Result:
    with torch.no_grad():
        meta_loss = F.cross_entropy(clf(data["meta"][0]), data["meta"][1])
        x_te, y_te = data["test"]
        acc = (clf(x_te).argmax(1) == y_te).float().mean()
    params = [p.detach().clone() for p in [*clf.parameters(), *wnet.parameters()]]
    return {"params": params, "losses": [meta_loss, acc],
            "summary": f"meta CE {float(meta_loss):.4f}, test acc {float(acc):.3f}"}
