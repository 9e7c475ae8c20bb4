"""Cost of one outer step of each hypergradient method against one plain training step, in
the parameter-dominated and the activation-dominated regime (programs: `_programs.py`).

Rows, for each program:

* ``plain``: one hand-written training step of the lower model alone (forward, loss with the
  upper fixed, backward, optimizer step, gradients set to None): the unit of both ratios;
* ``hand-darts``: the straightforward hand-written DARTS loop (lower step; ``v = dL_U/dw``;
  ``v <- eps v`` in place; probes at ``w + v`` and ``w - v`` made and undone in place by
  addition and subtraction; upper step): the reference for the library's darts;
* ``darts``, ``sama``, ``neumann`` (K = 5), ``cg`` (K = 5): the library, lower an
  ImplicitProblem with ``unroll_steps = 1``, default settings otherwise;
* ``reverse``: the lower an IterativeProblem, the upper ``first_order=False`` (``--unroll``
  differentiable lower steps per outer step, default 1).

``mlp-act`` is also run with its blocks under ``torch.utils.checkpoint`` (rows
marked ``+ckpt``).

Measured in a fresh subprocess per cell (one torch thread):

* **tensor MB**: live CPU tensor bytes, from ``torch.profiler`` memory events (every allocation
  and free of the CPU allocator, started before the program is built): the peak over
  ``--steps`` outer steps minus what was live when the program was built (parameters, data):
  gradients, optimizer state, activations, graphs and the method's own vectors. On CUDA,
  ``torch.cuda.max_memory_allocated`` minus ``memory_allocated`` before the first step.
* **RSS MB**: the process's peak resident memory (``VmHWM``, reset through
  ``/proc/self/clear_refs`` before the first step) minus its resident memory then: what a user
  hits as out-of-memory, including allocator caching (run without the profiler).
* **ms / step**: median thread CPU time of the outer steps after the first (``--clock wall``
  for wall time), from the RSS run.

    python benchmarks/bench_cost_table.py --quick                 # 3 steps per cell
    python benchmarks/bench_cost_table.py --programs mwn-wide --methods plain darts
    python benchmarks/bench_cost_table.py --alternate --programs mwn-wide \
        --methods hand-darts darts                  # time against the hand-written loop
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _programs import PROGRAMS, Program, parameter_count, program  # noqa: E402

from betty import Engine  # noqa: E402
from betty.configs import Config, EngineConfig  # noqa: E402
from betty.problems import ImplicitProblem, IterativeProblem  # noqa: E402

METHODS = ("plain", "hand-darts", "darts", "sama", "neumann", "cg", "nystrom", "f2sa",
           "reverse")
DARTS_ALPHA = 0.01


def _problem_classes(p: Program) -> tuple[type, type, type]:
    def lower_step(self, batch):  # type: ignore[no-untyped-def]
        return p.lower_loss(self.module, self.upper.module, batch)

    def upper_step(self, batch):  # type: ignore[no-untyped-def]
        return p.upper_loss(self.lower.module, batch)

    return (type("Lower", (ImplicitProblem,), {"training_step": lower_step}),
            type("UnrolledLower", (IterativeProblem,), {"training_step": lower_step}),
            type("Upper", (ImplicitProblem,), {"training_step": upper_step}))


def build(p: Program, method: str, args: argparse.Namespace) -> Callable[[], None]:
    """A function running one outer step of ``method`` on program ``p``."""
    torch.manual_seed(args.seed)
    lower, upper = p.lower_module().to(args.device), p.upper_module().to(args.device)
    train, meta = (tuple(t.to(args.device) for t in b) for b in p.batches(args.seed + 1))
    w, lam = list(lower.parameters()), list(upper.parameters())
    lower_opt, upper_opt = p.lower_optimizer(w), p.upper_optimizer(lam)
    if method in ("plain", "hand-darts"):
        def lower_step() -> None:
            p.lower_loss(lower, upper, train).backward(inputs=w)
            lower_opt.step()
            lower_opt.zero_grad(set_to_none=True)

        if method == "plain":
            return lower_step

        def hand_darts_step() -> None:
            lower_step()
            v = list(torch.autograd.grad(p.upper_loss(lower, meta), w))
            v_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(v)))
            torch._foreach_mul_(v, DARTS_ALPHA / v_norm)  # v <- eps v
            with torch.no_grad():
                torch._foreach_add_(w, v)
            g_plus = torch.autograd.grad(p.lower_loss(lower, upper, train), lam)
            with torch.no_grad():
                torch._foreach_sub_(w, v, alpha=2.0)
            g_minus = torch.autograd.grad(p.lower_loss(lower, upper, train), lam)
            with torch.no_grad():
                torch._foreach_add_(w, v)
            del v
            half_inverse = v_norm / (2 * DARTS_ALPHA)
            for param, gp, gm in zip(lam, g_plus, g_minus):
                param.grad = (gm - gp) * half_inverse
            upper_opt.step()
            upper_opt.zero_grad(set_to_none=True)

        return hand_darts_step
    lower_cls, unrolled_cls, upper_cls = _problem_classes(p)
    if method == "reverse":
        unroll = args.unroll
        low = unrolled_cls("lower", Config(unroll_steps=unroll), lower, lower_opt,
                           train_data_loader=[train])
        upper_config = Config(first_order=False)
    else:
        unroll = 1
        low = lower_cls("lower", Config(type=method, neumann_iterations=args.iterations,
                                        neumann_alpha=0.1, cg_iterations=args.iterations,
                                        nystrom_rank=args.iterations,
                                        f2sa_steps=args.iterations,
                                        darts_alpha=DARTS_ALPHA), lower, lower_opt,
                        train_data_loader=[train])
        upper_config = Config()
    up = upper_cls("upper", upper_config, upper, upper_opt, train_data_loader=[meta])
    strategy = "gpu" if args.device.startswith("cuda") else "cpu"
    engine = Engine([up, low], EngineConfig(train_iters=unroll, strategy=strategy,
                                            progress_bar=False, nonfinite=args.nonfinite),
                    {"u2l": {up: [low]}, "l2u": {low: [up]}})

    def outer_step() -> None:
        engine.config.train_iters = engine.global_step + unroll
        engine.run()

    return outer_step


# -- one cell, in a child process -------------------------------------------------------------
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def _clock(args: argparse.Namespace) -> Callable[[], float]:
    return time.thread_time if args.clock == "thread" else time.perf_counter


def run_rss(p: Program, method: str, args: argparse.Namespace) -> dict[str, float]:
    step = build(p, method, args)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    before = _status_kb("VmRSS")
    clock, times = _clock(args), []
    for _ in range(args.steps):
        start = clock()
        step()
        times.append(clock() - start)
    return {"rss": (_status_kb("VmHWM") - before) * 1024.0,
            "seconds": statistics.median(times[1:] if len(times) > 1 else times)}


def run_tensor_cpu(p: Program, method: str, args: argparse.Namespace) -> dict[str, float]:
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step = build(p, method, args)
        gc.collect()
        with record_function("measured_steps"):
            for _ in range(args.steps):
                step()
    events = list(prof.profiler.kineto_results.events())
    window = [e for e in events if e.name() == "measured_steps"]
    begin, end = min(e.start_ns() for e in window), max(e.end_ns() for e in window)
    memory = sorted((e for e in events
                     if e.name() == "[memory]" and str(e.device_type()).endswith("CPU")),
                    key=lambda e: e.start_ns())
    live, at_start, peak = 0, None, 0
    for event in memory:
        if at_start is None and event.start_ns() >= begin:
            at_start = live
        live += event.nbytes()
        if begin <= event.start_ns() <= end:
            peak = max(peak, live)
    return {"tensor": float(peak - (live if at_start is None else at_start))}


def run_tensor_cuda(p: Program, method: str, args: argparse.Namespace) -> dict[str, float]:
    step = build(p, method, args)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    for _ in range(args.steps):
        step()
    torch.cuda.synchronize()
    return {"tensor": float(torch.cuda.max_memory_allocated() - before)}


def child(args: argparse.Namespace) -> None:
    name, method, mode = args.child
    p = program(name, checkpointing=method.endswith("+ckpt"))
    method = method.removesuffix("+ckpt")
    if mode == "rss":
        result = run_rss(p, method, args)
    elif args.device.startswith("cuda"):
        result = run_tensor_cuda(p, method, args)
    else:
        result = run_tensor_cpu(p, method, args)
    print(json.dumps(result))


def measure(name: str, method: str, mode: str, args: argparse.Namespace) -> dict[str, float]:
    command = [sys.executable, os.path.abspath(__file__), "--child", name, method, mode,
               "--steps", str(args.steps), "--device", args.device, "--seed", str(args.seed),
               "--threads", str(args.threads), "--unroll", str(args.unroll),
               "--iterations", str(args.iterations), "--clock", args.clock,
               "--nonfinite", args.nonfinite]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        print(f"# {name} {method} {mode} failed: {done.stderr.strip().splitlines()[-1:]}",
              file=sys.stderr)
        return {}
    return json.loads(done.stdout.strip().splitlines()[-1])


# -- the table --------------------------------------------------------------------------------
def cells(name: str, methods: list[str], args: argparse.Namespace) -> list[str]:
    rows = list(methods)
    if name == "mlp-act" and not args.no_checkpoint_rows:
        rows += [m + "+ckpt" for m in methods if m != "hand-darts"]
    return rows


def alternate(args: argparse.Namespace) -> None:
    """Time only: every method of ``--methods`` built in this one process per program, timed
    in alternation (``--repeats`` rounds of ``--steps`` outer steps each, after one untimed
    step of each), so that the machine's drift falls on all alike; medians, ratio to the
    first method listed."""
    clock = _clock(args)
    print(f"device {args.device}, threads {args.threads}, {args.repeats} alternating rounds "
          f"of {args.steps} outer steps, clock {args.clock}, nonfinite {args.nonfinite}")
    print()
    print(f"| program | method | ms / step (median) | ratio to {args.methods[0]} | spread |")
    print("|---|---|---|---|---|")
    for name in args.programs:
        p = program(name)
        steps = {method: build(p, method, args) for method in args.methods}
        for step in steps.values():
            step()
        times: dict[str, list[float]] = {method: [] for method in args.methods}
        for _ in range(args.repeats):
            for method, step in steps.items():
                start = clock()
                for _ in range(args.steps):
                    step()
                times[method].append((clock() - start) / args.steps)
        base = statistics.median(times[args.methods[0]])
        for method, seen in times.items():
            middle = statistics.median(seen)
            print(f"| {name} | {method} | {middle * 1e3:.1f} | {middle / base:.3f} | "
                  f"{min(seen) * 1e3:.0f}-{max(seen) * 1e3:.0f} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--programs", nargs="+", default=list(PROGRAMS), choices=PROGRAMS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=5, help="outer steps per cell")
    parser.add_argument("--quick", action="store_true", help="3 steps per cell")
    parser.add_argument("--iterations", type=int, default=5, help="neumann and cg K")
    parser.add_argument("--unroll", type=int, default=1, help="reverse mode's lower steps")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--clock", choices=("thread", "wall"), default="thread")
    parser.add_argument("--no-checkpoint-rows", action="store_true")
    parser.add_argument("--alternate", action="store_true",
                        help="time only, the methods in alternation in one process")
    parser.add_argument("--repeats", type=int, default=6, help="--alternate's rounds")
    parser.add_argument("--nonfinite", choices=("raise", "skip", "off"), default="raise",
                        help="EngineConfig.nonfinite of the library's runs (default: its "
                        "default, the guard on)")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.steps = 3
    if args.device != "cpu" or args.threads != 1:
        args.clock = "wall"
    torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    if args.alternate:
        alternate(args)
        return
    methods = ["plain"] + [m for m in args.methods if m != "plain"]
    print(f"device {args.device}, threads {args.threads}, {args.steps} outer steps per cell, "
          f"neumann/cg K={args.iterations}, reverse unroll {args.unroll}, clock {args.clock}")
    print()
    print("| program | params | method | tensor MB | ratio | RSS MB | ratio | ms / step "
          "| ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name in args.programs:
        count = parameter_count(program(name).lower_module())
        base: dict[str, float] = {}
        for method in cells(name, methods, args):
            result = {**measure(name, method, "rss", args),
                      **measure(name, method, "tensor", args)}
            if method == "plain":
                base = result
            row = [name, f"{count / 1e6:.1f}M", method]
            for key, scale, fmt in (("tensor", 2**-20, "{:.1f}"), ("rss", 2**-20, "{:.1f}"),
                                    ("seconds", 1e3, "{:.0f}")):
                value = result.get(key)
                row.append("" if value is None else fmt.format(value * scale))
                ok = value is not None and base.get(key)
                row.append(f"{value / base[key]:.2f}" if ok else "")
            print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    main()
