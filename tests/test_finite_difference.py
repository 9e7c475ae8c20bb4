"""Finite-difference probes (darts, sama) in practice: randomness, buffers, precision.

The central difference ``[dL/dlam(w + eps x) - dL/dlam(w - eps x)] / (2 eps)`` is only a
derivative if both probes evaluate the *same* function: the same dropout masks, the same
BatchNorm statistics. Checked here on a Meta-Weight-Net-shaped program (a classifier trained
on ``mean(weight_net(loss_i) * loss_i)``, the weight net trained on a clean meta batch),
through `Engine`:

* dropout: the two probes draw one mask, and the hypergradient equals the exact mixed
  product ``-M x`` (double backward, written here with `torch.func.functional_call`) with the
  dropout masks held fixed to the ones the engine drew; repeated hops give identical results
  and leave the user's random stream where it was;
* BatchNorm: running statistics and the lower parameters are bit for bit what they were before
  the hypergradient (every method), unless ``*_multitask`` asks to keep the probed weights;
* precision: with bf16 or fp16 autocast the hypergradient stays within cosine 0.99 of the
  fp32 one (darts and sama probe in fp32; neumann and cg keep autocast); parameters stored in
  bf16 still get a probe that survives rounding (``PROBE_ULPS``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.hypergradient import Hop, darts
from betty.hypergradient.darts import PROBE_ULPS, probe_radius
from betty.problems import ImplicitProblem

DTYPE = torch.float64
INNER_LR = 0.1


class RecordingDropout(nn.Module):
    """Inverted dropout that records every mask it draws (``fixed``: use this mask)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.masks: list[Tensor] = []
        self.fixed: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        if not self.training:
            return x
        mask = self.fixed if self.fixed is not None else \
            (torch.rand_like(x) >= self.p).to(x.dtype)
        self.masks.append(mask)
        return x * mask / (1 - self.p)


def classifier(*, batch_norm: bool, dropout: float, width: int = 8, dim: int = 5,
               classes: int = 3) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(dim, width)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(width))
    layers += [nn.Tanh(), RecordingDropout(dropout), nn.Linear(width, classes)]
    return nn.Sequential(*layers)


def weight_net() -> nn.Sequential:
    return nn.Sequential(nn.Linear(1, 6), nn.Tanh(), nn.Linear(6, 1), nn.Sigmoid())


def weighted_loss(logits: Tensor, y: Tensor, wnet: nn.Module, *, detach: bool = True
                  ) -> Tensor:
    """``mean(wnet(loss_i) * loss_i)``; Meta-Weight-Net detaches the weight net's input."""
    losses = F.cross_entropy(logits, y, reduction="none")
    scores = losses.detach() if detach else losses
    return (wnet(scores.unsqueeze(1)).squeeze(1) * losses).mean()


class Classifier(ImplicitProblem):
    detach = True

    def training_step(self, batch):
        x, y = batch
        return weighted_loss(self.module(x), y, self.reweight.module, detach=self.detach)


class Reweight(ImplicitProblem):
    """Records, right before its hypergradient, the classifier's parameters and buffers; and
    the gradient it receives."""

    def training_step(self, batch):
        x, y = batch
        loss = F.cross_entropy(self.classifier(x), y)
        module = self.classifier.module
        self.before = ([p.detach().clone() for p in module.parameters()],
                       [b.detach().clone() for b in module.buffers()])
        return loss

    def grad_callback(self, grads):
        module = self.classifier.module
        self.after = ([p.detach().clone() for p in module.parameters()],
                      [b.detach().clone() for b in module.buffers()])
        self.grads_seen.append([g.detach().clone() for g in grads])


def batches(seed: int, n: int, dim: int, classes: int, dtype: torch.dtype
            ) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    train = (torch.randn(n, dim, generator=gen).to(dtype),
             torch.randint(0, classes, (n,), generator=gen))
    meta = (torch.randn(n, dim, generator=gen).to(dtype),
            torch.randint(0, classes, (n,), generator=gen))
    return train, meta


def build(clf: nn.Module, wnet: nn.Module, data, inner_config: Config, *,
          outer_config: Config | None = None, steps: int = 1, detach: bool = True
          ) -> tuple[Engine, Reweight]:
    train, meta = data
    inner = Classifier("classifier", inner_config, clf,
                       torch.optim.SGD(clf.parameters(), lr=INNER_LR), train_data_loader=[train])
    inner.detach = detach
    outer = Reweight("reweight", outer_config or Config(), wnet,
                     torch.optim.SGD(wnet.parameters(), lr=0.0), train_data_loader=[meta])
    outer.grads_seen = []
    engine = Engine([outer, inner], EngineConfig(train_iters=steps),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    return engine, outer


def flat(tensors: list[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float(torch.linalg.vector_norm(actual - expected)
                 / torch.linalg.vector_norm(expected))


# -- dropout ----------------------------------------------------------------------------------
FD_CONFIGS = {
    "darts": (Config(type="darts", darts_alpha=1e-4), 1.0),
    "sama": (Config(type="sama", sama_adam_alpha=1e-4), INNER_LR),  # plain SGD: P = lr
}


@pytest.mark.parametrize("method", list(FD_CONFIGS))
def test_dropout_probes_share_a_mask_and_match_the_fixed_mask_reference(method):
    """Reference: ``-M (P v)`` by double backward, dropout masks fixed to those the engine
    drew (``v`` with the meta forward's mask, ``M`` with the probes' mask); P = lr for sama
    with plain SGD. A probe pair that drew two masks would be off by O(1 / eps).

    The weight net sees the live (not detached) losses here: a finite difference moves every
    value that depends on ``w``, a detached one included, while double backward stops at the
    detach, so with Meta-Weight-Net's detach the two are different (both legitimate) numbers.
    """
    config, p_scale = FD_CONFIGS[method]
    torch.manual_seed(0)
    clf = classifier(batch_norm=False, dropout=0.5).to(DTYPE)
    wnet = weight_net().to(DTYPE)
    data = batches(1, 16, 5, 3, DTYPE)
    engine, outer = build(clf, wnet, data, config, detach=False)
    engine.run()
    drop = clf[2]
    assert len(drop.masks) == 4  # classifier step, meta forward, probe +, probe -
    assert torch.equal(drop.masks[2], drop.masks[3])
    assert not torch.equal(drop.masks[1], drop.masks[2])  # the RNG did move on between them

    names = [n for n, _ in clf.named_parameters()]
    w = [t.requires_grad_() for t in outer.before[0]]
    lam = list(wnet.parameters())
    (x, y), (xm, ym) = data

    def logits(params: list[Tensor], inputs: Tensor, mask: Tensor) -> Tensor:
        drop.fixed = mask
        try:
            return functional_call(clf, dict(zip(names, params)), (inputs,))
        finally:
            drop.fixed = None

    v = torch.autograd.grad(F.cross_entropy(logits(w, xm, drop.masks[1]), ym), w)
    inner_loss = weighted_loss(logits(w, x, drop.masks[2]), y, wnet, detach=False)
    inner_grad = torch.autograd.grad(inner_loss, w, create_graph=True)
    mixed = torch.autograd.grad(inner_grad, lam, grad_outputs=[p_scale * t for t in v])
    expected = -flat(list(mixed))
    assert rel_err(flat(outer.grads_seen[0]), expected) < 1e-6


def test_repeated_hops_are_identical_and_leave_the_random_stream_alone():
    """Reference: the first call. Two darts hops over a dropout network return bitwise equal
    results, and the global random state afterwards is the one before (the user's own draws
    are not shifted by the probes)."""
    torch.manual_seed(0)
    clf = classifier(batch_norm=True, dropout=0.5).to(DTYPE)
    wnet = weight_net().to(DTYPE)
    (x, y), (xm, ym) = batches(2, 16, 5, 3, DTYPE)
    w, lam = list(clf.parameters()), list(wnet.parameters())
    v = list(torch.autograd.grad(F.cross_entropy(clf(xm), ym), w))
    state = torch.get_rng_state()
    results = []
    for _ in range(2):
        hop = Hop(w, lam, lambda: weighted_loss(clf(x), y, wnet), buffers=list(clf.buffers()))
        with hop:
            results.append(flat(darts(hop, v, Config(type="darts"))))
        assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(results[0], results[1])
    assert bool(results[0].abs().sum() > 0)


# -- BatchNorm buffers and parameters ---------------------------------------------------------
METHODS = {
    "darts": Config(type="darts"),
    "sama": Config(type="sama"),
    "neumann": Config(type="neumann", neumann_iterations=2, neumann_alpha=0.1),
    "cg": Config(type="cg", cg_iterations=2),
}


@pytest.mark.parametrize("method", list(METHODS))
def test_hypergradient_leaves_batchnorm_and_parameters_bit_for_bit(method):
    """Reference: the classifier's parameters and buffers (BatchNorm running mean, variance,
    num_batches_tracked) recorded right before the hypergradient; afterwards they are
    identical (torch.equal). The classifier's own step did update its statistics."""
    torch.manual_seed(0)
    clf = classifier(batch_norm=True, dropout=0.3).to(DTYPE)
    initial = [b.clone() for b in clf.buffers()]
    engine, outer = build(clf, weight_net().to(DTYPE), batches(3, 16, 5, 3, DTYPE),
                          METHODS[method], steps=2)
    engine.run()
    params_before, buffers_before = outer.before
    params_after, buffers_after = outer.after
    assert not all(torch.equal(a, b) for a, b in zip(initial, buffers_before))
    assert all(torch.equal(a, b) for a, b in zip(buffers_before, buffers_after))
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after))
    assert all(torch.isfinite(g).all() for g in outer.grads_seen[-1])


@pytest.mark.parametrize("method", ["darts", "sama"])
def test_multitask_keeps_the_probed_weights_but_not_the_statistics(method):
    """``darts_multitask`` / ``sama_multitask``: the classifier keeps the last probe's weights
    (not restored), while its BatchNorm statistics are still restored."""
    torch.manual_seed(0)
    clf = classifier(batch_norm=True, dropout=0.0).to(DTYPE)
    config = Config(type=method, **{f"{method}_multitask": True})
    engine, outer = build(clf, weight_net().to(DTYPE), batches(4, 16, 5, 3, DTYPE), config)
    engine.run()
    assert not all(torch.equal(a, b) for a, b in zip(outer.before[0], outer.after[0]))
    assert all(torch.equal(a, b) for a, b in zip(outer.before[1], outer.after[1]))


# -- mixed precision --------------------------------------------------------------------------
LOW_PRECISION_METHODS = {
    "darts": Config(type="darts"),
    "sama": Config(type="sama"),
    "neumann": Config(type="neumann", neumann_iterations=3, neumann_alpha=0.05),
    "cg": Config(type="cg", cg_iterations=3),
}


def mixed_precision_run(method: str, precision: str) -> Tensor:
    """One global step of a float32 MWN program (ReLU MLP 32-64-10, batch 64) with both
    problems at ``precision``; returns the weight net's hypergradient (scale removed: fp16's
    loss scale multiplies it, and a cosine does not see it)."""
    torch.manual_seed(5)
    clf = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))
    wnet = nn.Sequential(nn.Linear(1, 100), nn.ReLU(), nn.Linear(100, 1), nn.Sigmoid())
    data = batches(6, 64, 32, 10, torch.float32)
    inner = replace(LOW_PRECISION_METHODS[method], precision=precision)
    engine, outer = build(clf, wnet, data, inner, outer_config=Config(precision=precision))
    engine.run()
    return flat(outer.grads_seen[0])


def replace(config: Config, **changes) -> Config:
    out = copy.copy(config)
    for key, value in changes.items():
        setattr(out, key, value)
    out.validate()
    return out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("method", list(LOW_PRECISION_METHODS))
def test_low_precision_hypergradient_is_close_to_fp32(method, precision):
    """Reference: the same program in fp32. Cosine similarity >= 0.99 with bf16 or fp16
    autocast (with the probes under autocast darts falls to about 0.3 in bf16)."""
    reference = mixed_precision_run(method, "fp32")
    low = mixed_precision_run(method, precision)
    assert torch.isfinite(low).all()
    assert float(F.cosine_similarity(low, reference, dim=0)) >= 0.99


def test_probe_radius_floor_for_bf16_parameters():
    """Reference: ``max(radius, PROBE_ULPS * 2^-7 * ||w||)`` for bf16 weights. A radius far
    below bf16's resolution would round ``w + eps v`` back to ``w`` and give exactly 0; the
    floor keeps the probe visible, and the result keeps the upper parameters' dtype."""
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(torch.bfloat16)
    wnet = weight_net().to(torch.bfloat16)
    (x, y), (xm, ym) = batches(7, 32, 8, 3, torch.bfloat16)
    w, lam = list(clf.parameters()), list(wnet.parameters())
    w_norm = float(torch.linalg.vector_norm(flat([p.detach().float() for p in w])))
    expected = PROBE_ULPS * torch.finfo(torch.bfloat16).eps * w_norm
    assert abs(float(probe_radius(w, 1e-6)) - expected) <= 1e-6 * expected
    assert float(probe_radius(w, 10.0)) == 10.0
    v = list(torch.autograd.grad(F.cross_entropy(clf(xm).float(), ym), w))
    hop = Hop(w, lam, lambda: weighted_loss(clf(x).float(), y, lambda t: wnet(t.to(
        torch.bfloat16)).float()))
    with hop:
        out = darts(hop, v, Config(type="darts", darts_alpha=1e-6))
    assert all(o.dtype == torch.bfloat16 for o in out)
    assert bool(flat([o.float() for o in out]).abs().sum() > 0)
