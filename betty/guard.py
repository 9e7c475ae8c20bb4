"""The non-finite guard (``EngineConfig.nonfinite``): no NaN or inf is applied or saved unseen.

Checked on the device, without a host read where it is checked: every local step's loss, and
before every optimizer step the problem's own gradient and each path's hypergradient (their
largest absolute entry, one multi-tensor kernel per vector). The flags are read once per
global step, all together, at its end (before validation and any checkpoint):

* ``"raise"`` (default): `NonFiniteError` naming the problem, its local and the global step,
  and whether the loss, the gradient or the hypergradient was not finite. Nothing after the
  fault is saved: the checkpoint of that global step is never written.
* ``"skip"``: as the fp16 grad scaler does, an optimizer step whose loss or gradients are not
  finite is skipped (the parameters and optimizer state stay as they were), counted in
  ``problem.skipped_steps`` and logged. This reads the flag before each optimizer step.
* ``"off"``: no checks and no reads.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

import torch
from torch import Tensor

from betty.errors import TrainingError

log = logging.getLogger("betty")
POLICIES = ("raise", "skip", "off")


class NonFiniteError(TrainingError):
    """A loss, gradient or hypergradient held NaN or inf (``EngineConfig.nonfinite``)."""


# from this many elements a tensor's max |t| comes from aminmax, a vectorized reduction (about
# 3 ms for 16M float32 on one CPU thread), not from the inf-norm kernel (about 48 ms there);
# smaller tensors share one foreach inf-norm launch
LARGE = 1 << 16


def largest_magnitude(tensors: Sequence[Tensor | None]) -> Tensor | None:
    """``max |t|`` over all entries as a 0-d tensor on the device (NaN if any entry is NaN,
    inf if any is inf; a max cannot overflow as a sum of squares can)."""
    present = [t.detach() for t in tensors if t is not None and t.numel()]
    if not present:
        return None
    small = [t for t in present if t.numel() < LARGE]
    parts = list(torch._foreach_norm(small, float("inf"))) if small else []
    for t in present:
        if t.numel() >= LARGE:
            low, high = torch.aminmax(t)
            parts += [high, low.neg()]
    return parts[0] if len(parts) == 1 else torch.stack(parts).amax()


class FiniteGuard:
    """Pending device flags of one engine, with what each one checked."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self.active = policy != "off"
        # pending checks: a 0-d value per loss, the max |entry| per gradient (NaN or inf
        # propagate into it); finiteness is decided for all of them at the one read
        self.flags: list[Tensor] = []
        self._where: list[tuple[str, int, str]] = []  # (problem, local step, what)
        self.skipped: dict[str, int] = {}

    def observe(self, owner: str, step: int, what: str,
                tensors: Sequence[Tensor | None]) -> None:
        """Record whether ``tensors`` are all finite (no host read)."""
        if not self.active:
            return
        if len(tensors) == 1 and tensors[0] is not None and tensors[0].dim() == 0:
            self.flags.append(tensors[0].detach())  # a loss: no kernel at all until the read
            self._where.append((owner, step, what))
            return
        value = largest_magnitude(tensors)
        if value is None:
            return
        self.flags.append(value)
        self._where.append((owner, step, what))

    def allow_step(self, owner: str) -> bool:
        """Before ``owner``'s optimizer step: False if it must be skipped (policy "skip"
        and a pending check of ``owner`` failed; one host read)."""
        if self.policy != "skip":
            return True
        mine = [i for i, (name, _, _) in enumerate(self._where) if name == owner]
        if not mine:
            return True
        finite = _finite([self.flags[i] for i in mine])  # the one read
        bad = [self._where[i] for i, ok in zip(mine, finite) if not ok]
        keep = set(mine)
        self.flags = [f for i, f in enumerate(self.flags) if i not in keep]
        self._where = [w for i, w in enumerate(self._where) if i not in keep]
        if not bad:
            return True
        self.skipped[owner] = self.skipped.get(owner, 0) + 1
        name, step, what = bad[0]
        log.warning("problem '%s': %s not finite at local step %d; optimizer step skipped "
                    "(EngineConfig.nonfinite='skip'; %d skipped so far)", name, what, step,
                    self.skipped[owner])
        return False

    def end_step(self, global_step: int) -> None:
        """End of a global step: read every pending flag at once; raise on the first
        failure (policy "raise")."""
        if not self.flags:
            return
        values, where = self.flags, self._where
        # the global step's one host read
        finite = _finite(values)
        self.flags, self._where = [], []
        for ok, value, (name, step, what) in zip(finite, values, where):
            if not ok and self.policy == "raise":
                shown = "nan" if value.isnan() else "inf"  # a failure: reads are free now
                raise NonFiniteError(
                    f"problem '{name}': the {what} is not finite ({shown}) at its local "
                    f"step {step}, global step {global_step}; nothing after it was saved. "
                    "Lower the learning rate, clip gradients (Config.gradient_clipping), "
                    "check the data, or set EngineConfig(nonfinite='skip') to skip such steps"
                )


def _finite(values: list[Tensor]) -> list[bool]:
    """Which 0-d ``values`` are finite, with one host read: their sum (float64 when the
    dtypes differ) is finite exactly when every value is, unless the sum itself overflows;
    only then, or on a failure, is each value read."""
    dtypes = {v.dtype for v in values}
    same = values if len(dtypes) == 1 else [v.double() for v in values]
    stacked = torch.stack(same) if len(same) > 1 else same[0].reshape(1)
    if math.isfinite(stacked.sum().item()):
        return [True] * len(values)
    return torch.isfinite(stacked).tolist()
