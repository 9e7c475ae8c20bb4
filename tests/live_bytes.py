"""Peak live CPU tensor bytes while a function runs, counted exactly.

``torch.profiler`` records every allocation and free of the CPU allocator; the running sum of
those events, from zero at the start, peaks at what the function held at most above what was
live before it. The collector runs first and is off meanwhile: garbage left by earlier tests
and freed inside the window would count negative.
"""

from __future__ import annotations

import gc
from collections.abc import Callable
from typing import TypeVar

from torch.profiler import ProfilerActivity, profile

T = TypeVar("T")


def peak_live_bytes(run: Callable[[], T]) -> tuple[int, T]:
    """``(peak bytes above the start, run())``."""
    gc.collect()
    gc.disable()
    try:
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = run()
    finally:
        gc.enable()
    events = sorted((e for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]"), key=lambda e: e.start_ns())
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak, out
