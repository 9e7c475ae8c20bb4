"""SAMA's ``P v`` formed inside the upper's backward (`betty.problems.update_jacobian.HeadScaling`).

When a sama lower has one reader, at the head of that reader's one path through it, the
reader's backward multiplies each parameter's ``v = dL_U/dw`` by ``P`` as autograd produces it
and drops that parameter's kept gradient at once, writing ``P v`` over it. References: the
same program with the scaling done after the backward (`Problem.head_scaling` patched to
decline), which must give the same bits; the peak memory of darts on the same program, which
an Adam-type sama used to exceed by one parameter-sized vector (the kept gradient and ``v``
whole at once).
"""

from __future__ import annotations

import pytest
import torch
from live_bytes import peak_live_bytes
from torch import nn

import betty.optim.reader as reader
from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import HypergradientError
from betty.problems import ImplicitProblem, IterativeProblem
from betty.problems.problem import Problem
from betty.problems.update_jacobian import HeadScaling

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=0.01, weight_decay=0.1),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=0.01, amsgrad=True),
    "rmsprop": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.5),
}


class Tied(nn.Module):
    """A tied matrix read twice (its gradient is a sum in the backward), a bias the upper's
    loss never reaches, and a scale the optimizer does not step."""

    def __init__(self, dim: int = 12, width: int = 20) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.e = nn.Parameter(torch.randn(dim, width, generator=gen, dtype=torch.float64) / 4)
        self.lower_only = nn.Parameter(torch.zeros(width, dtype=torch.float64))
        self.scale = nn.Parameter(torch.ones((), dtype=torch.float64))

    def forward(self, x):
        return self.scale * torch.tanh(x @ self.e) @ self.e.T


class Lower(ImplicitProblem):
    def training_step(self, batch):
        x, = batch
        per_example = (self.module(x) - x).pow(2).sum(1)
        weights = torch.softmax(self.upper.module.logits, 0)
        return (weights * per_example).sum() + self.module.lower_only.pow(2).sum()

    def trainable_parameters(self):
        return [self.module.e, self.module.lower_only, self.module.scale]


class Upper(ImplicitProblem):
    def training_step(self, batch):
        x, = batch
        return (self.lower.module(x) - x).pow(2).mean()

    def grad_callback(self, grads):
        self.seen.append([g.clone() for g in grads])


class Logits(nn.Module):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.logits = nn.Parameter(torch.linspace(-1, 1, n, dtype=torch.float64))


class UnrolledLower(IterativeProblem):
    training_step = Lower.training_step
    trainable_parameters = Lower.trainable_parameters


def run(make_optimizer, *, steps: int = 4, lower_config=None, upper_config=None,
        engine_config=None, lower_class=Lower, dtype=torch.float64):
    gen = torch.Generator().manual_seed(1)
    train = [(torch.randn(8, 12, generator=gen, dtype=dtype),) for _ in range(steps)]
    valid = [(torch.randn(5, 12, generator=gen, dtype=dtype),) for _ in range(steps)]
    net = Tied().to(dtype)
    stepped = [p for n, p in net.named_parameters() if n != "scale"]
    lower = lower_class("lower", Config(type="sama", **(lower_config or {})), module=net,
                        optimizer=make_optimizer(stepped), train_data_loader=train)
    logits = Logits(8).to(dtype)
    upper = Upper("upper", Config(**(upper_config or {})), module=logits,
                  optimizer=torch.optim.SGD(logits.parameters(), lr=0.5),
                  train_data_loader=valid)
    upper.seen = []
    engine = Engine([upper, lower], EngineConfig(train_iters=steps, **(engine_config or {})),
                    {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    engine.run()
    return engine, lower, upper


@pytest.fixture
def attached(monkeypatch):
    """The head sizes of every fused backward (`HeadScaling.attach` calls)."""
    seen = []
    original_attach = HeadScaling.attach
    monkeypatch.setattr(HeadScaling, "attach",
                        lambda self, head: (seen.append(len(head)),
                                            original_attach(self, head))[1])
    return seen


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_fused_scaling_gives_the_same_bits_as_scaling_afterwards(name, attached, monkeypatch):
    monkeypatch.setattr(reader, "DIAG_CHUNK", 64)  # the 240-element matrix goes in chunks
    _, _, fused = run(OPTIMIZERS[name])
    assert attached == [3] * 4  # every upper step formed P v in its backward
    monkeypatch.setattr(Problem, "head_scaling", lambda self, reader: None)
    _, _, after = run(OPTIMIZERS[name])
    assert len(fused.seen) == len(after.seen) == 4
    for mine, theirs in zip(fused.seen, after.seen):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))
    assert float(fused.seen[-1][0].abs().sum()) > 0


SCHEDULES = {
    "upper-accumulates": ({}, {"gradient_accumulation": 2}, {}),
    "unroll-3": ({"unroll_steps": 3}, {}, {}),
    "lower-accumulates": ({"gradient_accumulation": 2}, {}, {}),
    "roll-back": ({}, {}, {"roll_back": True}),
    "warm-up": ({"warmup_steps": 2}, {}, {}),
    "all": ({"unroll_steps": 2}, {"gradient_accumulation": 2}, {"roll_back": True}),
    "iterative-lower": ({"unroll_steps": 2}, {}, {}),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_every_schedule_reads_a_fresh_gradient(schedule, attached, monkeypatch):
    """Each local step of the upper follows a window of the lower (`betty.schedule`), so the
    gradient it consumes is always the lower's latest: the same bits as scaling afterwards,
    and never the consumed-gradient error."""
    lower_config, upper_config, engine_config = SCHEDULES[schedule]
    runs = []
    for decline in (False, True):
        if decline:
            monkeypatch.setattr(Problem, "head_scaling", lambda self, reader: None)
        runs.append(run(OPTIMIZERS["adamw"], steps=12, lower_config=lower_config,
                        upper_config=upper_config, engine_config=engine_config,
                        lower_class=UnrolledLower if schedule == "iterative-lower" else Lower
                        )[2].seen)
    assert len(runs[0]) == len(runs[1]) == len(attached) > 0  # fused at every upper step
    for mine, theirs in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


@pytest.mark.parametrize("lower,upper", [("fp16", "fp16"), ("bf16", "bf16"), ("fp32", "fp16"),
                                         ("fp16", "fp32")])
def test_mixed_precision_gives_the_same_bits(lower, upper, attached, monkeypatch):
    """An fp16 upper's heads carry its loss scale, an fp16 lower's kept gradient is unscaled:
    P v formed in the backward has the bits of P v formed afterwards (float32 modules)."""
    runs = []
    for decline in (False, True):
        if decline:
            monkeypatch.setattr(Problem, "head_scaling", lambda self, reader: None)
        runs.append(run(OPTIMIZERS["adamw"], steps=6, lower_config={"precision": lower},
                        upper_config={"precision": upper}, dtype=torch.float32)[2].seen)
    assert len(runs[0]) == len(runs[1]) == len(attached) == 6  # fused at every upper step
    for mine, theirs in zip(*runs):
        assert all(torch.equal(a, b) for a, b in zip(mine, theirs))


def test_the_consumed_gradient_is_not_read_again():
    """After the upper's backward consumed it, P cannot be formed until the lower steps again:
    a clear error, not P at a zero gradient."""
    _, lower, _ = run(OPTIMIZERS["adamw"], steps=1)
    with pytest.raises(HypergradientError, match="consumed by the hypergradient of 'upper'"):
        lower.update_jacobian()


class Second(Upper):
    pass


class SharedLower(Lower):
    def training_step(self, batch):
        x, = batch
        per_example = (self.module(x) - x).pow(2).sum(1)
        logits = self.upper.module.logits + self.second.module.logits
        return (torch.softmax(logits, 0) * per_example).sum()


def test_two_readers_scale_afterwards():
    """Two uppers read the lower's P at each of their steps: neither may consume it."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 12, generator=gen, dtype=torch.float64),)]
    net = Tied()
    lower = SharedLower("lower", Config(type="sama"), module=net,
                        optimizer=torch.optim.Adam(net.parameters(), lr=0.01),
                        train_data_loader=data)
    uppers = []
    for name, cls in (("upper", Upper), ("second", Second)):
        logits = Logits(8)
        uppers.append(cls(name, Config(), module=logits,
                          optimizer=torch.optim.SGD(logits.parameters(), lr=0.5),
                          train_data_loader=data))
        uppers[-1].seen = []
    Engine([*uppers, lower], EngineConfig(train_iters=1),
           {"u2l": {u: [lower] for u in uppers}, "l2u": {lower: uppers}}).run()
    assert all(lower.head_scaling(u.name) is None for u in uppers)
    assert all(float(u.seen[0][0].abs().sum()) > 0 for u in uppers)
    assert float(lower.update_jacobian()[0].abs().sum()) > 0  # still there to read


class Deep(nn.Module):
    """Eight equal 96x96 layers: the largest tensor is an eighth of the parameters."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.layers = nn.ParameterList(
            nn.Parameter(torch.randn(96, 96, generator=gen) / 10) for _ in range(8))

    def forward(self, x):
        for w in self.layers:
            x = torch.tanh(x @ w)
        return x


class DeepLower(ImplicitProblem):
    def training_step(self, batch):
        x, = batch
        per_example = (self.module(x) - x).pow(2).sum(1)
        return (torch.softmax(self.upper.module.logits, 0) * per_example).sum()


class DeepUpper(ImplicitProblem):
    def training_step(self, batch):
        x, = batch
        return (self.lower.module(x) - x).pow(2).mean()


def peak_above_start(kind: str) -> float:
    """Peak live CPU tensor bytes over 3 outer steps above those at the run's start, in units
    of the lower's parameter bytes (AdamW lower, batch 4: activations are a few kB)."""
    gen = torch.Generator().manual_seed(1)
    data = [(torch.randn(4, 96, generator=gen),) for _ in range(3)]
    net, logits = Deep(), Logits(4).float()
    lower = DeepLower("lower", Config(type=kind), module=net,
                      optimizer=torch.optim.AdamW(net.parameters(), lr=1e-3),
                      train_data_loader=data)
    upper = DeepUpper("upper", Config(), module=logits,
                      optimizer=torch.optim.SGD(logits.parameters(), lr=0.1),
                      train_data_loader=data)
    engine = Engine([upper, lower], EngineConfig(train_iters=3),
                    {"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    peak, _ = peak_live_bytes(engine.run)
    engine.close()
    return peak / sum(p.numel() * p.element_size() for p in net.parameters())


def test_adam_sama_peak_is_darts_plus_one_layer(monkeypatch):
    """Measured: sama - darts = 0.00 P (a layer's kept gradient and its incoming v, 0.25 P,
    stay below darts' peak); 1.00 P when P v was formed after the backward. P is formed over
    1024 elements at a time (the default chunk is larger than these layers, whose P's
    temporaries would count)."""
    monkeypatch.setattr(reader, "DIAG_CHUNK", 1024)
    darts, sama = peak_above_start("darts"), peak_above_start("sama")
    assert sama - darts < 0.3, (sama, darts)
    monkeypatch.setattr(Problem, "head_scaling", lambda self, reader: None)
    assert peak_above_start("sama") - darts > 0.9  # the test sees the vector it guards against
