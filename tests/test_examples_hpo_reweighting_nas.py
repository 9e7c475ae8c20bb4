"""The application examples (hpo, data_reweighting, nas) learn what they claim, in their
``--quick`` configurations (each module's ``QUICK``, the keywords ``main --quick`` passes to
``run``).

References: HPO starts every weight decay at 1 (underfitting), so a correct hypergradient
lowers the validation loss and treats features differently; Meta-Weight-Net on 40% flipped
labels must learn to give the (high-loss) flipped samples less weight than clean ones; the
DARTS search must move the architecture parameters and derive a valid discrete cell, and the
random baseline must have exactly the derived cell's parameter count.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
PNG_MAGIC = b"\x89PNG"

pytestmark = pytest.mark.slow  # each runs an example program


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / name / "main.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hpo_learns_per_weight_decays(tmp_path):
    hpo = load("hpo")
    result = hpo.run(**hpo.QUICK, plot=tmp_path / "hpo.png")
    assert set(result["datasets"]) == {"synthetic", "breast_cancer"}
    for name, res in result["datasets"].items():
        lam = torch.tensor(res["lam"])
        assert len(lam) == res["dim"]
        assert bool(torch.isfinite(lam).all()) and bool((lam > 0).all())
        # Per-weight: most decays fell from 1 (too strong), and they spread apart.
        assert lam.median() < 0.7, name
        assert math.log(lam.max() / lam.min()) > 0.5, name
        # The validation loss fell once hpo started stepping (first validation: warm-up).
        first, last = res["history"][0], res["history"][-1]
        assert first["lam"] == pytest.approx([1.0] * res["dim"])
        assert last["loss"] < 0.8 * first["loss"], name
        rows = {row["method"].split(",")[0]: row for row in res["rows"]}
        initial = rows["lam = 1 for all weights (initial)"]
        learned = rows["per-weight lam (Betty)"]
        assert learned["val_loss"] < initial["val_loss"]
        assert 0.8 < learned["test_acc"] <= 1.0
    assert "| synthetic | grid search, one lam =" in hpo.format_table(result)
    assert (tmp_path / "hpo.png").read_bytes()[:4] == PNG_MAGIC


def test_mwn_downweights_flipped_labels(tmp_path):
    dr = load("data_reweighting")
    result = dr.run(**dr.QUICK, plot=tmp_path / "mwn.png")
    (run,) = result["runs"]
    assert run["setting"] == "noise40"
    weights = run["group_weights"]
    assert weights["flipped"] < weights["clean"] - 0.1
    # The learned map is decreasing over the losses that matter: high loss, low weight.
    with torch.no_grad():
        curve = run["weight_net"](torch.tensor([0.1, 1.0, 3.0, 6.0]))
    assert curve[0] > curve[-1]
    assert run["mwn_acc"] > 0.6 and run["plain_acc"] > 0.6
    assert "| noise40 | 1197 |" in dr.format_table(result)
    assert (tmp_path / "mwn.png").read_bytes()[:4] == PNG_MAGIC


def test_nas_moves_alphas_and_derives_a_valid_cell(tmp_path):
    nas = load("nas")
    result = nas.run(**nas.QUICK, plot=tmp_path / "nas.png")
    moved = (result["alphas"] - result["initial_alphas"]).abs().max()
    assert moved > 1e-2
    assert result["alphas"].shape == (len(nas.EDGES), len(nas.PRIMITIVES))

    for genotype in [result["derived"], *result["random"]]:
        for node in range(nas.NODES):
            sources = [src for target, src, _ in genotype if target == node]
            assert len(sources) == min(2, node + 1) == len(set(sources))
            assert all(0 <= src <= node for src in sources)
        assert all(op in nas.PRIMITIVES and op != "none" for _, _, op in genotype)
        net = nas.FixedNet(genotype, nas.QUICK["channels"])
        assert net(torch.zeros(3, 1, 8, 8)).shape == (3, 10)
        assert nas.num_parameters(net) == result["size"]
    # The derived edge of each node is its strongest (non-none) incoming edge.
    weights = result["alphas"].softmax(-1)
    none = nas.PRIMITIVES.index("none")
    for node in range(nas.NODES):
        incoming = [e for e, (target, _) in enumerate(nas.EDGES) if target == node]
        best = max(incoming, key=lambda e: torch.cat([weights[e, :none],
                                                      weights[e, none + 1:]]).max())
        assert (node, nas.EDGES[best][1]) in {(n, s) for n, s, _ in result["derived"]}
    assert all(0.0 <= a <= 1.0 for a in result["derived_acc"] + result["random_acc"])
    assert (tmp_path / "nas.png").read_bytes()[:4] == PNG_MAGIC


@pytest.mark.parametrize("name, args, expected", [
    ("hpo", [], "| breast_cancer | per-weight lam (Betty), refit |"),
    ("data_reweighting", ["--strategy", "cpu"], "| noise40 | 1197 |"),
    ("nas", [], "| derived by DARTS search |"),
])
def test_main_quick_prints_its_table(name, args, expected, capsys):
    load(name).main(["--quick", "--plot", "", *args])
    assert expected in capsys.readouterr().out
