"""Checkpoints: atomic save, safe load and exact resume of a whole `Engine`.

A checkpoint is one ``torch.save`` file holding everything needed to continue as if training
had never stopped: per problem its module, optimizer, scheduler and grad scaler state, step
counter, unroll-window and readiness flags, gradients accumulated so far, roll-back cache,
current batch and data-loader position; for the engine its global step and early-stopping
state; and the random states of torch (CPU and CUDA), numpy and Python.

* Writes are atomic: a temporary file in the same folder, flushed and fsynced, then renamed
  over the target, so a crash mid-write leaves the previous checkpoint intact.
* Loads are safe: every zip record's CRC is checked first (a truncated or corrupt file is
  refused), then ``torch.load(..., weights_only=True)`` unpickles plain data only, and a
  checkpoint of another program (other problem names or parameter shapes) is refused.
* Ctrl-C: while `Engine.run` trains with checkpointing on, a first SIGINT only sets a flag;
  the engine saves a checkpoint at the end of the current global step and then raises
  `KeyboardInterrupt`. A second Ctrl-C stops at once, without saving.

Example:
    >>> engine = Engine(problems, EngineConfig(train_iters=10_000, checkpoint_dir="ckpt",
    ...                 checkpoint_step=500, resume_from="latest"), dependencies=deps)
    >>> engine.run()                       # resumes from ckpt/step_<N>.pt when one exists
    >>> engine.save_checkpoint("final.pt")
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch

from betty.errors import BettyError

if TYPE_CHECKING:
    from betty.engine import Engine

log = logging.getLogger("betty")

FORMAT = "betty-checkpoint"
VERSION = 2  # 2: states owned by each object (schedule, pipeline, precision)
_FILE = re.compile(r"^step_(\d+)\.(?:pt|dcp)$")  # .dcp: a sharded (FSDP) checkpoint folder


class CheckpointError(BettyError, RuntimeError):
    """A checkpoint cannot be written, read, or used for this program."""


# -- random states ---------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """Random states of torch (CPU, and CUDA once initialised), numpy and Python."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:  # numpy is optional for the random state
        return state
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state["numpy"] = (kind, [int(k) for k in keys], int(pos), int(has_gauss), float(cached))
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `rng_state`."""
    torch.set_rng_state(state["torch"])
    random.setstate(_as_tuples(state["python"]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        if len(cuda) != torch.cuda.device_count():
            log.warning("checkpoint holds %d CUDA random states for %d visible devices; "
                        "restoring the first ones", len(cuda), torch.cuda.device_count())
        for device, cuda_state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(cuda_state, device)
    if "numpy" in state:
        import numpy as np

        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants the nested tuples it gave, not lists."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# -- one problem ----------------------------------------------------------------------
def storable_batch(owner: str, batch: Any) -> Any:
    """``batch`` if ``weights_only`` loading can rebuild it, else ``None`` (with a warning)."""
    if _is_plain(batch):
        return batch
    log.warning("problem '%s': its current batch (a %s) is not made of tensors, numbers, "
                "strings, lists, tuples and dicts, so the checkpoint leaves it out; a "
                "hypergradient hop through '%s' before its next step would see no batch",
                owner, type(batch).__name__, owner)
    return None


def _is_plain(value: Any) -> bool:
    if value is None or isinstance(value, (torch.Tensor, bool, int, float, str, bytes)):
        return True
    if type(value) in (list, tuple):
        return all(_is_plain(v) for v in value)
    if type(value) is dict:
        return all(isinstance(k, (str, int)) and _is_plain(v) for k, v in value.items())
    return False


# -- the program's identity ------------------------------------------------------------
def signature(engine: Engine) -> dict[str, dict[str, Any]]:
    """Per problem: its class, and the names and shapes of its module's state."""
    out: dict[str, dict[str, Any]] = {}
    for problem in engine.problems:
        module = problem.module.state_dict() if problem.module is not None else {}
        out[problem.name] = {
            "class": type(problem).__name__,
            "module": {k: list(v.shape) for k, v in module.items()
                       if isinstance(v, torch.Tensor)},
            "trainable": [list(p.shape) for p in problem.trainable_parameters()],
            "optimizer": _optimizer_layout(problem.optimizer),
        }
    return out


def _optimizer_layout(optimizer: Any) -> dict[str, Any] | None:
    """The optimizer's class and its parameter groups' sizes: what its state must fit."""
    if optimizer is None:
        return None
    local = getattr(optimizer, "optim", optimizer)  # ZeRO wraps the user's optimizer class
    return {"class": type(local).__name__,
            "groups": [len(g["params"]) for g in optimizer.param_groups]}


def check_signature(saved: dict[str, Any], current: dict[str, Any], path: str) -> None:
    """Refuse a checkpoint of another program: names, state shapes, optimizer layout."""
    if sorted(saved) != sorted(current):
        raise CheckpointError(
            f"checkpoint {path} belongs to another program: it has problems {sorted(saved)}, "
            f"this program has {sorted(current)}"
        )
    problems: list[str] = []
    for name in sorted(current):
        old, new = saved[name], current[name]
        diffs = [f"{key}: {old['module'].get(key)} in the checkpoint, {shape} here"
                 for key, shape in new["module"].items() if old["module"].get(key) != shape]
        diffs += [f"{key}: in the checkpoint only" for key in old["module"]
                  if key not in new["module"]]
        if old["trainable"] != new["trainable"] and not diffs:
            diffs.append(f"trainable parameter shapes {old['trainable']} in the checkpoint, "
                         f"{new['trainable']} here")
        was, now = old.get("optimizer"), new["optimizer"]
        if was != now:
            show = [None if o is None else f"{o['class']} with groups of {o['groups']} "
                    "parameters" for o in (was, now)]
            diffs.append(f"optimizer {show[0]} in the checkpoint, {show[1]} here (its state "
                         "would not fit; resume with the optimizer the run was saved with)")
        if diffs:
            problems.append(f"problem '{name}': " + "; ".join(diffs[:4]) +
                            (f"; ... ({len(diffs)} differences)" if len(diffs) > 4 else ""))
    if problems:
        raise CheckpointError(f"checkpoint {path} does not fit this program's shapes: " +
                              " | ".join(problems))


# -- the whole engine ------------------------------------------------------------------
def engine_state(engine: Engine) -> dict[str, Any]:
    """Everything a checkpoint holds: format, loop, schedule, signature, problems, RNG."""
    return {
        "format": FORMAT,
        "version": VERSION,
        "torch_version": str(torch.__version__),
        "engine": engine.loop_state_dict(),
        "schedule": engine.schedule.state_dict(),
        "signature": signature(engine),
        "problems": {p.name: p.training_state() for p in engine.problems},
        "rng": rng_state(),
    }


def save(engine: Engine, path: str | os.PathLike[str] | None = None) -> str:
    """Write the engine's checkpoint to ``path`` (default: ``<checkpoint_dir>/step_<N>.pt``,
    then keep only the newest ``keep_checkpoints`` there). Returns the path written."""
    directory = engine.config.checkpoint_dir
    if path is None:
        if directory is None:
            raise CheckpointError("save_checkpoint() needs a path, or "
                                  "EngineConfig.checkpoint_dir to name one")
        path = checkpoint_path(directory, engine.global_step)
    path = os.fspath(path)
    check_finite_state(engine)
    remove_stale_temporaries(os.path.dirname(os.path.abspath(path)))
    atomic_save(engine_state(engine), path)
    log.info("checkpoint of global step %d saved to %s", engine.global_step, path)
    if directory is not None and engine.config.keep_checkpoints > 0 and \
            os.path.dirname(os.path.abspath(path)) == os.path.abspath(directory):
        prune(directory, engine.config.keep_checkpoints)
    return path


def check_finite_state(engine: Engine) -> None:
    """Refuse to save parameters that hold NaN or inf (one host read for all of them): a
    checkpoint is what a run falls back to, so it must never hold a non-finite value."""
    from betty.guard import largest_magnitude

    named = [(p.name, n, t) for p in engine.problems if p.module is not None
             for n, t in p.module.state_dict().items()
             if isinstance(t, torch.Tensor) and t.is_floating_point()]
    magnitudes = [largest_magnitude([t]) for _, _, t in named]
    if not magnitudes:
        return
    finite = torch.isfinite(torch.stack([m.float() for m in magnitudes])).tolist()
    bad = [f"'{name}'.{key}" for (name, key, _), ok in zip(named, finite) if not ok]
    if bad:
        raise CheckpointError(
            f"not saving a checkpoint of global step {engine.global_step}: {', '.join(bad[:5])}"
            f" hold NaN or inf; the last saved checkpoint is left as it was"
        )


def load(engine: Engine, path: str | os.PathLike[str]) -> None:
    """Restore ``engine`` (built for the same program) to the checkpoint at ``path``: all or
    nothing (a load that fails leaves the engine exactly as it was)."""
    path = os.fspath(path)
    state = safe_load(path)
    check_signature(state["signature"], signature(engine), path)
    try:
        before: dict[str, Any] | None = copy.deepcopy(engine_state(engine))
    except RuntimeError:  # ZeRO: the full optimizer state exists on one rank only
        before = None  # the checks above are then the whole guarantee
    try:
        apply_state(engine, state)
    except Exception as err:
        if before is not None:
            apply_state(engine, before)
        raise CheckpointError(f"checkpoint {path} could not be loaded into this program "
                              f"({type(err).__name__}: {err}); the engine is unchanged") from err
    log.info("resumed from %s at global step %d", path, engine.global_step)


def apply_state(engine: Engine, state: dict[str, Any]) -> None:
    """Load a verified ``engine_state`` into ``engine`` (problems, schedule, loop, RNG)."""
    for problem in engine.problems:
        problem.load_training_state(state["problems"][problem.name])
    engine.schedule.load_state_dict(state["schedule"])
    engine.load_loop_state_dict(state["engine"])
    set_rng_state(state["rng"])  # last: replaying the data loaders moved the random state


# -- files -----------------------------------------------------------------------------
def checkpoint_path(directory: str | os.PathLike[str], global_step: int) -> str:
    """``<directory>/step_<global_step, 8 digits>.pt``."""
    return os.path.join(os.fspath(directory), f"step_{global_step:08d}.pt")


def list_checkpoints(directory: str | os.PathLike[str]) -> list[tuple[int, str]]:
    """``(global step, path)`` of each ``step_<N>.pt`` (or sharded ``step_<N>.dcp`` folder)
    in ``directory``, oldest first."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), os.path.join(directory, name))
             for name in os.listdir(directory) if (m := _FILE.match(name))]
    return sorted(found)


def latest_checkpoint(directory: str | os.PathLike[str]) -> str | None:
    """The newest checkpoint in ``directory`` (None if there is none)."""
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def prune(directory: str | os.PathLike[str], keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints in ``directory``."""
    for _, path in list_checkpoints(directory)[:-keep]:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


_TEMPORARY = re.compile(r"^\.step_\d+\.pt\..+\.tmp$")


def remove_stale_temporaries(directory: str) -> None:
    """Delete what an earlier process killed mid-save left (``.step_N.pt.*.tmp``): only one
    process writes a run's checkpoints, so any such file here is litter."""
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if _TEMPORARY.match(name):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(directory, name))


def atomic_save(obj: Any, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, fsync, then rename over it."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp",
                               dir=directory)
    try:
        with os.fdopen(fd, "wb") as f, _crc32_on():
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt included: never leave a partial file behind
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise
    _fsync_directory(directory)


@contextlib.contextmanager
def _crc32_on() -> Iterator[None]:
    """Make sure ``torch.save`` writes the CRCs `safe_load` checks."""
    config = getattr(getattr(torch.utils, "serialization", None), "config", None)
    save_config = getattr(config, "save", None)
    if save_config is None or not hasattr(save_config, "compute_crc32"):
        yield
        return
    before = save_config.compute_crc32
    save_config.compute_crc32 = True
    try:
        yield
    finally:
        save_config.compute_crc32 = before


def _fsync_directory(directory: str) -> None:
    """Persist the rename itself (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def safe_load(path: str) -> dict[str, Any]:
    """Check every record's CRC, then ``torch.load(weights_only=True)`` on the CPU."""
    if os.path.isdir(path):
        raise CheckpointError(f"checkpoint {path} is a folder; pass a checkpoint file in it, "
                              "or set checkpoint_dir to it and resume_from='latest'")
    if not os.path.isfile(path):
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except Exception as err:  # BadZipFile, OSError, EOFError, and bytes that decode wrongly
        raise CheckpointError(f"checkpoint {path} is truncated or is not a checkpoint "
                              f"({err}); use an earlier one") from None
    if bad is not None:
        raise CheckpointError(f"checkpoint {path} is corrupt (record {bad} fails its CRC "
                              "check); use an earlier one")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        lines = str(err).splitlines()
        why = next((line.strip() for line in lines if "Unpickler error" in line), lines[0])
        raise CheckpointError(
            f"checkpoint {path} holds objects that cannot be loaded safely "
            f"(torch.load with weights_only=True): {why}"
        ) from None
    except Exception as err:  # a damaged file fails in many ways (decoding, unknown records)
        raise CheckpointError(f"checkpoint {path} cannot be read ({type(err).__name__}: "
                              f"{err}); use an earlier one") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a betty checkpoint (save one with "
                              "Engine.save_checkpoint)")
    if state.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {state.get('version')}; "
                              f"this betty reads version {VERSION}")
    return state
