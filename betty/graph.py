"""The program's structure, with no torch: dependencies -> DAG, order, leaves and paths.

``l2u`` maps each lower problem to the uppers it triggers (the hierarchy); ``u2l`` maps an
upper to the lowers whose losses its parameters enter (where hypergradients flow). A
hypergradient path of upper ``U`` through lower ``L`` is every chain of ``l2u`` edges from
``L`` up to ``U``, written top-down and closed by ``U``: ``[U, ..., L, U]``.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from betty.errors import DependencyError

Node = Hashable
MAX_PATHS = 10_000  # hypergradient paths per program; each costs a chain of hops per step


def _name(node: Any) -> str:
    return getattr(node, "name", repr(node))


@dataclass
class ProgramGraph:
    """Parents, children, leaves, paths and a topological order of a multilevel program."""

    nodes: list[Any]
    parents: dict[Any, list[Any]] = field(default_factory=dict)
    children: dict[Any, list[Any]] = field(default_factory=dict)
    paths: dict[Any, list[list[Any]]] = field(default_factory=dict)
    leaves: list[Any] = field(default_factory=list)
    order: list[Any] = field(default_factory=list)  # lowers before uppers
    u2l: dict[Any, list[Any]] = field(default_factory=dict)


def _check_members(nodes: Sequence[Any], deps: Mapping[str, Mapping[Any, Iterable[Any]]]) -> None:
    known = {id(n) for n in nodes}
    for kind in ("u2l", "l2u"):
        for key, values in deps.get(kind, {}).items():
            for node in (key, *values):
                if id(node) not in known:
                    raise DependencyError(
                        f"dependencies['{kind}'] mentions problem '{_name(node)}', which is not "
                        "in the `problems` list given to Engine; add it to `problems`"
                    )


def resolve_dependencies(nodes: Sequence[Any], deps: Mapping[str, Any] | None
                         ) -> dict[str, dict[Any, list[Any]]]:
    """``dependencies`` with problem names (str) replaced by the problems, and every value
    checked to be a list or tuple of problems."""
    by_name = {_name(n): n for n in nodes}

    def find(kind: str, item: Any) -> Any:
        if not isinstance(item, str):
            return item
        if item not in by_name:
            raise DependencyError(
                f"dependencies['{kind}'] names problem '{item}', but `problems` has only "
                f"{sorted(by_name)}; fix the name or add the problem"
            )
        return by_name[item]

    out: dict[str, dict[Any, list[Any]]] = {}
    for kind, mapping in (deps or {}).items():
        if not isinstance(mapping, Mapping):
            raise DependencyError(f"dependencies['{kind}'] must be a dict problem -> "
                                  f"[problems], got {type(mapping).__name__}")
        out[kind] = {}
        for key, values in mapping.items():
            if not isinstance(values, (list, tuple)):
                raise DependencyError(
                    f"dependencies['{kind}'][{_name(find(kind, key))!r}] must be a list of "
                    f"problems, got {type(values).__name__}; write [{_name(values)}]"
                )
            out[kind][find(kind, key)] = [find(kind, v) for v in values]
    return out


def _count_chains(lower: Any, upper: Any, parents: Mapping[Any, list[Any]]) -> int:
    """Number of l2u chains from ``lower`` up to ``upper``, without enumerating them."""
    memo: dict[int, int] = {}
    stack: list[tuple[Any, bool]] = [(lower, False)]
    while stack:
        node, expanded = stack.pop()
        if id(node) in memo:
            continue
        if node is upper:
            memo[id(node)] = 1
        elif expanded:
            memo[id(node)] = sum(memo[id(p)] for p in parents[node])
        else:
            stack.append((node, True))
            stack.extend((p, False) for p in parents[node] if id(p) not in memo)
    return memo[id(lower)]


def _check_names(nodes: Sequence[Any]) -> None:
    seen: dict[str, Any] = {}
    for node in nodes:
        name = _name(node)
        if name in seen:
            if seen[name] is node:
                raise DependencyError(f"problem '{name}' appears twice in `problems`")
            raise DependencyError(
                f"two problems are named '{name}'; problems reach each other by name, so "
                "give each a distinct name"
            )
        seen[name] = node


def _topological_order(nodes: Sequence[Any], parents: Mapping[Any, list[Any]]) -> list[Any]:
    """Kahn's algorithm over l2u edges (lower -> upper); raises on a cycle."""
    indegree = {n: 0 for n in nodes}
    for n in nodes:
        for p in parents[n]:
            indegree[p] += 1
    ready = [n for n in nodes if indegree[n] == 0]
    order: list[Any] = []
    while ready:
        n = ready.pop(0)
        order.append(n)
        for p in parents[n]:
            indegree[p] -= 1
            if indegree[p] == 0:
                ready.append(p)
    if len(order) != len(nodes):
        stuck = [_name(n) for n in nodes if indegree[n] > 0]
        raise DependencyError(
            f"dependencies['l2u'] has a cycle through problems {stuck}; a problem cannot be "
            "(indirectly) its own upper. Remove one edge of the cycle"
        )
    return order


def _upward_chains(lower: Any, upper: Any, parents: Mapping[Any, list[Any]]) -> list[list[Any]]:
    """Every l2u chain from ``lower`` up to ``upper``, found with an explicit stack."""
    chains: list[list[Any]] = []
    stack: list[list[Any]] = [[lower]]
    while stack:
        chain = stack.pop()
        last = chain[-1]
        if last is upper and len(chain) > 1:
            chains.append(chain)
            continue
        for parent in reversed(parents[last]):
            stack.append([*chain, parent])
    return chains


def build_graph(
    nodes: Sequence[Any], dependencies: Mapping[str, Mapping[Any, Iterable[Any]]] | None
) -> ProgramGraph:
    """Check ``dependencies`` and derive the program's structure.

    Problems may be given by name. Raises:
        DependencyError: unknown keys, a problem missing from ``nodes`` or an unknown name,
            a value that is not a list, duplicate names, a cycle, a ``u2l`` edge with no
            ``l2u`` chain from the lower up to the upper, or more than `MAX_PATHS` paths.
    """
    deps = dict(dependencies or {})
    unknown = set(deps) - {"u2l", "l2u"}
    if unknown:
        raise DependencyError(
            f"dependencies has unknown keys {sorted(unknown)}; use 'u2l' and 'l2u' only"
        )
    _check_names(nodes)
    deps = resolve_dependencies(nodes, deps)
    _check_members(nodes, deps)
    graph = ProgramGraph(nodes=list(nodes))
    for n in nodes:
        graph.parents[n] = []
        graph.children[n] = []
        graph.paths[n] = []
        graph.u2l[n] = []
    for lower, uppers in deps.get("l2u", {}).items():
        for upper in uppers:
            if upper is lower:
                raise DependencyError(f"problem '{_name(lower)}' is listed as its own upper")
            if upper not in graph.parents[lower]:
                graph.parents[lower].append(upper)
                graph.children[upper].append(lower)
    graph.order = _topological_order(nodes, graph.parents)
    for upper, lowers in deps.get("u2l", {}).items():
        for lower in lowers:
            if lower is upper:
                raise DependencyError(f"problem '{_name(upper)}' is listed as its own lower")
            count = _count_chains(lower, upper, graph.parents)
            if count > MAX_PATHS:
                raise DependencyError(
                    f"dependencies give {count} hypergradient paths from '{_name(upper)}' "
                    f"through '{_name(lower)}' (more than {MAX_PATHS}): every level feeds "
                    "several uppers, so the paths multiply; each path costs a chain of hops "
                    "per step. Remove l2u edges that do not carry a hypergradient"
                )
            chains = _upward_chains(lower, upper, graph.parents)
            if not chains:
                raise DependencyError(
                    f"dependencies['u2l'] says '{_name(upper)}' enters the loss of "
                    f"'{_name(lower)}', but no chain of l2u edges leads from '{_name(lower)}' "
                    f"up to '{_name(upper)}'; add '{_name(lower)}': [..., '{_name(upper)}'] "
                    "to dependencies['l2u']"
                )
            graph.u2l[upper].append(lower)
            for chain in chains:
                path = [*reversed(chain), upper]
                if path not in graph.paths[upper]:
                    graph.paths[upper].append(path)
    graph.leaves = [n for n in nodes if not graph.children[n]]
    return graph
