"""Task batching (`TaskBatchedProblem`): one vmapped inner loop equals T sequential ones
(the hand-written loop in unrolled.py), in float64; checkpoints, dropout, bf16, errors.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from unrolled import (
    DT,
    EXACT,
    META_LR,
    QUERY,
    TASKS,
    Adapt,
    Hyper,
    Meta,
    adam,
    bn_net,
    maml,
    mlp,
    mlp_apply,
    rel_err,
    sequential_maml,
    sgd_momentum,
    task_sets,
    weights,
)

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import ConfigError, ProblemDefinitionError, TrainingError
from betty.problems import TaskBatchedProblem


@pytest.mark.parametrize("name", ["sgd_momentum", "adam"])
def test_task_batched_maml_matches_sequential_loops(name):
    if name == "sgd_momentum":
        def make(net):
            return torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5)
        rule = sgd_momentum(0.3, 0.5, 0.0)
    else:
        def make(net):
            return torch.optim.Adam(net.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-3)
        rule = adam(0.05, 0.8, 0.9, 1e-3)
    engine, meta, adapt = maml(make, unroll=3, windows=2)
    engine.run()
    expected, adapted = sequential_maml(rule, unroll=3, windows=2)
    assert len(meta.record) == 2
    for got, want in zip(meta.record, expected):
        assert rel_err(got, want) < EXACT
    got = adapt.adapted_parameters()
    assert list(got) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert got["0.weight"].shape == (TASKS, 4, 3)
    assert rel_err(list(got.values()), adapted) < EXACT
    assert not adapt.optimizer.state  # each window starts every task afresh


class MicroAdapt(Adapt):
    """Two micro-batches per update: the support points 0, 2, 4, then 1, 3."""

    def get_batch(self):
        j = (self.count - 1) % 2
        return self.tasks[0][:, j::2], self.tasks[1][:, j::2]

    def training_step(self, batch):
        x, y = batch
        return F.mse_loss(self.module(x), y)


@pytest.mark.parametrize("clip", [0.0, 0.5])
def test_task_batched_accumulation_and_per_task_clipping(clip):
    """gradient_accumulation=2 over two different micro-batches and gradient_clipping by each
    task's own norm, differentiated through: the sequential per-task loops doing the same."""
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.3, momentum=0.5)
    engine, meta, adapt = maml(make, unroll=3, windows=2, adapt_cls=MicroAdapt, micro=2,
                               clip=clip)
    grads_seen = []
    adapt.grad_callback = lambda grads: grads_seen.append([g.detach() for g in grads])
    engine.run()
    rule = sgd_momentum(0.3, 0.5, 0.0)
    expected, adapted = sequential_maml(rule, unroll=3, windows=2, micro=2, clip=clip)
    assert len(meta.record) == 2 and len(grads_seen) == 12  # once per micro-batch, unclipped
    for got, want in zip(meta.record, expected):
        assert rel_err(got, want) < EXACT
    assert rel_err(list(adapt.adapted_parameters().values()), adapted) < EXACT
    if clip:  # per-task norms of each step's summed micro-batches: some above c, some below
        steps = [[a + b for a, b in zip(first, second)]
                 for first, second in zip(grads_seen[::2], grads_seen[1::2])]
        norms = torch.stack([torch.sqrt(sum(g.reshape(TASKS, -1).square().sum(1) for g in step))
                             for step in steps])
        assert (norms > 1.01 * clip).sum() >= 3
        assert (norms < 0.99 * clip).sum() >= 3
        whole, _ = sequential_maml(rule, unroll=3, windows=2, micro=2)
        assert rel_err(meta.record[0], whole[0]) > 1e-4  # the test can tell
    else:
        one, _ = sequential_maml(rule, unroll=3, windows=2)  # the whole support at once
        assert rel_err(meta.record[0], one[0]) > 1e-4  # the two halves are not the mean


class IndexedAdapt(Adapt):
    """Tasks chosen by the window index (the local step count is checkpointed)."""

    def on_inner_loop_start(self):
        self.tasks = self.sets[self.count // self.config.unroll_steps]


def _indexed_maml(windows: int, **engine: object) -> tuple[Engine, Meta, IndexedAdapt]:
    meta_net, template = mlp(0), mlp(1)
    meta = Meta("meta", Config(first_order=False), module=meta_net,
                optimizer=torch.optim.Adam(meta_net.parameters(), lr=0.05))
    meta.record = []
    adapt = IndexedAdapt("adapt", Config(unroll_steps=2), module=template,
                         optimizer=torch.optim.SGD(template.parameters(), lr=0.3, momentum=0.5))
    adapt.sets = task_sets(5, 4)
    program = Engine([meta, adapt], EngineConfig(train_iters=2 * windows, **engine),
                     {"u2l": {meta: [adapt]}, "l2u": {adapt: [meta]}})
    return program, meta, adapt


def test_task_batched_checkpoint_resumes_bitwise(tmp_path):
    """Saved between windows, a task-batched program resumes bitwise (meta Adam state
    included); mid-window, the periodic checkpoint waits for the window's end."""
    whole, meta, adapt = _indexed_maml(4)
    whole.run()
    first, _, _ = _indexed_maml(3, checkpoint_dir=str(tmp_path), checkpoint_step=3)
    first.run()  # step 3 is mid-window: saved at step 4 instead (and at step 6)
    assert sorted(os.listdir(tmp_path)) == ["step_00000004.pt", "step_00000006.pt"]
    resumed, meta2, adapt2 = _indexed_maml(4)
    resumed.load_checkpoint(tmp_path / "step_00000004.pt")
    resumed.run()
    for a, b in zip(meta.module.parameters(), meta2.module.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(adapt.adapted_parameters().values(), adapt2.adapted_parameters().values()):
        assert torch.equal(a, b)
    assert torch.equal(meta.optimizer.state_dict()["state"][0]["exp_avg"],
                       meta2.optimizer.state_dict()["state"][0]["exp_avg"])


def test_adapt_evaluates_new_tasks_and_keeps_buffers_per_task():
    """`adapt` (e.g. in validation) without a graph; BatchNorm statistics per task."""
    net = bn_net()
    problem = Adapt("adapt", Config(unroll_steps=2), module=net,
                    optimizer=torch.optim.SGD(net.parameters(), lr=0.2))
    problem.initial_parameters = lambda: None  # start from its own module
    lead = Hyper()
    meta = Meta("meta", Config(first_order=False), module=lead,
                optimizer=torch.optim.SGD(lead.parameters(), lr=0.1))
    Engine([meta, problem], EngineConfig(train_iters=0),
           {"u2l": {meta: [problem]}, "l2u": {problem: [meta]}})
    xs, ys, xq, _ = task_sets(4, 1)[0]
    with torch.no_grad():
        adapted = problem.adapt((xs, ys), steps=3)
        net.eval()
        out = problem(xq)
        net.train()
    assert out.shape == (TASKS, QUERY, 1) and not out.requires_grad
    for t in range(TASKS):  # plain torch: a copy of the module trained on task t alone
        plain = copy.deepcopy(net)
        opt = torch.optim.SGD(plain.parameters(), lr=0.2)
        for _ in range(3):
            opt.zero_grad()
            F.mse_loss(plain(xs[t]), ys[t]).backward()
            opt.step()
        for name, p in plain.named_parameters():
            assert torch.allclose(adapted[name][t], p, rtol=1e-12, atol=1e-14)
        plain.eval()
        assert torch.allclose(out[t], plain(xq[t]), rtol=1e-12, atol=1e-14)  # running stats
    assert int(net[1].num_batches_tracked) == 0  # the module's own buffers are untouched


def test_task_batched_dropout_draws_different_masks_per_task_reproducibly():
    """nn.Dropout inside the vmapped window (vmap randomness='different'): T copies of the
    SAME task adapt differently (each task draws its own masks), and the same seed gives
    the same meta-gradient and adapted parameters bit for bit."""
    def run(seed: int) -> tuple[list[Tensor], list[Tensor]]:
        torch.manual_seed(0)
        meta_net = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Dropout(0.5),
                                 nn.Linear(8, 1)).to(DT)
        template = copy.deepcopy(meta_net)
        meta = Meta("meta", Config(first_order=False), module=meta_net,
                    optimizer=torch.optim.SGD(meta_net.parameters(), lr=META_LR))
        meta.record = []
        adapt = Adapt("adapt", Config(unroll_steps=2), module=template,
                      optimizer=torch.optim.SGD(template.parameters(), lr=0.3))
        one = task_sets(3, 1)[0]
        adapt.sampler = iter([tuple(t[:1].expand_as(t).clone() for t in one)])  # T x task 0
        engine = Engine([meta, adapt], EngineConfig(train_iters=2),
                        {"u2l": {meta: [adapt]}, "l2u": {adapt: [meta]}})
        torch.manual_seed(seed)
        engine.run()
        return meta.record[0], [a.detach() for a in adapt.adapted_parameters().values()]

    grads, adapted = run(7)
    first = adapted[0]  # [T, 8, 3]
    for t in range(1, TASKS):
        assert (first[t] - first[0]).abs().max() > 1e-6, "tasks drew the same masks"
    again_grads, again_adapted = run(7)
    assert all(torch.equal(a, b) for a, b in zip(grads, again_grads))
    assert all(torch.equal(a, b) for a, b in zip(adapted, again_adapted))
    other_grads, _ = run(8)
    assert not all(torch.equal(a, b) for a, b in zip(grads, other_grads))


def test_task_batched_bf16_meta_gradient_is_close_to_fp32():
    """precision='bf16' on both levels of a task-batched MAML program (float32 modules):
    autocast reaches the vmapped forward (its matmuls run in bfloat16: the meta-gradient
    moves by far more than float32 round-off) and the meta-gradient of the second
    meta-step lies within 5% of the fp32 one (1.6% measured)."""
    def run(precision: str) -> Tensor:
        torch.manual_seed(0)
        meta_net = nn.Sequential(nn.Linear(3, 16), nn.Tanh(), nn.Linear(16, 1))
        template = copy.deepcopy(meta_net)
        meta = Meta("meta", Config(first_order=False, precision=precision), module=meta_net,
                    optimizer=torch.optim.SGD(meta_net.parameters(), lr=META_LR))
        meta.record = []
        adapt = Adapt("adapt", Config(unroll_steps=3, precision=precision), module=template,
                      optimizer=torch.optim.SGD(template.parameters(), lr=0.3))
        adapt.sampler = iter([tuple(t.float() for t in s) for s in task_sets(3, 2)])
        Engine([meta, adapt], EngineConfig(train_iters=6),
               {"u2l": {meta: [adapt]}, "l2u": {adapt: [meta]}}).run()
        assert all(g.dtype == torch.float32 for g in meta.record[1])
        assert {p.dtype for p in template.parameters()} == {torch.float32}
        return torch.cat([g.reshape(-1) for g in meta.record[1]])

    exact, half = run("fp32"), run("bf16")
    assert 1e-3 < rel_err([half], [exact]) < 0.05


class ScaledAdapt(TaskBatchedProblem):
    def get_batch(self):
        return self.batch

    def training_step(self, batch):
        x, y, scale = batch  # `scale` is a Python float: shared by the tasks, not vmapped
        loss = scale * F.mse_loss(self.module(x), y)
        return {"loss": loss, "scaled_twice": 2 * loss}


def test_task_batch_with_non_tensor_leaves_and_logged_extras():
    """Non-tensor leaves of a stacked batch reach every task unchanged; each task's gradient
    is its own (the backward of the summed task losses), and dict entries are task means."""
    net = mlp(2)
    problem = ScaledAdapt("adapt", Config(unroll_steps=2), module=net,
                          optimizer=torch.optim.SGD(net.parameters(), lr=0.3))
    lead = Hyper()
    meta = Meta("meta", Config(first_order=False), module=lead,
                optimizer=torch.optim.SGD(lead.parameters(), lr=0.1))
    Engine([meta, problem], EngineConfig(train_iters=0),
           {"u2l": {meta: [problem]}, "l2u": {problem: [meta]}})
    xs, ys, _, _ = task_sets(5, 1)[0]
    w = [p.detach().clone() for p in weights(net)]
    with torch.no_grad():
        adapted = list(problem.adapt((xs, ys, 0.25), steps=1).values())
    grads = [(p - a) / 0.3 for p, a in zip(w, adapted)]  # one SGD step: w - 0.3 g
    problem._start(TASKS)
    logged = problem._window_gradients((xs, ys, 0.25), create_graph=False)[1]
    losses = []
    for t in range(TASKS):
        wt = [p.clone().requires_grad_() for p in w]
        loss = 0.25 * F.mse_loss(mlp_apply(wt, xs[t]), ys[t])
        losses.append(loss.detach())
        for g, want in zip(grads, torch.autograd.grad(loss, wt)):
            assert torch.allclose(g[t], want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(logged["loss"], torch.stack(losses).mean(), rtol=1e-12)
    assert torch.allclose(logged["scaled_twice"], 2 * torch.stack(losses).mean(), rtol=1e-12)


def test_task_batched_program_errors_before_training():
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.1)
    meta_net, template = mlp(0), mlp(1)
    meta = Meta("meta", Config(first_order=True), module=meta_net,
                optimizer=torch.optim.SGD(meta_net.parameters(), lr=META_LR))
    adapt = Adapt("adapt", Config(unroll_steps=2), module=template, optimizer=make(template))
    with pytest.raises(ConfigError, match=r"'adapt'.*first_order=False"):
        Engine([meta, adapt], EngineConfig(train_iters=2),
               {"u2l": {meta: [adapt]}, "l2u": {adapt: [meta]}})
    meta = Meta("meta", Config(first_order=False), module=bn_net(),  # another architecture
                optimizer=torch.optim.SGD(meta_net.parameters(), lr=META_LR))
    adapt = Adapt("adapt", Config(unroll_steps=2), module=template, optimizer=make(template))
    with pytest.raises(ProblemDefinitionError, match=r"'adapt'.*initial_parameters\(\)"):
        Engine([meta, adapt], EngineConfig(train_iters=2),
               {"u2l": {meta: [adapt]}, "l2u": {adapt: [meta]}})


def test_task_batch_shapes_are_checked():
    def make(net):
        return torch.optim.SGD(net.parameters(), lr=0.1)
    engine, _, adapt = maml(make, unroll=2, windows=1)
    xs, ys, xq, yq = task_sets(3, 1)[0]
    adapt.sampler = iter([(xs, ys[:3], xq, yq)])
    shapes = r"\(4, 5, 3\), \(3, 5, 1\)"
    with pytest.raises(TrainingError, match=rf"'adapt'.*leading dimension T.*{shapes}"):
        engine.run()
