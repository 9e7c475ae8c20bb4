"""Text domains from the standard library of the Python that runs the example.

Every domain is a list of real files of ``sysconfig.get_paths()["stdlib"]``; nothing is
downloaded. Files are split into train / validation / test (never sharing a file) by a fixed
seed, so every run seed sees the same split; `manifest` records the exact file lists, their
sizes and the Python version, so a run can be reproduced (or compared) on another machine.

Domains (``kind``: how a file becomes bytes):

* ``email``, ``asyncio``, ``xml`` (``code``): the ``*.py`` files of that package;
* ``docstrings`` (``prose``): the docstrings of each top-level stdlib module (one document per
  ``*.py`` file directly in the stdlib folder, docstrings joined by blank lines), English text;
* ``scrambled`` (``harmful``): the ``*.py`` files of ``unittest``, ``logging`` and ``http``
  with their bytes shuffled within each file and every byte value replaced through one fixed
  random permutation of 1..255: noise as peaked as code, but on other symbols and without
  any structure, so it pulls the LM away from the target from the first step.
"""

from __future__ import annotations

import ast
import random
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import torch

SPLITS = ("train", "val", "test")
SEPARATOR = b"\x00"  # between files of a stream; never occurs in the text itself
SPLIT_SEED = 0  # the file split does not depend on the run seed
SCRAMBLE_SEED = 1234  # permutations of the harmful domain's bytes
MIN_DOCSTRING_BYTES = 300  # modules with less documentation than this are left out

# name -> (kind, packages)
DOMAINS: dict[str, tuple[str, tuple[str, ...]]] = {
    "email": ("code", ("email",)),
    "asyncio": ("code", ("asyncio",)),
    "xml": ("code", ("xml",)),
    "docstrings": ("prose", ()),
    "scrambled": ("harmful", ("unittest", "logging", "http")),
}


def stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def package_files(root: Path, packages: tuple[str, ...]) -> list[Path]:
    """The ``*.py`` files of ``packages`` (recursively), without test suites."""
    files = []
    for package in packages:
        files += [f for f in (root / package).rglob("*.py")
                  if "test" not in f.relative_to(root).parts[1:-1]]
    return sorted(files)


def docstrings(path: Path) -> bytes:
    """Every docstring of a module (module, classes, functions), joined by blank lines."""
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError):
        return b""
    nodes = [tree] + [n for n in ast.walk(tree) if isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    docs = [ast.get_docstring(n) for n in nodes]
    return "\n\n".join(d for d in docs if d).encode("utf-8")


def scrambled_bytes(data: bytes, key: str) -> bytes:
    """``data`` shuffled by a generator seeded from the file's name ``key``, then every byte
    value mapped through one fixed permutation of 1..255 (0, the `SEPARATOR`, stays 0)."""
    order = list(data)
    random.Random(f"{SCRAMBLE_SEED}:{key}").shuffle(order)
    alphabet = list(range(1, 256))
    random.Random(SCRAMBLE_SEED).shuffle(alphabet)
    return bytes(order).translate(bytes([0] + alphabet))


@dataclass
class Document:
    path: str  # relative to the stdlib folder
    data: bytes = field(repr=False)


def load_domain(name: str, root: Path | None = None) -> list[Document]:
    """The documents of domain ``name``, sorted by path; empty ones left out."""
    root = stdlib() if root is None else root
    kind, packages = DOMAINS[name]
    if kind == "prose":
        files = sorted(f for f in root.glob("*.py") if not f.name.startswith("_"))
        docs = [Document(str(f.relative_to(root)), docstrings(f)) for f in files]
        return [d for d in docs if len(d.data) >= MIN_DOCSTRING_BYTES]
    docs = []
    for f in package_files(root, packages):
        rel = str(f.relative_to(root))
        data = f.read_bytes().replace(SEPARATOR, b"")
        docs.append(Document(rel, scrambled_bytes(data, rel) if kind == "harmful" else data))
    return [d for d in docs if d.data]


def split_files(docs: list[Document], fractions: tuple[float, float] = (0.2, 0.2)
                ) -> dict[str, list[Document]]:
    """Shuffle by `SPLIT_SEED` and cut into val / test (``fractions`` of the files, at least
    one each) and train (the rest)."""
    order = list(docs)
    random.Random(SPLIT_SEED).shuffle(order)
    n_val = max(1, round(fractions[0] * len(order)))
    n_test = max(1, round(fractions[1] * len(order)))
    parts = {"val": order[:n_val], "test": order[n_val:n_val + n_test],
             "train": order[n_val + n_test:]}
    if not parts["train"]:
        raise ValueError(f"too few files to split: {len(docs)}")
    return {k: sorted(v, key=lambda d: d.path) for k, v in parts.items()}


def stream(docs: list[Document]) -> torch.Tensor:
    """The documents' bytes, concatenated with `SEPARATOR` between them, as uint8."""
    joined = SEPARATOR.join(d.data for d in docs)
    return torch.frombuffer(bytearray(joined), dtype=torch.uint8)


@dataclass
class Corpus:
    """Per domain and split: the documents and their byte stream."""

    documents: dict[str, dict[str, list[Document]]]
    streams: dict[str, dict[str, torch.Tensor]]
    target: str

    @property
    def domains(self) -> list[str]:
        return list(self.documents)

    def sizes(self, split: str = "train") -> dict[str, int]:
        return {d: len(self.streams[d][split]) for d in self.domains}

    def manifest(self) -> dict:
        """What a run trained and evaluated on: Python, stdlib folder, the file lists."""
        return {
            "python": sys.version, "implementation": sys.implementation.name,
            "stdlib": str(stdlib()), "target": self.target, "split_seed": SPLIT_SEED,
            "scramble_seed": SCRAMBLE_SEED,
            "domains": {name: {"kind": DOMAINS[name][0], "splits": {
                split: [[doc.path, len(doc.data)] for doc in docs]
                for split, docs in splits.items()}} for name, splits in self.documents.items()},
        }


def load_corpus(target: str = "email", domains: tuple[str, ...] = tuple(DOMAINS),
                max_bytes: int | None = None, root: Path | None = None,
                target_train_files: int | None = None) -> Corpus:
    """All ``domains`` split by file; ``max_bytes`` caps each stream; ``target_train_files``
    keeps only that many of the target's training files (drawn by `SPLIT_SEED`): a scarce
    target, the setting data mixing is for."""
    if target not in domains:
        raise ValueError(f"target {target!r} is not one of the domains {domains}")
    documents = {name: split_files(load_domain(name, root)) for name in domains}
    if target_train_files is not None:
        train = documents[target]["train"]
        kept = random.Random(SPLIT_SEED).sample(train, min(target_train_files, len(train)))
        documents[target]["train"] = sorted(kept, key=lambda d: d.path)
    streams = {name: {s: stream(docs) for s, docs in splits.items()}
               for name, splits in documents.items()}
    if max_bytes is not None:
        for name in domains:
            streams[name] = {s: t[:max_bytes] for s, t in streams[name].items()}
    return Corpus(documents, streams, target)


class WindowSampler:
    """Random windows of ``length`` bytes from each stream: batches ``[D, n, length]``.

    An iterable of ``steps`` batches per pass, drawing from one generator seeded once, so the
    sequence of batches depends only on ``seed`` (betty restarts the loader when exhausted).
    """

    def __init__(self, streams: list[torch.Tensor], n: int, length: int, seed: int,
                 steps: int = 1000) -> None:
        short = [len(s) for s in streams if len(s) <= length]
        if short:
            raise ValueError(f"a stream of {short[0]} bytes is shorter than a window")
        self.streams, self.n, self.length, self.steps = streams, n, length, steps
        self.generator = torch.Generator().manual_seed(seed)

    def sample(self) -> torch.Tensor:
        offsets = [torch.randint(0, len(s) - self.length + 1, (self.n,),
                                 generator=self.generator) for s in self.streams]
        index = torch.arange(self.length)
        return torch.stack([s[o[:, None] + index] for s, o in zip(self.streams, offsets)]).long()

    def __iter__(self):
        for _ in range(self.steps):
            yield self.sample()


def eval_windows(data: torch.Tensor, length: int, max_windows: int | None = None
                 ) -> torch.Tensor:
    """Non-overlapping windows of ``length`` bytes covering ``data`` (the tail that does not
    fill a window is dropped), evenly thinned to ``max_windows``: ``[W, length]`` long."""
    count = len(data) // length
    windows = data[: count * length].reshape(count, length)
    if max_windows is not None and count > max_windows:
        windows = windows[torch.linspace(0, count - 1, max_windows).long()]
    return windows.long()
