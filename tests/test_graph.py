"""`betty.graph`: dependencies -> parents, children, leaves, topological order, paths, and the
structural errors. Pure: the nodes here are plain named objects, no torch."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

import betty.graph
from betty.errors import DependencyError
from betty.graph import build_graph


class N:
    """A stand-in for a problem: the graph only needs a name and identity."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __repr__(self) -> str:
        return self.name


def nodes(*names: str) -> list[N]:
    return [N(n) for n in names]


def names(path) -> list[str]:
    return [n.name for n in path]


def path_names(graph, node) -> list[list[str]]:
    return sorted(names(p) for p in graph.paths[node])


def assert_topological(graph) -> None:
    position = {id(n): i for i, n in enumerate(graph.order)}
    assert sorted(position.values()) == list(range(len(graph.nodes)))
    for lower, uppers in graph.parents.items():
        for upper in uppers:
            assert position[id(lower)] < position[id(upper)], (lower, upper)


# -- well-formed programs ----------------------------------------------------------------
def test_bilevel():
    outer, inner = nodes("outer", "inner")
    g = build_graph([outer, inner], {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
    assert g.paths[outer] == [[outer, inner, outer]]
    assert all(a is b for a, b in zip(g.paths[outer][0], [outer, inner, outer]))
    assert g.paths[inner] == []
    assert g.parents[inner] == [outer] and g.parents[outer] == []
    assert g.children[outer] == [inner] and g.children[inner] == []
    assert g.leaves == [inner]
    assert g.order == [inner, outer]
    assert g.u2l[outer] == [inner] and g.u2l[inner] == []


def test_l2u_only_has_no_paths():
    outer, inner = nodes("outer", "inner")
    g = build_graph([outer, inner], {"l2u": {inner: [outer]}})
    assert g.paths == {outer: [], inner: []}
    assert g.leaves == [inner]


def test_no_dependencies_every_problem_is_a_leaf():
    a, b = nodes("a", "b")
    for deps in (None, {}, {"u2l": {}, "l2u": {}}):
        g = build_graph([a, b], deps)
        assert g.leaves == [a, b]
        assert g.paths == {a: [], b: []}


def test_three_level_chain_adjacent_u2l():
    low, mid, top = nodes("low", "mid", "top")
    deps = {"l2u": {low: [mid], mid: [top]}, "u2l": {mid: [low], top: [mid]}}
    g = build_graph([top, mid, low], deps)
    assert g.paths[mid] == [[mid, low, mid]]
    assert g.paths[top] == [[top, mid, top]]
    assert g.paths[low] == []
    assert g.leaves == [low]
    assert g.order == [low, mid, top]


def test_three_level_chain_skip_u2l_goes_through_the_middle():
    # top's parameters enter low's loss: the hypergradient must pass low, then mid.
    low, mid, top = nodes("low", "mid", "top")
    deps = {"l2u": {low: [mid], mid: [top]}, "u2l": {top: [low]}}
    g = build_graph([low, mid, top], deps)
    assert g.paths[top] == [[top, mid, low, top]]
    assert g.paths[mid] == []


def test_lbi_shape():
    # Learning by ignoring: pretrain -> finetune -> reweight, and pretrain -> reweight.
    pt, ft, rw = nodes("pt", "ft", "rw")
    deps = {"u2l": {rw: [pt]}, "l2u": {pt: [ft, rw], ft: [rw]}}
    g = build_graph([pt, ft, rw], deps)
    assert path_names(g, rw) == [["rw", "ft", "pt", "rw"], ["rw", "pt", "rw"]]
    assert g.paths[ft] == [] and g.paths[pt] == []
    assert g.parents[pt] == [ft, rw] and g.parents[ft] == [rw]
    assert g.children[rw] == [pt, ft] and g.children[ft] == [pt]
    assert g.leaves == [pt]
    assert g.order == [pt, ft, rw]


def test_diamond():
    bottom, left, right, top = nodes("bottom", "left", "right", "top")
    deps = {"l2u": {bottom: [left, right], left: [top], right: [top]},
            "u2l": {top: [bottom], left: [bottom], right: [bottom]}}
    g = build_graph([top, right, left, bottom], deps)
    assert path_names(g, top) == [["top", "left", "bottom", "top"],
                                  ["top", "right", "bottom", "top"]]
    assert g.paths[left] == [[left, bottom, left]]
    assert g.paths[right] == [[right, bottom, right]]
    assert g.leaves == [bottom]
    assert_topological(g)
    assert g.order[0] is bottom and g.order[-1] is top


def test_stacked_diamonds_give_every_path():
    # k diamonds stacked: 2**k distinct chains from the bottom to the top.
    k = 4
    levels = [N("n0")]
    l2u: dict[N, list[N]] = {}
    for i in range(k):
        a, b, join = N(f"a{i}"), N(f"b{i}"), N(f"n{i + 1}")
        l2u[levels[-1]] = [a, b]
        l2u[a] = [join]
        l2u[b] = [join]
        levels += [a, b, join]
    bottom, top = levels[0], levels[-1]
    g = build_graph(levels, {"l2u": l2u, "u2l": {top: [bottom]}})
    paths = g.paths[top]
    assert len(paths) == 2 ** k
    assert len({tuple(names(p)) for p in paths}) == 2 ** k
    for p in paths:
        assert p[0] is top and p[-1] is top and p[-2] is bottom
        assert len(p) == 2 * k + 2
        for upper, lower in zip(p[:-2], p[1:-1]):  # each hop is an l2u edge
            assert upper in g.parents[lower]


def test_several_leaves_and_uppers():
    a, b, c, u1, u2 = nodes("a", "b", "c", "u1", "u2")
    deps = {"l2u": {a: [u1], b: [u1, u2], c: [u2]}, "u2l": {u1: [a, b], u2: [b, c]}}
    g = build_graph([u1, u2, a, b, c], deps)
    assert g.leaves == [a, b, c]
    assert g.children[u1] == [a, b] and g.children[u2] == [b, c]
    assert g.parents[b] == [u1, u2]
    assert path_names(g, u1) == [["u1", "a", "u1"], ["u1", "b", "u1"]]
    assert path_names(g, u2) == [["u2", "b", "u2"], ["u2", "c", "u2"]]
    assert_topological(g)


def test_topological_order_for_every_input_order():
    pt, ft, rw = nodes("pt", "ft", "rw")
    deps = {"u2l": {rw: [pt]}, "l2u": {pt: [ft, rw], ft: [rw]}}
    for perm in itertools.permutations([pt, ft, rw]):
        g = build_graph(list(perm), deps)
        assert g.order == [pt, ft, rw]
        assert g.nodes == list(perm)


def test_duplicate_edges_are_merged():
    outer, inner = nodes("outer", "inner")
    deps = {"u2l": {outer: [inner, inner]}, "l2u": {inner: [outer, outer]}}
    g = build_graph([outer, inner], deps)
    assert g.parents[inner] == [outer]
    assert g.children[outer] == [inner]
    assert g.paths[outer] == [[outer, inner, outer]]


def test_deep_chain_needs_no_recursion():
    depth = 3000  # far beyond Python's default recursion limit
    chain = [N(f"p{i}") for i in range(depth)]
    l2u = {lo: [up] for lo, up in zip(chain, chain[1:])}
    g = build_graph(chain, {"l2u": l2u, "u2l": {chain[-1]: [chain[0]]}})
    assert g.order == chain
    assert g.leaves == [chain[0]]
    (path,) = g.paths[chain[-1]]
    assert path == [*reversed(chain), chain[-1]]


def test_graph_module_imports_no_torch():
    tree = ast.parse(Path(betty.graph.__file__).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert "torch" not in imported


# -- structural errors -------------------------------------------------------------------
def test_cycle_is_named():
    a, b, c, free = nodes("a", "b", "c", "free")
    with pytest.raises(DependencyError, match="cycle") as err:
        build_graph([a, b, c, free], {"l2u": {a: [b], b: [c], c: [a]}})
    message = str(err.value)
    assert all(f"'{n}'" in message for n in ("a", "b", "c"))
    assert "free" not in message


def test_two_cycle_and_self_loop():
    a, b = nodes("a", "b")
    with pytest.raises(DependencyError, match="cycle"):
        build_graph([a, b], {"l2u": {a: [b], b: [a]}})
    with pytest.raises(DependencyError, match="'a' is listed as its own upper"):
        build_graph([a, b], {"l2u": {a: [a]}})
    with pytest.raises(DependencyError, match="'a' is listed as its own lower"):
        build_graph([a, b], {"u2l": {a: [a]}, "l2u": {b: [a]}})


@pytest.mark.parametrize("kind", ["u2l", "l2u"])
def test_problem_missing_from_problems(kind):
    outer, inner, ghost = nodes("outer", "inner", "ghost")
    deps = {"u2l": {outer: [inner]}, "l2u": {inner: [outer]}}
    deps[kind] = {**deps[kind], ghost: [outer] if kind == "l2u" else [inner]}
    with pytest.raises(DependencyError, match=rf"'{kind}'.*'ghost'.*not in the `problems`"):
        build_graph([outer, inner], deps)


def test_missing_problem_as_a_value():
    outer, inner, ghost = nodes("outer", "inner", "ghost")
    with pytest.raises(DependencyError, match="'ghost'"):
        build_graph([outer, inner], {"l2u": {inner: [outer, ghost]}})


def test_duplicate_names_and_repeated_problem():
    a1, a2, b = N("a"), N("a"), N("b")
    with pytest.raises(DependencyError, match="two problems are named 'a'"):
        build_graph([a1, b, a2], {})
    with pytest.raises(DependencyError, match="'a' appears twice"):
        build_graph([a1, b, a1], {})


def test_u2l_without_l2u_chain():
    a, b, c = nodes("a", "b", "c")
    # c is above b, but no l2u chain leads from a up to c.
    deps = {"l2u": {b: [c], a: [b]}, "u2l": {a: [c]}}
    with pytest.raises(DependencyError, match="'a' enters the loss of 'c'") as err:
        build_graph([a, b, c], deps)
    assert "'c': [..., 'a']" in str(err.value)


def test_unknown_dependency_key():
    a, b = nodes("a", "b")
    with pytest.raises(DependencyError, match="unknown keys.*'l2U'"):
        build_graph([a, b], {"u2l": {}, "l2U": {a: [b]}})
