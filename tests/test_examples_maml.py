"""examples/maml in its --quick configuration (30 meta-steps, 50 test tasks; a few seconds).

What must hold even after so little meta-training: fine-tuning on the support set lowers
every model's query MSE on new sinusoid tasks; on 5-way digit tasks of classes never seen in
meta-training, every model ends far above chance (0.2) and MAML gains at least 0.3 from its
K steps; and betty's own ``TaskBatchedProblem.adapt`` gives the example's evaluation numbers
(the two are independent implementations of the same K SGD steps).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

MAIN = Path(__file__).resolve().parents[1] / "examples" / "maml" / "main.py"

pytestmark = pytest.mark.slow  # runs the example program


def load_example():
    spec = importlib.util.spec_from_file_location("example_maml", MAIN)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    threads = torch.get_num_threads()
    plot = tmp_path_factory.mktemp("maml") / "maml.png"
    try:
        result = load_example().main(["--quick", "--plot", str(plot)])
    finally:
        torch.set_num_threads(threads)
    return result, plot


def test_every_setting_and_method_is_reported(quick):
    result, plot = quick
    pairs = {(r["setting"], r["method"]) for r in result["rows"]}
    assert len(pairs) == len(result["rows"]) == 12
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_adapting_lowers_the_sinusoid_query_mse(quick):
    for r in quick[0]["rows"]:
        if r["kind"] == "regression":
            assert r["after"] < r["before"], r


def test_few_shot_digits_beat_chance(quick):
    for r in quick[0]["rows"]:
        if r["kind"] == "classification":
            assert r["after"] > 0.4, r  # 5-way: chance is 0.2
            if r["method"] == "MAML":
                assert r["after"] > r["before"] + 0.3, r


def test_betty_adapt_agrees_with_the_evaluation(quick):
    checked = [r for r in quick[0]["rows"] if r["betty_after"] is not None]
    assert len(checked) == 6  # MAML and first-order MAML in each of the three settings
    for r in checked:
        assert r["betty_after"] == pytest.approx(r["after"], rel=1e-4, abs=1e-4), r
