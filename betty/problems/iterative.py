"""`IterativeProblem`: differentiable unrolled updates for reverse-mode hypergradients."""

from __future__ import annotations

from betty.errors import ProblemDefinitionError
from betty.problems.problem import Problem


class IterativeProblem(Problem):
    """A level whose updates inside an unroll window are differentiable (reverse mode)."""

    def check_definition(self) -> None:
        raise ProblemDefinitionError(
            f"problem '{self.name}': IterativeProblem is not available in this build yet; "
            "use ImplicitProblem"
        )
