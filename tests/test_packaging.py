"""The package a user installs: `python -m build` makes an sdist and, from it, a wheel; the
wheel, installed into a fresh virtual environment, runs the quick start and prints the same
test accuracy as the source tree.

The fresh environment gets betty only from the wheel (``--no-deps``, ``--no-index``). Its
dependencies (torch, numpy, scikit-learn for the quick start's data) are not installed again:
a ``.pth`` file points at the site-packages of the interpreter running the tests, which holds
them. Installing torch into every test's environment would copy about a gigabyte, and the
thing under test is betty's wheel; a ``.pth`` line adds that folder to ``sys.path`` without
running the ``.pth`` files inside it, so the editable install of the source tree that lives
there stays inactive (the test checks that ``betty`` is imported from the new environment).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = [str(REPO / "examples" / "quickstart.py"), "--iters", "200"]

pytestmark = pytest.mark.slow


def run(args: list[str], **kwargs) -> str:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    out = subprocess.run(args, capture_output=True, text=True, timeout=600, env=env, **kwargs)
    assert out.returncode == 0, f"{' '.join(args)}\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


def printed_accuracy(stdout: str) -> float:
    match = re.search(r"^test accuracy: ([0-9.]+)", stdout, re.MULTILINE)
    assert match, stdout[-2000:]
    return float(match.group(1))


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build")
    out = tmp_path_factory.mktemp("dist")
    # --no-isolation: the build backend (setuptools, a test extra) comes from this
    # environment; an isolated build would fetch it from the index twice (minutes on CI)
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)])
    return out


def test_build_makes_a_complete_wheel_and_sdist(dist):
    (wheel,) = dist.glob("betty_ml-*-py3-none-any.whl")
    (sdist,) = dist.glob("betty_ml-*.tar.gz")
    names = set(zipfile.ZipFile(wheel).namelist())
    source = {p.relative_to(REPO).as_posix() for p in (REPO / "betty").rglob("*.py")}
    assert source <= names  # every module of the package, subpackages included
    assert "betty/py.typed" in names
    assert not any(n.startswith(("tests/", "examples/")) for n in names)
    members = {m.split("/", 1)[1] for m in tarfile.open(sdist).getnames() if "/" in m}
    for needed in ("pyproject.toml", "README.md", "betty/engine.py", "tests/conftest.py",
                   "examples/quickstart.py", "docs/index.md", "mkdocs.yml"):
        assert needed in members


def test_twine_accepts_both(dist):
    pytest.importorskip("twine")
    stdout = run([sys.executable, "-m", "twine", "check", "--strict", *map(str, dist.iterdir())])
    assert stdout.count("PASSED") == 2


def test_installed_wheel_runs_the_quick_start(dist, tmp_path):
    (wheel,) = dist.glob("betty_ml-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])  # this pip installs
    python = str(venv / "bin" / "python")
    site = run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"])
    Path(site.strip(), "_test_dependencies.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n")
    run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index",
         "-q", str(wheel)])

    # (from tmp_path: `python -c` puts the current folder first on sys.path)
    where = run([python, "-c", "import betty; print(betty.__file__, betty.__version__)"],
                cwd=tmp_path)
    assert where.startswith(str(venv)), where  # the wheel's betty, not the source tree's

    installed = printed_accuracy(run([python, *QUICKSTART], cwd=tmp_path))
    source = printed_accuracy(run([sys.executable, *QUICKSTART], cwd=REPO))
    assert installed == source > 0.9  # the same program gives the same number
