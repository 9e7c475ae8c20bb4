"""Problem types: `Problem` (base), `ImplicitProblem`, `IterativeProblem`, `TaskBatchedProblem`."""

from betty.problems.implicit import ImplicitProblem
from betty.problems.iterative import IterativeProblem
from betty.problems.problem import Problem
from betty.problems.tasks import TaskBatchedProblem

__all__ = ["ImplicitProblem", "IterativeProblem", "Problem", "TaskBatchedProblem"]
