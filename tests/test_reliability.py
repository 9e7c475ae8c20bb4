"""Mistakes that used to pass silently or fail with raw errors (docs/reliability.md): each is
now refused with an error that names the culprit, before anything was trained or saved.
"""

from __future__ import annotations

import logging
import os
import zipfile

import pytest
import torch

from betty import Engine
from betty.checkpoint import CheckpointError, list_checkpoints
from betty.configs import Config, EngineConfig
from betty.errors import ConfigError, DependencyError, ProblemDefinitionError, TrainingError
from betty.graph import MAX_PATHS, build_graph
from betty.problems import ImplicitProblem


class Scalar(ImplicitProblem):
    """``(w - 1)^2 + w * sum of the named problems' w``."""

    def __init__(self, name, config=None, *, reads=(), optimizer_cls=torch.optim.SGD,
                 module=None, loader=None, **kwargs):
        module = module if module is not None else torch.nn.Linear(1, 1, bias=False)
        if module is not None and list(module.parameters()):
            torch.nn.init.constant_(module.weight, 0.5)
        params = [p for p in module.parameters() if p.requires_grad]
        super().__init__(name, config, module=module,
                         optimizer=optimizer_cls(params, lr=0.1) if params else None,
                         train_data_loader=loader if loader is not None else [torch.ones(1)],
                         **kwargs)
        self.reads = reads

    def training_step(self, batch):
        x = batch[0] if isinstance(batch, (list, tuple)) else batch
        w = self.module(x).sum()
        return (w - 1) ** 2 + sum(w * getattr(self, r).module.weight.sum() for r in self.reads)


class OnlyLower(Scalar):
    def training_step(self, batch):  # uses the lower's weights only: never its own
        return self.inner.module.weight.sum() ** 2


def weight(problem) -> float:
    return float(problem.module.weight.detach().sum())


# -- mistakes that passed silently ---------------------------------------------------------
def test_l2u_without_u2l_is_refused_at_the_first_step():
    inner, outer = Scalar("inner", reads=("outer",)), OnlyLower("outer")
    engine = Engine([outer, inner], EngineConfig(train_iters=5, progress_bar=False),
                    {"l2u": {inner: [outer]}})
    with pytest.raises(TrainingError, match=r"'outer'.*never move.*u2l.*\{'outer': \['inner'\]\}"):
        engine.run()
    assert weight(outer) == 0.5 and engine.global_step == 1


@pytest.mark.parametrize(("where", "field", "value"), [
    ("engine", "roll_back", "no"), ("problem", "first_order", "False"),
    ("problem", "retain_graph", "yes"), ("engine", "early_stopping", 1),
])
def test_yes_no_fields_must_be_bools(where, field, value):
    make = EngineConfig if where == "engine" else Config
    with pytest.raises(ConfigError, match=rf"{field}={value!r} must be True or False"):
        make(**{field: value})


@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_darts_alpha_must_be_finite(value):
    with pytest.raises(ConfigError, match=r"darts_alpha=.*finite"):
        Config(darts_alpha=value)


def test_a_tuple_of_tensors_as_the_loader_is_refused():
    x, y = torch.ones(4, 1), torch.zeros(4)
    with pytest.raises(ProblemDefinitionError, match=r"'p'.*tuple holding tensors.*TensorDataset"):
        Engine([Scalar("p", loader=(x, y))], EngineConfig(train_iters=1))


def test_a_parameter_optimized_by_two_problems_is_refused():
    shared = torch.nn.Linear(1, 1, bias=False)
    inner, outer = Scalar("inner", module=shared, reads=("outer",)), Scalar("outer",
                                                                             module=shared)
    with pytest.raises(DependencyError, match=r"'outer' and 'inner' both optimize"):
        Engine([outer, inner], EngineConfig(train_iters=1),
               {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})


def test_resume_latest_in_a_folder_that_did_not_exist_warns(tmp_path, caplog):
    missing = tmp_path / "chekpoints"  # a typo
    engine = Engine([Scalar("p")], EngineConfig(train_iters=2, checkpoint_dir=str(missing),
                                                resume_from="latest", progress_bar=False))
    with caplog.at_level(logging.WARNING, logger="betty"):
        engine.run()
    assert "did not exist" in caplog.text and str(missing) in caplog.text


def test_resuming_a_checkpoint_past_train_iters_is_refused(tmp_path):
    first = Engine([Scalar("p")], EngineConfig(train_iters=6, checkpoint_dir=str(tmp_path),
                                               checkpoint_step=6, progress_bar=False))
    first.run()
    again = Engine([Scalar("p")], EngineConfig(train_iters=3, checkpoint_dir=str(tmp_path),
                                               resume_from="latest", progress_bar=False))
    with pytest.raises(CheckpointError, match=r"global step 6, past .*train_iters=3"):
        again.run()


def test_a_first_window_longer_than_the_run_warns(caplog):
    inner, outer = Scalar("inner", Config(unroll_steps=5), reads=("outer",)), Scalar("outer")
    with caplog.at_level(logging.WARNING, logger="betty"):
        Engine([outer, inner], EngineConfig(train_iters=3),
               {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    assert "'inner' ends its first unroll window after 5" in caplog.text
    assert "['outer'] will not step" in caplog.text


# -- raw errors that named nothing -------------------------------------------------------------
def test_resume_into_another_optimizer_is_refused_before_touching_anything(tmp_path):
    first = Engine([Scalar("p")], EngineConfig(train_iters=3, checkpoint_dir=str(tmp_path),
                                               checkpoint_step=3, progress_bar=False))
    first.run()
    adam = Scalar("p", optimizer_cls=torch.optim.Adam)
    engine = Engine([adam], EngineConfig(train_iters=6, progress_bar=False))
    before = {k: v.clone() for k, v in adam.module.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"'p'.*optimizer SGD.*Adam"):
        engine.load_checkpoint(list_checkpoints(tmp_path)[-1][1])
    assert engine.global_step == 0 and adam.count == 0
    assert all(torch.equal(v, adam.module.state_dict()[k]) for k, v in before.items())


def test_a_module_without_trainable_parameters_is_named():
    frozen = torch.nn.Linear(1, 1, bias=False).requires_grad_(False)
    with pytest.raises(ProblemDefinitionError, match=r"'p' has no trainable parameters"):
        Engine([Scalar("p", module=frozen)], EngineConfig(train_iters=1))


def test_dependencies_by_name_work_and_non_lists_are_named():
    inner, outer = Scalar("inner", reads=("outer",)), Scalar("outer", reads=("inner",))
    engine = Engine([outer, inner], EngineConfig(train_iters=2, progress_bar=False),
                    {"u2l": {"outer": ["inner"]}, "l2u": {"inner": ["outer"]}})
    assert [[p.name for p in path] for path in outer.paths] == [["outer", "inner", "outer"]]
    engine.run()
    with pytest.raises(DependencyError, match=r"\['l2u'\]\['inner'\] must be a list.*\[outer\]"):
        Engine([Scalar("outer"), Scalar("inner")], dependencies={"l2u": {"inner": outer}})
    with pytest.raises(DependencyError, match=r"names problem 'outr'.*\['inner', 'outer'\]"):
        Engine([Scalar("outer"), Scalar("inner")], dependencies={"l2u": {"inner": ["outr"]}})


def test_an_unwritable_checkpoint_dir_is_found_at_set_up(tmp_path):
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(ConfigError, match=r"checkpoint_dir=.*file.*cannot be written"):
        Engine([Scalar("p")], EngineConfig(train_iters=1, checkpoint_dir=str(blocked / "x")))


def test_resume_from_a_folder_says_so(tmp_path):
    engine = Engine([Scalar("p")], EngineConfig(train_iters=1, resume_from=str(tmp_path)))
    with pytest.raises(CheckpointError, match=r"is a folder"):
        engine.run()


def test_damaged_files_always_give_checkpoint_errors(tmp_path):
    """Every single-byte flip of a small checkpoint is a CheckpointError (or loads exactly),
    never a raw UnicodeDecodeError or NotImplementedError."""
    engine = Engine([Scalar("p")], EngineConfig(train_iters=1, progress_bar=False))
    engine.run()
    good = tmp_path / "good.pt"
    engine.save_checkpoint(good)
    data = good.read_bytes()
    with zipfile.ZipFile(good) as archive:  # the zip's directory: names and headers
        header_end = min(info.header_offset for info in archive.infolist()) + 200
    positions = sorted(set(range(0, min(len(data), header_end), 7)) |
                       set(range(len(data) - 300, len(data), 5)))
    for i in positions:
        bad = tmp_path / "bad.pt"
        flipped = bytearray(data)
        flipped[i] ^= 0xFF
        bad.write_bytes(bytes(flipped))
        try:
            Engine([Scalar("p")], EngineConfig(train_iters=1)).load_checkpoint(bad)
        except CheckpointError:
            pass
    assert os.path.exists(good)


def test_a_ladder_graph_with_too_many_paths_is_refused_at_once():
    """Each level feeds the next two: the path count is a Fibonacci number."""

    class Node:
        def __init__(self, name):
            self.name = name

    nodes = [Node(f"n{i}") for i in range(30)]
    l2u = {nodes[i]: [nodes[j] for j in (i + 1, i + 2) if j < len(nodes)]
           for i in range(len(nodes) - 1)}
    with pytest.raises(DependencyError, match=r"(\d+) hypergradient paths.*'n29'.*'n0'") as info:
        build_graph(nodes, {"l2u": l2u, "u2l": {nodes[-1]: [nodes[0]]}})
    assert int(str(info.value).split()[2]) > MAX_PATHS


def test_two_shuffled_loaders_on_the_global_generator_resume_bitwise(tmp_path):
    """Iterators are created at start-up (the original's order), and a sampler on torch's
    global generator draws its seed at the first batch, after other draws: resume replays
    both moments."""
    from torch.utils.data import DataLoader, TensorDataset

    def build(**kw):
        torch.manual_seed(0)
        x, y = torch.randn(64, 1), torch.randn(64)

        def loader():
            return DataLoader(TensorDataset(x, y), batch_size=8, shuffle=True)

        inner = Scalar("inner", Config(type="cg", unroll_steps=2), reads=("outer",),
                       loader=loader())
        outer = Scalar("outer", reads=("inner",), loader=loader())
        return Engine([outer, inner], EngineConfig(train_iters=20, progress_bar=False, **kw),
                      {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})

    whole = build()
    whole.run()
    first = build(checkpoint_dir=str(tmp_path), checkpoint_step=6)
    first.config.train_iters = 6
    first.run()
    resumed = build(resume_from=str(tmp_path / "step_00000006.pt"))
    resumed.run()
    for a, b in zip(whole.problems, resumed.problems):
        assert torch.equal(a.module.weight, b.module.weight), a.name
