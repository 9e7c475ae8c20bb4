"""The original Betty's other iterative problem names, mapped to `IterativeProblem`.

Programs written for betty-ml 0.2 import ``HigherIterativeProblem`` (unrolled updates through
the ``higher`` package) or ``MetaIterativeProblem`` (a hand-written functional SGD step) from
``betty.problems``; the original's own versions no longer run on current PyTorch. Here both
names are `IterativeProblem` under another name: the same user code, differentiable updates
by the user's optimizer as given (the original's ``higher`` path zeroed momentum and weight
decay inside the window, and its ``Meta`` path applied plain SGD with the first group's
learning rate only). Building one warns with a `DeprecationWarning` that names the
replacement (Python shows it once per calling line by default).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

from betty.problems.iterative import IterativeProblem
from betty.problems.problem import Problem


def problem_takes_device() -> bool:
    """Whether `Problem`'s constructor takes the original's ``device`` argument (read from
    the first class in its MRO whose ``__init__`` names its parameters)."""
    for cls in Problem.__mro__:
        if "__init__" not in cls.__dict__:
            continue
        parameters = inspect.signature(cls.__init__).parameters.values()
        named = [p.name for p in parameters
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if named != ["self"]:  # not (*args, **kwargs): this class states the signature
            return "device" in named
    return False


class _Renamed(IterativeProblem):
    """`IterativeProblem` with the original's constructor order: ``device`` is the seventh
    argument (the device is chosen by the engine; a given one is passed on when `Problem`
    takes it, else ignored)."""

    _original_name = "IterativeProblem"

    def __init__(self, name: str, config: Any = None, module: Any = None,
                 optimizer: Any = None, scheduler: Any = None, train_data_loader: Any = None,
                 device: Any = None, **kwargs: Any) -> None:
        warnings.warn(
            f"{self._original_name} is the original Betty's name; betty runs it as "
            "IterativeProblem (differentiable updates by your own optimizer). Import "
            "IterativeProblem from betty.problems instead.",
            DeprecationWarning, stacklevel=2)
        if device is not None and problem_takes_device():
            kwargs["device"] = device
        super().__init__(name, config, module, optimizer, scheduler, train_data_loader,
                         **kwargs)


class HigherIterativeProblem(_Renamed):
    """Deprecated name of `IterativeProblem` (the original's ``higher``-based version)."""

    _original_name = "HigherIterativeProblem"


class MetaIterativeProblem(_Renamed):
    """Deprecated name of `IterativeProblem` (the original's ``MetaModule``-based version)."""

    _original_name = "MetaIterativeProblem"


__all__ = ["HigherIterativeProblem", "MetaIterativeProblem"]
