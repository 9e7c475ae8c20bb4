"""SAMA: a first-order hypergradient adapted to the lower problem's optimizer.

    hop(v) = -M (P v),   P = du/dg (diagonal) of the optimizer's update u(g),
    M x ~ [dL/dlam(w + eps x) - dL/dlam(w - eps x)] / (2 eps),  eps = sama_adam_alpha/||P v||.

Choe, Mehta, Ahn, Neiswanger, Xie, Strubell & Xing, "Making Scalable Meta Learning
Practical", NeurIPS 2023, Section 3. P comes from `betty.optim.update_jacobian_diag` (SGD with
momentum/nesterov/weight decay, Adam/AdamW with bias correction, RMSprop, Adagrad), evaluated
at the optimizer's current state with the lower's latest gradient. Cost: as darts plus
O(#params) elementwise work.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from betty.configs import Config
from betty.hypergradient.darts import central_difference
from betty.hypergradient.hop import Hop, OptionalVector


def sama(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """SAMA hop: the DARTS central difference applied to ``P v``."""
    if hop.update_jacobian is None:
        raise RuntimeError("sama needs the lower problem's optimizer (Hop.update_jacobian)")
    pv = list(v)  # the chain hands each hop a vector of its own: scale it in place, so
    torch._foreach_mul_(pv, hop.update_jacobian())  # sama needs no memory beyond darts
    return central_difference(hop, pv, config.sama_adam_alpha,
                              restore=not config.sama_multitask)
