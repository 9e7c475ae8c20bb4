"""`Problem`: constructor arguments and configure_* hooks, data loading, the loss dict and
logging, modes, state round trips, the user's optimizer and param groups, and the hooks of a
local step (on_inner_loop_start, grad_callback, param_callback, epoch_callback)."""

from __future__ import annotations

import copy

import pytest
import torch

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem


class Linear(ImplicitProblem):
    """Least squares ``mean((x @ w - y)^2)`` on batches ``(x, y)``; records what it saw."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batches: list = []

    def training_step(self, batch):
        self.batches.append(batch)
        x, y = batch
        return ((self.module(x).squeeze(-1) - y) ** 2).mean()


def linear_module(n: int = 3, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Linear(n, 1, bias=False)


def batches(k: int, n: int = 3, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, n, generator=g), torch.randn(4, generator=g)) for _ in range(k)]


def single(problem, config: EngineConfig | None = None, engine_type=Engine) -> Engine:
    return engine_type([problem], config or EngineConfig(train_iters=1))


def step(engine: Engine, n: int = 1) -> None:
    for _ in range(n):
        engine.global_step += 1
        engine.train_step()


# -- constructor arguments vs configure_* hooks ------------------------------------------
def test_everything_from_hooks():
    made = {}

    class Hooked(Linear):
        def configure_module(self):
            made["module"] = linear_module()
            return made["module"]

        def configure_optimizer(self):
            # the module is resolved before the optimizer hook runs
            made["optimizer"] = torch.optim.SGD(self.module.parameters(), lr=0.1)
            return made["optimizer"]

        def configure_scheduler(self):
            made["scheduler"] = torch.optim.lr_scheduler.StepLR(self.optimizer, 1, gamma=0.5)
            return made["scheduler"]

        def configure_train_data_loader(self):
            made["loader"] = batches(2)
            return made["loader"]

    p = Hooked("p")
    engine = single(p)
    assert p.module is made["module"]
    assert p.optimizer is made["optimizer"]
    assert p.scheduler is made["scheduler"]
    step(engine, 3)
    assert p.batches[0][0] is made["loader"][0][0] and p.batches[2][0] is made["loader"][0][0]
    assert p.optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5 ** 3)


def test_constructor_arguments_without_hooks():
    module = linear_module()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2, gamma=0.1)
    loader = batches(3)
    p = Linear("p", module=module, optimizer=optimizer, scheduler=scheduler,
               train_data_loader=loader, extra_config={"tag": 7})
    assert p.config == Config() and p.cfg == {"tag": 7}
    engine = single(p)
    assert (p.module, p.optimizer, p.scheduler) == (module, optimizer, scheduler)
    step(engine, 4)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.1 ** 2)
    assert [b[0] is loader[i % 3][0] for i, b in enumerate(p.batches)] == [True] * 4


def test_hook_result_wins_over_constructor_argument():
    given, hooked = linear_module(seed=1), linear_module(seed=2)

    class Hooked(Linear):
        def configure_module(self):
            return hooked

        def configure_optimizer(self):
            return torch.optim.SGD(self.module.parameters(), lr=0.1)

    p = Hooked("p", module=given, train_data_loader=batches(1))
    single(p)
    assert p.module is hooked


def test_setters_before_engine():
    p = Linear("p")
    module = linear_module()
    p.set_module(module)
    p.set_optimizer(torch.optim.SGD(module.parameters(), lr=0.1))
    p.set_train_data_loader(batches(2))
    engine = single(p)
    step(engine, 2)
    assert p.count == 2


def test_set_train_data_loader_after_engine():
    p = Linear("p", module=linear_module(), train_data_loader=batches(2, seed=1))
    p.set_optimizer(torch.optim.SGD(p.module.parameters(), lr=0.1))
    engine = single(p)
    new = batches(1, seed=5)
    p.set_train_data_loader(new)
    step(engine, 2)
    assert p.batches[0][0] is new[0][0] and p.batches[1][1] is new[0][1]


# -- data ------------------------------------------------------------------------------
class Recording(ImplicitProblem):
    """Records each batch and the count at each epoch_callback; loss ignores the batch."""

    def __init__(self, *args, **kwargs) -> None:
        module = torch.nn.Linear(1, 1)
        super().__init__(*args, module=module,
                         optimizer=torch.optim.SGD(module.parameters(), lr=0.0), **kwargs)
        self.batches: list = []
        self.epochs_at: list[int] = []

    def training_step(self, batch):
        self.batches.append(batch)
        return self.module.weight.sum() ** 2

    def epoch_callback(self):
        self.epochs_at.append(self.count)


def test_single_loader_restarts_and_epoch_callback():
    p = Recording("p", train_data_loader=["a", "b", "c"])
    engine = single(p)
    step(engine, 8)
    assert p.batches == ["a", "b", "c", "a", "b", "c", "a", "b"]
    # exhausted while drawing the batch of local steps 4 and 7
    assert p.epochs_at == [4, 7]


def test_tuple_of_loaders_gives_tuple_of_batches():
    first, second = ["a", "b", "c"], [10, 20]
    p = Recording("p", train_data_loader=(first, second))
    engine = single(p)
    step(engine, 7)
    assert p.batches == [("a", 10), ("b", 20), ("c", 10), ("a", 20), ("b", 10), ("c", 20),
                         ("a", 10)]
    # epoch_callback follows the first loader only
    assert p.epochs_at == [4, 7]


def test_dataloader_and_tensor_batches():
    data = torch.utils.data.TensorDataset(torch.arange(6.0).unsqueeze(1), torch.arange(6.0))
    loader = torch.utils.data.DataLoader(data, batch_size=4)  # batches of 4 and 2
    p = Recording("p", train_data_loader=loader)
    engine = single(p)
    step(engine, 3)
    assert [len(b[1]) for b in p.batches] == [4, 2, 4]
    torch.testing.assert_close(p.batches[2][1], torch.arange(4.0))
    assert p.epochs_at == [3]


def test_generator_function_iterable_restarts():
    class Counting:
        def __init__(self) -> None:
            self.iterations = 0

        def __iter__(self):
            self.iterations += 1
            yield from (1, 2)

    loader = Counting()
    p = Recording("p", train_data_loader=loader)
    engine = single(p)
    step(engine, 5)
    assert p.batches == [1, 2, 1, 2, 1]
    assert loader.iterations == 3 and p.epochs_at == [3, 5]


def test_get_batch_override_without_loader():
    class Generated(ImplicitProblem):
        def get_batch(self):
            return torch.full((2,), float(self.count))

        def training_step(self, batch):
            self.seen = getattr(self, "seen", []) + [batch.clone()]
            return ((self.module.weight.squeeze() - batch) ** 2).sum()

    module = torch.nn.Linear(2, 1, bias=False)
    p = Generated("p", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1))
    engine = single(p)
    step(engine, 3)
    assert [float(b[0]) for b in p.seen] == [1.0, 2.0, 3.0]
    assert torch.equal(p.cur_batch, p.seen[-1])


# -- the loss dict and logging ------------------------------------------------------------
class DictLoss(ImplicitProblem):
    def training_step(self, batch):
        loss = (self.module.weight.sum() - batch) ** 2
        return {"loss": loss, "acc": 0.25 * self.count, "extra": torch.tensor(2.0)}


def _dict_problem(config: Config) -> DictLoss:
    module = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(module.weight, 3.0)
    return DictLoss("dl", config, module=module,
                    optimizer=torch.optim.SGD(module.parameters(), lr=0.0),
                    train_data_loader=[torch.tensor(1.0)])


def test_dict_loss_logged_every_log_step(monkeypatch):
    p = _dict_problem(Config(log_step=2))
    engine = single(p)
    calls = []
    monkeypatch.setattr(engine, "log_metrics",
                        lambda name, metrics, step: calls.append((name, step, metrics)))
    for s in range(1, 6):
        engine.global_step = 10 * s  # distinguishes global from local steps
        engine.train_step()
    assert [(name, step) for name, step, _ in calls] == [("dl", 20), ("dl", 40)]
    metrics = calls[1][2]
    assert set(metrics) == {"loss", "acc", "extra"}
    assert float(metrics["loss"].detach()) == pytest.approx(4.0)  # (3 - 1)^2
    assert metrics["acc"] == 1.0 and float(metrics["extra"]) == 2.0


def test_log_local_step(monkeypatch):
    p = _dict_problem(Config(log_step=3, log_local_step=True))
    engine = single(p)
    calls = []
    monkeypatch.setattr(engine, "log_metrics",
                        lambda name, metrics, step: calls.append(step))
    engine.global_step = 100
    for _ in range(7):
        engine.train_step()
    assert calls == [3, 6]


def test_no_logging_by_default(monkeypatch):
    p = _dict_problem(Config())
    engine = single(p)
    calls = []
    monkeypatch.setattr(engine, "log_metrics", lambda *a: calls.append(a))
    step(engine, 4)
    assert calls == []


def test_scalar_loss_is_logged_as_loss(monkeypatch):
    p = Linear("p", Config(log_step=1), module=linear_module(),
               train_data_loader=batches(1))
    p.set_optimizer(torch.optim.SGD(p.module.parameters(), lr=0.0))
    engine = single(p)
    calls = []
    monkeypatch.setattr(engine, "log_metrics", lambda name, m, step: calls.append(m))
    step(engine, 1)
    x, y = batches(1)[0]
    expected = ((x @ p.module.weight.detach().T).squeeze(-1) - y).pow(2).mean()
    assert list(calls[0]) == ["loss"]
    torch.testing.assert_close(calls[0]["loss"].detach(), expected)


# -- modes ---------------------------------------------------------------------------------
def test_train_and_eval_modes():
    module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    p = Linear("p", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
               train_data_loader=batches(1))
    engine = single(p)
    p.eval()
    assert not module.training and not module[1].training
    p.train()
    assert module.training and module[1].training
    engine.eval()
    assert not module.training
    engine.train()
    assert module.training


# -- state -------------------------------------------------------------------------------
def _stateful(seed: int = 0) -> Linear:
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4),
                                 torch.nn.Linear(4, 1))
    optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    return Linear("p", module=module, optimizer=optimizer, scheduler=scheduler,
                  train_data_loader=batches(1, seed=seed))


def test_state_dict_round_trip_resumes_exactly():
    p = _stateful()
    engine = single(p)
    step(engine, 3)
    saved = copy.deepcopy(p.state_dict())
    assert saved["count"] == 3
    step(engine, 4)
    reference = [t.detach().clone() for t in p.module.state_dict().values()]
    reference_lr = p.optimizer.param_groups[0]["lr"]

    p.load_state_dict(saved)
    assert p.count == 3
    assert p.scheduler.last_epoch == 3
    assert p.optimizer.state_dict()["state"][0]["step"] == 3
    for key, value in saved["module"].items():
        torch.testing.assert_close(p.module.state_dict()[key], value, rtol=0, atol=0)
    step(engine, 4)
    assert p.count == 7
    assert p.optimizer.param_groups[0]["lr"] == reference_lr
    for got, want in zip(p.module.state_dict().values(), reference):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_state_dict_into_a_fresh_problem():
    p = _stateful()
    step(single(p), 5)
    q = _stateful()
    single(q)
    q.load_state_dict(copy.deepcopy(p.state_dict()))
    assert q.count == 5
    assert q.scheduler.state_dict() == p.scheduler.state_dict()
    for a, b in zip(q.module.state_dict().values(), p.module.state_dict().values()):
        assert torch.equal(a, b)


# -- the user's optimizer and param groups ------------------------------------------------
def test_user_optimizer_object_and_per_group_lr():
    module = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD([
        {"params": [module.weight], "lr": 0.1},
        {"params": [module.bias], "lr": 0.01},
    ])
    groups = optimizer.param_groups
    p = Linear("p", module=module, optimizer=optimizer, train_data_loader=batches(1))
    engine = single(p)
    assert p.optimizer is optimizer and p.optimizer.param_groups is groups
    assert [g["lr"] for g in optimizer.param_groups] == [0.1, 0.01]

    x, y = batches(1)[0]
    w, b = module.weight.detach().clone(), module.bias.detach().clone()
    residual = (x @ w.T).squeeze(-1) + b - y  # d/dw mean(r^2) = 2 mean(r x)
    grad_w = (2 * residual.unsqueeze(1) * x).mean(0, keepdim=True)
    grad_b = 2 * residual.mean().reshape(1)
    step(engine, 1)
    torch.testing.assert_close(module.weight.detach(), w - 0.1 * grad_w)
    torch.testing.assert_close(module.bias.detach(), b - 0.01 * grad_b)


def test_optimizer_with_momentum_matches_torch():
    # The same data through the engine and through a plain torch loop: identical weights.
    def make():
        module = linear_module(seed=3)
        opt = torch.optim.SGD(module.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01,
                              nesterov=True)
        return module, opt

    data = batches(3)
    module, opt = make()
    p = Linear("p", module=module, optimizer=opt, train_data_loader=data)
    step(single(p), 6)
    ref, ref_opt = make()
    for i in range(6):
        x, y = data[i % 3]
        ref_opt.zero_grad()
        ((ref(x).squeeze(-1) - y) ** 2).mean().backward()
        ref_opt.step()
    torch.testing.assert_close(module.weight.detach(), ref.weight.detach())


def test_frozen_parameters_are_not_trained():
    module = torch.nn.Linear(3, 1)
    module.bias.requires_grad_(False)
    bias = module.bias.detach().clone()
    p = Linear("p", module=module, optimizer=torch.optim.SGD([module.weight], lr=0.1),
               train_data_loader=batches(1))
    assert p.trainable_parameters() == [module.weight]
    step(single(p), 2)
    assert torch.equal(module.bias.detach(), bias)


# -- hooks of a local step -----------------------------------------------------------------
class Hooks(ImplicitProblem):
    def __init__(self, *args, **kwargs) -> None:
        module = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(module.weight, 0.0)
        super().__init__(*args, module=module,
                         optimizer=torch.optim.SGD(module.parameters(), lr=1.0), **kwargs)
        self.starts: list[int] = []
        self.grads: list[float] = []
        self.params_after: list[float] = []

    def get_batch(self):
        return torch.tensor(5.0)

    def training_step(self, batch):
        return (self.module.weight.sum() - batch) ** 2

    def on_inner_loop_start(self):
        self.starts.append(self.count)

    def grad_callback(self, grads):
        self.grads.append(float(grads[0]))


def test_on_inner_loop_start_once_per_window():
    inner = Hooks("inner", Config(unroll_steps=3))
    outer = Hooks("outer")
    engine = Engine([outer, inner], dependencies={"l2u": {inner: [outer]}})
    step(engine, 9)
    assert inner.starts == [0, 3, 6]
    assert outer.starts == [0, 1, 2]


def test_on_inner_loop_start_with_accumulation():
    inner = Hooks("inner", Config(unroll_steps=2, gradient_accumulation=2))
    outer = Hooks("outer")
    engine = Engine([outer, inner], dependencies={"l2u": {inner: [outer]}})
    step(engine, 8)
    assert inner.starts == [0, 4]


def test_grad_callback_receives_this_steps_gradient():
    p = Hooks("p")
    engine = single(p)
    step(engine, 2)
    # w0 = 0: grad 2(0 - 5) = -10; w1 = 0 - 1.0 * -10 = 10: grad 2(10 - 5) = 10
    assert p.grads == [-10.0, 10.0]


def test_grad_callback_edits_gradients_in_place():
    class Halving(Hooks):
        def grad_callback(self, grads):
            grads[0].mul_(0.5)

    p = Halving("p")
    step(single(p), 1)
    assert p.module.weight.item() == pytest.approx(5.0)  # 0 - 1.0 * (0.5 * -10)


def test_param_callback_clamps_after_each_step():
    class Clamped(Hooks):
        def param_callback(self, params):
            self.params_after.append(params[0].item())
            for q in params:
                q.data.clamp_(max=2.0)

    p = Clamped("p")
    step(single(p), 3)
    # w: 0 -> 10 (clamped to 2) -> 2 - 2(2 - 5) = 8 (clamped to 2) -> 8 again
    assert p.params_after == [10.0, 8.0, 8.0]
    assert p.module.weight.item() == 2.0


def test_param_callback_not_called_while_accumulating():
    class Counting(Hooks):
        def param_callback(self):
            self.params_after.append(self.count)

    p = Counting("p", Config(gradient_accumulation=3))
    step(single(p), 7)
    assert p.params_after == [3, 6]


def test_custom_optimizer_step_replaces_optimizer():
    class Custom(Hooks):
        def custom_optimizer_step(self):
            with torch.no_grad():
                for q in self.trainable_parameters():
                    q -= 0.25 * q.grad

    p = Custom("p")
    step(single(p), 1)
    assert p.module.weight.item() == pytest.approx(2.5)  # 0 - 0.25 * -10


def test_gradient_clipping():
    p = Hooks("p", Config(gradient_clipping=1.0))
    step(single(p), 1)
    assert p.module.weight.item() == pytest.approx(1.0)  # |grad| 10 clipped to 1


def test_forward_and_problem_call():
    class Scaled(Hooks):
        def forward(self, x):
            return 3 * x

    a, b = Scaled("a"), Hooks("b")
    engine = Engine([a, b])
    assert float(b.a(torch.tensor(2.0))) == 6.0
    assert engine.a is a and engine.b is b and a.b is b
