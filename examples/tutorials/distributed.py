"""Tutorial 5, distributed training: the same program as one process per device.

``EngineConfig(strategy="distributed")`` runs data parallel: every rank holds the whole
program, reads its own shard of each problem's data, and averages gradients and
hypergradients across ranks, so N ranks compute what one process computes on the union of
their batches. Launch it with torchrun (on CPUs the gloo backend is used):

    torchrun --nproc_per_node=2 examples/tutorials/distributed.py
    python examples/tutorials/distributed.py --strategy default     # one process

Only rank 0 logs, validates and prints.
"""

from __future__ import annotations

import argparse

import torch
import torch.distributed as dist
from quick_start import accuracy, dependencies, load_noisy_digits, make_problems

from betty import Engine
from betty.configs import EngineConfig


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="global steps")
    parser.add_argument("--strategy", default="distributed",
                        choices=("default", "distributed", "zero", "fsdp"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    # --8<-- [start:run]
    data = load_noisy_digits(seed=args.seed)  # every rank builds the same program
    # batch_size is per rank: with 2 ranks each step trains on 2 x 50 samples
    classifier, reweight = make_problems(data, seed=args.seed, batch_size=50)
    engine = Engine(problems=[classifier, reweight],
                    config=EngineConfig(train_iters=args.steps, strategy=args.strategy),
                    dependencies=dependencies(classifier, reweight))
    engine.run()
    if engine.strategy.is_main:  # rank 0 (or the only process)
        ranks = dist.get_world_size() if dist.is_initialized() else 1
        test_acc = accuracy(classifier.module, data["test"])
        print(f"{ranks} process(es), strategy {args.strategy}: test accuracy {test_acc:.4f}")
    # --8<-- [end:run]
        return test_acc
    return float("nan")


if __name__ == "__main__":
    main()
