"""Bad programs fail with a clear message that names the problem: structural and definition
errors at Engine construction (before any training step), and the runtime errors (a loss
that is not a scalar or not finite, a hypergradient edge that carries nothing). That valid
programs with the default ``retain_graph=False`` never crash is in
test_default_retain_graph.py."""

from __future__ import annotations

import re

import pytest
import torch
from quad_problem import STEPS, Quad

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import (
    BettyError,
    ConfigError,
    DependencyError,
    HypergradientError,
    ProblemDefinitionError,
    TrainingError,
)
from betty.problems import ImplicitProblem, IterativeProblem


@pytest.fixture(autouse=True)
def _clear_steps():
    STEPS.clear()
    yield


def bilevel(inner_config: Config | None = None, outer_config: Config | None = None,
            inner_uses=("outer",), outer_uses=("inner",)):
    inner = Quad("inner", inner_config, uses=inner_uses)
    outer = Quad("outer", outer_config, uses=outer_uses)
    return inner, outer, {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}


def fails_before_training(error: type[Exception], match: str, *args, **kwargs):
    with pytest.raises(error, match=match) as info:
        Engine(*args, **kwargs)
    assert STEPS == []
    assert isinstance(info.value, BettyError)
    return str(info.value)


# -- structure -------------------------------------------------------------------------
def test_cycle():
    a, b, c = Quad("a"), Quad("b"), Quad("c")
    message = fails_before_training(DependencyError, "cycle", [a, b, c],
                                    dependencies={"l2u": {a: [b], b: [c], c: [a]}})
    assert "'a'" in message and "'b'" in message and "'c'" in message


def test_problem_missing_from_problems():
    inner, outer, deps = bilevel()
    fails_before_training(DependencyError, "'outer'.*not in the `problems`", [inner],
                          dependencies=deps)


def test_duplicate_names():
    fails_before_training(DependencyError, "two problems are named 'twin'",
                          [Quad("twin"), Quad("twin")])


def test_same_problem_twice():
    p = Quad("p")
    fails_before_training(DependencyError, "'p' appears twice", [p, p])


@pytest.mark.parametrize("name", ["module", "optimizer", "config", "count", "train", "eval",
                                  "step", "parents", "paths", "forward"])
def test_name_clashing_with_a_problem_attribute(name):
    fails_before_training(DependencyError, f"problem name '{name}' clashes",
                          [Quad("other"), Quad(name)])


@pytest.mark.parametrize("name", ["run", "train_step", "validation", "problems", "leaves",
                                  "logger", "global_step"])
def test_name_clashing_with_an_engine_attribute(name):
    fails_before_training(DependencyError, f"problem name '{name}' clashes with Engine",
                          [Quad(name)])


def test_name_must_be_an_identifier():
    with pytest.raises(ProblemDefinitionError, match="'my-problem'"):
        Quad("my-problem")


def test_u2l_without_l2u_path():
    inner, outer = Quad("inner"), Quad("outer")
    fails_before_training(DependencyError, "'outer' enters the loss of 'inner'.*l2u",
                          [inner, outer], dependencies={"u2l": {outer: [inner]}})


def test_not_a_problem():
    fails_before_training(DependencyError, "not a betty Problem",
                          [Quad("a"), torch.nn.Linear(1, 1)])


# -- configs -----------------------------------------------------------------------------
@pytest.mark.parametrize("field, value, choices", [
    ("type", "cgg", ["darts", "neumann", "cg"]),
    ("precision", "fp8", ["fp32", "fp16", "bf16"]),
])
def test_unknown_config_choice(field, value, choices):
    with pytest.raises(ConfigError, match=rf"Config\.{field}='{value}'") as info:
        Config(**{field: value})
    assert all(c in str(info.value) for c in choices)


@pytest.mark.parametrize("field, value, choices", [
    ("strategy", "tpu", ["default", "cpu", "gpu", "distributed", "zero", "fsdp"]),
    ("logger_type", "mlflow", ["none", "tensorboard", "wandb"]),
    ("early_stopping_mode", "avg", ["min", "max"]),
])
def test_unknown_engine_config_choice(field, value, choices):
    with pytest.raises(ConfigError, match=rf"EngineConfig\.{field}='{value}'") as info:
        EngineConfig(**{field: value})
    assert all(c in str(info.value) for c in choices)


@pytest.mark.parametrize("field, value", [("type", "cgg"), ("precision", "fp8"),
                                          ("unroll_steps", 0)])
def test_config_edited_after_construction_names_the_problem(field, value):
    inner, outer, deps = bilevel()
    setattr(inner.config, field, value)
    message = fails_before_training(ConfigError, rf"Config\.{field}", [outer, inner],
                                    dependencies=deps)
    assert "'inner'" in message


def test_engine_config_edited_after_construction():
    config = EngineConfig()
    config.strategy = "tpu"
    fails_before_training(ConfigError, "strategy='tpu'", [Quad("p")], config)


@pytest.mark.parametrize("field, value", [("unroll_steps", 0), ("gradient_accumulation", 0),
                                          ("warmup_steps", -1), ("log_step", 0),
                                          ("darts_alpha", 0.0), ("cg_iterations", 0)])
def test_bad_config_numbers(field, value):
    with pytest.raises(ConfigError, match=field):
        Config(**{field: value})


# -- problem definitions -----------------------------------------------------------------
def test_missing_training_step():
    class NoStep(ImplicitProblem):
        pass

    module = torch.nn.Linear(1, 1)
    p = NoStep("nostep", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=1),
               train_data_loader=[1])
    fails_before_training(ProblemDefinitionError, "'nostep'.*training_step", [Quad("a"), p])


@pytest.mark.parametrize("loader", [[], (), ([1], []), torch.utils.data.DataLoader([])])
def test_empty_data_loader(loader):
    p = Quad("empty", loader=loader)
    fails_before_training(ProblemDefinitionError, "'empty'.*(empty|no data)", [Quad("a"), p])


def test_empty_loader_without_length_fails_on_first_batch():
    class Nothing:
        def __iter__(self):
            return iter(())

    p = Quad("hollow", loader=Nothing())
    engine = Engine([p])
    with pytest.raises(ProblemDefinitionError, match="'hollow'.*no batch"):
        engine.train_step()


def test_iterator_loader_is_refused():
    p = Quad("once", loader=iter([torch.tensor(1.0)]))
    fails_before_training(ProblemDefinitionError, "'once'.*iterator", [p])


def test_no_data_at_all():
    p = Quad("nodata", loader=None)
    fails_before_training(ProblemDefinitionError, "'nodata' has no data", [p])


def test_no_module():
    p = Quad("nomodule", module=None, optimizer=None)
    fails_before_training(ProblemDefinitionError, "'nomodule' has no module", [p])


def test_no_optimizer():
    p = Quad("noopt", optimizer=None)
    fails_before_training(ProblemDefinitionError, "'noopt' has no optimizer", [p])


def test_first_order_false_above_implicit_problem():
    inner, outer, deps = bilevel(outer_config=Config(first_order=False))
    message = fails_before_training(ConfigError, "'outer'.*first_order=False",
                                    [outer, inner], dependencies=deps)
    assert "'inner'" in message and "IterativeProblem" in message


def test_first_order_false_below_the_top_is_checked_too():
    low, mid, top = Quad("low", uses=("mid",)), Quad("mid", Config(first_order=False),
                                                    uses=("low",)), Quad("top")
    deps = {"u2l": {mid: [low]}, "l2u": {low: [mid], mid: [top]}}
    fails_before_training(ConfigError, "'mid'.*'low'", [low, mid, top], dependencies=deps)


# -- runtime: the loss --------------------------------------------------------------------
def test_non_scalar_loss():
    class Wide(Quad):
        def training_step(self, batch):
            STEPS.append(self.name)
            return self.module.weight.sum() - torch.ones(4)

    engine = Engine([Wide("wide")], EngineConfig(train_iters=3))
    with pytest.raises(TrainingError, match=r"'wide'.*scalar.*\(4,\).*local step 1"):
        engine.run()


def test_one_element_loss_is_accepted():
    class OneElement(Quad):
        def training_step(self, batch):
            return (self.module.weight - batch) ** 2  # shape (1, 1)

    engine = Engine([OneElement("one")], EngineConfig(train_iters=2))
    engine.run()
    assert engine.one.count == 2


def test_dict_loss_without_loss_key():
    class NoKey(Quad):
        def training_step(self, batch):
            return {"los": self.module.weight.sum()}

    engine = Engine([NoKey("nokey")], EngineConfig(train_iters=1))
    with pytest.raises(TrainingError, match="'nokey'.*'loss'"):
        engine.run()


class Blowup(Quad):
    """Finite loss until local step ``bad``, then NaN."""

    bad = 3

    def training_step(self, batch):
        loss = super().training_step(batch)
        return loss * float("nan") if self.count >= self.bad else loss


def _step_in(message: str, kind: str) -> int:
    found = re.search(rf"{kind} step (\d+)", message)
    assert found, message
    return int(found.group(1))


def test_nan_loss_stops_at_its_step():
    p = Blowup("blowup")
    engine = Engine([p], EngineConfig(train_iters=10))
    with pytest.raises(TrainingError, match="'blowup'.*nan") as info:
        engine.run()
    assert _step_in(str(info.value), "local") == 3
    assert _step_in(str(info.value), "global") == 3
    assert engine.global_step == 3


def test_nan_in_a_lower_never_reaches_its_upper():
    inner = Blowup("inner", Config(unroll_steps=4), uses=("outer",))
    outer = Quad("outer", uses=("inner",))
    engine = Engine([outer, inner], EngineConfig(train_iters=10),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    with pytest.raises(TrainingError, match="'inner'") as info:
        engine.run()
    assert 3 <= _step_in(str(info.value), "local") <= 4
    assert outer.count == 0
    assert bool(torch.isfinite(outer.module.weight).all())


def test_nan_in_an_upper():
    class UpperBlowup(Blowup):
        bad = 2

    inner = Quad("inner", uses=("outer",))
    outer = UpperBlowup("outer", uses=("inner",))
    engine = Engine([outer, inner], EngineConfig(train_iters=10),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    with pytest.raises(TrainingError, match="'outer'.*local step 2"):
        engine.run()


# -- runtime: hypergradients ---------------------------------------------------------------
@pytest.mark.parametrize("method", ["darts", "cg", "neumann"])
def test_lower_loss_ignores_upper(method):
    inner, outer, deps = bilevel(Config(type=method), inner_uses=())
    engine = Engine([outer, inner], EngineConfig(train_iters=3), deps)
    with pytest.raises(HypergradientError, match="'outer'.*inner") as info:
        engine.run()
    assert "u2l" in str(info.value)
    assert outer.count == 1 and engine.global_step == 1


@pytest.mark.parametrize("method", ["darts", "cg", "neumann"])
def test_upper_loss_ignores_lower(method):
    inner, outer, deps = bilevel(Config(type=method), outer_uses=())
    engine = Engine([outer, inner], EngineConfig(train_iters=3), deps)
    with pytest.raises(HypergradientError, match="'outer'"):
        engine.run()


def test_hypergradient_edges_that_carry_something_run():
    for method in ("darts", "cg", "neumann"):
        inner, outer, deps = bilevel(Config(type=method))
        engine = Engine([outer, inner], EngineConfig(train_iters=3), deps)
        engine.run()
        assert outer.count == 3


# -- reverse mode (first_order=False) ----------------------------------------------------
class IterQuad(IterativeProblem):
    def __init__(self, name: str, config: Config | None = None, *, uses: tuple = ()) -> None:
        module = torch.nn.Linear(1, 1, bias=False)
        torch.nn.init.constant_(module.weight, 0.5)
        super().__init__(name, config, module=module,
                         optimizer=torch.optim.SGD(module.parameters(), lr=0.1),
                         train_data_loader=[torch.tensor(1.0)])
        self.uses = uses

    training_step = Quad.training_step


def test_first_order_false_above_iterative_problem_runs():
    inner = IterQuad("inner", Config(unroll_steps=2), uses=("outer",))
    outer = Quad("outer", Config(first_order=False), uses=("inner",))
    engine = Engine([outer, inner], EngineConfig(train_iters=4),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    engine.run()
    assert (inner.count, outer.count) == (4, 2)


@pytest.mark.parametrize("inner_uses, outer_uses", [((), ("inner",)), (("outer",), ())],
                         ids=["lower-ignores-upper", "upper-ignores-lower"])
def test_reverse_mode_edge_that_carries_nothing(inner_uses, outer_uses):
    inner = IterQuad("inner", Config(unroll_steps=2), uses=inner_uses)
    outer = Quad("outer", Config(first_order=False), uses=outer_uses)
    engine = Engine([outer, inner], EngineConfig(train_iters=4),
                    {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    raised = False
    try:
        engine.run()
    except HypergradientError as err:
        raised = "'outer'" in str(err)
    assert raised


def test_original_fp16_flag_means_precision_fp16():
    """The original's earlier Config(fp16=True) keeps working: it selects precision='fp16'."""
    assert Config(fp16=True).precision == "fp16"
    assert Config(fp16=True, precision="bf16").precision == "bf16"
    assert Config().precision == "fp32"
