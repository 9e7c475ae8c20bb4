"""Pure, differentiable steps of a user's torch.optim optimizer, and SAMA's P.

``functional_optimizer(opt)`` reads an SGD, Adam, AdamW, RMSprop or Adagrad optimizer (its
param groups, hyperparameters and state) and returns a `FunctionalOptimizer` whose
``step(params, grads, state) -> (params, state)`` matches ``opt.step()`` exactly, out of
place, so autograd differentiates through it. ``update_jacobian_diag(opt, params, grads)``
is the diagonal of ``∂u/∂g`` for the update ``u`` the optimizer would apply next.
Layout: ``steps`` (the update rules), ``jacobian`` (their P), ``reader`` (the glue).
"""

from __future__ import annotations

from betty.optim.reader import (
    RULES,
    FunctionalOptimizer,
    Rule,
    find_rule,
    functional_optimizer,
    update_jacobian_diag,
)

__all__ = [
    "RULES",
    "FunctionalOptimizer",
    "Rule",
    "find_rule",
    "functional_optimizer",
    "update_jacobian_diag",
]
