"""Hugging Face `transformers` models inside betty programs, against hand-written references.

A tiny GPT-2 (`GPT2LMHeadModel`, float64, output layer tied to the input embedding, dropout on
in train mode) is the lower problem of a data-weighting program: the upper holds one logit per
training sequence and the lower minimises ``sum_i softmax(lam)_i ce_i(w)`` (+ ``mu/2 ||w||^2``
where the implicit methods need a positive definite Hessian); the upper's loss is the mean
cross-entropy of validation sequences. Each betty hypergradient is compared with the formula
its method implements (MATH.md), written out here with `torch.func.functional_call` on the
same model and parameters:

* darts / sama: the central difference ``-[dL/dlam(w + eps x) - dL/dlam(w - eps x)] / (2 eps)``,
  ``x = v`` (darts) or ``P v`` with ``P = lr`` (SGD with momentum, after its first step);
* cg / neumann (converged): the exact implicit hypergradient ``-d/dlam <dL/dw, H^-1 v>`` with
  ``H`` the dense Hessian and ``H^-1 v`` from `torch.linalg.solve`;
* reverse mode (`IterativeProblem` lower, upper ``first_order=False``): the K SGD-momentum
  updates unrolled by hand with ``create_graph=True``;
* `TaskBatchedProblem` (MAML over the GPT-2 itself): per-task inner loops by hand; the
  meta-gradient includes the tied weight's two uses. Dropout is off there: vmap draws each
  task's masks independently, which a per-task loop cannot replay.

Dropout masks match the references because each reference evaluation starts from the random
state the library's evaluation started from (recorded inside ``training_step``; a hop
rewinds the state before each of its evaluations).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem, IterativeProblem, TaskBatchedProblem

transformers = pytest.importorskip("transformers")

DTYPE = torch.float64
VOCAB, CONTEXT = 7, 5
LR, MOMENTUM = 0.05, 0.9


def tiny_gpt2(dropout: float = 0.1, seed: int = 0, attention: str = "sdpa"
              ) -> torch.nn.Module:
    """A 1-layer GPT-2 of width 4; a large initialiser range gives a Hessian with structure."""
    torch.manual_seed(seed)
    config = transformers.GPT2Config(attn_implementation=attention,
        vocab_size=VOCAB, n_positions=CONTEXT, n_embd=4, n_layer=1, n_head=2,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, initializer_range=0.5,
        bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(config).to(DTYPE).train()


def sequences(count: int, seed: int) -> Tensor:
    return torch.randint(0, VOCAB, (count, CONTEXT + 1),
                         generator=torch.Generator().manual_seed(seed))


TRAIN, VAL = sequences(4, 1), sequences(3, 2)


def ce(logits_of, x: Tensor) -> Tensor:
    """Per-sequence mean next-token cross-entropy; ``logits_of(input_ids) -> logits``."""
    logits = logits_of(x[..., :-1])
    return F.cross_entropy(logits.transpose(-1, -2), x[..., 1:], reduction="none").mean(-1)


def module_ce(model: torch.nn.Module, x: Tensor) -> Tensor:
    return ce(lambda ids: model(input_ids=ids).logits, x)


def functional_ce(model: torch.nn.Module, params: dict[str, Tensor], x: Tensor) -> Tensor:
    """The same loss with ``params`` (unique names; the tied head follows the embedding)."""
    return ce(lambda ids: functional_call(model, params, (), {"input_ids": ids}).logits, x)


def rel_err(actual: Tensor, expected: Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def assert_tied_once(model: torch.nn.Module, problem, optimizer) -> None:
    """The tied embedding is one parameter: in the module, the problem and the optimizer."""
    wte = model.transformer.wte.weight
    assert model.lm_head.weight is wte
    trainable = problem.trainable_parameters()
    assert sum(p is wte for p in trainable) == 1
    assert len(trainable) == len({id(p) for p in trainable}) == len(dict(
        model.named_parameters()))
    in_optimizer = [p for group in optimizer.param_groups for p in group["params"]]
    assert sum(p is wte for p in in_optimizer) == 1


class SequenceWeights(torch.nn.Module):
    def __init__(self, count: int) -> None:
        super().__init__()
        self.logits = torch.nn.Parameter(
            torch.linspace(-0.5, 0.5, count, dtype=DTYPE))

    def forward(self) -> Tensor:
        return torch.softmax(self.logits, 0)


class Lower(ImplicitProblem):
    """``sum_i softmax(lam)_i ce_i(w) + mu/2 ||w||^2``; records random state and batch."""

    mu = 0.0

    def training_step(self, batch):
        self.log.append((torch.get_rng_state(), batch))
        loss = (self.weights() * module_ce(self.module, batch)).sum()
        if self.mu:
            loss = loss + 0.5 * self.mu * sum(p.pow(2).sum() for p in self.module.parameters())
        return loss


class IterativeLower(IterativeProblem):
    log: list
    mu = 0.0
    training_step = Lower.training_step


class Upper(ImplicitProblem):
    """Mean validation cross-entropy; records the lower's parameters and the random state
    before and after its forward (a hop starts from the latter), and its gradient."""

    def training_step(self, batch):
        self.w_at = {n: p.detach().clone() for n, p in self.lm.module.named_parameters()}
        self.rng_before = torch.get_rng_state()
        loss = module_ce(self.lm.module, batch).mean()
        self.rng_after = torch.get_rng_state()
        return loss

    def grad_callback(self, grads):
        self.seen.append(torch.cat([g.reshape(-1) for g in grads]))


def program(lower_cls, config: Config, upper_config: Config, *, steps: int, mu: float = 0.0,
            lr: float = LR):
    model = tiny_gpt2()
    weights = SequenceWeights(len(TRAIN)).to(DTYPE)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=MOMENTUM)
    lm = lower_cls("lm", config, model, optimizer, train_data_loader=[TRAIN])
    lm.log, lm.mu = [], mu
    upper = Upper("weights", upper_config, weights,
                  torch.optim.SGD(weights.parameters(), lr=0.0), train_data_loader=[VAL])
    upper.seen = []
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    engine = Engine([lm, upper], EngineConfig(train_iters=steps, progress_bar=False),
                    {"u2l": {upper: [lm]}, "l2u": {lm: [upper]}})
    return engine, lm, upper, model, weights, start


# -- the references ---------------------------------------------------------------------------
def lower_loss(model, params, lam: Tensor, batch: Tensor, mu: float) -> Tensor:
    loss = (torch.softmax(lam, 0) * functional_ce(model, params, batch)).sum()
    return loss + 0.5 * mu * sum(p.pow(2).sum() for p in params.values()) if mu else loss


def val_gradient(model, params: dict[str, Tensor], rng: Tensor) -> list[Tensor]:
    torch.set_rng_state(rng)
    w = {n: p.clone().requires_grad_() for n, p in params.items()}
    return list(torch.autograd.grad(functional_ce(model, w, VAL).mean(), list(w.values())))


def upper_grad_at(model, params, lam, rng, mu) -> Tensor:
    torch.set_rng_state(rng)
    lam = lam.clone().requires_grad_()
    return torch.autograd.grad(lower_loss(model, params, lam, TRAIN, mu), lam)[0]


def central_difference(model, w, lam, x: list[Tensor], radius: float, rng, mu) -> Tensor:
    eps = radius / torch.cat([t.reshape(-1) for t in x]).norm()
    shifted = [{n: p + s * eps * d for (n, p), d in zip(w.items(), x)} for s in (1, -1)]
    plus, minus = (upper_grad_at(model, p, lam, rng, mu) for p in shifted)
    return -(plus - minus) / (2 * eps)


def dense_hessian_and_mixed(model, w, lam, rng, mu) -> tuple[Tensor, Tensor, Tensor]:
    """``H = d2L/dw2`` (dense, by one Hessian-vector product per coordinate), the flat ``w``
    and a function of ``x`` giving ``d/dlam <dL/dw, x>`` (one forward, same masks)."""
    names, shapes = list(w), [p.shape for p in w.values()]
    flat = torch.cat([p.reshape(-1) for p in w.values()]).requires_grad_()
    lam = lam.clone().requires_grad_()

    def unflat(v: Tensor) -> dict[str, Tensor]:
        return dict(zip(names, (t.reshape(s) for t, s in zip(
            torch.split(v, [math.prod(s) for s in shapes]), shapes))))

    torch.set_rng_state(rng)
    g = torch.autograd.grad(lower_loss(model, unflat(flat), lam, TRAIN, mu), flat,
                            create_graph=True)[0]
    eye = torch.eye(len(flat), dtype=DTYPE)
    h = torch.stack([torch.autograd.grad(g, flat, e, retain_graph=True)[0] for e in eye])
    return h, g, lam


def implicit_reference(model, w, lam, v: Tensor, rng, mu) -> tuple[Tensor, Tensor]:
    h, g, lam_leaf = dense_hessian_and_mixed(model, w, lam, rng, mu)
    x = torch.linalg.solve(h, v)
    return -torch.autograd.grad(g, lam_leaf, x)[0], torch.linalg.eigvalsh(h)


def flat(tensors) -> Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


# -- tests ------------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["darts", "sama"])
def test_first_order_methods_match_the_central_difference(method):
    radius = 0.02
    settings = {"darts": {"darts_alpha": radius}, "sama": {"sama_adam_alpha": radius}}[method]
    engine, lm, upper, model, weights, _ = program(
        Lower, Config(type=method, **settings), Config(), steps=2)
    assert_tied_once(model, lm, lm.optimizer)
    engine.run()
    assert len(upper.seen) == 2  # the lower stepped with lr > 0 before each upper step
    v = val_gradient(model, upper.w_at, upper.rng_before)
    x = v if method == "darts" else [LR * t for t in v]  # P = lr: SGD momentum after step 1
    expected = central_difference(model, upper.w_at, weights.logits.detach(), x, radius,
                                  upper.rng_after, 0.0)
    assert rel_err(upper.seen[-1], expected) < 1e-8
    assert model.lm_head.weight is model.transformer.wte.weight


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cg", "neumann"])
def test_converged_solvers_match_the_dense_implicit_hypergradient(method):
    # The LM loss alone has Hessian eigenvalues in about [-5, 16] here: mu = 10 makes H
    # positive definite (checked on the reference's H) with a condition number near 5, so 60
    # CG steps or 250 Neumann terms (alpha = 1 / 30) converge to round-off.
    settings = ({"cg_iterations": 60} if method == "cg" else
                {"neumann_alpha": 1 / 30, "neumann_iterations": 250})
    engine, lm, upper, model, weights, _ = program(
        Lower, Config(type=method, **settings), Config(), steps=1, mu=10.0)
    engine.run()
    v = flat(val_gradient(model, upper.w_at, upper.rng_before))
    expected, eigenvalues = implicit_reference(model, upper.w_at, weights.logits.detach(), v,
                                               upper.rng_after, 10.0)
    assert 2.0 < eigenvalues[0] and eigenvalues[-1] < 30.0
    assert rel_err(upper.seen[-1], expected) < 1e-8


def test_reverse_mode_through_an_iterative_gpt2_matches_a_hand_unroll():
    steps = 3
    engine, lm, upper, model, weights, start = program(
        IterativeLower, Config(unroll_steps=steps), Config(first_order=False), steps=steps,
        lr=0.1)
    assert_tied_once(model, lm, lm.optimizer)
    engine.run()
    assert len(upper.seen) == 1 and len(lm.log) == steps
    lam = weights.logits.detach().clone().requires_grad_()
    w = {n: p.clone().requires_grad_() for n, p in start.items()}
    buffers: list[Tensor] | None = None
    for rng, batch in lm.log:  # w <- w - lr * b, b <- momentum * b + g (torch.optim.SGD)
        torch.set_rng_state(rng)
        grads = torch.autograd.grad(lower_loss(model, w, lam, batch, 0.0), list(w.values()),
                                    create_graph=True)
        buffers = list(grads) if buffers is None else [
            MOMENTUM * b + g for b, g in zip(buffers, grads)]
        w = {n: p - 0.1 * b for (n, p), b in zip(w.items(), buffers)}
    torch.set_rng_state(upper.rng_before)
    expected = torch.autograd.grad(functional_ce(model, w, VAL).mean(), lam)[0]
    assert rel_err(upper.seen[0], expected) < 1e-10
    # the window's values were written back to the one tied parameter
    assert model.lm_head.weight is model.transformer.wte.weight
    for (n, p), ref in zip(model.named_parameters(), w.values()):
        assert torch.allclose(p, ref, rtol=0, atol=1e-12), n


class TaskLM(TaskBatchedProblem):
    """One task's support loss; ``forward`` gives one task's query loss (vmapped)."""

    def initial_parameters(self):
        return self.meta.module

    def training_step(self, batch):
        return module_ce(self.module, batch).mean()

    def forward(self, x):
        return module_ce(self.module, x).mean()


class Meta(ImplicitProblem):
    def training_step(self, batch):
        return self.inner(batch).mean()

    def grad_callback(self, grads):
        self.seen.append([g.clone() for g in grads])


def test_task_batched_maml_on_gpt2_matches_per_task_loops():
    tasks, inner_steps, inner_lr = 2, 2, 0.3
    support = torch.stack([sequences(3, 10 + t) for t in range(tasks)])
    query = torch.stack([sequences(2, 20 + t) for t in range(tasks)])
    # eager attention: torch has no vmap rule for the CPU sdpa kernel (slow fallback, warning)
    theta, adapted = (tiny_gpt2(dropout=0.0, seed=s, attention="eager") for s in (1, 2))
    inner = TaskLM("inner", Config(unroll_steps=inner_steps), adapted,
                   torch.optim.SGD(adapted.parameters(), lr=inner_lr),
                   train_data_loader=[support])
    meta = Meta("meta", Config(first_order=False), theta,
                torch.optim.SGD(theta.parameters(), lr=0.0), train_data_loader=[query])
    meta.seen = []
    assert_tied_once(theta, meta, meta.optimizer)
    Engine([meta, inner], EngineConfig(train_iters=inner_steps, progress_bar=False),
           {"u2l": {meta: [inner]}, "l2u": {inner: [meta]}}).run()
    assert len(meta.seen) == 1
    params = {n: p.detach().clone().requires_grad_() for n, p in theta.named_parameters()}
    total = 0.0
    for t in range(tasks):
        w = dict(params)
        for _ in range(inner_steps):
            grads = torch.autograd.grad(functional_ce(theta, w, support[t]).mean(),
                                        list(w.values()), create_graph=True)
            w = {n: p - inner_lr * g for (n, p), g in zip(w.items(), grads)}
        total = total + functional_ce(theta, w, query[t]).mean()
    expected = torch.autograd.grad(total / tasks, list(params.values()))
    names = list(params)
    for name, got, ref in zip(names, meta.seen[0], expected):
        assert rel_err(got, ref) < 1e-9, name
    wte = names.index("transformer.wte.weight")  # embedding + output layer: both uses summed
    assert rel_err(meta.seen[0][wte], expected[wte]) < 1e-9
