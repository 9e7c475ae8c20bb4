"""Learning the data mixture of a byte-level language model on the Python standard library.

A bilevel program in the style of DoGE (Fan et al., "DoGE: Domain Reweighting with
Generalization Estimation", ICML 2024) and Meta-Weight-Net (Shu et al., NeurIPS 2019):

* ``lm`` (lower, `ImplicitProblem`): a GPT-2 byte-level LM built from a Hugging Face
  `GPT2Config` (byte_lm.py; no weights downloaded) trained on a mixture of text domains taken
  from the standard library that runs this script (stdlib_text.py): code of ``email``, ``asyncio``,
  ``xml``; docstrings; and a harmful domain, code scrambled into noise. Each step sees the
  same number of windows from every domain; its loss is ``sum_d p_d * mean loss of domain d``.
* ``weights`` (upper): ``p = softmax(logits)`` over the domains, trained with Adam to minimise
  the LM's loss on windows of the TARGET domain's validation files, through betty's
  hypergradient (``Config(type=method)`` on ``lm``). Variant ``mwn``: per-example weights
  instead, ``w_i = mwn(loss_i)`` (a 1-32-1 MLP with a sigmoid), loss ``mean_i w_i loss_i``.
* baselines, same model initialisation, optimizer, schedule, steps and bytes per step:
  ``uniform`` (p_d = 1/D), ``proportional`` (p_d proportional to the domain's training bytes)
  and ``target-only`` (every window of the batch from the target's training files).

Reported: target-domain TEST loss in bits per byte (mean +- std over seeds), the final weight of
the harmful domain (and the target's), wall time per run; a plot of the weights over training.
Outputs go to ``--out`` (git-ignored); ``--refresh`` also rewrites the committed figure.

    python examples/lm_data_mixing/main.py                     # 3 seeds, out/ (minutes)
    python examples/lm_data_mixing/main.py --quick             # seconds: smoke test
    python examples/lm_data_mixing/main.py --methods darts sama neumann cg --seeds 0 1
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from byte_lm import ModelSize, bits_per_byte, byte_lm, sequence_losses  # noqa: E402
from mixing_report import format_table, save_plot, summarize  # noqa: E402
from stdlib_text import DOMAINS, Corpus, WindowSampler, eval_windows, load_corpus  # noqa: E402

from betty import Engine  # noqa: E402
from betty.configs import Config, EngineConfig  # noqa: E402
from betty.problems import ImplicitProblem  # noqa: E402

METHOD_SETTINGS = {  # Config fields per hypergradient method (radius as darts for sama)
    "darts": {}, "sama": {"sama_adam_alpha": 0.01},
    "neumann": {"neumann_iterations": 3, "neumann_alpha": 0.01},
    "cg": {"cg_iterations": 3},
}
BASELINES = ("uniform", "proportional", "target-only")


@dataclass(frozen=True)
class Settings:
    size: ModelSize = ModelSize(width=64, layers=2, heads=4, context=64)
    steps: int = 300
    per_domain: int = 3  # windows per domain per step (x 5 domains)
    val_windows: int = 16  # target validation windows per upper step
    lr: float = 3e-3
    warmup: int = 20  # LM learning-rate warm-up; the upper starts stepping after it too
    meta_lr: float = 0.05
    unroll: int = 2  # LM steps per upper step
    test_windows: int = 256
    target: str = "email"
    target_train_files: int | None = None  # None: all of the target's training files
    methods: tuple[str, ...] = ("darts",)
    variants: tuple[str, ...] = ("domain", "mwn")
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "cpu"
    bf16: bool = False
    extra: dict = field(default_factory=dict)


QUICK = Settings(size=ModelSize(width=48, layers=2, heads=4, context=48), steps=100,
                 per_domain=3, val_windows=8, meta_lr=0.1, warmup=10, test_windows=64,
                 seeds=(0,))


# -- the two levels --------------------------------------------------------------------------
class DomainWeights(nn.Module):
    """``softmax(logits)`` over the domains, starting uniform."""

    def __init__(self, domains: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(domains))

    def forward(self) -> torch.Tensor:
        return torch.softmax(self.logits, 0)


class ExampleWeights(nn.Module):
    """Meta-Weight-Net: a window's loss (detached, as in the paper) -> its weight in (0, 1)."""

    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 1),
                                 nn.Sigmoid())

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        return self.net(losses.detach().unsqueeze(-1)).squeeze(-1)


class MixtureLM(ImplicitProblem):
    """Lower level: the LM's weighted loss on a batch ``[D, n, L]`` (n windows per domain)."""

    variant = "domain"
    record_every = 5
    shares: list

    def training_step(self, batch):
        losses = sequence_losses(self.module, batch)  # [D, n], nats
        if self.variant == "domain":
            return (self.weights() * losses.mean(1)).sum()
        w = self.weights(losses)
        if self.count % self.record_every == 0 and (not self.shares or
                                                    self.shares[-1][0] != self.count):
            # each domain's share of the total weight (once per step, not per probe)
            self.shares.append((self.count, (w.sum(1) / w.sum()).tolist()))
        return (w * losses).mean()


class Weights(ImplicitProblem):
    """Upper level: the LM's loss on target-domain validation windows ``[1, n, L]``."""

    history: list

    def training_step(self, batch):
        return sequence_losses(self.lm.module, batch[0]).mean()

    def param_callback(self, params=None):
        if isinstance(self.module, DomainWeights):
            with torch.no_grad():
                self.history.append((self.lm.count, self.module().tolist()))


# -- one run ---------------------------------------------------------------------------------
def lr_schedule(settings: Settings):
    """Linear warm-up, then cosine decay to 10% (a factor for LambdaLR)."""
    def factor(step: int) -> float:
        if step < settings.warmup:
            return (step + 1) / settings.warmup
        progress = (step - settings.warmup) / max(1, settings.steps - settings.warmup)
        return 0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


SECOND_ORDER = ("neumann", "cg")  # Hessian-vector products: double backward


def new_lm(settings: Settings, seed: int, method: str | None = None):
    torch.manual_seed(seed)
    attention = "eager" if method in SECOND_ORDER else "sdpa"
    model = byte_lm(settings.size, attention).to(settings.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.lr, betas=(0.9, 0.95),
                                  weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(settings))
    return model, optimizer, scheduler


def train_sampler(corpus: Corpus, settings: Settings, seed: int, target_only: bool = False):
    length = settings.size.context + 1
    if target_only:
        return WindowSampler([corpus.streams[corpus.target]["train"]],
                             settings.per_domain * len(corpus.domains), length, seed)
    return WindowSampler([corpus.streams[d]["train"] for d in corpus.domains],
                         settings.per_domain, length, seed)


def train_betty(corpus: Corpus, settings: Settings, seed: int, variant: str,
                method: str) -> dict:
    """The bilevel program: domain weights (``variant="domain"``) or MWN (``"mwn"``)."""
    model, optimizer, scheduler = new_lm(settings, seed, method)
    torch.manual_seed(seed + 1000)
    upper = DomainWeights(len(corpus.domains)) if variant == "domain" else ExampleWeights()
    upper.to(settings.device)
    precision = "bf16" if settings.bf16 else "fp32"
    lm = MixtureLM("lm", module=model, optimizer=optimizer, scheduler=scheduler,
                   train_data_loader=train_sampler(corpus, settings, seed),
                   config=Config(type=method, unroll_steps=settings.unroll,
                                 warmup_steps=settings.warmup, precision=precision,
                                 **METHOD_SETTINGS[method]))
    lm.variant, lm.shares = variant, []
    val = WindowSampler([corpus.streams[corpus.target]["val"]], settings.val_windows,
                        settings.size.context + 1, seed + 1)
    weights = Weights("weights", module=upper, train_data_loader=val,
                      optimizer=torch.optim.Adam(upper.parameters(), lr=settings.meta_lr))
    weights.history = [(0, upper().tolist())] if variant == "domain" else []
    engine = Engine(problems=[lm, weights],
                    config=EngineConfig(train_iters=settings.steps, progress_bar=False,
                                        strategy="cpu" if settings.device == "cpu" else "gpu"),
                    dependencies={"u2l": {weights: [lm]}, "l2u": {lm: [weights]}})
    engine.run()
    history = weights.history if variant == "domain" else lm.shares
    return {"model": model, "history": history, "final_weights": history[-1][1]}


def train_fixed(corpus: Corpus, settings: Settings, seed: int, baseline: str) -> dict:
    """A baseline: the same LM, optimizer, schedule and steps with fixed domain weights."""
    model, optimizer, scheduler = new_lm(settings, seed)
    domains = corpus.domains
    if baseline == "uniform":
        p = [1 / len(domains)] * len(domains)
    elif baseline == "proportional":
        sizes = corpus.sizes("train")
        p = [sizes[d] / sum(sizes.values()) for d in domains]
    else:
        p = [float(d == corpus.target) for d in domains]
    target_only = baseline == "target-only"
    weights = torch.tensor([1.0] if target_only else p, device=settings.device)
    batches = iter(train_sampler(corpus, settings, seed, target_only=target_only))
    for _ in range(settings.steps):
        batch = next(batches).to(settings.device)
        with autocast(settings):
            loss = (weights * sequence_losses(model, batch).mean(1)).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return {"model": model, "history": [(0, p), (settings.steps, p)], "final_weights": p}


def autocast(settings: Settings):
    if not settings.bf16:
        return nullcontext()
    return torch.autocast(torch.device(settings.device).type, dtype=torch.bfloat16)


def run_one(corpus: Corpus, settings: Settings, seed: int, name: str) -> dict:
    start = time.perf_counter()
    if name in BASELINES:
        out = train_fixed(corpus, settings, seed, name)
    else:
        variant, method = name.split(":")
        out = train_betty(corpus, settings, seed, variant, method)
    seconds = time.perf_counter() - start
    windows = eval_windows(corpus.streams[corpus.target]["test"], settings.size.context + 1,
                           settings.test_windows).to(settings.device)
    with autocast(settings):
        bpb = bits_per_byte(out["model"], windows)
    return {"name": name, "seed": seed, "test_bpb": bpb, "seconds": seconds,
            "final_weights": out["final_weights"], "history": out["history"]}


def warm_up(settings: Settings) -> None:
    """One forward/backward of a throw-away LM, so that the first timed run does not pay for
    loading the model code and first-call set-up (every run seeds itself anyway)."""
    model = byte_lm(settings.size).to(settings.device)
    windows = torch.zeros(2, settings.size.context + 1, dtype=torch.long,
                          device=settings.device)
    sequence_losses(model, windows).sum().backward()


def run_names(settings: Settings) -> list[str]:
    return [f"{v}:{m}" for v in settings.variants for m in settings.methods] + list(BASELINES)


def run(settings: Settings = Settings(), out_dir: str | Path | None = None,
        corpus: Corpus | None = None, plot: str | Path | None = None,
        verbose: bool = False) -> dict:
    """Every method and baseline for every seed; writes results, file lists and the plot
    to ``out_dir`` (None: nothing written)."""
    start = time.perf_counter()
    if corpus is None:
        corpus = load_corpus(settings.target, target_train_files=settings.target_train_files)
    warm_up(settings)
    runs = []
    for seed in settings.seeds:
        for name in run_names(settings):
            runs.append(run_one(corpus, settings, seed, name))
            if verbose:
                print(f"seed {seed} {name}: {runs[-1]['test_bpb']:.3f} bits/byte, "
                      f"{runs[-1]['seconds']:.1f} s", flush=True)
    result = {"settings": asdict(settings), "domains": corpus.domains, "target": corpus.target,
              "harmful": [d for d in corpus.domains if DOMAINS[d][0] == "harmful"],
              "parameters": settings.size.parameters(), "train_bytes": corpus.sizes("train"),
              "runs": runs, "seconds": time.perf_counter() - start}
    result["summary"] = summarize(result)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps(corpus.manifest(), indent=1))
        (out / "results.json").write_text(json.dumps(result, indent=1))
        (out / "table.md").write_text(format_table(result) + "\n")
        plot = out / "weights.png" if plot is None else plot
    if plot is not None:
        save_plot(result, plot)
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="under a minute: smoke test")
    parser.add_argument("--seeds", nargs="+", type=int)
    parser.add_argument("--steps", type=int, help="LM steps per run")
    parser.add_argument("--methods", nargs="+", choices=tuple(METHOD_SETTINGS),
                        help="hypergradient method(s) for the learned weights")
    parser.add_argument("--variants", nargs="+", choices=("domain", "mwn"))
    parser.add_argument("--target", choices=tuple(DOMAINS))
    parser.add_argument("--target-train-files", type=int,
                        help="keep only this many training files of the target (scarce data)")
    parser.add_argument("--device", help="cpu (default) or cuda")
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: small models gain little from more)")
    parser.add_argument("--out", default=str(HERE / "out"), help="output folder")
    parser.add_argument("--refresh", action="store_true",
                        help="also rewrite the committed weights.png next to README.md")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = QUICK if args.quick else Settings()
    given = {k: getattr(args, k) for k in ("steps", "target", "device", "target_train_files")
             if getattr(args, k)}
    given.update({k: tuple(getattr(args, k)) for k in ("seeds", "methods", "variants")
                  if getattr(args, k)})
    settings = replace(settings, **given, bf16=args.bf16 or settings.bf16)
    result = run(settings, out_dir=args.out, verbose=True)
    if args.refresh:
        save_plot(result, HERE / "weights.png")
    print(format_table(result))
    print(f"{len(result['runs'])} runs of {settings.steps} steps, model of "
          f"{result['parameters']:,} parameters, {result['seconds']:.1f} s in total; "
          f"outputs in {args.out}")
    return result


if __name__ == "__main__":
    main()
