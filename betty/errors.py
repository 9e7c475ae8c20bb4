"""Exception types whose messages name the offending problem and the fix."""

from __future__ import annotations


class BettyError(Exception):
    """Base class of every error the library raises on purpose."""


class ConfigError(BettyError, ValueError):
    """A `Config` or `EngineConfig` field holds a value the library cannot use."""


class DependencyError(BettyError, ValueError):
    """The `dependencies` given to `Engine` do not describe a valid multilevel program."""


class ProblemDefinitionError(BettyError, ValueError):
    """A `Problem` lacks something it needs (training_step, module, optimizer, data)."""


class TrainingError(BettyError, RuntimeError):
    """Training cannot go on (non-finite loss, a loss that is not a scalar, ...)."""


class HypergradientError(BettyError, RuntimeError):
    """A hypergradient requested by the dependencies cannot be computed."""
