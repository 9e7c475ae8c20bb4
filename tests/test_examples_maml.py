"""examples/maml in its quick configuration: adaptation must help, and few-shot accuracy on
classes never seen in meta-training must be far above chance (0.2 for 5-way)."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def _load():
    path = os.path.join(HERE, "..", "examples", "maml", "main.py")
    spec = importlib.util.spec_from_file_location("maml_example", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_maml_quick_run_adapts_and_beats_chance():
    threads = torch.get_num_threads()
    try:
        result = _load().run(quick=True)
    finally:
        torch.set_num_threads(threads)
    rows = {(r["setting"], r["method"]): r for r in result["rows"]}
    assert len(rows) == 9
    for (setting, method), r in rows.items():
        if r["kind"] == "regression":
            assert r["after"] < r["before"], (setting, method)  # adapting lowers query MSE
        else:
            assert r["after"] > 0.5, (setting, method)  # 5-way: chance is 0.2
            assert r["after"] > r["before"] + 0.2, (setting, method)
