"""Hessian-vector products: double backward vs torch.func forward-over-reverse.

One "hypergradient" here is what a `cg` hop costs: K conjugate-gradient iterations on
H x = v (K Hessian-vector products) and one mixed product M x = d/dlam <dL/dw, x>.

* double backward (what betty/hypergradient/hop.py does): g = dL/dw built once with
  create_graph=True, then each product is a backward through g with the graph retained,
  H p = autograd.grad(g, w, p) and M x = autograd.grad(g, lam, x).
* forward-over-reverse: H p = torch.func.jvp(w -> torch.func.grad(L)(w, lam), w, p), and
  M x = torch.func.jvp(w -> grad of L w.r.t. lam at (w, lam), w, x); L evaluates the
  modules through torch.func.functional_call. Nothing is shared between products.

Programs: (i) the logistic regression of bench_core (a) (w, lam in R^20, 500 samples);
(ii) the Meta-Weight-Net lower loss of bench_core (b): MLP 64-512-512-10 on digits, batch
100, lam = the 1-100-1 weight net. Both methods are checked against each other (max |diff| of
one H v and of the whole hypergradient) before timing.

    python benchmarks/bench_hvp.py
    python benchmarks/bench_hvp.py --ks 1 3 --iters-logreg 50 --iters-mlp 5 --repeats 1
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jvp

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _data import (  # noqa: E402
    batch_list,
    common_args,
    logistic_data,
    max_abs_diff,
    median,
    noisy_digits,
    setup,
    timed,
)
from bench_core import (  # noqa: E402
    classifier_net,
    logreg_inner_loss,
    mwn_train_loss,
    weight_net,
)

Vector = list[Tensor]
LossFn = Callable[[Vector, Vector], Tensor]  # L(w, lam) on lists of tensors


def solve_cg(matvec: Callable[[Vector], Vector], b: Vector, iterations: int) -> Vector:
    """Plain CG from x = 0 (the same iteration for both methods)."""
    x = [torch.zeros_like(t) for t in b]
    r = list(b)
    p = list(r)
    rr = sum(torch.sum(t * t) for t in r)
    for _ in range(iterations):
        ap = matvec(p)
        step = rr / sum(torch.sum(a * b) for a, b in zip(p, ap))
        x = [xi + step * pi for xi, pi in zip(x, p)]
        r = [ri - step * ai for ri, ai in zip(r, ap)]
        rr_new = sum(torch.sum(t * t) for t in r)
        p = [ri + (rr_new / rr) * pi for ri, pi in zip(r, p)]
        rr = rr_new
    return x


# -- the two implementations of one cg hypergradient ----------------------------------------
def double_backward(loss: Callable[[], Tensor], w: Vector, lam: Vector, v: Vector, k: int
                    ) -> tuple[Vector, Vector]:
    """(-M H^-1 v by K CG steps, H v); ``loss()`` uses the parameters ``w`` and ``lam``
    (e.g. a module's own, as betty does), which require grad."""
    g = torch.autograd.grad(loss(), w, create_graph=True)

    def hvp(p: Vector) -> Vector:
        return list(torch.autograd.grad(g, w, p, retain_graph=True))

    x = solve_cg(hvp, v, k)
    mixed = torch.autograd.grad(g, lam, x, retain_graph=True)
    return [-m for m in mixed], hvp(v)


def forward_over_reverse(loss_fn: LossFn, w: Vector, lam: Vector, v: Vector, k: int
                         ) -> tuple[Vector, Vector]:
    """The same, with torch.func.jvp of torch.func.grad; ``w`` and ``lam`` plain tensors."""
    grad_w = grad(loss_fn, argnums=0)
    grad_lam = grad(loss_fn, argnums=1)

    def hvp(p: Vector) -> Vector:
        return list(jvp(lambda w_: grad_w(w_, lam), (w,), (p,))[1])

    x = solve_cg(hvp, v, k)
    mixed = jvp(lambda w_: grad_lam(w_, lam), (w,), (x,))[1]
    return [-m for m in mixed], hvp(v)


# -- programs --------------------------------------------------------------------------------
def logreg_program(args: argparse.Namespace) -> dict[str, Any]:
    (x, y), (x_va, y_va) = logistic_data(seed=args.seed, device=args.device)
    gen = torch.Generator().manual_seed(args.seed)
    w = (0.1 * torch.randn(20, generator=gen)).to(args.device).requires_grad_(True)
    lam = torch.ones(20, device=args.device, requires_grad=True)
    v = torch.autograd.grad(
        torch.nn.functional.binary_cross_entropy_with_logits(x_va @ w, y_va), [w])

    def loss_fn(w_: Vector, lam_: Vector) -> Tensor:
        return logreg_inner_loss(x, y, w_[0], lam_[0])

    return {"name": "logreg", "loss_fn": loss_fn, "stateful_loss": lambda: loss_fn([w], [lam]),
            "w": [w], "lam": [lam], "v": [t.detach() for t in v], "iters": args.iters_logreg}


def mlp_program(args: argparse.Namespace) -> dict[str, Any]:
    data = noisy_digits(seed=args.seed, device=args.device)
    (x, y), = batch_list(data["train"], 100, 1, seed=args.seed + 1)
    (xm, ym), = batch_list(data["meta"], 100, 1, seed=args.seed + 2)
    torch.manual_seed(args.seed)
    clf, wnet = classifier_net().to(args.device), weight_net().to(args.device)
    w_names = [n for n, _ in clf.named_parameters()]
    lam_names = [n for n, _ in wnet.named_parameters()]

    def loss_fn(w_: Vector, lam_: Vector) -> Tensor:
        c = _bind(clf, dict(zip(w_names, w_)))
        m = _bind(wnet, dict(zip(lam_names, lam_)))
        return mwn_train_loss(c, m, x, y)

    w, lam = list(clf.parameters()), list(wnet.parameters())
    v = torch.autograd.grad(nn.functional.cross_entropy(clf(xm), ym), w)
    return {"name": "mlp-512", "loss_fn": loss_fn,
            "stateful_loss": lambda: mwn_train_loss(clf, wnet, x, y), "w": w, "lam": lam,
            "v": [t.detach() for t in v], "iters": args.iters_mlp}


def _bind(module: nn.Module, params: dict[str, Tensor]) -> Callable[[Tensor], Tensor]:
    return lambda inp: functional_call(module, params, (inp,))


# -- driver ----------------------------------------------------------------------------------
def run_double_backward(prog: dict[str, Any], k: int) -> tuple[Vector, Vector]:
    hyper, hv = double_backward(prog["stateful_loss"], prog["w"], prog["lam"], prog["v"], k)
    return [t.detach() for t in hyper], [t.detach() for t in hv]


def run_forward_over_reverse(prog: dict[str, Any], k: int) -> tuple[Vector, Vector]:
    w = [t.detach() for t in prog["w"]]
    lam = [t.detach() for t in prog["lam"]]
    return forward_over_reverse(prog["loss_fn"], w, lam, prog["v"], k)


METHODS = {"double-backward": run_double_backward, "fwd-over-rev": run_forward_over_reverse}


def measure(prog: dict[str, Any], k: int, args: argparse.Namespace) -> dict[str, Any]:
    out = {name: fn(prog, k) for name, fn in METHODS.items()}  # also the warm-up
    db, fr = out["double-backward"], out["fwd-over-rev"]
    scale = max(float(t.abs().max()) for t in db[0])
    row: dict[str, Any] = {"program": prog["name"], "k": k,
                           "d_hv": max_abs_diff(db[1], fr[1]),
                           "d_hyper": max_abs_diff(db[0], fr[0]), "hyper_scale": scale}
    times: dict[str, list[float]] = {name: [] for name in METHODS}
    iters = prog["iters"]
    for _ in range(args.repeats):
        for name, fn in METHODS.items():
            seconds, _ = timed(lambda fn=fn: [fn(prog, k) for _ in range(iters)], args.device,
                               args.clock)
            times[name].append(seconds)
    for name in METHODS:
        row[name] = 1e3 * median(times[name]) / iters
    return row


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, device "
          f"{args.device}, repeats {args.repeats} (medians); one hypergradient = K HVPs "
          "(K CG iterations) + 1 mixed product")
    header = (f"{'program':<9} {'K':>3} {'double-bwd ms':>14} {'fwd-over-rev ms':>16} "
              f"{'fwd/dbl':>8} {'faster':<16} {'max|dHv|':>9} {'max|dhyper|':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        db, fr = r["double-backward"], r["fwd-over-rev"]
        faster = "double-backward" if db <= fr else "fwd-over-rev"
        print(f"{r['program']:<9} {r['k']:>3} {db:>14.4f} {fr:>16.4f} {fr / db:>8.2f} "
              f"{faster:<16} {r['d_hv']:>9.2e} {r['d_hyper']:>11.2e}")
    for r in rows:
        if r["d_hv"] > args.tol or r["d_hyper"] > args.tol * max(1.0, r["hyper_scale"]):
            print(f"  !!!!! MISMATCH {r['program']} K={r['k']}: the two methods disagree "
                  f"(|dHv| {r['d_hv']:.2e}, |dhyper| {r['d_hyper']:.2e}) !!!!!")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5, 10])
    parser.add_argument("--programs", nargs="+", choices=["logreg", "mlp"],
                        default=["logreg", "mlp"])
    parser.add_argument("--iters-logreg", type=int, default=200,
                        help="hypergradients per timed run, logistic regression")
    parser.add_argument("--iters-mlp", type=int, default=20,
                        help="hypergradients per timed run, MLP")
    parser.add_argument("--tol", type=float, default=1e-4)
    args = parser.parse_args(argv)
    setup(args)
    builders = {"logreg": logreg_program, "mlp": mlp_program}
    rows = []
    for name in args.programs:
        prog = builders[name](args)
        for k in args.ks:
            rows.append(measure(prog, k, args))
    print_table(rows, args)


if __name__ == "__main__":
    main()
