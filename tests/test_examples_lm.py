"""The LM data-mixing example (examples/lm_data_mixing): its data, its metric and what it learns.

References: bits per byte against a hand computation (log-softmax of the logits, by hand);
the file split against the domain's full file list (disjoint, complete, recorded in the
manifest); the harmful domain against the bytes it was made from (a shuffle and a byte
substitution keep the sorted byte histogram); the quick run's learned domain weights against
uniform (the harmful domain must end far below 1/D).
"""

from __future__ import annotations

import importlib.util
import math
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "lm_data_mixing"


@pytest.fixture(scope="module")
def example():
    """The example's modules: main.py puts its folder on sys.path and imports the others
    (unique names: stdlib_text, byte_lm, mixing_report)."""
    spec = importlib.util.spec_from_file_location("lm_data_mixing_main", EXAMPLE / "main.py")
    main = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = main  # dataclasses look their module up
    spec.loader.exec_module(main)
    return sys.modules["stdlib_text"], sys.modules["byte_lm"], main


@pytest.fixture(scope="module")
def corpus(example):
    """The domains made of whole files (the docstrings domain parses every stdlib module:
    seconds; its split is the same function)."""
    return example[0].load_corpus("email", domains=("email", "asyncio", "xml", "scrambled"))


def test_bits_per_byte_is_the_hand_computed_mean_of_minus_log2_p(example):
    _, model_mod, _ = example
    torch.manual_seed(0)
    model = model_mod.byte_lm(model_mod.ModelSize(width=8, layers=1, heads=2, context=6,
                                                  dropout=0.5))
    windows = torch.randint(0, 256, (3, 7), generator=torch.Generator().manual_seed(1))
    bpb = model_mod.bits_per_byte(model, windows, batch=2)  # two batches: 2 + 1 windows
    assert model.training  # evaluated in eval mode (no dropout), training mode restored
    model.eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=windows[:, :-1]).logits, -1)
    nats = -sum(logp[w, t, windows[w, t + 1]].item() for w in range(3) for t in range(6))
    assert bpb == pytest.approx(nats / 18 / math.log(2), rel=1e-6)
    assert 7.0 < bpb < 9.0  # an untrained model is near uniform: 8 bits per byte


def test_files_are_split_disjointly_completely_and_recorded(example, corpus):
    data, _, _ = example
    manifest = corpus.manifest()
    assert manifest["python"] == sys.version and manifest["target"] == "email"
    root = data.stdlib()
    for name in corpus.domains:
        packages = data.DOMAINS[name][1]
        parts = {s: {d.path for d in corpus.documents[name][s]} for s in data.SPLITS}
        assert all(parts.values())
        assert not (parts["train"] & parts["val"] or parts["train"] & parts["test"]
                    or parts["val"] & parts["test"])
        every = {str(f.relative_to(root)) for f in data.package_files(root, packages)
                 if f.stat().st_size}  # every non-empty file of the packages
        assert set().union(*parts.values()) == every
        for split in data.SPLITS:
            docs = corpus.documents[name][split]
            recorded = manifest["domains"][name]["splits"][split]
            assert recorded == [[d.path, len(d.data)] for d in docs]
            # the stream is the files' bytes with one separator between files
            stream = corpus.streams[name][split]
            assert len(stream) == sum(len(d.data) for d in docs) + len(docs) - 1
            assert int((stream == 0).sum()) == len(docs) - 1
    assert manifest["domains"]["scrambled"]["kind"] == "harmful"


def test_harmful_domain_is_a_shuffle_and_substitution_of_real_code(example, corpus):
    data, _, _ = example
    doc = corpus.documents["scrambled"]["train"][0]
    original = (data.stdlib() / doc.path).read_bytes()
    assert doc.data != original and len(doc.data) == len(original)
    # same multiset of byte frequencies, different symbols: sorted histograms agree
    assert sorted(Counter(doc.data).values()) == sorted(Counter(original).values())
    assert Counter(doc.data).most_common(1)[0][0] != Counter(original).most_common(1)[0][0]


@pytest.mark.slow
def test_quick_run_drives_the_harmful_domain_down(example):
    _, _, main = example
    settings = replace(main.QUICK, variants=("domain",))
    run = main.run_one(main.load_corpus("email"), settings, 0, "domain:darts")
    history, domains = run["history"], list(main.DOMAINS)
    harmful = domains.index("scrambled")
    assert history[0][1] == pytest.approx([1 / len(domains)] * len(domains))
    weights = torch.tensor(run["final_weights"])
    assert weights.sum().item() == pytest.approx(1.0)
    # driven far below uniform, and below every real domain
    assert weights[harmful] < 0.5 / len(domains)
    assert weights[harmful] == weights.min()
    assert 2.0 < run["test_bpb"] < 6.0  # learned something: uniform guessing is 8 bits/byte
