"""The logger protocol, and turning a step's buffered metrics into host values at once.

Metrics travel as tensors until a step's records are emitted; `to_host` then reads every
scalar tensor of the step with one ``.tolist()`` per device (one CPU-GPU sync per device)
instead of one ``.item()`` per value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor


@dataclass
class Record:
    """The metrics one source (a problem, ``validation``) logged at one step.

    ``tag`` names the source; ``step`` is the x-axis value it asked for (the global step, or
    a problem's local step with ``Config.log_local_step``).
    """

    tag: str
    step: int | None
    metrics: dict[str, Any]


class Logger(Protocol):
    """A backend: receives the records of one global step, already on the host."""

    def write(self, records: Sequence[Record], *, global_step: int) -> None:
        """Record ``records``, the values logged at global step ``global_step`` (each
        record may carry its own local step); called once per logged global step."""
        ...

    def close(self) -> None:
        """Flush and release what the backend holds (files, runs); called once, at the end."""
        ...


def to_float(value: Any) -> Any:
    """A loggable Python value (a one-element tensor becomes a float: one host read)."""
    if isinstance(value, Tensor):
        return float(value.detach()) if value.numel() == 1 else value.detach().cpu().tolist()
    return value


def detach(metrics: dict[str, Any]) -> dict[str, Any]:
    """A copy with tensors detached, so a buffered loss does not keep its graph alive."""
    return {k: v.detach() if isinstance(v, Tensor) else v for k, v in metrics.items()}


def to_host(values: Sequence[Any]) -> list[Any]:
    """`to_float` of every value, reading all one-element tensors of a device in one go."""
    out = list(values)
    by_device: dict[torch.device, list[int]] = {}
    for i, v in enumerate(out):
        if isinstance(v, Tensor) and v.numel() == 1:
            by_device.setdefault(v.device, []).append(i)
    for indices in by_device.values():
        stacked = torch.stack([out[i].detach().reshape(()).to(torch.float64) for i in indices])
        for i, number in zip(indices, stacked.tolist()):  # the host read (a sync on GPU)
            out[i] = number
    return [to_float(v) for v in out]


def records_to_host(records: Sequence[Record]) -> list[Record]:
    """Records with host values; records of one tag and step are merged, in order."""
    flat = [v for r in records for v in r.metrics.values()]
    values = iter(to_host(flat))
    merged: dict[tuple[str, int | None], Record] = {}
    for r in records:
        host = {k: next(values) for k in r.metrics}
        key = (r.tag, r.step)
        if key in merged:
            merged[key].metrics.update(host)
        else:
            merged[key] = Record(r.tag, r.step, host)
    return list(merged.values())


def is_number(value: Any) -> bool:
    """Whether ``value`` is an int or a float (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def format_value(value: Any) -> str:
    """``value`` as a console log shows it: 6 significant digits for numbers (a one-element
    tensor counts as one), ``str`` otherwise."""
    value = to_float(value)
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def format_metrics(metrics: dict[str, Any]) -> str:
    """``key: value | key: value`` (reads tensors from the device)."""
    return " | ".join(f"{key}: {format_value(value)}" for key, value in metrics.items())


def learning_rates(optimizer: Any) -> dict[str, Any]:
    """``{"lr": ...}`` for an optimizer with one param group, else ``{"lr/<i>": ...}``."""
    groups = getattr(optimizer, "param_groups", None) or []
    rates = [g["lr"] for g in groups if "lr" in g]
    if len(rates) == 1:
        return {"lr": rates[0]}
    return {f"lr/{i}": lr for i, lr in enumerate(rates)}
