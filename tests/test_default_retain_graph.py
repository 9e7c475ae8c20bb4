"""Valid programs with the default ``retain_graph=False`` never crash: a meta-weight-net
style program whose upper reuses the lower's features (a subgraph shared by both losses),
under darts, cg and neumann, with and without gradient accumulation, and an LBI-shaped
diamond whose upper's single loss feeds both of its hypergradient paths."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from quad_problem import Quad

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.problems import ImplicitProblem


class Net(torch.nn.Module):
    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.body = torch.nn.Linear(n_in, 8)
        self.head = torch.nn.Linear(8, n_out)

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def _data(seed: int, n: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    return [(x, (x.sum(1) > 0).long())]


class Classifier(ImplicitProblem):
    """Per-example losses weighted by the upper's weighting net (meta-weight-net style)."""

    def training_step(self, batch):
        x, y = batch
        losses = F.cross_entropy(self.module(x), y, reduction="none")
        weights = torch.sigmoid(self.weighting(losses.unsqueeze(1))).squeeze(1)
        return (weights * losses).mean()


class Weighting(ImplicitProblem):
    """Validation loss through the classifier, sharing its features with an own head."""

    def training_step(self, batch):
        x, y = batch
        features = torch.tanh(self.classifier.module.body(x))  # shared subgraph
        logits = self.classifier.module.head(features)
        own = self.module(F.cross_entropy(logits, y, reduction="none").unsqueeze(1))
        penalty = 0.1 * own.pow(2).mean() + 0.01 * features.pow(2).mean()
        return F.cross_entropy(logits, y) + penalty


@pytest.mark.parametrize("method", ["darts", "cg", "neumann"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_default_retain_graph_with_shared_subgraphs(method, accumulation):
    torch.manual_seed(0)
    net = Net(4, 2)
    wnet = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
    classifier = Classifier(
        "classifier", Config(type=method, unroll_steps=2, gradient_accumulation=accumulation),
        module=net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9),
        train_data_loader=_data(0))
    weighting = Weighting(
        "weighting", Config(gradient_accumulation=accumulation), module=wnet,
        optimizer=torch.optim.Adam(wnet.parameters(), lr=0.01), train_data_loader=_data(1))
    assert not classifier.config.retain_graph and not weighting.config.retain_graph
    before = [p.detach().clone() for p in wnet.parameters()]
    engine = Engine([weighting, classifier], EngineConfig(train_iters=8),
                    {"u2l": {weighting: [classifier]}, "l2u": {classifier: [weighting]}})
    engine.run()
    assert weighting.count == 8 // (2 * accumulation)
    assert all(bool(torch.isfinite(p).all()) for p in [*net.parameters(), *wnet.parameters()])
    assert any(not torch.equal(a, b.detach()) for a, b in zip(before, wnet.parameters()))


def test_default_retain_graph_on_a_diamond_with_two_paths():
    # LBI-shaped: rw's single loss feeds both of its paths ([rw, pt, rw], [rw, ft, pt, rw]).
    pt = Quad("pt", uses=("rw",))
    ft = Quad("ft", uses=("pt",))
    rw = Quad("rw", uses=("pt", "ft"))
    deps = {"u2l": {rw: [pt]}, "l2u": {pt: [ft, rw], ft: [rw]}}
    engine = Engine([pt, ft, rw], EngineConfig(train_iters=5), deps)
    assert len(rw.paths) == 2
    engine.run()
    assert (pt.count, ft.count, rw.count) == (5, 5, 5)
