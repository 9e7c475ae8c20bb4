"""Hypergradient diagnostics (``EngineConfig.diagnostics=True``; off by default).

Per problem and global step, logged under the problem's name:

* ``direct_norm``: norm of the problem's own gradient (its direct part);
* ``implicit_norm/<path>``: norm of the hypergradient carried by each path, named by the
  lowers it passes through (``inner``, or ``mid-low`` for a longer path);
* ``cg_residual/<lower>``: relative residual ``||v - H x|| / ||v||`` of the CG solve in the
  hop through ``lower`` (0 = solved exactly; near 1 = more ``cg_iterations`` needed);
* ``neumann_rho/<lower>``: estimate of the spectral radius of ``I - neumann_alpha * H`` (a few
  power iterations); the Neumann series converges only if it is below 1, so a value >= 1
  raises a `DiagnosticWarning` (once per problem and lower);
* ``time_ms``: wall time of the problem's local steps in this global step (on CUDA the
  device is synchronised around each step, so it is the real time, at a cost).

Costs when on: a norm per gradient, ``betty.hypergradient.neumann.POWER_ITERATIONS`` extra
Hessian-vector products per Neumann hop, and one host read of all values per global step.
When off, nothing runs.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from betty.logging.base import to_host

Reporter = Callable[[str, Tensor], None]


class DiagnosticWarning(UserWarning):
    """A hypergradient diagnostic found a problem (e.g. a Neumann series that diverges)."""


def active_diagnostics(engine: Any) -> Diagnostics | None:
    """The engine's `Diagnostics` when they are on, else None (also for no engine)."""
    diagnostics = getattr(engine, "diagnostics", None)
    return diagnostics if isinstance(diagnostics, Diagnostics) and diagnostics.enabled else None


def path_label(names: Sequence[str]) -> str:
    """``[outer, mid, low, outer]`` -> ``"mid-low"`` (the lowers a path passes through)."""
    return "-".join(names[1:-1])


class Diagnostics:
    """Collects the diagnostics of one global step; the engine emits them at its end."""

    def __init__(self, enabled: bool = False) -> None:
        self.enabled = enabled
        self.latest: dict[str, dict[str, float]] = {}  # last emitted values, per problem
        self._values: dict[str, dict[str, Any]] = {}
        self._warned: set[tuple[str, str]] = set()

    # -- recording (hot path: tensors stay on the device) ------------------------------
    def record(self, owner: str, key: str, value: Tensor | float) -> None:
        self._values.setdefault(owner, {})[key] = value

    def record_norm(self, owner: str, key: str, vector: Sequence[Tensor | None]) -> None:
        """Euclidean norm of a gradient given as a list of tensors (None entries: zeros)."""
        parts = [t.detach() for t in vector if t is not None]
        parts = [t if t.dtype == torch.float64 else t.float() for t in parts]  # bf16 -> fp32
        self.record(owner, key, torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(t) for t in parts])) if parts else 0.0)

    def reporter(self, owner: str, lower: str) -> Reporter:
        """What a hop through ``lower`` (for ``owner``'s hypergradient) reports to."""
        return lambda key, value: self.record(owner, f"{key}/{lower}", value)

    def clock(self) -> float | None:
        """Start time of a timed section, or None when diagnostics are off."""
        if not self.enabled:
            return None
        _synchronize()
        return time.perf_counter()

    def add_time(self, owner: str, started: float) -> None:
        _synchronize()
        elapsed = 1000.0 * (time.perf_counter() - started)
        metrics = self._values.setdefault(owner, {})
        metrics["time_ms"] = metrics.get("time_ms", 0.0) + elapsed

    # -- end of a global step ----------------------------------------------------------
    def end_step(self, logger: Any, global_step: int) -> dict[str, dict[str, float]]:
        """Read this step's values (one host read), warn, and log them under each problem's
        name at ``global_step``. Returns the values."""
        if not self._values:
            return {}
        values, self._values = self._values, {}
        keys = [(owner, key) for owner, metrics in values.items() for key in metrics]
        host = iter(to_host([values[o][k] for o, k in keys]))
        out: dict[str, dict[str, float]] = {}
        for owner, key in keys:
            out.setdefault(owner, {})[key] = next(host)
        self._check(out)
        self.latest.update(out)
        for owner, metrics in out.items():
            logger.log(metrics, tag=owner, step=global_step)
        return out

    def _check(self, values: dict[str, dict[str, float]]) -> None:
        for owner, metrics in values.items():
            for key, rho in metrics.items():
                if not key.startswith("neumann_rho/") or not rho >= 1.0:
                    continue
                lower = key.split("/", 1)[1]
                if (owner, lower) in self._warned:
                    continue
                self._warned.add((owner, lower))
                warnings.warn(
                    f"problem '{owner}': the Neumann series through lower problem '{lower}' "
                    f"cannot converge: the spectral radius of (I - neumann_alpha * H) is about "
                    f"{rho:.3g} >= 1 (H: the Hessian of '{lower}''s loss). Lower "
                    f"Config.neumann_alpha of '{lower}' below 2 / (largest eigenvalue of H), "
                    "or use Config(type='cg'); if H has eigenvalues <= 0 (not at a minimum), "
                    "no neumann_alpha helps",
                    DiagnosticWarning, stacklevel=2,
                )


def _synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
