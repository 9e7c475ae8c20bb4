"""Tutorial 4, memory: gradient accumulation and mixed precision.

Two fields of a problem's `Config` trade speed for memory without touching its code:

* ``gradient_accumulation=k``: k micro-batches make one optimizer step (each micro-batch's
  loss is divided by k), so batches of 50 with k=2 give the update of one batch of 100 while
  holding the activations of 50 samples at a time. The scheduler steps once per optimizer
  step, and the problem's uppers step once per k micro-batches.
* ``precision="bf16"``: ``training_step`` runs under ``torch.autocast`` in bfloat16 (half the
  activation memory; parameters and optimizer state stay float32). ``"fp16"`` adds a
  gradient scaler; on CPUs it is very slow, so use bf16 there.

The hypergradient method matters too: ``darts`` (used here) needs no second-order graph;
``cg`` and ``neumann`` hold one extra graph of the lower gradient per hop.

    python examples/tutorials/memory.py
"""

from __future__ import annotations

import argparse

import torch
from quick_start import accuracy, dependencies, load_noisy_digits, make_problems

from betty import Engine
from betty.configs import Config, EngineConfig


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000,
                        help="global steps (= classifier micro-batches)")
    parser.add_argument("--accumulation", type=int, default=2, help="micro-batches per step")
    parser.add_argument("--precision", default="bf16", choices=("fp32", "bf16", "fp16"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    data = load_noisy_digits(seed=args.seed)
    # --8<-- [start:config]
    k = args.accumulation
    classifier, reweight = make_problems(
        data, seed=args.seed,
        batch_size=100 // k,  # micro-batches of 50: one optimizer step still sees 100 samples
        classifier_config=Config(type="darts", warmup_steps=100 * k,  # local steps
                                 gradient_accumulation=k, precision=args.precision),
        reweight_config=Config(precision=args.precision),
    )
    # One cosine period over the run, counted in optimizer steps (not micro-batches).
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(classifier.optimizer,
                                                           T_max=args.steps // k)
    classifier.set_scheduler(scheduler)
    engine = Engine(problems=[classifier, reweight],
                    config=EngineConfig(train_iters=args.steps),
                    dependencies=dependencies(classifier, reweight))
    engine.run()
    # --8<-- [end:config]
    test_acc = accuracy(classifier.module, data["test"])
    print(f"precision {args.precision}, {k} micro-batches per step: "
          f"{scheduler.last_epoch} optimizer steps, {reweight.count} reweight steps; "
          f"test accuracy {test_acc:.4f}")
    return {"test_acc": test_acc, "optimizer_steps": scheduler.last_epoch,
            "reweight_steps": reweight.count}


if __name__ == "__main__":
    main()
