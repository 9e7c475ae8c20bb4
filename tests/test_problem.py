"""`Problem`: constructor arguments and configure_* hooks, data loading, the loss dict and
logging, modes and state round trips. The user's optimizer and param groups and the hooks of a
local step are in test_problem_step.py."""

from __future__ import annotations

import copy

import pytest
import torch
from single_problem import Linear, batches, linear_module, single, step

from betty.configs import Config
from betty.problems import ImplicitProblem


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
