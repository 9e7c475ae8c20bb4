"""Hyperparameter optimization: one L2 weight decay per weight of a logistic regression.

The original Betty's first example (after hypertorch): a bilevel program in two problems.

* ``classifier`` (lower) fits a logistic regression ``w, b`` on the training set. Its loss is
  the mean binary cross-entropy plus ``1/2 * sum_i lam_i * w_i**2``: one weight decay per
  weight, read from the upper problem as ``self.hpo()`` (the bias is not decayed).
* ``hpo`` (upper) holds ``log(lam)`` (the log keeps every ``lam_i`` positive) and minimises
  the classifier's cross-entropy on *validation* data. ``--method cg`` (default) gets the
  hypergradient by the implicit function theorem with conjugate gradient at the classifier's
  current solution (warm-started: the classifier keeps training between upper steps);
  ``--method reverse`` back-propagates through the classifier's last ``unroll`` updates
  (an IterativeProblem, upper ``first_order=False``).

All weight decays start at 1, as in the original: far too strong, so there is something to
learn. The baseline is what one would do without Betty: a grid search over ONE weight decay
shared by all weights, choosing the value with the lowest validation loss. Both are judged
the same way: a logistic regression is refit to convergence (float64 L-BFGS) on the training
set with the chosen decays, and its loss and accuracy on held-out test data are reported.

Datasets: ``synthetic`` as in the original (1000 points, 20 standard-normal features, label
``x . w_gt + 0.1 * noise > 0``, half train and half validation) plus 1000 fresh test points
from the same distribution; and scikit-learn's ``breast_cancer`` (569 samples, 30 features,
standardized; stratified 40% train / 30% validation / 30% test).

    python examples/hpo/main.py            # both datasets, writes outputs/hpo/hpo.png
    python examples/hpo/main.py --method reverse
    python examples/hpo/main.py --quick    # seconds: a smoke test
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from _common import add_figure_arguments, figure_path  # noqa: E402

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem, IterativeProblem

METHODS = ("cg", "reverse")
DATASETS = ("synthetic", "breast_cancer")
PLOT = Path(__file__).with_name("hpo.png")
QUICK = {"train_iters": 600, "grid_size": 5}  # --quick: seconds, for the test suite
MAX_LAM = 10.0  # the classifier's SGD (lr 0.25, momentum 0.9) is stable for lam < 13
Split = tuple[torch.Tensor, torch.Tensor]


# -- data ------------------------------------------------------------------------------------
def synthetic_data(seed: int) -> dict[str, Split]:
    """The original's data (1000 points, 20 features, half train / half validation) plus
    1000 test points drawn from the same distribution."""
    rng = np.random.default_rng(seed)
    w_gt = rng.standard_normal(20)
    x = rng.standard_normal((2000, 20))
    y = (x @ w_gt + 0.1 * rng.standard_normal(2000) > 0).astype(np.float32)
    x = torch.tensor(x, dtype=torch.float32)
    y = torch.tensor(y)
    return {"train": (x[:500], y[:500]), "val": (x[500:1000], y[500:1000]),
            "test": (x[1000:], y[1000:])}


def breast_cancer_data(seed: int) -> dict[str, Split]:
    """Breast cancer, stratified 40/30/30, standardized with training statistics."""
    x, y = load_breast_cancer(return_X_y=True)
    x_train, x_rest, y_train, y_rest = train_test_split(
        x, y, train_size=0.4, stratify=y, random_state=seed)
    x_val, x_test, y_val, y_test = train_test_split(
        x_rest, y_rest, train_size=0.5, stratify=y_rest, random_state=seed)
    scaler = StandardScaler().fit(x_train)

    def tensors(xs, ys):
        return (torch.tensor(scaler.transform(xs), dtype=torch.float32),
                torch.tensor(ys, dtype=torch.float32))

    return {"train": tensors(x_train, y_train), "val": tensors(x_val, y_val),
            "test": tensors(x_test, y_test)}


LOADERS = {"synthetic": synthetic_data, "breast_cancer": breast_cancer_data}


# -- models ----------------------------------------------------------------------------------
class LogisticRegression(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.linear = nn.Linear(dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x).squeeze(-1)


class PerWeightDecay(nn.Module):
    """The hyperparameters: ``lam_i = exp(log_lam_i)``, one per weight."""

    def __init__(self, dim: int, initial: float) -> None:
        super().__init__()
        self.log_lam = nn.Parameter(torch.full((dim,), float(np.log(initial))))

    def forward(self) -> torch.Tensor:
        return self.log_lam.exp()


def regularized_loss(model: LogisticRegression, lam: torch.Tensor, x: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor:
    """The lower objective: mean cross-entropy + 1/2 sum_i lam_i w_i^2."""
    weight = model.linear.weight.squeeze(0)
    return F.binary_cross_entropy_with_logits(model(x), y) + 0.5 * (lam * weight**2).sum()


# -- the two levels --------------------------------------------------------------------------
class Classifier(ImplicitProblem):
    """Lower level: the training loss with the upper's per-weight decays."""

    def training_step(self, batch):
        x, y = batch
        return regularized_loss(self.module, self.hpo(), x, y)


class UnrolledClassifier(IterativeProblem):
    """The same level with differentiable updates, for ``--method reverse``."""

    training_step = Classifier.training_step


class HPO(ImplicitProblem):
    """Upper level: the classifier's cross-entropy on the validation set."""

    def training_step(self, batch):
        x, y = batch
        return F.binary_cross_entropy_with_logits(self.classifier(x), y)

    def param_callback(self, params):
        # An irrelevant feature wants lam -> infinity, but gradient descent on the classifier
        # is only stable while lr * lam stays small (the original clamps lam too).
        params[0].data.clamp_(max=float(np.log(MAX_LAM)))


class HPOEngine(Engine):
    """Adds `validation()`: the classifier's validation loss and the current decays."""

    def __init__(self, *args, val_data: Split, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.val_data = val_data
        self.history: list[dict] = []

    @torch.no_grad()
    def validation(self):
        x, y = self.val_data
        loss = F.binary_cross_entropy_with_logits(self.classifier(x), y).item()
        self.history.append({"step": self.global_step, "loss": loss,
                             "lam": self.hpo().tolist()})
        return {"loss": loss}


def learn_decays(data: dict[str, Split], *, method: str, train_iters: int, unroll: int,
                 warmup: int, hpo_lr: float, valid_step: int) -> dict:
    """The bilevel program: returns the learned decays, the history and the classifier."""
    dim = data["train"][0].shape[1]
    model = LogisticRegression(dim)
    decays = PerWeightDecay(dim, initial=1.0)
    implicit = method != "reverse"
    classifier = (Classifier if implicit else UnrolledClassifier)(
        name="classifier",
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=0.25, momentum=0.9),
        train_data_loader=[data["train"]],  # full batch, every step
        # `unroll` classifier steps per hpo step; cg_iterations >= dim + 1 solves H x = v.
        config=Config(type="cg" if implicit else "darts", unroll_steps=unroll,
                      warmup_steps=warmup, cg_iterations=dim + 1),
    )
    hpo = HPO(
        name="hpo",
        module=decays,
        optimizer=torch.optim.Adam(decays.parameters(), lr=hpo_lr),
        train_data_loader=[data["val"]],
        config=Config(first_order=implicit),
    )
    engine = HPOEngine(
        problems=[classifier, hpo],
        config=EngineConfig(train_iters=train_iters, valid_step=valid_step),
        dependencies={"u2l": {hpo: [classifier]}, "l2u": {classifier: [hpo]}},
        val_data=data["val"],
    )
    engine.run()
    return {"lam": decays().detach(), "history": engine.history, "model": model}


# -- the yardstick: refit to convergence, grid search ---------------------------------------
def refit(train: Split, lam: torch.Tensor) -> LogisticRegression:
    """Logistic regression minimising the regularized training loss (float64 L-BFGS)."""
    x, y = (t.double() for t in train)
    lam = lam.detach().double().expand(x.shape[1])
    model = LogisticRegression(x.shape[1]).double()
    optimizer = torch.optim.LBFGS(model.parameters(), lr=1.0, max_iter=2000,
                                  tolerance_grad=1e-10, tolerance_change=1e-14,
                                  history_size=50, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = regularized_loss(model, lam, x, y)
        loss.backward()
        return loss

    optimizer.step(closure)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, split: Split) -> dict[str, float]:
    x, y = split
    dtype = next(model.parameters()).dtype
    logits = model(x.to(dtype))
    return {"loss": F.binary_cross_entropy_with_logits(logits, y.to(dtype)).item(),
            "acc": ((logits > 0).to(dtype) == y.to(dtype)).to(dtype).mean().item()}


def grid_search(data: dict[str, Split], grid: np.ndarray) -> dict:
    """The scalar weight decay (shared by all weights) with the lowest validation loss."""
    val_losses = [evaluate(refit(data["train"], torch.tensor(lam)), data["val"])["loss"]
                  for lam in grid]
    best = int(np.argmin(val_losses))
    return {"lam": float(grid[best]), "val_losses": val_losses, "grid": grid}


# -- putting it together ---------------------------------------------------------------------
def run_dataset(name: str, *, method: str, seed: int, train_iters: int, grid_size: int,
                unroll: int, warmup: int, hpo_lr: float, valid_step: int) -> dict:
    torch.manual_seed(seed)
    data = LOADERS[name](seed)
    start = time.perf_counter()
    learned = learn_decays(data, method=method, train_iters=train_iters, unroll=unroll,
                           warmup=warmup, hpo_lr=hpo_lr, valid_step=valid_step)
    bilevel_seconds = time.perf_counter() - start
    grid = grid_search(data, np.logspace(-5, 1, grid_size))

    rows = []
    for label, model in [
        ("lam = 1 for all weights (initial)", refit(data["train"], torch.tensor(1.0))),
        (f"grid search, one lam = {grid['lam']:.2g}", refit(data["train"],
                                                           torch.tensor(grid["lam"]))),
        ("per-weight lam (Betty), refit", refit(data["train"], learned["lam"])),
        ("per-weight lam (Betty), its own classifier", learned["model"]),
    ]:
        val, test = evaluate(model, data["val"]), evaluate(model, data["test"])
        rows.append({"method": label, "val_loss": val["loss"], "test_loss": test["loss"],
                     "test_acc": test["acc"]})
    return {"dataset": name, "rows": rows, "lam": learned["lam"].tolist(),
            "grid": grid, "history": learned["history"], "bilevel_seconds": bilevel_seconds,
            "dim": data["train"][0].shape[1]}


def run(datasets: tuple[str, ...] = DATASETS, method: str = "cg", seed: int = 0,
        train_iters: int = 10000, grid_size: int = 25, unroll: int = 10, warmup: int = 200,
        hpo_lr: float = 0.05, valid_step: int = 100, plot: str | Path | None = None) -> dict:
    """Learn per-weight decays on each dataset and compare with the grid-searched scalar."""
    start = time.perf_counter()
    results = {name: run_dataset(name, method=method, seed=seed, train_iters=train_iters,
                                 grid_size=grid_size, unroll=unroll, warmup=warmup,
                                 hpo_lr=hpo_lr, valid_step=valid_step)
               for name in datasets}
    if plot is not None:
        save_plot(results, plot)
    return {"method": method, "datasets": results, "seconds": time.perf_counter() - start}


def save_plot(results: dict[str, dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(results), figsize=(5.5 * len(results), 7), squeeze=False)
    for col, (name, res) in enumerate(results.items()):
        steps = [h["step"] for h in res["history"]]
        top, bottom = axes[0][col], axes[1][col]
        top.plot(steps, [h["loss"] for h in res["history"]], label="per-weight lam (Betty)")
        best = min(res["grid"]["val_losses"])
        top.axhline(best, color="k", ls="--", label="best scalar lam (grid)")
        top.set(title=f"{name}: validation loss", xlabel="global step", ylabel="BCE")
        top.legend()
        bottom.bar(range(res["dim"]), res["lam"], color="tab:blue")
        bottom.axhline(res["grid"]["lam"], color="k", ls="--", label="grid-searched scalar")
        bottom.set(yscale="log", title=f"{name}: learned lam per weight", xlabel="feature",
                   ylabel="lam")
        bottom.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_table(result: dict) -> str:
    lines = ["| dataset | weight decay | val loss | test loss | test acc |",
             "|---|---|---|---|---|"]
    for name, res in result["datasets"].items():
        for row in res["rows"]:
            lines.append(f"| {name} | {row['method']} | {row['val_loss']:.4f} | "
                         f"{row['test_loss']:.4f} | {row['test_acc']:.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, default="cg")
    parser.add_argument("--iters", type=int, default=10000, help="global steps per dataset")
    parser.add_argument("--seed", type=int, default=0)
    add_figure_arguments(parser, PLOT)
    parser.add_argument("--quick", action="store_true", help="a few seconds: smoke test")
    args = parser.parse_args(argv)

    torch.set_num_threads(1)  # tiny models: more threads only add overhead
    kwargs = QUICK if args.quick else {"train_iters": args.iters}
    result = run(method=args.method, seed=args.seed, plot=figure_path(args, PLOT), **kwargs)

    for name, res in result["datasets"].items():
        lam = np.array(res["lam"])
        first, last = res["history"][0], res["history"][-1]
        print(f"{name}: validation loss {first['loss']:.4f} (step {first['step']}) -> "
              f"{last['loss']:.4f} (step {last['step']}); learned lam from {lam.min():.2e} "
              f"to {lam.max():.2e} (median {np.median(lam):.2e}); bilevel run "
              f"{res['bilevel_seconds']:.1f} s")
    print(format_table(result))
    print(f"method {result['method']}, total {result['seconds']:.1f} s")
    return result


if __name__ == "__main__":
    main()
