"""`Engine`: the schedule (unroll, warmup, accumulation, several leaves and uppers, chains,
diamonds), validation, early stopping, `train_step` overrides and very deep programs.

Each schedule test compares the local step counts after every global step with a table
written out by hand from the rules in API.md: a lower steps ``unroll_steps`` times (times
``gradient_accumulation``), then triggers each of its uppers; an upper steps once every one of
its lowers has triggered it since its last step; nothing triggers before ``count >
warmup_steps``.

The problems are `Scalar`s (tests/scalar_problem.py): one parameter each, with a record
of the order of their local steps.
"""

from __future__ import annotations

import sys

import pytest
import torch
from scalar_problem import Scalar

from betty import Engine
from betty.configs import Config, EngineConfig


def counts_table(engine: Engine, problems: list[Scalar], steps: int) -> list[tuple[int, ...]]:
    """Counts of ``problems`` after each of ``steps`` global steps."""
    table = []
    for _ in range(steps):
        engine.global_step += 1
        engine.train_step()
        table.append(tuple(p.count for p in problems))
    return table


def columns(*cols: list[int]) -> list[tuple[int, ...]]:
    return list(zip(*cols))


# -- the schedule ----------------------------------------------------------------------
def test_bilevel_unroll():
    trace: list[str] = []
    inner = Scalar("inner", Config(unroll_steps=3), trace=trace)
    outer = Scalar("outer", trace=trace)
    engine = Engine([outer, inner], dependencies={"l2u": {inner: [outer]}})
    table = counts_table(engine, [inner, outer], 7)
    assert table == columns([1, 2, 3, 4, 5, 6, 7],
                            [0, 0, 1, 1, 1, 2, 2])
    assert trace == ["inner"] * 3 + ["outer"] + ["inner"] * 3 + ["outer", "inner"]


@pytest.mark.parametrize("unroll, warmup, expected", [
    (1, 3, [0, 0, 0, 1, 2, 3, 4, 5]),
    (2, 3, [0, 0, 0, 1, 1, 2, 2, 3]),
    (3, 3, [0, 0, 0, 0, 0, 1, 1, 1]),
    (2, 0, [0, 1, 1, 2, 2, 3, 3, 4]),
])
def test_warmup(unroll, warmup, expected):
    inner = Scalar("inner", Config(unroll_steps=unroll, warmup_steps=warmup))
    outer = Scalar("outer")
    engine = Engine([outer, inner], dependencies={"l2u": {inner: [outer]}})
    table = counts_table(engine, [inner, outer], 8)
    assert table == columns(list(range(1, 9)), expected)
    assert inner.optimizer_steps == 8  # warmup delays the uppers, not the lower's own steps


def test_two_independent_programs_several_leaves():
    a, b = Scalar("a", Config(unroll_steps=2)), Scalar("b", Config(unroll_steps=3))
    big_a, big_b = Scalar("A"), Scalar("B")
    engine = Engine([big_a, a, big_b, b], dependencies={"l2u": {a: [big_a], b: [big_b]}})
    assert engine.leaves == [a, b]
    table = counts_table(engine, [a, big_a, b, big_b], 6)
    assert table == columns([1, 2, 3, 4, 5, 6],
                            [0, 1, 1, 2, 2, 3],
                            [1, 2, 3, 4, 5, 6],
                            [0, 0, 1, 1, 1, 2])


@pytest.mark.parametrize("order", ["abt", "tba"])
def test_upper_waits_for_all_its_lowers(order):
    # a triggers from step 7 on (warmup), b at every even step; top steps only once both
    # have triggered it since its last step.
    a = Scalar("a", Config(unroll_steps=1, warmup_steps=6))
    b = Scalar("b", Config(unroll_steps=2))
    top = Scalar("top")
    problems = {"a": a, "b": b, "t": top}
    engine = Engine([problems[c] for c in order], dependencies={"l2u": {a: [top], b: [top]}})
    table = counts_table(engine, [top], 10)
    assert [row[0] for row in table] == [0, 0, 0, 0, 0, 0, 1, 2, 2, 3]


def test_upper_with_two_lowers_of_different_unrolls():
    a, b = Scalar("a", Config(unroll_steps=2)), Scalar("b", Config(unroll_steps=5))
    top = Scalar("top")
    engine = Engine([a, b, top], dependencies={"l2u": {a: [top], b: [top]}})
    table = counts_table(engine, [a, b, top], 11)
    assert [row[2] for row in table] == [0, 0, 0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert [row[0] for row in table] == list(range(1, 12))


def test_lower_with_two_uppers():
    low = Scalar("low", Config(unroll_steps=2))
    u1, u2 = Scalar("u1", Config(unroll_steps=2)), Scalar("u2")
    top = Scalar("top")
    deps = {"l2u": {low: [u1, u2], u1: [top]}}
    engine = Engine([top, u1, u2, low], dependencies=deps)
    table = counts_table(engine, [low, u1, u2, top], 8)
    assert table == columns([1, 2, 3, 4, 5, 6, 7, 8],
                            [0, 1, 1, 2, 2, 3, 3, 4],
                            [0, 1, 1, 2, 2, 3, 3, 4],
                            [0, 0, 0, 1, 1, 1, 1, 2])


def test_three_level_chain():
    trace: list[str] = []
    low = Scalar("low", Config(unroll_steps=2), trace=trace)
    mid = Scalar("mid", Config(unroll_steps=3), trace=trace)
    top = Scalar("top", trace=trace)
    engine = Engine([top, mid, low], dependencies={"l2u": {low: [mid], mid: [top]}})
    table = counts_table(engine, [low, mid, top], 12)
    assert table == columns(list(range(1, 13)),
                            [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6],
                            [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2])
    # within global step 6 the cascade runs bottom-up: low, then mid, then top
    assert trace[:9] == ["low", "low", "mid", "low", "low", "mid", "low", "low", "mid"]
    assert trace[9] == "top"


def test_lbi_diamond_schedule():
    trace: list[str] = []
    pt = Scalar("pt", Config(unroll_steps=2), trace=trace)
    ft = Scalar("ft", Config(unroll_steps=3), trace=trace)
    rw = Scalar("rw", trace=trace)
    engine = Engine([pt, ft, rw], dependencies={"l2u": {pt: [ft, rw], ft: [rw]}})
    table = counts_table(engine, [pt, ft, rw], 12)
    assert table == columns(list(range(1, 13)),
                            [0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6],
                            [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2])
    step6 = trace[trace.index("rw") - 2: trace.index("rw") + 1]
    assert step6 == ["pt", "ft", "rw"]
    assert trace.count("rw") == 2


def test_lbi_diamond_hypergradient_sums_both_paths():
    # L_pt = (w_pt-1)^2 + a w_pt w_rw,  L_ft = (w_ft-1)^2 + b w_ft w_pt,
    # L_rw = (w_rw-1)^2 + c w_rw w_pt + d w_rw w_ft.  DARTS hop through a quadratic is
    # exactly -M v, so rw's total gradient is
    #   2(w_rw-1) + c w_pt + d w_ft  +  [rw,pt,rw]: -a c w_rw  +  [rw,ft,pt,rw]: +a b d w_rw.
    a, b, c, d = 0.7, -1.3, 0.4, 0.9
    pt = Scalar("pt", couple={"rw": a}, init=0.3)
    ft = Scalar("ft", couple={"pt": b}, init=-0.2)
    rw = Scalar("rw", couple={"pt": c, "ft": d}, init=0.8)
    seen = []

    def record(grads):
        w = {p.name: p.module.w.detach().clone() for p in (pt, ft, rw)}
        seen.append((grads[0].detach().clone(), w))

    rw.grad_callback = record  # type: ignore[method-assign]
    deps = {"u2l": {rw: [pt]}, "l2u": {pt: [ft, rw], ft: [rw]}}
    engine = Engine([pt, ft, rw], dependencies=deps)
    assert sorted([q.name for q in path] for path in rw.paths) == [
        ["rw", "ft", "pt", "rw"], ["rw", "pt", "rw"]]
    counts_table(engine, [pt, ft, rw], 3)
    assert len(seen) == 3
    for grad, w in seen:
        expected = (2 * (w["rw"] - 1) + c * w["pt"] + d * w["ft"]
                    + w["rw"] * (a * b * d - a * c))
        torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-5)


def test_lower_steps_before_its_uppers_each_global_step():
    trace: list[str] = []
    inner = Scalar("inner", trace=trace)
    outer = Scalar("outer", trace=trace)
    engine = Engine([outer, inner], dependencies={"l2u": {inner: [outer]}})
    counts_table(engine, [inner, outer], 3)
    assert trace == ["inner", "outer"] * 3


# -- gradient accumulation ---------------------------------------------------------------
def test_gradient_accumulation_schedule_and_update():
    # target at local step k is k: the accumulated gradient is the mean over micro-batches
    # of 2 (w - k), applied once every 2 local steps.
    lr = 0.05
    inner = Scalar("inner", Config(unroll_steps=3, gradient_accumulation=2), lr=lr,
                   targets=lambda k: k)
    outer = Scalar("outer")
    engine = Engine([outer, inner], dependencies={"l2u": {inner: [outer]}})
    w = inner.module.w.item()
    history = []
    for step in range(1, 13):
        engine.global_step = step
        engine.train_step()
        if step % 2 == 0:
            w = w - lr * ((2 * (w - (step - 1)) + 2 * (w - step)) / 2)
        history.append((inner.optimizer_steps, outer.count))
        assert inner.module.w.item() == pytest.approx(w, rel=1e-6), step
    assert history == columns([0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6],
                              [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 2])


def test_gradient_accumulation_on_the_upper():
    inner = Scalar("inner")
    outer = Scalar("outer", Config(gradient_accumulation=3))
    engine = Engine([outer, inner], dependencies={"l2u": {inner: [outer]}})
    counts_table(engine, [inner, outer], 7)
    assert outer.count == 7
    assert outer.optimizer_steps == 2
    assert inner.optimizer_steps == 7


# -- run(), validation, train_step overrides --------------------------------------------
class Validating(Engine):
    def __init__(self, *args, metrics=None, **kwargs) -> None:
        self.calls: list[tuple[int, list[bool]]] = []
        self.metrics = list(metrics or [])
        super().__init__(*args, **kwargs)

    def validation(self):
        modes = [p.module.training for p in self.problems]
        self.calls.append((self.global_step, modes))
        value = self.metrics.pop(0) if self.metrics else 0.0
        return {"loss": torch.tensor(value), "acc": 1.0 - value}


def _bilevel(unroll: int = 1):
    inner = Scalar("inner", Config(unroll_steps=unroll))
    outer = Scalar("outer")
    return [outer, inner], {"l2u": {inner: [outer]}}


@pytest.mark.parametrize("train_iters, valid_step", [(10, 3), (12, 4), (5, 7), (6, 1)])
def test_validation_calls_and_eval_mode(train_iters, valid_step):
    problems, deps = _bilevel()
    engine = Validating(problems, EngineConfig(train_iters=train_iters, valid_step=valid_step),
                        deps)
    engine.run()
    expected_steps = [valid_step * k for k in range(1, train_iters // valid_step + 1)]
    assert [s for s, _ in engine.calls] == expected_steps
    assert all(modes == [False, False] for _, modes in engine.calls)
    assert all(p.module.training for p in problems)
    assert engine.global_step == train_iters
    assert problems[1].count == train_iters


def test_validation_results_are_logged():
    problems, deps = _bilevel()
    engine = Validating(problems, EngineConfig(train_iters=4, valid_step=2), deps,
                        metrics=[0.5, 0.25])
    logged = []
    engine.logger.log = lambda metrics, *, tag, step: logged.append((tag, step, metrics))
    engine.run()
    assert [(tag, step) for tag, step, _ in logged] == [("validation", 2), ("validation", 4)]
    assert float(logged[1][2]["loss"]) == 0.25 and logged[1][2]["acc"] == 0.75


def test_train_step_override():
    class Custom(Engine):
        def __init__(self, *args, **kwargs) -> None:
            self.seen: list[int] = []
            super().__init__(*args, **kwargs)

        def train_step(self):
            self.seen.append(self.global_step)
            if self.global_step % 2 == 0:  # step the program on even steps only
                super().train_step()

    problems, deps = _bilevel(unroll=2)
    engine = Custom(problems, EngineConfig(train_iters=8), deps)
    engine.run()
    assert engine.seen == list(range(1, 9))
    outer, inner = problems
    assert (inner.count, outer.count) == (4, 2)


@pytest.mark.parametrize("mode, metrics, tolerance, stop_at", [
    # best 2 at the 2nd validation; 2.5 and an equal 2 are no improvement -> stop at the 4th
    ("min", [3, 2, 2.5, 2, 1, 0], 2, 4),
    # an improvement at the 4th resets the count; three bad ones after it -> stop at the 7th
    ("max", [1, 2, 1.5, 2.5, 2.4, 2.5, 2.0, 9, 9], 3, 7),
    # never three bad validations in a row: runs to the end
    ("min", [5, 6, 7, 4, 5, 6, 3, 4, 5, 2], 3, None),
])
def test_early_stopping(mode, metrics, tolerance, stop_at):
    valid_step, n = 2, len(metrics)
    problems, deps = _bilevel()
    config = EngineConfig(train_iters=valid_step * n, valid_step=valid_step,
                          early_stopping=True, early_stopping_mode=mode,
                          early_stopping_tolerance=tolerance)
    engine = Validating(problems, config, deps, metrics=metrics)
    engine.run()
    last = stop_at or n
    assert len(engine.calls) == last
    assert engine.global_step == valid_step * last
    assert problems[1].count == valid_step * last
    assert engine.stopped_early is (stop_at is not None)


def test_early_stopping_metric_key():
    problems, deps = _bilevel()
    config = EngineConfig(train_iters=20, valid_step=2, early_stopping=True,
                          early_stopping_mode="max", early_stopping_metric="acc",
                          early_stopping_tolerance=1)
    # acc = 1 - loss: 0.5, 0.6, 0.55 -> stops at the 3rd validation
    engine = Validating(problems, config, deps, metrics=[0.5, 0.4, 0.45, 0.0])
    engine.run()
    assert engine.global_step == 6


def test_early_stopping_unknown_metric():
    problems, deps = _bilevel()
    config = EngineConfig(train_iters=4, valid_step=2, early_stopping=True,
                          early_stopping_metric="f1")
    engine = Validating(problems, config, deps)
    with pytest.raises(ValueError, match="'f1'.*acc.*loss"):
        engine.run()
    assert engine.global_step == 2


def test_early_stopping_off_runs_everything():
    problems, deps = _bilevel()
    engine = Validating(problems, EngineConfig(train_iters=8, valid_step=2), deps,
                        metrics=[1, 2, 3, 4])
    engine.run()
    assert engine.global_step == 8 and not engine.stopped_early


def test_run_without_validation_and_default_config():
    problems, deps = _bilevel(unroll=2)
    engine = Engine(problems, EngineConfig(train_iters=6, valid_step=1), deps)
    engine.run()
    outer, inner = problems
    assert (engine.global_step, inner.count, outer.count) == (6, 6, 3)
    problems, deps = _bilevel()
    assert Engine(problems, dependencies=deps).config == EngineConfig()


# -- very deep programs ------------------------------------------------------------------
def _stack_depth() -> int:
    frame, depth = sys._getframe(), 0
    while frame is not None:
        frame, depth = frame.f_back, depth + 1
    return depth


def test_deep_chain_without_recursion():
    depth = 300
    chain = [Scalar(f"p{i}", lr=0.01) for i in range(depth)]
    l2u = {lo: [up] for lo, up in zip(chain, chain[1:])}
    u2l = {up: [lo] for lo, up in zip(chain[-4:], chain[-3:])}  # hypergradients at the top
    for lo, up in zip(chain[-4:], chain[-3:]):
        lo.couple[up.name] = 0.5
        up.couple[lo.name] = 0.5
    engine = Engine(chain, dependencies={"l2u": l2u, "u2l": u2l})
    assert engine.leaves == [chain[0]]
    # A recursive cascade needs a few frames per level; leave room for far fewer.
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(_stack_depth() + 120)
    try:
        counts_table(engine, chain, 2)
    finally:
        sys.setrecursionlimit(limit)
    assert [p.count for p in chain] == [2] * depth
    assert chain[-1].paths == [[chain[-1], chain[-2], chain[-1]]]
    assert chain[0].p299 is chain[-1]
