"""Tutorial 3, logging: what each problem and the validation report, and where it goes.

``training_step`` may return a dict: its ``"loss"`` is trained on, every other entry is
logged, every ``Config.log_step`` local steps. ``EngineConfig.logger_type`` picks where the
records go: ``"console"`` (lines on the terminal), ``"csv"``, ``"tensorboard"`` or
``"wandb"``; the last three also print the console lines.

    python examples/tutorials/logging_metrics.py                  # writes runs/tutorial/
    python examples/tutorials/logging_metrics.py --logger tensorboard
    tensorboard --logdir runs
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
from quick_start import Reweight, accuracy, dependencies, load_noisy_digits, make_problems
from validation import ReweightingEngine

from betty.configs import Config, EngineConfig


# --8<-- [start:problem]
class LoggedReweight(Reweight):
    """The quick start's upper level, reporting its meta-set accuracy next to its loss."""

    def training_step(self, batch):
        x, y = batch
        logits = self.classifier(x)
        # Values may stay tensors: they are read from the device only when a line is due.
        return {"loss": F.cross_entropy(logits, y),
                "acc": (logits.argmax(1) == y).float().mean()}
# --8<-- [end:problem]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000, help="global steps")
    parser.add_argument("--log-step", type=int, default=50, help="log every N local steps")
    parser.add_argument("--logger", default="csv",
                        choices=("console", "csv", "tensorboard", "wandb"))
    parser.add_argument("--log-dir", default="runs")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    data = load_noisy_digits(seed=args.seed)
    # --8<-- [start:config]
    classifier, reweight = make_problems(
        data, seed=args.seed,
        classifier_config=Config(type="darts", warmup_steps=100, log_step=args.log_step),
        reweight_config=Config(log_step=args.log_step),
        reweight_class=LoggedReweight,
    )
    engine = ReweightingEngine(
        problems=[classifier, reweight],
        config=EngineConfig(train_iters=args.steps, valid_step=args.log_step,
                            logger_type=args.logger, log_dir=args.log_dir,
                            run_name="tutorial"),
        dependencies=dependencies(classifier, reweight),
        val_data=data["val"],
    )
    engine.run()
    # --8<-- [end:config]
    test_acc = accuracy(classifier.module, data["test"])
    folder = os.path.join(args.log_dir, "tutorial")
    print(f"test accuracy: {test_acc:.4f}; records in {folder}")
    return {"test_acc": test_acc, "folder": folder}


if __name__ == "__main__":
    main()
