"""Problem types: `Problem` (base), `ImplicitProblem`, `IterativeProblem`, `TaskBatchedProblem`
(and the original's deprecated names `HigherIterativeProblem`, `MetaIterativeProblem`)."""

from betty.problems.compat import HigherIterativeProblem, MetaIterativeProblem
from betty.problems.implicit import ImplicitProblem
from betty.problems.iterative import IterativeProblem
from betty.problems.problem import Problem
from betty.problems.tasks import TaskBatchedProblem

__all__ = ["HigherIterativeProblem", "ImplicitProblem", "IterativeProblem",
           "MetaIterativeProblem", "Problem", "TaskBatchedProblem"]
