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
from betty.hypergradient.hop import Hop, OptionalVector, OwnedVector


def sama(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """SAMA hop: the DARTS central difference applied to ``P v``."""
    if hop.update_jacobian is None:
        raise RuntimeError("sama needs the lower problem's optimizer (Hop.update_jacobian)")
    owned = isinstance(v, OwnedVector)
    pv = OwnedVector(v) if owned else OwnedVector(t.clone() for t in v)
    if owned:
        v.clear()  # type: ignore[attr-defined]  # P v overwrites the chain's own vector
    if hop.prescaled:  # the upper's backward formed P v as each gradient arrived
        return central_difference(hop, pv, config.sama_adam_alpha,
                                  restore=not config.sama_multitask)
    if hop.scale_by_update_jacobian is not None:
        hop.scale_by_update_jacobian(pv)  # one P tensor alive at a time
    else:
        torch._foreach_mul_(pv, hop.update_jacobian())
    return central_difference(hop, pv, config.sama_adam_alpha,
                              restore=not config.sama_multitask)
