"""Reverse-mode windows (`IterativeProblem`) beyond the hypergradient's value, in float64.

BatchNorm statistics, parameters and optimizer state against plain torch.optim training of a
copy of the module on the same batches (also when `run()` stops mid-window); each window's
graph freed when the next starts (flat resident memory over 2200 windows); the errors before
training for an unsupported optimizer and fp16; bf16 autocast inside the differentiable
updates against fp32. The hypergradients against hand-written unrolls are in
test_iterative.py.
"""

from __future__ import annotations

import copy
import gc
import os
import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from unrolled import DT, Hyper, Upper, batches, bilevel, bn_net, rel_err

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import ConfigError, ProblemDefinitionError
from betty.problems import ImplicitProblem, IterativeProblem


# -- 1. buffers and optimizer state follow the functional steps -------------------------------
def bn_loss(net: nn.Module, lam: Tensor, batch: tuple[Tensor, Tensor]) -> Tensor:
    x, y = batch
    return F.mse_loss(net(x), y) + 0.5 * lam[0].exp() * net[0].weight.square().sum()


class BNLower(IterativeProblem):
    def training_step(self, batch):
        return bn_loss(self.module, self.upper.module.lam, batch)


class WeightNorm(ImplicitProblem):
    """An upper whose loss reads the lower's final weights only (no forward: BN untouched)."""

    def training_step(self, batch):
        return self.lower.module[3].weight.square().sum() + 0 * self.module.lam.sum()

    def grad_callback(self, grads):
        self.record.append([g.clone() for g in grads])


@pytest.mark.parametrize("reverse", [False, True])
def test_buffers_and_optimizer_state_match_plain_torch(reverse):
    unroll, steps = 3, 8  # the run stops inside the third window: its steps count too
    data = batches(1, steps)
    net = bn_net()
    plain = copy.deepcopy(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.05, betas=(0.8, 0.9), weight_decay=0.01)
    hyper = Hyper()
    upper = WeightNorm("upper", Config(first_order=not reverse), module=hyper,
                       optimizer=torch.optim.SGD(hyper.parameters(), lr=0.0),
                       train_data_loader=[None])
    upper.record = []
    lower = BNLower("lower", Config(unroll_steps=unroll), module=net, optimizer=opt,
                    train_data_loader=data)
    Engine([upper, lower], EngineConfig(train_iters=steps),
           {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}).run()

    plain_opt = torch.optim.Adam(plain.parameters(), lr=0.05, betas=(0.8, 0.9),
                                 weight_decay=0.01)
    for batch in data:
        plain_opt.zero_grad()
        bn_loss(plain, hyper.lam.detach(), batch).backward()
        plain_opt.step()
    for (name, got), want in zip(net.state_dict().items(), plain.state_dict().values()):
        assert torch.allclose(got, want, rtol=1e-12, atol=1e-14), name  # incl. running stats
    assert int(net[1].num_batches_tracked) == steps
    for p, q in zip(net.parameters(), plain.parameters()):
        mine, theirs = opt.state[p], plain_opt.state[q]
        assert set(mine) == set(theirs)
        for key in theirs:
            assert torch.allclose(mine[key], theirs[key], rtol=1e-12, atol=1e-14), key
    if reverse:  # the window was differentiated: a gradient reached the upper
        assert len(upper.record) == steps // unroll
        assert bool(upper.record[0][0].abs().sum() > 0)
    # after run() the module holds the optimizer's own parameters again, and torch.optim
    # goes on from the written-back state exactly as from its own
    assert all(a is b for a, b in zip(net.parameters(), opt.param_groups[0]["params"]))
    for o, module in ((opt, net), (plain_opt, plain)):
        o.zero_grad()
        bn_loss(module, hyper.lam.detach(), data[0]).backward()
        o.step()
    for p, q in zip(net.parameters(), plain.parameters()):
        # the states agree to ~1e-16 but one more Adam step divides by sqrt(v): ~2e-14 apart
        # on some CPUs (their vector kernels round differently); a wrong state moves ~1e-3
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-12)


# -- 2. graph hygiene: each window's graph is cut when the next one starts ---------------------
class Vector(nn.Module):
    def __init__(self, size: int, value: float) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full((size,), value, dtype=DT))


class Follower(IterativeProblem):
    def training_step(self, batch):
        return (self.module.w - self.leader.module.w).square().mean()


class Leader(ImplicitProblem):
    def training_step(self, batch):
        loss = self.follower.module.w.square().mean()  # w_K of the follower's window
        self.nodes.append(graph_size(loss))
        if len(self.nodes) == 1:
            self.first_window = weakref.ref(self.follower.module.w)
        return loss


def graph_size(t: Tensor) -> int:
    seen, stack = set(), [t.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        stack.extend(n for n, _ in node.next_functions)
    return len(seen)


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux RSS")
def test_memory_stays_flat_over_thousands_of_windows():
    size, unroll = 4096, 2  # a leaked window would hold ~10 tensors of 32 KiB: ~0.6 GiB
    lead = Vector(size, 1.0)
    leader = Leader("leader", Config(first_order=False), module=lead,
                    optimizer=torch.optim.SGD(lead.parameters(), lr=0.01),
                    train_data_loader=[None])
    leader.nodes = []
    follow = Vector(size, 0.0)
    follower = Follower("follower", Config(unroll_steps=unroll), module=follow,
                        optimizer=torch.optim.SGD(follow.parameters(), lr=0.1, momentum=0.9),
                        train_data_loader=[None])
    engine = Engine([leader, follower], EngineConfig(train_iters=200 * unroll),
                    {"u2l": {leader: [follower]}, "l2u": {follower: [leader]}})
    engine.run()
    gc.collect()
    before = resident_bytes()
    engine.config.train_iters = 2200 * unroll
    engine.run()
    gc.collect()
    grown = resident_bytes() - before
    assert len(leader.nodes) == 2200
    assert leader.first_window() is None  # window 1's tensors are gone
    assert len(set(leader.nodes[1:])) == 1  # the same graph size in every window (not growing)
    assert grown < 64 * 2**20, f"resident memory grew by {grown / 2**20:.1f} MiB"


# -- 3. clear errors before training -----------------------------------------------------------
def test_unsupported_optimizer_names_the_supported_ones():
    def make(net):
        return torch.optim.Adadelta(net.parameters())
    with pytest.raises(ProblemDefinitionError) as info:
        bilevel(make, unroll=2, windows=1)
    message = str(info.value)
    assert "'lower'" in message and "Adadelta" in message
    for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad"):
        assert f"torch.optim.{name}" in message


def test_fp16_is_refused_with_a_reason():
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(ConfigError, match=r"'lower'.*fp16.*'bf16'"):
        bilevel(make, unroll=2, windows=1, lower=Config(unroll_steps=2, precision="fp16"))


class Bf16Lower(IterativeProblem):
    def training_step(self, batch):
        x, y = batch
        penalty = self.upper.module.lam.exp() * sum(w.square().sum()
                                                    for w in self.module.parameters())
        return F.mse_loss(self.module(x), y) + penalty.sum()


class Bf16Upper(Upper):
    def training_step(self, batch):
        x, y = batch
        out = self.lower(x)
        self.dtypes.add(out.dtype)
        return F.mse_loss(out.float(), y)


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_bf16_reverse_mode_hypergradient_is_close_to_fp32(name):
    """bf16 autocast inside the differentiable updates: the forward runs in bf16 (checked),
    the parameters and optimizer state stay float32, and the reverse-mode hypergradient of
    4 windows of 5 steps lies within 2% of the fp32 one (and differs from it)."""
    def run(precision: str) -> tuple[Tensor, set]:
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 1))
        hyper = nn.Module()
        hyper.lam = nn.Parameter(torch.tensor([-2.0]))
        gen = torch.Generator().manual_seed(1)
        xs = [torch.randn(64, 8, generator=gen) for _ in range(20)]
        data = [(x, torch.sin(x.sum(1, keepdim=True))) for x in xs]
        opt = (torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9) if name == "sgd_momentum"
               else torch.optim.Adam(net.parameters(), lr=0.01))
        up = Bf16Upper("upper", Config(first_order=False, precision=precision), module=hyper,
                       optimizer=torch.optim.SGD(hyper.parameters(), lr=0.1),
                       train_data_loader=data)
        up.record, up.dtypes = [], set()
        low = Bf16Lower("lower", Config(unroll_steps=5, precision=precision), module=net,
                        optimizer=opt, train_data_loader=data)
        Engine([up, low], EngineConfig(train_iters=20),
               {"u2l": {up: [low]}, "l2u": {low: [up]}}).run()
        assert {p.dtype for p in net.parameters()} == {torch.float32}
        assert all(t.dtype == torch.float32 for s in opt.state.values()
                   for t in s.values() if t.dim() > 0)
        return torch.cat([g[0] for g in up.record]), up.dtypes

    exact, dtypes = run("fp32")
    assert dtypes == {torch.float32} and exact.abs().min() > 1e-4
    half, dtypes = run("bf16")
    assert dtypes == {torch.bfloat16}
    assert not torch.equal(half, exact)
    assert rel_err([half], [exact]) < 0.02  # measured: 0.4% (SGD), 0.2% (Adam)
