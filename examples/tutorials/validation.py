"""Tutorial 2, validation: evaluate the program during training and stop early.

The quick start's program, with an `Engine` subclass whose ``validation()`` measures the
classifier on a clean validation set every ``valid_step`` global steps. The returned dict is
logged, and early stopping reads one of its keys.

    python examples/tutorials/validation.py
"""

from __future__ import annotations

import argparse
import copy

import torch
from quick_start import accuracy, dependencies, load_noisy_digits, make_problems

from betty import Engine
from betty.configs import EngineConfig


# --8<-- [start:engine]
class ReweightingEngine(Engine):
    """Adds ``validation()``: the classifier's accuracy on the clean validation set."""

    def __init__(self, *args, val_data, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_data = val_data
        self.best_acc = 0.0
        self.best_state: dict | None = None  # the classifier at its best validation
        self.history: list[dict] = []

    @torch.no_grad()  # the engine puts every problem in eval mode around this call
    def validation(self) -> dict:
        acc = accuracy(self.classifier.module, self.val_data)  # engine.<name> is that problem
        if acc > self.best_acc:
            self.best_acc = acc
            self.best_state = copy.deepcopy(self.classifier.module.state_dict())
        self.history.append({"step": self.global_step, "acc": acc})
        return {"acc": acc, "best_acc": self.best_acc}
# --8<-- [end:engine]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000, help="most global steps")
    parser.add_argument("--valid-step", type=int, default=100)
    parser.add_argument("--tolerance", type=int, default=5,
                        help="validations without improvement before stopping")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    data = load_noisy_digits(seed=args.seed)
    classifier, reweight = make_problems(data, seed=args.seed)
    # --8<-- [start:config]
    config = EngineConfig(
        train_iters=args.steps,
        valid_step=args.valid_step,          # validation() every 100 global steps
        early_stopping=True,                 # stop when "acc" has not improved ...
        early_stopping_metric="acc",
        early_stopping_mode="max",
        early_stopping_tolerance=args.tolerance,  # ... for 5 validations in a row
    )
    engine = ReweightingEngine(problems=[classifier, reweight], config=config,
                               dependencies=dependencies(classifier, reweight),
                               val_data=data["val"])
    engine.run()
    # --8<-- [end:config]
    for record in engine.history:
        print(f"step {record['step']:5d}  validation accuracy {record['acc']:.3f}")
    # Early stopping ends the run some validations after the best one: go back to it.
    last_acc = accuracy(classifier.module, data["test"])
    classifier.module.load_state_dict(engine.best_state)
    test_acc = accuracy(classifier.module, data["test"])
    print(f"stopped early: {engine.stopped_early} at step {engine.global_step}; best "
          f"validation accuracy {engine.best_acc:.3f}; test accuracy {test_acc:.4f} "
          f"(last model: {last_acc:.4f})")
    return {"history": engine.history, "best_acc": engine.best_acc, "test_acc": test_acc,
            "stopped_early": engine.stopped_early, "global_step": engine.global_step}


if __name__ == "__main__":
    main()
