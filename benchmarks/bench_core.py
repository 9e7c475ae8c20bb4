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

The two programs (library and hand-written variants) are in ``_core_programs.py``; this file
times them and prints the table.

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
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _core_programs import (  # noqa: E402
    Result,
    classifier_net,
    logreg_hand,
    logreg_inner_loss,
    logreg_library,
    mwn_hand,
    mwn_library,
    mwn_train_loss,
    weight_net,
)
from _data import (  # noqa: E402
    common_args,
    logistic_data,
    max_abs_diff,
    median,
    noisy_digits,
    setup,
    timed,
)

# the programs live in _core_programs.py; bench_hvp.py imports these from here
__all__ = ["classifier_net", "logreg_inner_loss", "main", "mwn_train_loss", "weight_net"]


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
