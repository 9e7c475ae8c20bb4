"""Hypergradient methods, one small module each, registered by the name `Config.type` uses.

A method is a pure function ``method(hop, v, config) -> vector`` that maps the vector ``v``
(w.r.t. a lower problem's parameters) to its contribution w.r.t. the next upper's parameters,
using only the closures of `Hop`. A new method is one function added to `METHODS`. The
chain hands ``v`` over as an `OwnedVector`: a method may empty it once it no longer needs it
(darts and sama do, to free it before their probes' forward passes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor

from betty.configs import Config
from betty.hypergradient.cg import cg
from betty.hypergradient.darts import darts
from betty.hypergradient.f2sa import f2sa
from betty.hypergradient.hop import Hop, OptionalVector
from betty.hypergradient.neumann import neumann
from betty.hypergradient.nystrom import nystrom
from betty.hypergradient.reinforce import reinforce, score_function_loss
from betty.hypergradient.sama import sama

Method = Callable[[Hop, Sequence[Tensor], Config], OptionalVector]

METHODS: dict[str, Method] = {"darts": darts, "neumann": neumann, "cg": cg, "sama": sama,
                              "nystrom": nystrom, "reinforce": reinforce, "f2sa": f2sa}


def register(name: str, method: Method) -> None:
    """Make ``Config(type=name)`` use ``method``, a function ``(hop, v, config) -> vector``
    (see `darts` for the shape of one). A method may also be passed directly as
    ``Config(type=method)``.

    Args:
        name: the name ``Config.type`` will use; an existing name is replaced.
        method: ``method(hop, v, config)`` returns the hop's vector w.r.t. the upper's
            parameters (a sequence of tensors, ``None`` where nothing flows).

    Raises:
        TypeError: ``name`` is not a non-empty str, or ``method`` is not callable.
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"register: name must be a non-empty str, got {name!r}")
    if not callable(method):
        raise TypeError(f"register: method for {name!r} must be callable, got {method!r}")
    METHODS[name] = method


__all__ = ["METHODS", "Hop", "Method", "cg", "darts", "f2sa", "neumann", "nystrom", "register",
           "reinforce", "sama", "score_function_loss"]
