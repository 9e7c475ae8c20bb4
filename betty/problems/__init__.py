"""Problem types: `Problem` (base), `ImplicitProblem`, `IterativeProblem`."""

from betty.problems.implicit import ImplicitProblem
from betty.problems.iterative import IterativeProblem
from betty.problems.problem import Problem

__all__ = ["ImplicitProblem", "IterativeProblem", "Problem"]
