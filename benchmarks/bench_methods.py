"""Cost of one outer step of each hypergradient method, relative to one plain training step.

The program is Meta-Weight-Net shaped: a classifier MLP 64-H-10 (ReLU; SGD lr 0.1, momentum
0.9) is trained on ``mean(weight_net(loss_i.detach()) * loss_i)`` over a batch of 100
digits-sized inputs (64 features, 10 classes); the weight net 1-100-1 (sigmoid; Adam lr 1e-3)
is trained on the cross-entropy of a meta batch of the same size through the hypergradient.
Data is random (cost does not depend on it). For each hidden width H:

* ``plain``: one training step of the classifier alone (forward, cross-entropy, backward,
  SGD step), plain PyTorch: the unit of both ratios;
* ``darts``, ``sama``, ``neumann`` (K = 5), ``cg`` (K = 5): ImplicitProblem classifier,
  ``unroll_steps = 1``; one outer step = one classifier step + one weight-net step;
* ``reverse``: IterativeProblem classifier with ``unroll_steps = 5`` and the weight net at
  ``first_order=False``; one outer step = 5 differentiable classifier steps + one weight-net
  step back-propagated through all 5.

Time: all programs are built in one process and timed in alternation (``--repeats`` rounds
of ``--steps`` outer steps each, after one warm-up round); the table gives the median time per
outer step and its ratio to the plain step.

Peak memory: each program runs in a fresh subprocess. On CPU, ``torch.profiler.profile(
profile_memory=True)`` is started before anything is built and records every allocation and
free of the CPU tensor allocator; the running sum of those events is the tensor memory alive at
each moment (parameters, gradients, optimizer state, data, activations, autograd graphs), and
the peak is its maximum during the second outer step (the first one creates optimizer state).
This counts tensor bytes only: not the Python heap, not library code, and not scratch memory
that oneDNN/MKL allocate outside PyTorch's allocator; process RSS would bury MB-sized tensors
under hundreds of MB of libraries and allocator caching. On CUDA it is
``torch.cuda.max_memory_allocated`` over the same step (its reset at the step start).

    python benchmarks/bench_methods.py
    python benchmarks/bench_methods.py --widths 256 --steps 3 --repeats 3
    python benchmarks/bench_methods.py --device cuda --widths 1024 4096 16384 --repeats 10
    python benchmarks/bench_methods.py --no-memory            # time only
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem, IterativeProblem

METHODS = ("plain", "darts", "sama", "neumann", "cg", "nystrom", "reverse")
FEATURES, CLASSES = 64, 10


# -- the program ------------------------------------------------------------------------------
def classifier(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, width), nn.ReLU(), nn.Linear(width, CLASSES))


def weight_net() -> nn.Module:
    return nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())


def weighted_loss(problem: Any, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    losses = F.cross_entropy(problem.module(x), y, reduction="none")
    weights = problem.reweight(losses.detach().unsqueeze(1)).squeeze(1)
    return (weights * losses).mean()


class Classifier(ImplicitProblem):
    training_step = weighted_loss


class UnrolledClassifier(IterativeProblem):
    training_step = weighted_loss


class Reweight(ImplicitProblem):
    def training_step(self, batch: tuple[Tensor, Tensor]) -> Tensor:
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)


def random_batch(args: argparse.Namespace, seed: int) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(args.batch, FEATURES, generator=gen)
    y = torch.randint(0, CLASSES, (args.batch,), generator=gen)
    return x.to(args.device), y.to(args.device)


def build(method: str, width: int, args: argparse.Namespace) -> Callable[[], None]:
    """A function that runs one outer step of ``method`` (one plain step for ``plain``)."""
    torch.manual_seed(args.seed)
    clf = classifier(width).to(args.device)
    train = random_batch(args, args.seed + 1)
    if method == "plain":
        opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9)

        def plain_step() -> None:
            loss = F.cross_entropy(clf(train[0]), train[1])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        return plain_step
    wnet = weight_net().to(args.device)
    meta = random_batch(args, args.seed + 2)
    opt = torch.optim.SGD(clf.parameters(), lr=0.1, momentum=0.9)
    if method == "reverse":
        unroll = args.unroll
        inner: ImplicitProblem | IterativeProblem = UnrolledClassifier(
            "classifier", Config(unroll_steps=unroll), clf, opt, train_data_loader=[train])
        outer_config = Config(first_order=False)
    else:
        unroll = 1
        inner = Classifier("classifier", Config(
            type=method, neumann_iterations=args.neumann_iterations, neumann_alpha=0.1,
            cg_iterations=args.cg_iterations), clf, opt, train_data_loader=[train])
        outer_config = Config()
    outer = Reweight("reweight", outer_config, wnet, torch.optim.Adam(wnet.parameters(), lr=1e-3),
                     train_data_loader=[meta])
    strategy = "gpu" if args.device.startswith("cuda") else "cpu"
    engine = Engine([outer, inner],
                    EngineConfig(train_iters=unroll, strategy=strategy, progress_bar=False),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})

    def outer_step() -> None:
        engine.config.train_iters = engine.global_step + unroll
        engine.run()

    return outer_step


# -- measurements -----------------------------------------------------------------------------
def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_all(widths: list[int], methods: list[str], args: argparse.Namespace
             ) -> dict[tuple[int, str], float]:
    """Median seconds per outer step, programs timed in alternation."""
    steps = {(w, m): build(m, w, args) for w in widths for m in methods}
    samples: dict[tuple[int, str], list[float]] = {key: [] for key in steps}
    for round_index in range(args.repeats + 1):
        for key, step in steps.items():
            synchronize(args.device)
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            synchronize(args.device)
            if round_index > 0:  # round 0 warms up
                samples[key].append((time.perf_counter() - start) / args.steps)
    return {key: statistics.median(values) for key, values in samples.items()}


def peak_cpu(method: str, width: int, args: argparse.Namespace) -> int:
    """Peak live CPU tensor bytes during the second outer step (see module docstring)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = build(method, width, args)
        step()
        with record_function("measured_step"):
            step()
    events = list(prof.profiler.kineto_results.events())
    window = [e for e in events if e.name() == "measured_step"]
    begin = min(e.start_ns() for e in window)
    end = max(e.end_ns() for e in window)
    memory = sorted((e for e in events
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
                    key=lambda e: e.start_ns())
    live, peak = 0, 0
    for event in memory:
        live += event.nbytes()
        if begin <= event.start_ns() <= end:
            peak = max(peak, live)
    return peak


def peak_cuda(method: str, width: int, args: argparse.Namespace) -> int:
    step = build(method, width, args)
    step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated()


def peak_in_subprocess(method: str, width: int, args: argparse.Namespace) -> int:
    command = [sys.executable, os.path.abspath(__file__), "--child", method, str(width),
               "--batch", str(args.batch), "--device", args.device, "--seed", str(args.seed),
               "--threads", str(args.threads), "--unroll", str(args.unroll),
               "--neumann-iterations", str(args.neumann_iterations),
               "--cg-iterations", str(args.cg_iterations)]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return int(json.loads(out.strip().splitlines()[-1])["peak_bytes"])


# -- report -----------------------------------------------------------------------------------
def parameters(width: int) -> int:
    return sum(p.numel() for p in classifier(width).parameters())


def print_table(widths: list[int], methods: list[str], times: dict | None, peaks: dict | None,
                args: argparse.Namespace) -> None:
    print(f"device {args.device}, threads {args.threads}, batch {args.batch}, "
          f"time: median of {args.repeats} rounds x {args.steps} outer steps; neumann K="
          f"{args.neumann_iterations}, cg K={args.cg_iterations}, reverse unroll {args.unroll}")
    print()
    print("| H | classifier params | method | classifier steps / outer step "
          "| ms / outer step | time ratio | peak MB | memory ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for width in widths:
        for method in methods:
            unroll = args.unroll if method == "reverse" else 1
            cells = [str(width), f"{parameters(width):,}", method, str(unroll)]
            if times is not None:
                t, base = times[(width, method)], times[(width, "plain")]
                cells += [f"{1e3 * t:.2f}", f"{t / base:.2f}"]
            else:
                cells += ["", ""]
            if peaks is not None:
                m, base_m = peaks[(width, method)], peaks[(width, "plain")]
                cells += [f"{m / 2**20:.2f}", f"{m / base_m:.2f}"]
            else:
                cells += ["", ""]
            print("| " + " | ".join(cells) + " |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--steps", type=int, default=5, help="outer steps per timed round")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (median)")
    parser.add_argument("--neumann-iterations", type=int, default=5)
    parser.add_argument("--cg-iterations", type=int, default=5)
    parser.add_argument("--unroll", type=int, default=5, help="reverse mode's unrolled steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--no-time", action="store_true")
    parser.add_argument("--child", nargs=2, metavar=("METHOD", "WIDTH"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.child:
        method, width = args.child[0], int(args.child[1])
        measure = peak_cuda if args.device.startswith("cuda") else peak_cpu
        print(json.dumps({"peak_bytes": measure(method, width, args)}))
        return
    methods = ["plain"] + [m for m in args.methods if m != "plain"]
    times = None if args.no_time else time_all(args.widths, methods, args)
    peaks = None
    if not args.no_memory:
        peaks = {(w, m): peak_in_subprocess(m, w, args) for w in args.widths for m in methods}
    print_table(args.widths, methods, times, peaks, args)


if __name__ == "__main__":
    main()
