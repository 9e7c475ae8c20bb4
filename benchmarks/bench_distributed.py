"""Throughput of the data-reweighting example on 2 processes vs 1 (CPU, gloo).

The program is `examples/data_reweighting/main.py`'s Meta-Weight-Net (classifier MLP
64-100-10 with SGD, weight net 1-100-1 with Adam, darts hypergradient every step after the
warm-up) on the noise40 digits, with a GLOBAL batch of ``--batch`` (100) for both levels:

* ``1 proc``: one process, ``strategy="default"``, batch 100, ``--threads`` torch threads;
* ``2 procs``: two processes launched by torchrun (``python -m torch.distributed.run``),
  ``strategy="distributed"``, 50 samples per rank, ``--threads`` threads each.

Each variant builds everything, then times ``engine.run()`` for ``--steps`` global steps
(wall clock, rank 0; the ranks finish together at the final barrier). Reported: seconds,
global steps per second, samples per second (training + meta batches) and the speed-up of
2 processes over 1. With 1 thread per process the 2-process run uses twice the cores, so a
third row runs 1 process with 2 threads: the same cores. On a machine shared with other jobs
the numbers are noisy; repeat (``--repeats``, medians reported).

    python benchmarks/bench_distributed.py                 # 3 repeats of each variant
    python benchmarks/bench_distributed.py --steps 200 --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def child(args: argparse.Namespace) -> None:
    """One process of one variant: build the example's program, time ``engine.run()``."""
    import torch

    sys.path.insert(0, str(ROOT / "examples"))
    sys.path.insert(0, str(ROOT / "examples" / "data_reweighting"))
    import main as example  # the example's data and problems
    from _common import loader

    from betty import Engine
    from betty.configs import Config, EngineConfig

    torch.set_num_threads(args.threads)
    ranks = int(os.environ.get("WORLD_SIZE", "1")) if args.strategy == "distributed" else 1
    data = example.make_data("noise40", args.seed)
    torch.manual_seed(args.seed)
    model, weight_net = example.mlp(), example.MetaWeightNet()
    optimizer, scheduler = example.sgd(model, args.steps)
    classifier = example.Classifier(
        name="classifier", module=model, optimizer=optimizer, scheduler=scheduler,
        train_data_loader=loader(*data["train"], batch_size=args.batch // ranks,
                                 seed=args.seed),
        config=Config(type="darts", unroll_steps=1, warmup_steps=args.warmup))
    mwn = example.MWN(
        name="mwn", module=weight_net,
        optimizer=torch.optim.Adam(weight_net.parameters(), lr=1e-3, weight_decay=1e-4),
        train_data_loader=loader(*data["meta"], batch_size=args.batch // ranks,
                                 seed=args.seed + 1))
    engine = Engine([classifier, mwn],
                    EngineConfig(train_iters=args.steps, strategy=args.strategy,
                                 progress_bar=False),
                    {"u2l": {mwn: [classifier]}, "l2u": {classifier: [mwn]}})
    engine.strategy.barrier()
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start
    per_rank = [min(args.batch // ranks, len(data[k][1])) for k in ("train", "meta")]
    samples = ranks * (per_rank[0] * args.steps + per_rank[1] * (args.steps - args.warmup))
    latency = collective_latency(engine.strategy) if ranks > 1 else 0.0
    if engine.strategy.is_main:
        print("RESULT " + json.dumps({"seconds": seconds, "samples": samples,
                                      "latency": latency}), flush=True)


def collective_latency(strategy: object, count: int = 200) -> float:
    """Seconds per all-reduce of 1000 floats (the size of the weight net's gradient)."""
    import torch

    tensors = [torch.ones(1000)]
    strategy.all_average(tensors)  # type: ignore[attr-defined]
    start = time.perf_counter()
    for _ in range(count):
        strategy.all_average(tensors)  # type: ignore[attr-defined]
    return (time.perf_counter() - start) / count


def launch(strategy: str, procs: int, threads: int, args: argparse.Namespace) -> dict:
    script = [str(Path(__file__).resolve()), "--child", "--strategy", strategy,
              "--threads", str(threads), "--steps", str(args.steps), "--batch",
              str(args.batch), "--warmup", str(args.warmup), "--seed", str(args.seed)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    if procs == 1:
        command = [sys.executable, *script]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}",
                   "--master_addr=127.0.0.1", f"--master_port={port}", *script]
    out = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800,
                         check=False)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{strategy} x{procs} failed:\n{out.stdout[-3000:]}\n"
                           f"{out.stderr[-3000:]}")
    return json.loads(lines[0][len("RESULT "):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--strategy", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--steps", type=int, default=400, help="global steps per run")
    parser.add_argument("--warmup", type=int, default=50, help="classifier-only steps first")
    parser.add_argument("--batch", type=int, default=100, help="global batch (both levels)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    variants = [("1 proc", "default", 1, args.threads),
                ("2 procs", "distributed", 2, args.threads),
                ("1 proc, 2x threads", "default", 1, 2 * args.threads)]
    runs: dict[str, list[dict]] = {name: [] for name, *_ in variants}
    for _ in range(args.repeats):  # alternate the variants: drifting load hits all alike
        for name, strategy, procs, threads in variants:
            runs[name].append(launch(strategy, procs, threads, args))
    times = {name: statistics.median(r["seconds"] for r in rs) for name, rs in runs.items()}
    print(f"data reweighting (MWN, darts), {args.steps} global steps, global batch "
          f"{args.batch} (meta batch at most the 100 meta samples), {args.repeats} "
          "repeat(s), median wall clock")
    print("| variant | cores | s | steps/s | samples/s | speed-up vs 1 proc |")
    print("|---|---|---|---|---|---|")
    for name, _, procs, threads in variants:
        t = times[name]
        print(f"| {name} | {procs * threads} | {t:.2f} | {args.steps / t:.0f} | "
              f"{runs[name][0]['samples'] / t:.0f} | {times['1 proc'] / t:.2f}x |")
    latency = statistics.median(r["latency"] for r in runs["2 procs"])
    print(f"gloo all-reduce of 1000 floats between the 2 processes: {1e6 * latency:.0f} us; "
          "a global step after the warm-up makes 3 (the classifier's gradient, the weight "
          "net's first vector and its gradient)")


if __name__ == "__main__":
    main()
