"""A picture of a multilevel program: Graphviz DOT, Mermaid, plain text and PNG.

Problems are nodes labelled with their class, hypergradient method (``Config.type``, used
when a hypergradient passes through the problem) and ``unroll_steps``; ``l2u`` edges (lower ->
upper: who triggers whom) are solid, ``u2l`` edges (upper -> lower: whose parameters enter
whose loss, where hypergradients flow) are dashed. The PNG needs matplotlib only, no system
binary.

Example:
    >>> picture = engine.graph()
    >>> print(picture.to_mermaid())         # paste into a Markdown file or mermaid.live
    >>> picture.save_png("program.png")
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from betty.graph import build_graph

L2U_COLOR = "#1f77b4"
U2L_COLOR = "#d62728"


@dataclass(frozen=True)
class Node:
    """One problem as drawn."""

    name: str
    kind: str  # class name, e.g. ImplicitProblem
    method: str  # Config.type
    unroll_steps: int
    first_order: bool
    level: int  # 0 for a top problem; a lower sits one level below its lowest upper
    has_uppers: bool
    has_paths: bool

    def details(self) -> list[str]:
        """The label's lines after the name."""
        lines = [self.kind]
        if self.has_uppers:
            lines.append(f"{self.method}, unroll {self.unroll_steps}")
        if self.has_paths and not self.first_order:
            lines.append("reverse mode")
        return lines


@dataclass(frozen=True)
class ProgramPicture:
    """The program's nodes and edges; render with `to_dot`, `to_mermaid`, `to_text`,
    `to_png` / `save_png`."""

    nodes: tuple[Node, ...]
    l2u: tuple[tuple[str, str], ...]  # (lower, upper)
    u2l: tuple[tuple[str, str], ...]  # (upper, lower)
    paths: tuple[tuple[str, ...], ...]  # every hypergradient path, e.g. (outer, inner, outer)

    # -- text forms ----------------------------------------------------------------------
    def to_dot(self) -> str:
        """Graphviz DOT (``dot -Tpng``, or any online viewer); uppers drawn above lowers."""
        lines = ["digraph betty {", "  rankdir=BT;",
                 '  node [shape=box, style="rounded,filled", fillcolor="#f5f5f5", '
                 'fontname="Helvetica"];', '  edge [fontname="Helvetica", fontsize=10];']
        for node in self.nodes:
            label = "\\n".join([node.name, *node.details()])
            lines.append(f'  "{node.name}" [label="{label}"];')
        for lower, upper in self.l2u:
            lines.append(f'  "{lower}" -> "{upper}" [label="l2u", style=solid, '
                         f'color="{L2U_COLOR}"];')
        for upper, lower in self.u2l:
            lines.append(f'  "{upper}" -> "{lower}" [label="u2l", style=dashed, '
                         f'color="{U2L_COLOR}", constraint=false];')
        lines.append("}")
        return "\n".join(lines) + "\n"

    def to_mermaid(self) -> str:
        """Mermaid flowchart (renders in GitHub Markdown inside a ```mermaid block)."""
        lines = ["flowchart BT"]
        for node in self.nodes:
            label = "<br/>".join([f"<b>{node.name}</b>", *node.details()])
            lines.append(f'    {node.name}["{label}"]')
        styles = []
        for index, (lower, upper) in enumerate(self.l2u):
            lines.append(f"    {lower} -->|l2u| {upper}")
            styles.append(f"    linkStyle {index} stroke:{L2U_COLOR}")
        for index, (upper, lower) in enumerate(self.u2l, start=len(self.l2u)):
            lines.append(f"    {upper} -.->|u2l| {lower}")
            styles.append(f"    linkStyle {index} stroke:{U2L_COLOR}")
        return "\n".join(lines + styles) + "\n"

    def to_text(self) -> str:
        """A plain-text tree for the console: each upper above its lowers."""
        by_name = {n.name: n for n in self.nodes}
        lowers: dict[str, list[str]] = {n.name: [] for n in self.nodes}
        for lower, upper in self.l2u:
            lowers[upper].append(lower)
        rows: list[tuple[str, str]] = []  # (tree part, details)
        shown: set[str] = set()

        def draw(name: str, prefix: str, branch: str, below: str) -> None:
            again = name in shown  # a lower with several uppers (a diamond)
            details = "(see above)" if again else " | ".join(by_name[name].details())
            rows.append((f"{prefix}{branch}{name}", details))
            if again:
                return
            shown.add(name)
            children = lowers[name]
            for i, child in enumerate(children):
                last = i == len(children) - 1
                draw(child, prefix + below, "└─ " if last else "├─ ",
                     "   " if last else "│  ")

        for node in self.nodes:
            if node.level == 0:
                draw(node.name, "", "", "")
        width = max((len(tree) for tree, _ in rows), default=0)
        lines = [f"program: {len(self.nodes)} problems, {len(self.paths)} hypergradient "
                 f"path{'s' if len(self.paths) != 1 else ''}"]
        lines += [f"  {tree:<{width}}  {details}".rstrip() for tree, details in rows]
        for upper, lower in self.u2l:
            lines.append(f"  u2l: {upper} -> {lower}")
        for path in self.paths:
            lines.append(f"  path: {' > '.join(path)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_text()

    # -- image ---------------------------------------------------------------------------
    def to_png(self, *, dpi: int = 120) -> bytes:
        """PNG bytes drawn with matplotlib (``pip install matplotlib``), no system binary."""
        buffer = io.BytesIO()
        self._figure().savefig(buffer, format="png", dpi=dpi, bbox_inches="tight")
        return buffer.getvalue()

    def save_png(self, path: str, *, dpi: int = 120) -> None:
        """Write `to_png` to ``path`` (needs matplotlib)."""
        with open(path, "wb") as file:
            file.write(self.to_png(dpi=dpi))

    def _repr_png_(self) -> bytes:  # Jupyter shows the picture
        return self.to_png()

    def _figure(self) -> Any:
        from matplotlib.figure import Figure  # optional; Figure needs no GUI backend
        from matplotlib.lines import Line2D

        xy = _layout(self.nodes)
        levels = max((n.level for n in self.nodes), default=0) + 1
        columns = max((sum(1 for n in self.nodes if n.level == lv) for lv in range(levels)),
                      default=1)
        figure = Figure(figsize=(2.8 * max(columns, 2), 1.9 * levels + 0.6))
        ax = figure.add_subplot()
        ax.set_axis_off()
        boxes = {}
        for node in self.nodes:
            x, y = xy[node.name]
            boxes[node.name] = ax.annotate(
                "\n".join([node.name, *node.details()]), (x, y), ha="center", va="center",
                fontsize=9, bbox={"boxstyle": "round,pad=0.5", "fc": "#f5f5f5", "ec": "#444"})
        figure.canvas.draw()  # box sizes are known after a first draw
        for lower, upper in self.l2u:
            _arrow(ax, boxes[lower], boxes[upper], L2U_COLOR, "-", 0.0)
        level = {n.name: n.level for n in self.nodes}
        for upper, lower in self.u2l:  # bend further around the levels in between
            rad = 0.35 + 0.3 * max(0, level[lower] - level[upper] - 1)
            _arrow(ax, boxes[upper], boxes[lower], U2L_COLOR, "--", rad)
        xs = [p[0] for p in xy.values()] or [0.0]
        ys = [p[1] for p in xy.values()] or [0.0]
        ax.set_xlim(min(xs) - 0.8, max(xs) + 0.8)
        ax.set_ylim(min(ys) - 0.6, max(ys) + 0.6)
        ax.legend(handles=[Line2D([], [], color=L2U_COLOR, label="l2u (lower → upper)"),
                           Line2D([], [], color=U2L_COLOR, ls="--",
                                  label="u2l (upper → lower)")],
                  loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8, frameon=False)
        return figure


def _layout(nodes: Sequence[Node]) -> dict[str, tuple[float, float]]:
    """Uppers on top; the problems of one level spread evenly, centred."""
    xy: dict[str, tuple[float, float]] = {}
    for level in sorted({n.level for n in nodes}):
        row = [n for n in nodes if n.level == level]
        for i, node in enumerate(row):
            xy[node.name] = (i - (len(row) - 1) / 2, -float(level))
    return xy


def _arrow(ax: Any, source: Any, target: Any, color: str, style: str, rad: float) -> None:
    ax.annotate("", xy=(0.5, 0.5), xycoords=target, xytext=(0.5, 0.5), textcoords=source,
                arrowprops={"arrowstyle": "-|>", "color": color, "ls": style, "lw": 1.4,
                            "shrinkA": 2, "shrinkB": 2, "patchA": source.get_bbox_patch(),
                            "patchB": target.get_bbox_patch(),
                            "connectionstyle": f"arc3,rad={rad}"})


def picture(problems: Sequence[Any], dependencies: Mapping[str, Mapping[Any, Iterable[Any]]]
            | None = None) -> ProgramPicture:
    """The `ProgramPicture` of ``problems`` wired by ``dependencies`` (as given to `Engine`);
    raises `DependencyError` for an invalid program, like the engine."""
    graph = build_graph(problems, dependencies)
    level: dict[Any, int] = {}
    for node in reversed(graph.order):  # uppers first
        level[node] = max((level[p] + 1 for p in graph.parents[node]), default=0)
    nodes = tuple(
        Node(name=p.name, kind=type(p).__name__, method=p.config.type,
             unroll_steps=p.config.unroll_steps, first_order=p.config.first_order,
             level=level[p], has_uppers=bool(graph.parents[p]), has_paths=bool(graph.paths[p]))
        for p in problems)
    l2u = tuple((lower.name, upper.name) for lower in problems
                for upper in graph.parents[lower])
    u2l = tuple((upper.name, lower.name) for upper in problems for lower in graph.u2l[upper])
    paths = tuple(tuple(n.name for n in path) for p in problems for path in graph.paths[p])
    return ProgramPicture(nodes=nodes, l2u=l2u, u2l=u2l, paths=paths)
