"""The program's picture: DOT, Mermaid, text and PNG of a bilevel program, a three-level chain
and a diamond (one lower, two uppers: LBI's shape); printed at start-up when logging is
verbose."""

from __future__ import annotations

import io
import logging
import re

import pytest
import torch

from betty import Engine
from betty.configs import Config, EngineConfig
from betty.errors import DependencyError
from betty.problems import ImplicitProblem
from betty.visualize import picture


class Quad(ImplicitProblem):
    def __init__(self, name: str, config: Config | None = None) -> None:
        module = torch.nn.Linear(1, 1, bias=False)
        super().__init__(name, config, module=module,
                         optimizer=torch.optim.SGD(module.parameters(), lr=0.1))

    def get_batch(self):
        return torch.ones(1, 1)

    def training_step(self, batch):
        return self.module(batch).pow(2).sum()


def bilevel():
    outer, inner = Quad("outer"), Quad("inner", Config(type="cg", unroll_steps=3))
    return [outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}


def chain():
    top, mid = Quad("top"), Quad("mid", Config(type="neumann", unroll_steps=2))
    low = Quad("low", Config(type="darts"))
    return [top, mid, low], {"u2l": {top: [low], mid: [low]},
                             "l2u": {low: [mid], mid: [top]}}


def diamond():
    a, b = Quad("reweight"), Quad("augment", Config(type="sama"))
    c = Quad("classifier", Config(type="darts", unroll_steps=5))
    return [a, b, c], {"u2l": {a: [c], b: [c]}, "l2u": {c: [a, b]}}


def test_dot_nodes_labels_and_edge_styles():
    dot = picture(*bilevel()).to_dot()
    assert dot.startswith("digraph betty {") and dot.rstrip().endswith("}")
    assert dot.count("{") == dot.count("}")
    assert '"inner" [label="inner\\nQuad\\ncg, unroll 3"];' in dot
    assert '"outer" [label="outer\\nQuad"];' in dot  # a top problem: no method of its own
    l2u = re.search(r'"inner" -> "outer" \[(.*)\];', dot).group(1)
    u2l = re.search(r'"outer" -> "inner" \[(.*)\];', dot).group(1)
    assert 'label="l2u"' in l2u and "style=solid" in l2u
    assert 'label="u2l"' in u2l and "style=dashed" in u2l and "constraint=false" in u2l
    body = dot.strip().splitlines()[1:-1]
    assert all(line.rstrip().endswith(";") for line in body)


def test_mermaid_flowchart():
    text = picture(*chain()).to_mermaid()
    lines = [line.strip() for line in text.strip().splitlines()]
    assert lines[0] == "flowchart BT"
    assert 'mid["<b>mid</b><br/>Quad<br/>neumann, unroll 2"]' in lines
    edges = [line for line in lines if "|l2u|" in line or "|u2l|" in line]
    assert edges == ["mid -->|l2u| top", "low -->|l2u| mid",
                     "top -.->|u2l| low", "mid -.->|u2l| low"]
    styles = [line for line in lines if line.startswith("linkStyle")]
    assert len(styles) == len(edges)
    assert styles[0].endswith("#1f77b4") and styles[-1].endswith("#d62728")


def test_text_tree_of_a_diamond():
    text = picture(*diamond()).to_text()
    lines = text.splitlines()
    assert lines[0] == "program: 3 problems, 2 hypergradient paths"
    assert lines[1].split() == ["reweight", "Quad"]
    assert lines[2].split()[:2] == ["└─", "classifier"] and "darts, unroll 5" in lines[2]
    assert lines[3].split() == ["augment", "Quad"]  # a top problem: its type is unused
    assert lines[4].split() == ["└─", "classifier", "(see", "above)"]
    assert "u2l: reweight -> classifier" in text
    assert "path: augment > classifier > augment" in text
    columns = {line.index("Quad") for line in lines[1:4] if "Quad" in line}
    assert len(columns) == 1  # details aligned


def test_levels_put_uppers_above_lowers():
    levels = {n.name: n.level for n in picture(*chain()).nodes}
    assert levels == {"top": 0, "mid": 1, "low": 2}


def test_reverse_mode_is_shown():
    outer, inner = Quad("outer", Config(first_order=False)), Quad("inner")
    text = picture([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}).to_text()
    assert "reverse mode" in text


def test_invalid_program_fails_like_the_engine():
    a, b = Quad("a"), Quad("b")
    with pytest.raises(DependencyError, match="cycle"):
        picture([a, b], {"l2u": {a: [b], b: [a]}})


@pytest.mark.parametrize("build", [bilevel, chain, diamond])
def test_png_without_a_system_binary(build, tmp_path):
    pytest.importorskip("matplotlib")
    import matplotlib.image

    png = picture(*build()).to_png(dpi=60)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    image = matplotlib.image.imread(io.BytesIO(png))
    assert image.shape[0] > 50 and image.shape[1] > 50
    assert float(image[..., :3].std()) > 0.01  # something was drawn
    path = tmp_path / "program.png"
    picture(*build()).save_png(str(path), dpi=60)
    assert path.read_bytes()[:4] == b"\x89PNG"


def test_engine_graph_and_start_up_print(caplog):
    problems, deps = bilevel()
    caplog.set_level(logging.INFO, logger="betty")
    engine = Engine(problems, EngineConfig(train_iters=1), deps)
    assert engine.graph().to_text() in caplog.text
    assert engine.graph().to_dot() == picture(problems, deps).to_dot()


def test_no_start_up_print_when_quiet(monkeypatch, caplog):
    caplog.set_level(logging.WARNING, logger="betty")
    monkeypatch.setattr(Engine, "graph", lambda self: pytest.fail("drawn while quiet"))
    problems, deps = bilevel()
    Engine(problems, EngineConfig(), deps)
    assert "program:" not in caplog.text
