"""betty: multilevel optimization and generalized meta-learning in PyTorch.

Describe each level as a `Problem` and the hierarchy as an `Engine`; the engine runs the
nested training and computes hypergradients (darts, neumann, cg, sama, reverse mode).
"""

from betty import problems
from betty.activation import activation_checkpoint, recompute_context
from betty.configs import Config, EngineConfig
from betty.engine import Engine

__version__ = "0.3.0"

__all__ = ["Config", "Engine", "EngineConfig", "__version__", "activation_checkpoint",
           "problems", "recompute_context"]
