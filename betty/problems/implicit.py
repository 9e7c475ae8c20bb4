"""`ImplicitProblem`: a stateful module stepped by the user's own torch.optim optimizer.

Upper problems differentiate through its solution with the implicit method named by its
`Config.type` (darts, neumann, cg, sama).
"""

from __future__ import annotations

from betty.problems.problem import Problem


class ImplicitProblem(Problem):
    """A level whose parameters are updated in place; hypergradients are implicit."""
