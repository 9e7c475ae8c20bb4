"""MkDocs hook: publish the examples' and benchmarks' READMEs, figures and code from where
they live in the repository, so the site shows the same files the tests run and nothing is
copied by hand (a copy would drift)."""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parent.parent
PUBLISHED = ("examples/*/README.md", "examples/*/*.png", "examples/*.py", "examples/*/*.py",
             "benchmarks/README.md", "benchmarks/*.py")


def _listed(nav) -> set[str]:
    if isinstance(nav, str):
        return {nav}
    if isinstance(nav, dict):
        return set().union(*(_listed(v) for v in nav.values()))
    if isinstance(nav, list):
        return set().union(*(_listed(v) for v in nav))
    return set()


def on_config(config):
    # An example added without touching mkdocs.yml still gets its page in the Examples
    # section, titled by its README's first heading (up to a colon).
    listed = _listed(config["nav"])
    for section in config["nav"]:
        if isinstance(section, dict) and "Examples" in section:
            for readme in sorted(ROOT.glob("examples/*/README.md")):
                relative = readme.relative_to(ROOT).as_posix()
                if relative not in listed:
                    heading = next((line for line in readme.read_text().splitlines()
                                    if line.startswith("# ")), "# " + readme.parent.name)
                    section["Examples"].append({heading[2:].split(":")[0]: relative})
    return config


def on_files(files: Files, config) -> Files:
    for pattern in PUBLISHED:
        for path in sorted(ROOT.glob(pattern)):
            relative = path.relative_to(ROOT).as_posix()
            if files.get_file_from_path(relative) is None:
                files.append(File(relative, src_dir=str(ROOT), dest_dir=config["site_dir"],
                                  use_directory_urls=config["use_directory_urls"]))
    return files


def on_page_markdown(markdown: str, page, config, files) -> str:
    # A README links to the guides as ../../docs/<guide>.md from its folder in the repository;
    # on the site the guides sit at the top.
    if page.file.src_uri.startswith(("examples/", "benchmarks/")):
        depth = page.file.src_uri.count("/")
        markdown = markdown.replace("](" + "../" * depth + "docs/", "](" + "../" * depth)
    return markdown
