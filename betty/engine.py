"""`Engine`: checks a multilevel program, derives its schedule, and runs it.

One global step steps every leaf problem once. A problem that ends an unroll window triggers
its uppers; an upper steps once all of its lowers have triggered it. The cascade runs on an
explicit stack in depth-first order (the original's recursion, without Python recursion
limits), so chains of any depth and diamond-shaped graphs work.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any

import torch

from betty import checkpoint, program_checks
from betty.checkpoint_policy import CheckpointPolicy, checkpoint_blockers
from betty.configs import EngineConfig
from betty.diagnostics import Diagnostics
from betty.distributed import make_strategy
from betty.errors import DependencyError, ProblemDefinitionError
from betty.graph import build_graph, resolve_dependencies
from betty.guard import FiniteGuard
from betty.logging import ProgressBar, format_metrics, learning_rates, make_logger
from betty.problems.problem import Problem
from betty.schedule import Schedule

if TYPE_CHECKING:
    from betty.visualize import ProgramPicture

log = logging.getLogger("betty")


class Engine:
    """Runs a multilevel program.

    Args:
        problems: every `Problem` of the program.
        config: `EngineConfig` (default: ``EngineConfig()``).
        dependencies: ``{"u2l": {upper: [lowers]}, "l2u": {lower: [uppers]}}``.
        env: an optional environment object, kept as ``engine.env``.

    Example:
        >>> engine = Engine(problems=[outer, inner], config=EngineConfig(train_iters=100),
        ...                 dependencies={"u2l": {outer: [inner]}, "l2u": {inner: [outer]}})
        >>> engine.run()
    """

    def __init__(self, problems: list[Problem], config: EngineConfig | None = None,
                 dependencies: dict[str, dict[Problem, list[Problem]]] | None = None,
                 env: Any = None) -> None:
        self.config = config if config is not None else EngineConfig()
        self.problems = list(problems)
        self.dependencies = dependencies or {"u2l": {}, "l2u": {}}
        self.env = env
        self.global_step = 0
        self.cascading = False  # inside cascade_from: Problem.step steps only itself
        self.leaves: list[Problem] = []
        self.device = torch.device("cpu")
        self._buffers: list[torch.Tensor] = []
        self._best: float | None = None
        self._bad_validations = 0
        self.stopped_early = False
        self._resumed = False
        self.diagnostics = Diagnostics(enabled=self.config.diagnostics)
        self.guard = FiniteGuard(self.config.nonfinite)  # EngineConfig.nonfinite
        # one process, or this rank of a torchrun group (betty.distributed); only rank 0 logs
        self.strategy = make_strategy(self.config)
        self.logger = make_logger(
            self.config.logger_type if self.strategy.is_main else "none",
            log_dir=self.config.log_dir, run_name=self.config.run_name,
            names=[p.name for p in self.problems if isinstance(p, Problem)] + ["validation"],
            config=self._run_config(), clock=lambda: self.global_step)
        with self.strategy.fail_together():
            self.initialize()

    # -- set-up --------------------------------------------------------------------------
    def initialize(self) -> None:
        """Check everything, wire the problems, and set each one up (before training)."""
        self.config.validate()
        for problem in self.problems:
            if not isinstance(problem, Problem):
                raise DependencyError(
                    f"`problems` holds {problem!r}, which is not a betty Problem; subclass "
                    "ImplicitProblem or IterativeProblem"
                )
            problem.check_definition()
        self.dependencies = resolve_dependencies(self.problems, self.dependencies)  # names ok
        graph = build_graph(self.problems, self.dependencies)
        self.device = program_checks.pick_device(self.config.strategy, self.strategy)
        for problem in self.problems:
            problem.clear_dependencies()
            for parent in graph.parents[problem]:
                problem.add_parent(parent)
            for child in graph.children[problem]:
                problem.add_child(child)
            problem.add_paths(graph.paths[problem])
            problem.leaf = not graph.children[problem]
        self.leaves = graph.leaves
        self._set_names()
        program_checks.check_orders(self.problems)
        self.schedule = Schedule(self.problems, roll_back=self.config.roll_back)
        for problem in self.problems:
            problem.attach_clock(self.schedule.clock(problem.name))
            problem.initialize(self, self.device)
        program_checks.check_shared_parameters(self.problems)
        program_checks.check_windows_fit(self.problems, self.config.train_iters)
        self._checkpoint_dir_existed = program_checks.check_checkpoint_dir(
            self.config.checkpoint_dir) if self.strategy.is_main else True
        self.strategy.setup(self)  # shard data; ZeRO optimizers; FSDP modules
        self._buffers = [b for p in self.problems if p.module is not None
                         for b in p.module.buffers()]
        for problem in graph.order:
            log.debug("problem %s: uppers %s, lowers %s, paths %s", problem.name,
                      [p.name for p in problem.parents], [p.name for p in problem.children],
                      [[n.name for n in path] for path in problem.paths])
        if log.isEnabledFor(logging.INFO):  # the program's picture, when logging is verbose
            log.info("%s", self.graph().to_text())

    def _set_names(self) -> None:
        """``engine.<name>`` and ``problem.<other_name>`` for every pair of problems."""
        for problem in self.problems:
            if hasattr(self, problem.name) and getattr(self, problem.name) is not problem:
                raise DependencyError(
                    f"problem name '{problem.name}' clashes with Engine.{problem.name}; "
                    "rename the problem"
                )
            setattr(self, problem.name, problem)
            for other in self.problems:
                if other is problem:
                    continue
                current = getattr(problem, other.name, None)
                if hasattr(problem, other.name) and current is not other:
                    raise DependencyError(
                        f"problem name '{other.name}' clashes with the attribute "
                        f"'{other.name}' of problem '{problem.name}' "
                        f"({type(problem).__name__}); rename the problem"
                    )
                setattr(problem, other.name, other)

    def all_buffers(self) -> list[torch.Tensor]:
        """Buffers of every problem's module (hypergradient probes restore them)."""
        return self._buffers

    def graph(self) -> ProgramPicture:
        """The program's picture: ``.to_dot()``, ``.to_mermaid()``, ``.to_text()``,
        ``.save_png(path)`` (betty.visualize)."""
        from betty.visualize import picture

        return picture(self.problems, self.dependencies)

    def _run_config(self) -> dict[str, Any]:
        """The settings a run logger records (wandb's run config)."""
        described: dict[str, Any] = {"engine": dataclasses.asdict(self.config)}
        for problem in self.problems:
            if isinstance(problem, Problem) and dataclasses.is_dataclass(problem.config):
                described[problem.name] = dataclasses.asdict(problem.config)
        return described

    # -- training ------------------------------------------------------------------------
    def train_step(self) -> None:
        """One global step: each leaf steps once; finished windows trigger their uppers.
        With ``roll_back``, a finished window is then replayed as one real step per lower."""
        for leaf in self.leaves:
            self.cascade_from(leaf)
        if self.guard.flags:
            self.guard.end_step(self.global_step)  # the step's one read of its finite flags

    def cascade_from(self, leaf: Problem) -> bool:
        """Step ``leaf`` and every upper its finished window completes (then, with
        ``roll_back``, replay the window); True if the leaf's window ended."""
        self.cascading = True
        try:
            ended = self._cascade(leaf, roll_back=False)
            if ended and self.config.roll_back:
                self._cascade(leaf, roll_back=True)
        finally:
            self.cascading = False
        return ended

    def _cascade(self, leaf: Problem, *, roll_back: bool) -> bool:
        """Step ``leaf`` and, depth first, every upper it completes; True if the leaf's
        window ended."""
        stack: list[tuple[Problem, Problem | None]] = [(leaf, None)]
        leaf_ended = False
        schedule = self.schedule
        timed = self.diagnostics.enabled
        while stack:
            problem, trigger = stack.pop()
            if trigger is not None and not schedule.trigger(problem.name, trigger.name):
                continue
            started = self.diagnostics.clock() if timed else None  # EngineConfig.diagnostics
            if roll_back:
                ends_window = problem.roll_back_step() and bool(problem.parents)
            else:
                ends_window = problem.local_step(global_step=self.global_step)
            if started is not None:
                self.diagnostics.add_time(problem.name, started)
            schedule.reset(problem.name)
            leaf_ended = leaf_ended or (problem is leaf and ends_window)
            if ends_window:
                for parent in reversed(problem.parents):
                    stack.append((parent, problem))
        return leaf_ended

    def run(self) -> None:
        """Train up to global step ``train_iters`` in total, from the current global step
        (first resuming from ``EngineConfig.resume_from``, if set). With a
        ``checkpoint_dir``, a checkpoint is saved every ``checkpoint_step`` global steps, and
        Ctrl-C saves one at the end of the current global step before stopping."""
        self._resume()
        if self.stopped_early:
            log.info("early stopping already ended this run at global step %d",
                     self.global_step)
            return
        self.train()
        for problem in self.problems:
            problem.bind_hooks()  # hooks assigned on an instance since the last run
        config = self.config
        self.logger.open()  # start the wandb run, open event files: before the first step
        progress = ProgressBar(self.problems, total=config.train_iters,
                               initial=self.global_step,
                               enabled=config.progress_bar and self.strategy.is_main)
        strategy = self.strategy
        single = strategy.world_size == 1
        policy = CheckpointPolicy(self)
        try:
            with policy.watching(), strategy.fail_together():
                for step in range(self.global_step + 1, config.train_iters + 1):
                    self.global_step = step
                    if single:
                        self.train_step()
                    else:
                        with strategy.step_context(self):
                            self.train_step()
                    if self.guard.flags:  # a train_step override may not have read them
                        self.guard.end_step(step)
                    if step % config.valid_step == 0 and self._has_validation():
                        self.stopped_early = self._validate()
                    self._end_step(progress)
                    policy.after_step(step)
                    if self.stopped_early:
                        log.info("early stopping at global step %d", step)
                        break
                strategy.barrier()  # no rank leaves (and closes its connections) early
        finally:
            for problem in self.problems:
                problem.settle()
            progress.close()
            self.logger.close()

    def _end_step(self, progress: ProgressBar) -> None:
        """After a global step and its validation: emit the step's diagnostics and logged
        records (one host read, one call per logger backend), advance the progress bar."""
        if self.diagnostics.enabled:
            self.diagnostics.end_step(self.logger, self.global_step)
        if self.logger.has_pending():
            self.logger.flush()
        if progress.active:
            progress.update()

    def close(self) -> None:
        """Let the data loaders' worker processes go now (a long-lived process: a notebook,
        a sweep). A later `run` continues where this one stopped, batches included."""
        for problem in self.problems:
            problem.close()

    # -- checkpoints (betty.checkpoint) --------------------------------------------------
    def save_checkpoint(self, path: str | os.PathLike[str] | None = None) -> str:
        """Atomically write everything needed to continue exactly as if never stopped;
        ``path`` defaults to ``<checkpoint_dir>/step_<global_step>.pt``. Returns the path.
        Several processes: every rank calls it; rank 0 writes, the others wait.

        Refused (`CheckpointError`) in the middle of an unroll window that an upper
        differentiates (reverse mode) or that restarts from ``initial_parameters()``: that
        window's history is a graph no file can hold. ``checkpoint_step`` and Ctrl-C wait
        for the window to end on their own."""
        blockers = checkpoint_blockers(self.problems)
        if blockers:
            raise checkpoint.CheckpointError(
                f"cannot checkpoint global step {self.global_step}: {'; '.join(blockers)}. "
                "Save at the end of the window (a global step where it completes)"
            )
        return self.strategy.save_checkpoint(self, None if path is None else os.fspath(path))

    def load_checkpoint(self, path: str | os.PathLike[str]) -> None:
        """Restore this engine (built for the same program) from a checkpoint; `run` then
        continues from its global step up to ``train_iters``."""
        self.strategy.load_checkpoint(self, os.fspath(path))
        self._resumed = True

    def _resume(self) -> None:
        source = self.config.resume_from
        if source is None or self._resumed:
            return
        self._resumed = True
        if source == "latest":
            assert self.config.checkpoint_dir is not None
            path = checkpoint.latest_checkpoint(self.config.checkpoint_dir)
            if path is None:
                if not self._checkpoint_dir_existed:  # a first launch, or a mistyped path
                    log.warning("resume_from='latest': checkpoint_dir %s did not exist (it is "
                                "created now), so there is nothing to resume; training from "
                                "global step %d. Check the path if you meant to resume",
                                self.config.checkpoint_dir, self.global_step)
                else:
                    log.info("no checkpoint in %s yet: training from global step %d",
                             self.config.checkpoint_dir, self.global_step)
                return
            source = path
        self.load_checkpoint(source)
        if self.global_step > self.config.train_iters:
            raise checkpoint.CheckpointError(
                f"checkpoint {source} is at global step {self.global_step}, past "
                f"EngineConfig.train_iters={self.config.train_iters}: this run would do "
                "nothing. Raise train_iters to train further")

    def loop_state_dict(self) -> dict[str, Any]:
        """The training loop's own state: global step and early stopping."""
        return {"global_step": self.global_step, "best": self._best,
                "bad_validations": self._bad_validations, "stopped": self.stopped_early}

    def load_loop_state_dict(self, state: dict[str, Any]) -> None:
        """Inverse of `loop_state_dict`."""
        self.global_step = int(state["global_step"])
        self._best = state["best"]
        self._bad_validations = int(state["bad_validations"])
        self.stopped_early = bool(state["stopped"])

    def _has_validation(self) -> bool:
        return type(self).validation is not Engine.validation

    def validation(self) -> dict[str, Any] | None:
        """Override to evaluate the program; return a dict of metrics (logged, and read by
        early stopping). Runs every ``valid_step`` global steps with problems in eval mode."""
        return None

    def _validate(self) -> bool:
        """Validation (rank 0 only when several processes run, see `Strategy.validate`);
        True if early stopping ends the run (the same answer on every rank)."""
        return self.strategy.validate(self, self._validate_here)

    def _validate_here(self) -> bool:
        self.eval()
        stats = self.validation() or {}
        self.train()
        self.logger.log(stats, tag="validation", step=self.global_step)
        return self._should_stop(stats)

    def _should_stop(self, stats: dict[str, Any]) -> bool:
        if not self.config.early_stopping:
            return False
        key = self.config.early_stopping_metric
        if key not in stats:
            raise ProblemDefinitionError(
                f"EngineConfig.early_stopping_metric={key!r} is not a key of the dict returned "
                f"by validation() (keys: {sorted(stats)})"
            )
        value = float(stats[key])
        better = (self._best is None or (value < self._best if self.config.early_stopping_mode
                                         == "min" else value > self._best))
        if better:
            self._best, self._bad_validations = value, 0
            return False
        self._bad_validations += 1
        return self._bad_validations >= self.config.early_stopping_tolerance

    def log_metrics(self, name: str, metrics: dict[str, Any], step: int | None) -> None:
        """Log a problem's loss dict (called at its ``Config.log_step``) with its learning
        rates (``lr``, or ``lr/<group>``); values are read from the device at the end of the
        global step."""
        if not self.logger.active:
            return
        problem = self.__dict__.get(name)
        if isinstance(problem, Problem) and problem.optimizer is not None:
            rates = learning_rates(problem.optimizer)
            metrics = {**metrics, **{k: v for k, v in rates.items() if k not in metrics}}
        self.logger.log(metrics, tag=name, step=step)

    def train(self) -> None:
        """Every problem in training mode."""
        for problem in self.problems:
            problem.train()

    def eval(self) -> None:
        """Every problem in evaluation mode (around `validation`)."""
        for problem in self.problems:
            problem.eval()

    def __repr__(self) -> str:
        return f"Engine(problems={[p.name for p in self.problems]})"


__all__ = ["Engine", "format_metrics"]
