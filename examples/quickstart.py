"""Quick start: learn one weight decay per layer of a digit classifier, by hypergradient.

A bilevel program in two problems:

* ``classifier`` (lower) trains an MLP on the training set. Its loss is cross-entropy plus an
  L2 penalty ``wd_i * ||W_i||^2`` on each layer's weights; the weight decays come from the
  upper problem, ``self.hpo()``.
* ``hpo`` (upper) holds ``log(wd_i)`` and minimises the classifier's loss on *validation*
  data, ``self.classifier(x)``. That loss reaches ``log(wd_i)`` only through the classifier's
  training, so its gradient is a hypergradient; ``--method`` picks how it is computed: an
  implicit method (darts, cg, neumann, sama), or ``reverse``, which makes the classifier's
  updates differentiable (an IterativeProblem) and back-propagates through them.

The weight decays start deliberately too strong (0.1: the classifier underfits) so there is
something to learn. Data: scikit-learn's bundled 8x8 digits, standardized, split
train/val/test with a fixed seed.

    python examples/quickstart.py
    python examples/quickstart.py --method cg --iters 1000
    python examples/quickstart.py --method reverse
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem, IterativeProblem

METHODS = ("darts", "cg", "neumann", "sama", "reverse")


# -- data ------------------------------------------------------------------------------------
def load_data(seed: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Digits split 500 train / 500 val / 797 test, standardized with train statistics."""
    x, y = load_digits(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=500, stratify=y, random_state=seed)
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, train_size=500, stratify=y_rest, random_state=seed)
    scaler = StandardScaler().fit(x_train)

    def tensors(xs, ys):
        return (torch.tensor(scaler.transform(xs), dtype=torch.float32),
                torch.tensor(ys, dtype=torch.long))

    return {"train": tensors(x_train, y_train), "val": tensors(x_val, y_val),
            "test": tensors(x_test, y_test)}


def loader(split: tuple[torch.Tensor, torch.Tensor], batch_size: int, seed: int) -> DataLoader:
    return DataLoader(TensorDataset(*split), batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


# -- the two levels --------------------------------------------------------------------------
class WeightDecay(nn.Module):
    """The hyperparameters: one log-weight-decay per layer (the log keeps them positive)."""

    def __init__(self, num_layers: int, initial: float) -> None:
        super().__init__()
        self.log_wd = nn.Parameter(torch.full((num_layers,), math.log(initial)))

    def forward(self) -> torch.Tensor:
        return self.log_wd.exp()


class Classifier(ImplicitProblem):
    """Lower level: training loss + per-layer L2 penalty with the upper's weight decays."""

    def training_step(self, batch):
        x, y = batch
        weights = [m.weight for m in self.module if isinstance(m, nn.Linear)]
        squared_norms = torch.stack([w.pow(2).sum() for w in weights])
        return F.cross_entropy(self.module(x), y) + (self.hpo() * squared_norms).sum()


class UnrolledClassifier(IterativeProblem):
    """The same level with differentiable updates, for reverse mode (``--method reverse``)."""

    training_step = Classifier.training_step


class HPO(ImplicitProblem):
    """Upper level: the classifier's loss on validation data."""

    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.classifier(x), y)


class QuickstartEngine(Engine):
    """Adds `validation()`: the classifier's loss and accuracy on the whole validation set."""

    def __init__(self, *args, val_data, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_data = val_data
        self.history: list[dict] = []

    @torch.no_grad()
    def validation(self):
        x, y = self.val_data
        logits = self.classifier(x)
        stats = {"loss": F.cross_entropy(logits, y).item(),
                 "acc": (logits.argmax(1) == y).float().mean().item()}
        self.history.append({"step": self.global_step, **stats, "wd": self.hpo().tolist()})
        return stats


# -- putting it together ---------------------------------------------------------------------
def run(train_iters: int = 500, method: str = "darts", seed: int = 0, valid_step: int = 50,
        initial_wd: float = 0.1, hpo_lr: float = 0.05) -> dict:
    """Train the bilevel program; return what it learned and how well it generalizes."""
    torch.manual_seed(seed)
    data = load_data(seed)

    mlp = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    wd = WeightDecay(num_layers=2, initial=initial_wd)

    implicit = method != "reverse"
    classifier = (Classifier if implicit else UnrolledClassifier)(
        name="classifier",
        module=mlp,
        optimizer=torch.optim.SGD(mlp.parameters(), lr=0.1, momentum=0.9),
        train_data_loader=loader(data["train"], batch_size=50, seed=seed),
        # `type`: the implicit method hpo uses to differentiate through THIS problem's
        # training (unused in reverse mode). For the first 100 steps (warm-up) the classifier
        # trains alone; then hpo steps after each of its steps (unroll_steps=1).
        config=Config(type=method if implicit else "darts", unroll_steps=1, warmup_steps=100,
                      cg_iterations=3, neumann_iterations=3, neumann_alpha=0.1),
    )
    hpo = HPO(
        name="hpo",
        module=wd,
        optimizer=torch.optim.Adam(wd.parameters(), lr=hpo_lr),
        train_data_loader=loader(data["val"], batch_size=100, seed=seed + 1),
        # first_order=False: back-propagate through the classifier's unrolled update.
        config=Config(first_order=implicit),
    )

    engine = QuickstartEngine(
        problems=[classifier, hpo],
        config=EngineConfig(train_iters=train_iters, valid_step=valid_step),
        # u2l: hpo's parameters enter classifier's loss. l2u: classifier steps, then hpo.
        dependencies={"u2l": {hpo: [classifier]}, "l2u": {classifier: [hpo]}},
        val_data=data["val"],
    )

    initial = wd().tolist()
    start = time.perf_counter()
    engine.run()
    seconds = time.perf_counter() - start

    with torch.no_grad():
        x, y = data["test"]
        test_acc = (mlp(x).argmax(1) == y).float().mean().item()
    return {"method": method, "test_acc": test_acc, "seconds": seconds,
            "initial_wd": initial, "final_wd": wd().tolist(),
            "validations": len(engine.history), "history": engine.history}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=500, help="global training steps")
    parser.add_argument("--method", choices=METHODS, default="darts",
                        help="hypergradient method: the classifier's Config.type, or reverse")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--valid-step", type=int, default=50, help="validate every N steps")
    parser.add_argument("--initial-wd", type=float, default=0.1)
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # a 64-unit MLP: more threads only add overhead
    result = run(train_iters=args.iters, method=args.method, seed=args.seed,
                 valid_step=args.valid_step, initial_wd=args.initial_wd)

    for h in result["history"]:
        print(f"step {h['step']:5d}  val loss {h['loss']:.4f}  val acc {h['acc']:.3f}  "
              "weight decays " + "  ".join(f"{v:.2e}" for v in h["wd"]))
    print(f"hypergradient method: {result['method']}")
    for i, (before, after) in enumerate(zip(result["initial_wd"], result["final_wd"])):
        print(f"layer {i} weight decay: {before:.2e} -> {after:.2e}")
    print(f"test accuracy: {result['test_acc']:.4f}  "
          f"({args.iters} steps in {result['seconds']:.1f} s)")
    return result


if __name__ == "__main__":
    main()
