"""CUDA checks that CI (CPU only) cannot make: fp16 with a gradient scaler and bf16 autocast on
the GPU, for every implicit hypergradient method, against fp32; an overflowing fp16 step is
skipped and counted. Prints one line per check; exits 1 if any fails.

    python benchmarks/gpu_checks.py
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from betty import Config, Engine, EngineConfig
from betty.problems import ImplicitProblem

DEV = "cuda" if torch.cuda.is_available() else "cpu"


class Lower(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        return (self.weights(losses.detach().unsqueeze(1)).squeeze(1) * losses).mean() \
            * self.cfg["blow_up"]


class Upper(ImplicitProblem):
    def training_step(self, batch):
        x, y = batch
        return F.cross_entropy(self.lower(x), y)


def hypergradient(precision: str, method: str, blow_up: float = 1.0):
    torch.manual_seed(0)
    x, y = torch.randn(64, 32, device=DEV), torch.randint(0, 10, (64,), device=DEV)
    net = torch.nn.Sequential(torch.nn.Linear(32, 128), torch.nn.ReLU(),
                              torch.nn.Linear(128, 10)).to(DEV)
    wnet = torch.nn.Sequential(torch.nn.Linear(1, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1),
                               torch.nn.Sigmoid()).to(DEV)
    lower = Lower("lower", Config(type=method, precision=precision, cg_iterations=3,
                                  neumann_iterations=3, neumann_alpha=0.1),
                  net, torch.optim.SGD(net.parameters(), lr=0.05), train_data_loader=[(x, y)],
                  extra_config={"blow_up": blow_up})
    upper = Upper("weights", Config(precision=precision), wnet,
                  torch.optim.SGD(wnet.parameters(), lr=0.0), train_data_loader=[(x, y)])
    seen = []
    upper.grad_callback = lambda grads: seen.append([g.detach().float().clone() for g in grads])
    strategy = "gpu" if DEV == "cuda" else "cpu"
    engine = Engine([upper, lower], EngineConfig(train_iters=1, strategy=strategy),
                    {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    engine.run()
    return torch.cat([g.flatten() for g in seen[0]]), lower


def main() -> int:
    print(torch.__version__, torch.cuda.get_device_name() if DEV == "cuda" else "cpu")
    failures = 0
    for method in ("darts", "sama", "neumann", "cg"):
        ref, _ = hypergradient("fp32", method)
        for precision in ("fp16", "bf16"):
            got, _ = hypergradient(precision, method)
            cos = float(F.cosine_similarity(ref, got, dim=0))
            ok = cos >= 0.99
            failures += not ok
            print(f"{method:8s} {precision}: cosine to fp32 {cos:.5f} {'ok' if ok else 'FAIL'}")
    _, lower = hypergradient("fp16", "darts", blow_up=1e30)
    skipped = lower.skipped_steps
    print(f"overflowing fp16 step skipped: {skipped} {'ok' if skipped == 1 else 'FAIL'}")
    failures += skipped != 1
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
