"""Library overhead: two programs run through betty and as hand-written PyTorch, same math.

(a) logreg-cg: the original Betty's regression test. Inner w in R^20 minimises
    BCE(train) + 0.5 w^T diag(lam) w with SGD(lr 0.1) for `unroll` steps from w = 0
    (`on_inner_loop_start` zeroes w each window); outer lam (ones, SGD lr 1.0 momentum 0.9,
    clamped >= 1e-8) minimises BCE(valid) with the CG hypergradient
    -M (cg_alpha H)^-1 (cg_alpha v), K = 3 CG iterations of double-backward Hessian-vector
    products.
(b) mwn-darts: Meta-Weight-Net. Classifier MLP 64-512-512-10 (SGD lr 0.1 momentum 0.9) on
    long-tailed, 20%-noisy digits with loss mean(weight(loss_i.detach()) * loss_i); weight net
    1-100-1 (sigmoid; Adam lr 1e-3) on the clean meta-set CE, with the DARTS hypergradient
    -[dL/dlam(w + eps v) - dL/dlam(w - eps v)] / (2 eps), eps = alpha / ||v||, probes on
    copies of w restored exactly (1 / (2 eps) is formed as ||v|| / (2 alpha) with alpha a
    tensor, the library's current operation order, so the two agree bit for bit).

Both variants of a program start from the same initialisation and consume the same batches.
An untimed short run of each (warm-up and agreement check) comes first; then timed runs
alternate library / hand-written, and the table reports medians, the ratio and the largest
difference between the final parameters and losses of the two. A difference after the short
run is flagged as a MISMATCH (different computations); one that only appears after many steps
is float32 rounding amplified by training and is reported as such.

    python benchmarks/bench_core.py                       # both programs, 3 repeats each
    python benchmarks/bench_core.py --clock thread        # steadier on a busy machine
    python benchmarks/bench_core.py --program a --steps-a 400 --repeats 1 --profile --count
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import sys
from collections import Counter
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

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

from betty import Engine  # noqa: E402
from betty.configs import Config, EngineConfig  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402

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


# == driver ==================================================================================
PROGRAMS = {
    "a": ("logreg-cg", logistic_data, logreg_library, logreg_hand, "steps_a"),
    "b": ("mwn-darts", noisy_digits, mwn_library, mwn_hand, "steps_b"),
}


def _difference(lib: Result, ref: Result) -> float:
    return max(max_abs_diff(lib["params"], ref["params"]),
               max_abs_diff(lib["losses"], ref["losses"]))


def measure(key: str, args: argparse.Namespace) -> dict[str, Any]:
    name, make_data, library, hand, steps_attr = PROGRAMS[key]
    steps = getattr(args, steps_attr)
    check_steps = min(steps, args.check_steps_a if key == "a" else args.check_steps_b)
    data = make_data(seed=args.seed, device=args.device)
    # untimed warm-up, which is also the agreement check: after a few steps, float32
    # rounding differences (if any) have not yet been amplified by training
    check = {label: build(args, data, check_steps)()
             for label, build in (("library", library), ("hand", hand))}
    times: dict[str, list[float]] = {"library": [], "hand": []}
    results: dict[str, Result] = {}
    for _ in range(args.repeats):
        for label, build in (("library", library), ("hand", hand)):
            run = build(args, data, steps)
            seconds, results[label] = timed(run, args.device, args.clock)
            times[label].append(seconds)
    lib_ms = 1e3 * median(times["library"]) / steps
    hand_ms = 1e3 * median(times["hand"]) / steps
    lib, ref = results["library"], results["hand"]
    return {
        "name": name, "steps": steps, "lib_ms": lib_ms, "hand_ms": hand_ms,
        "ratio": lib_ms / hand_ms, "best_ratio": min(times["library"]) / min(times["hand"]),
        "target": args.target_a if key == "a" else args.target_b,
        "check_steps": check_steps, "dcheck": _difference(check["library"], check["hand"]),
        "dparams": max_abs_diff(lib["params"], ref["params"]),
        "dlosses": max_abs_diff(lib["losses"], ref["losses"]),
        "lib_summary": lib["summary"], "hand_summary": ref["summary"],
        "all_lib": times["library"], "all_hand": times["hand"],
    }


def print_table(rows: list[dict[str, Any]], args: argparse.Namespace) -> None:
    print(f"\ntorch {torch.__version__}, threads {torch.get_num_threads()}, device "
          f"{args.device}, nonfinite {args.nonfinite or 'raise (default)'}, "
          f"repeats {args.repeats}; ms/it are medians, ratio = median library / "
          "median hand-written, min-ratio = fastest library run / fastest hand-written run; "
          "max|d...| compare the final numbers of the two (check: after the short check run)")
    header = (f"{'program':<10} {'steps':>6} {'library ms/it':>14} {'hand ms/it':>11} "
              f"{'ratio':>6} {'min-ratio':>9} {'target':>7} {'max|dcheck|':>12} "
              f"{'max|dparam|':>12} {'max|dloss|':>11}")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['name']:<10} {r['steps']:>6} {r['lib_ms']:>14.4f} {r['hand_ms']:>11.4f} "
              f"{r['ratio']:>6.3f} {r['best_ratio']:>9.3f} {r['target']:>7.2f} "
              f"{r['dcheck']:>12.3e} {r['dparams']:>12.3e} {r['dlosses']:>11.3e}")
    for r in rows:
        print(f"  {r['name']}: library {r['lib_summary']} | hand-written {r['hand_summary']}")
        print(f"  {r['name']}: run seconds, library {[round(t, 3) for t in r['all_lib']]}, "
              f"hand-written {[round(t, 3) for t in r['all_hand']]}")
        final = max(r["dparams"], r["dlosses"])
        if r["dcheck"] > args.tol:
            print(f"  !!!!! MISMATCH in {r['name']}: after {r['check_steps']} steps the library "
                  f"and hand-written numbers already differ by {r['dcheck']:.3e} > --tol "
                  f"{args.tol:g}; the timings compare different computations !!!!!")
        elif final == 0.0:
            print(f"  {r['name']}: library and hand-written final numbers are bit-identical")
        elif final > args.tol:
            print(f"  {r['name']}: final numbers differ by {final:.3e} although the "
                  f"{r['check_steps']}-step check agrees to {r['dcheck']:.3e}: float32 rounding "
                  "differences amplified by training (same math, different operation order)")
        if r["ratio"] > r["target"]:
            print(f"  {r['name']}: ratio {r['ratio']:.3f} is above the target "
                  f"{r['target']:.2f}")


def profile_library(key: str, args: argparse.Namespace) -> None:
    """cProfile one library run of program ``key``; print the heaviest functions."""
    name, make_data, library, _, steps_attr = PROGRAMS[key]
    steps = getattr(args, steps_attr)
    run = library(args, make_data(seed=args.seed, device=args.device), steps)
    profiler = cProfile.Profile()
    profiler.enable()
    run()
    profiler.disable()
    for order in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(order).print_stats(args.profile_lines)
        print(f"\n== cProfile of the library run of {name} ({steps} steps), by {order} ==")
        print(out.getvalue())


class _OpCounter(TorchDispatchMode):
    """Counts the aten operators a run dispatches (forward and backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None
                           ) -> Any:
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def count_work(key: str, args: argparse.Namespace) -> None:
    """Load-independent cost: Python calls (cProfile, generator resumptions included) and
    dispatched aten operators per global step, library vs hand-written, with the operators
    the library runs more often."""
    name, make_data, library, hand, steps_attr = PROGRAMS[key]
    steps = min(getattr(args, steps_attr), args.count_steps)
    data = make_data(seed=args.seed, device=args.device)
    calls: dict[str, int] = {}
    ops: dict[str, Counter[str]] = {}
    for label, build in (("library", library), ("hand", hand)):
        run = build(args, data, steps)
        profiler = cProfile.Profile()
        profiler.enable()
        run()
        profiler.disable()
        calls[label] = pstats.Stats(profiler).total_calls  # type: ignore[attr-defined]
        counter = _OpCounter()
        run = build(args, data, steps)
        with counter:
            run()
        ops[label] = counter.ops
    print(f"\n== work per global step of {name} ({steps} steps) ==")
    for label in ("library", "hand"):
        print(f"  {label:<8} Python calls {calls[label] / steps:9.1f}   aten ops "
              f"{sum(ops[label].values()) / steps:8.1f}")
    extra = {op: ops["library"][op] - ops["hand"][op]
             for op in set(ops["library"]) | set(ops["hand"])}
    shown = sorted((kv for kv in extra.items() if kv[1]), key=lambda kv: -abs(kv[1]))
    for op, n in shown[: args.profile_lines]:
        print(f"    {op:<40} library - hand-written {n / steps:+8.2f} per step")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common_args(parser)
    parser.add_argument("--program", choices=["a", "b", "both"], default="both")
    parser.add_argument("--nonfinite", choices=["raise", "skip", "off"], default=None,
                        help="EngineConfig.nonfinite of the library runs (default: the "
                        "library's default, 'raise': a device check per step, one read per "
                        "global step; the hand-written loop checks nothing)")
    parser.add_argument("--steps-a", type=int, default=2000, help="global steps of (a)")
    parser.add_argument("--unroll", type=int, default=100, help="unroll steps of (a)")
    parser.add_argument("--cg-alpha", type=float, default=0.1)
    parser.add_argument("--steps-b", type=int, default=300, help="global steps of (b)")
    parser.add_argument("--batch", type=int, default=100, help="batch size of (b)")
    parser.add_argument("--darts-alpha", type=float, default=0.01)
    parser.add_argument("--check-steps-a", type=int, default=100,
                        help="steps of the untimed warm-up + agreement run of (a)")
    parser.add_argument("--check-steps-b", type=int, default=10,
                        help="steps of the untimed warm-up + agreement run of (b)")
    parser.add_argument("--tol", type=float, default=1e-4,
                        help="flag numbers of the two variants differing by more than this")
    parser.add_argument("--target-a", type=float, default=1.10)
    parser.add_argument("--target-b", type=float, default=1.03)
    parser.add_argument("--profile", action="store_true",
                        help="after the table, cProfile one library run of each program")
    parser.add_argument("--profile-lines", type=int, default=30)
    parser.add_argument("--count", action="store_true",
                        help="after the table, count Python calls and aten operators per "
                        "global step of each variant (independent of machine load)")
    parser.add_argument("--count-steps", type=int, default=200,
                        help="steps of the --count runs (at most the program's steps)")
    args = parser.parse_args(argv)
    setup(args)
    if args.steps_a % args.unroll:
        parser.error("--steps-a must be a multiple of --unroll")
    keys = ["a", "b"] if args.program == "both" else [args.program]
    rows = []
    for key in keys:
        rows.append(measure(key, args))
    print_table(rows, args)
    if args.count:
        for key in keys:
            count_work(key, args)
    if args.profile:
        for key in keys:
            profile_library(key, args)


if __name__ == "__main__":
    main()
