"""The README's quick start (examples/quickstart.py) learns its weight decays and generalizes.

Reference: with the weight decays held at their initial 0.1 the classifier underfits (about
0.8 validation accuracy at the end of warm-up), so a correct hypergradient must lower them
and, with them, the validation loss. A sign error in a method would raise them instead.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


@pytest.fixture(scope="module")
def quickstart():
    spec = importlib.util.spec_from_file_location("quickstart", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.parametrize("method", ["darts", "cg", "neumann", "sama", "reverse"])
def test_learns_weight_decay(quickstart, method):
    train_iters, valid_step = 300, 70  # hpo steps from step 101 on (warm-up 100)
    result = quickstart.run(train_iters=train_iters, method=method, valid_step=valid_step)

    assert result["test_acc"] > 0.9
    assert result["validations"] == train_iters // valid_step
    assert [h["step"] for h in result["history"]] == [70, 140, 210, 280]

    # Every layer's weight decay fell by more than a factor of e from 0.1 ...
    assert result["initial_wd"] == pytest.approx([0.1, 0.1])
    for before, after in zip(result["initial_wd"], result["final_wd"]):
        assert math.log(after) - math.log(before) < -1.0
    # ... and the validation loss fell with it (first validation: before hpo ever stepped).
    first, last = result["history"][0], result["history"][-1]
    assert first["wd"] == pytest.approx([0.1, 0.1])
    assert last["loss"] < 0.5 * first["loss"]
    assert last["acc"] > first["acc"]


def test_main_prints_what_it_learned(quickstart, capsys):
    result = quickstart.main(["--iters", "150", "--valid-step", "50", "--method", "cg"])
    out = capsys.readouterr().out
    assert result["validations"] == 3
    assert "hypergradient method: cg" in out
    assert "layer 0 weight decay: 1.00e-01 ->" in out
    assert "test accuracy:" in out
