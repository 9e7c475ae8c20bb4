"""The documentation's wiring, checked without building the site (`.ci/run` builds it with
`mkdocs build --strict`): every snippet a page includes exists, every tutorial and example is
on a page, and the examples write figures where the docs say."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import re
from pathlib import Path

import pytest

from betty.configs import Config, EngineConfig

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
SNIPPET = re.compile(r'--8<-- "([^"]+)"')


def pages() -> list[Path]:
    return sorted(DOCS.rglob("*.md"))


def nav() -> str:
    return (REPO / "mkdocs.yml").read_text()


def test_every_included_snippet_and_section_exists():
    """pymdownx.snippets fails the build on a missing file, but includes nothing for a missing
    section: a renamed marker would leave an empty code block on a tutorial page."""
    included = 0
    for page in pages():
        for target in SNIPPET.findall(page.read_text()):
            path, _, section = target.partition(":")
            source = REPO / path
            assert source.is_file(), f"{page.relative_to(REPO)} includes {path}"
            if section:
                text = source.read_text()
                assert f"--8<-- [start:{section}]" in text, f"{target} ({page.name})"
                assert f"--8<-- [end:{section}]" in text, f"{target} ({page.name})"
            included += 1
    assert included >= 15


def test_every_tutorial_file_is_shown_on_a_page():
    shown = " ".join(p.read_text() for p in (DOCS / "tutorials").glob("*.md"))
    tutorials = sorted((REPO / "examples" / "tutorials").glob("*.py"))
    assert len(tutorials) == 5
    for tutorial in tutorials:
        assert f'"examples/tutorials/{tutorial.name}"' in shown, tutorial.name


def test_every_guide_is_in_the_nav():
    # (examples missing from the nav are added by docs/hooks.py)
    for page in pages():
        assert page.relative_to(DOCS).as_posix() in nav(), page


def test_api_reference_covers_the_public_names():
    api = " ".join(p.read_text() for p in (DOCS / "api").glob("*.md"))
    for name in ("betty.problems.Problem", "betty.problems.ImplicitProblem",
                 "betty.problems.IterativeProblem", "betty.problems.TaskBatchedProblem",
                 "betty.engine.Engine", "betty.configs.Config", "betty.configs.EngineConfig",
                 "betty.optim", "betty.hypergradient", "betty.errors",
                 "betty.checkpoint.CheckpointError"):
        assert f"::: {name}\n" in api, name


@pytest.fixture
def common():
    spec = importlib.util.spec_from_file_location("examples_common",
                                                  REPO / "examples" / "_common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_examples_write_figures_outside_the_committed_ones(common, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    committed = REPO / "examples" / "hpo" / "hpo.png"
    parser = argparse.ArgumentParser()
    common.add_figure_arguments(parser, committed)

    def path(*argv: str) -> str | None:
        return common.figure_path(parser.parse_args(list(argv)), committed)

    assert path() == str(Path("outputs") / "hpo" / "hpo.png")
    assert (tmp_path / "outputs" / "hpo").is_dir()
    assert path("--plot", "") is None
    assert path("--plot", "a/b.png") == "a/b.png"
    assert path("--refresh-figures") == str(committed)
    for main in sorted((REPO / "examples").glob("*/main.py")):
        text = main.read_text()
        if "savefig" in text and "add_figure_arguments" not in text:
            pytest.fail(f"{main.relative_to(REPO)} draws a figure without add_figure_arguments")


@pytest.mark.parametrize("page", ["docs/api/configs.md", "README.md"])
def test_every_config_field_is_in_the_tables(page):
    text = (REPO / page).read_text()
    for cls in (Config, EngineConfig):
        for field in dataclasses.fields(cls):
            row = f"| `{field.name}` | `{field.default!r}` |".replace("'", '"')
            assert row in text, f"{cls.__name__}.{field.name} has no row {row} in {page}"


# What the API reference shows of these modules (their `__all__`, and the public methods of
# its classes) must carry a docstring.
DOCUMENTED = ["betty.optim", "betty.hypergradient", "betty.errors", "betty.logging",
              "betty.visualize", "betty.envs", "betty.distributed"]


@pytest.mark.parametrize("module", DOCUMENTED)
def test_public_names_have_docstrings(module):
    griffe = pytest.importorskip("griffe")
    root = griffe.load(module, search_paths=[str(REPO)])
    names = root.exports or [n for n, m in root.members.items()
                             if not n.startswith("_") and not m.is_alias]
    missing = [] if root.docstring else [module]
    for name in names:
        obj = root[name]
        if not (obj.is_class or obj.is_function):
            continue
        if not obj.docstring:
            missing.append(obj.path)
        if obj.is_class:
            missing += [member.path for member_name, member in obj.members.items()
                        if member.is_function and not member_name.startswith("_")
                        and not member.docstring]
    assert not missing, f"public names without a docstring: {missing}"
