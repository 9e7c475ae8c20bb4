"""MAML on sinusoid regression: milliseconds per meta-step, betty against hand-written PyTorch
and against the MAML libraries `higher` and `torchopt`.

The program (Finn, Abbeel & Levine, "Model-Agnostic Meta-Learning", ICML 2017, section 5.1):
tasks y = a sin(x + b) with a ~ U[0.1, 5], b ~ U[0, pi], x ~ U[-5, 5]; 16 tasks per meta-step,
10 support and 10 query points per task, an MLP 1-40-40-1 (ReLU), 5 inner SGD steps at lr
0.01 from the meta-initialisation theta, and an Adam step (lr 1e-3) on theta with the exact
(second-order) meta-gradient of the mean query MSE.

Variants, all starting from the same theta and seeing the same tasks in the same order:

* ``betty task-batched``: a `TaskBatchedProblem` adapts the 16 tasks in one vmapped window
  (``initial_parameters()`` returns the meta problem's module) below an `ImplicitProblem`
  with ``Config(first_order=False)``: the program of docs/reverse_mode.md.
* ``betty 16 problems``: the original Betty's way, one `IterativeProblem` per task and one
  meta problem above all 16. Each task problem's ``initial_parameters()`` returns the meta
  problem's module, so every window restarts from theta, differentiably.
* ``betty 1 problem x16``: one such IterativeProblem that takes the 16 tasks one window
  after the other; the meta problem accumulates their query gradients
  (``gradient_accumulation=16``) before its Adam step.
* ``autograd loop``: a Python loop over the tasks, ``torch.autograd.grad(create_graph=True)``
  for each inner step, the query loss back-propagated per task.
* ``torch.func+vmap``: the whole inner loop of one task as a function (``torch.func.grad``
  inside), vmapped over the 16 tasks; one backward.
* ``higher``, ``torchopt`` (if installed: ``pip install -e ".[bench]"``): each library's
  MAML idiom (``higher.innerloop_ctx``; ``torchopt.MetaSGD`` with extract/recover of the
  network's state), looping over the tasks.

The hand-written variants evaluate the network with ``torch.func.functional_call``.

Each variant first computes one meta-gradient on the first task batch from the same theta;
the table reports its largest difference from the autograd loop's. Timed runs then alternate
between the variants (``--repeats`` rounds of ``--steps`` meta-steps each, after
``--warmup`` untimed meta-steps) and the table reports medians. ``--profile`` runs cProfile
over the task-batched library variant and lists where the time goes.

The tasks and the variants are in ``_maml_programs.py``; this file times them and prints the
table.

    python benchmarks/bench_maml.py
    python benchmarks/bench_maml.py --steps 20 --repeats 5 --clock thread
    python benchmarks/bench_maml.py --variants betty-tb vmap --profile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import os
import pstats
import statistics
import sys
import time
from collections.abc import Callable

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _maml_programs import (  # noqa: E402
    VARIANTS,
    AutogradLoop,
    Batch,
    BettyTaskBatched,
    Setting,
    Variant,
    installed,
    make_net,
    sample_batches,
)


# -- measuring -------------------------------------------------------------------------------
def clock_of(name: str) -> Callable[[], float]:
    return time.thread_time if name == "thread" else time.perf_counter


def profile_task_batched(net: nn.Module, batches: list[Batch], s: Setting, steps: int,
                         lines: int) -> None:
    variant = BettyTaskBatched(net, batches, s)
    variant.meta_steps(2)  # warm-up
    profiler = cProfile.Profile()
    profiler.enable()
    variant.meta_steps(steps)
    profiler.disable()
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(lines)
        print(f"\ncProfile of betty task-batched, {steps} meta-steps, sorted by {key}:")
        print("\n".join(out.getvalue().splitlines()[4:]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="meta-steps per timed run")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed meta-steps first")
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--tasks", type=int, default=16)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("wall", "thread"), default="wall",
                        help="wall clock, or the CPU time of this thread (steadier when the "
                        "machine is shared; with one torch thread it counts all the work)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tol", type=float, default=1e-5,
                        help="largest meta-gradient difference accepted")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the task-batched library variant afterwards")
    parser.add_argument("--profile-lines", type=int, default=25)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    if args.clock == "thread" and args.threads != 1:
        parser.error("--clock thread counts one thread only: use --threads 1")
    s = Setting(tasks=args.tasks, inner_steps=args.inner_steps)
    batches = sample_batches(8, s, args.seed)
    net = make_net(args.seed)
    clock = clock_of(args.clock)

    variants: dict[str, Variant] = {}
    skipped: dict[str, str] = {}
    for key in args.variants:
        label, cls = VARIANTS[key]
        why = installed(key) if key in ("higher", "torchopt") else None
        if why is not None:
            skipped[label] = why
            continue
        variants[label] = cls(net, batches, s)

    # the first meta-gradient of every variant, from the same theta on the same tasks
    grads = {label: v.first_meta_gradient() for label, v in variants.items()}
    reference = grads.get("autograd loop") or AutogradLoop(net, batches, s).first_meta_gradient()
    diffs = {label: max((a - b).abs().max().item() for a, b in zip(g, reference))
             for label, g in grads.items()}

    for v in variants.values():
        v.meta_steps(args.warmup)
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(args.repeats):  # alternate: a slow spell of the machine hits every variant
        for label, v in variants.items():
            start = clock()
            v.meta_steps(args.steps)
            times[label].append((clock() - start) / args.steps * 1000.0)

    medians = {label: statistics.median(t) for label, t in times.items()}
    print(f"MAML, sinusoid: {s.tasks} tasks/meta-step, {s.inner_steps} inner SGD steps "
          f"(lr {s.inner_lr}), {s.shots} shots, MLP 1-40-40-1, Adam; torch {torch.__version__}, "
          f"{args.threads} thread(s), {args.clock} clock, {args.repeats} x {args.steps} "
          f"meta-steps; load average {os.getloadavg()[0]:.2f}")
    vmap_ms = medians.get("torch.func+vmap")
    tb_ms = medians.get("betty task-batched")
    print(f"{'variant':22s} {'ms/meta-step':>12s} {'min':>8s} {'x vmap':>7s} "
          f"{'/ betty-tb':>10s} {'max|dgrad| vs loop':>19s}")
    for label, ms in medians.items():
        vs_vmap = f"{ms / vmap_ms:7.2f}" if vmap_ms else f"{'-':>7s}"
        vs_tb = f"{ms / tb_ms:10.2f}" if tb_ms else f"{'-':>10s}"
        flag = "  !!!!! MISMATCH" if diffs[label] > args.tol else ""
        print(f"{label:22s} {ms:12.2f} {min(times[label]):8.2f} {vs_vmap} {vs_tb} "
              f"{diffs[label]:19.1e}{flag}")
    for label, why in skipped.items():
        print(f"{label:22s} not measured ({why})")
    targets = []
    if tb_ms and vmap_ms:
        ratio = tb_ms / vmap_ms
        targets.append(f"task-batched / vmap = {ratio:.2f} (target <= 1.2: "
                       f"{'met' if ratio <= 1.2 else 'NOT met'})")
    for other in ("higher", "torchopt"):
        if tb_ms and other in medians:
            speedup = medians[other] / tb_ms
            targets.append(f"{other} / task-batched = {speedup:.2f} (target >= 5: "
                           f"{'met' if speedup >= 5 else 'NOT met'})")
    for line in targets:
        print(line)
    for label, t in times.items():
        print(f"  runs, {label}: " + ", ".join(f"{x:.2f}" for x in t))

    if args.profile:
        profile_task_batched(net, batches, s, max(args.steps, 20), args.profile_lines)
    return {"medians": medians, "times": times, "grad_diffs": diffs, "skipped": skipped}


if __name__ == "__main__":
    main()
