"""Shared fixtures of the test suite.

The suite runs on small dense problems: extra intra-op threads only add contention on the
2-core machines it runs on, so every test runs with one torch thread (restored afterwards).
Test files import their hand-written references from `references.py` (dense float64
formulas, docs/math.md) and `unrolled.py` (reverse-mode unrolls), which share no code with
betty.
"""

from __future__ import annotations

import pytest
import torch


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
