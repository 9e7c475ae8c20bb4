"""Mixed precision of one problem: autocast for the loss, a gradient scaler for fp16.

fp16 keeps a `torch.amp.GradScaler` (CPU and CUDA): the loss is scaled before the backward,
gradients are unscaled before clipping, and a step whose gradients hold inf/NaN is skipped
(and counted in ``skipped_steps``). bf16 needs no scaler.

Finite-difference hypergradients (darts, sama) evaluate the lower loss inside
`full_precision()`, which turns every problem's autocast off: their central difference
``[dL/dlam(w + eps v) - dL/dlam(w - eps v)] / (2 eps)`` cancels two nearly equal gradients,
and bf16's 8-bit mantissa (fp16's 11) rounds the activations and losses of each probe far more
than the probe radius moves them, so under autocast the difference is mostly rounding noise.
Second-order products (neumann, cg) do not cancel and keep the problem's autocast.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

from betty.configs import Config

log = logging.getLogger("betty")

_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_SWITCH = threading.local()  # .off: autocast disabled in this thread (full_precision)


@contextmanager
def full_precision() -> Iterator[None]:
    """Inside this context every problem's `Precision.autocast` is a no-op (fp32 compute).

    Used around finite-difference probes (see the module docstring); nests and is per thread.
    """
    previous = getattr(_SWITCH, "off", False)
    _SWITCH.off = True
    try:
        yield
    finally:
        _SWITCH.off = previous


class Precision:
    """Autocast, loss scaling and the guarded optimizer step of one problem: a plugin that
    receives the optimizer and the step as closures (as torch's GradScaler and Lightning's
    precision plugins do) and never calls back into the problem."""

    def __init__(self, owner: str, config: Config, device: torch.device) -> None:
        self.owner = owner
        self.device_type = device.type
        self.dtype = _DTYPES.get(config.precision)
        self.skipped_steps = 0
        self.scaler: torch.amp.GradScaler | None = None
        if config.precision == "fp16":
            self.scaler = torch.amp.GradScaler(
                self.device_type, init_scale=config.initial_dynamic_scale,
                growth_factor=config.scale_factor)
            if device.type == "cpu" and not _WARNED.get("fp16-cpu"):
                _WARNED["fp16-cpu"] = True
                log.warning("problem '%s': precision='fp16' on the CPU runs float16 kernels "
                            "that are far slower than float32 there (100x on a ResNet-50); "
                            "use precision='bf16' on CPUs", owner)

    def autocast(self) -> Any:
        if self.dtype is None or getattr(_SWITCH, "off", False):
            return nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def scale(self, loss: Tensor, micro_batches: int) -> Tensor:
        """Loss as differentiated: scaled for fp16, divided over ``micro_batches``."""
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        return loss if micro_batches == 1 else loss / micro_batches

    def step(self, optimizer: torch.optim.Optimizer | None, grads: Sequence[Tensor | None],
             *, clip: Callable[[], None], step: Callable[[], None]) -> bool:
        """unscale -> ``clip()`` -> ``step()`` -> scaler update. ``grads`` are the
        optimizer's ``.grad`` tensors. Returns False when fp16 gradients held inf/NaN and
        the step was skipped (counted in ``skipped_steps``)."""
        if self.scaler is None:
            clip()
            step()
            return True
        assert optimizer is not None
        self.scaler.unscale_(optimizer)
        clip()
        present = [g for g in grads if g is not None]
        # host read, fp16 only: whether to step at all
        finite = bool(torch.stack([torch.isfinite(g).all() for g in present]).all()) \
            if present else True
        if finite:
            step()
        self.scaler.update()  # reads the inf flags unscale_ recorded: halves the scale
        self.skipped_steps += int(not finite)
        return finite

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"skipped_steps": self.skipped_steps}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.skipped_steps = int(state.get("skipped_steps", 0))
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])


_WARNED: dict[str, bool] = {}
