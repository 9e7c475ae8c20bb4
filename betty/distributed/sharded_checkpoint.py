"""Sharded checkpoints (``strategy='fsdp'``) through ``torch.distributed.checkpoint`` (DCP).

A sharded checkpoint is a folder, ``<checkpoint_dir>/step_<N>.dcp`` by default:

* the modules' parameters and buffers and the optimizers' state, one DCP state dict keyed
  ``<problem>.module.<name>`` and ``<problem>.optimizer.state.<name>.<key>`` (names, not
  positions, through ``torch.distributed.checkpoint.state_dict``): every rank writes its
  own shards (``__<rank>_0.distcp``) and DCP records each tensor's global shape, so any
  number of processes can read it back, each taking the slices it holds;
* ``betty_state.pt``: everything else `betty.checkpoint.engine_state` holds (schedule, loop
  state, random states, each problem's step counter, scheduler, scaler, data position and
  training extras), small and the same on every rank but for the current batch, written by
  rank 0 as the other strategies write their one file.

Writes are atomic: the folder is written under a temporary name beside its target and
renamed once every rank has finished (what a killed save leaves is removed by the next).
`load` reads such a folder into an engine of any strategy and any number of processes (one
process without a process group included), and also reads an ordinary one-file checkpoint
into sharded modules. It checks the program's signature first, but is not all-or-nothing
like a one-file load: one that fails midway (a damaged shard) leaves the engine partly
restored.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist

from betty import checkpoint
from betty.checkpoint import CheckpointError, apply_state, check_signature

if TYPE_CHECKING:
    from betty.engine import Engine
    from betty.problems.problem import Problem

SIDE_FILE = "betty_state.pt"
SUFFIX = ".dcp"


def default_path(engine: Engine) -> str:
    directory = engine.config.checkpoint_dir
    if directory is None:
        raise CheckpointError("save_checkpoint() needs a path, or EngineConfig.checkpoint_dir "
                              "to name one")
    plain = checkpoint.checkpoint_path(directory, engine.global_step)
    return plain[: -len(".pt")] + SUFFIX


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _problem_states(engine: Engine, stateless: set[str]) -> dict[str, Any]:
    """What DCP reads and writes: per problem, its module's and optimizer's state dicts
    keyed by parameter names (DTensor shards under FSDP, whole tensors otherwise). The
    optimizers of ``stateless`` (not stepped yet) are left out: torch's ``get_state_dict``
    would create their state by stepping them with zero gradients, which changes Adam's
    step count; their empty state travels in the side file."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
    )

    states: dict[str, Any] = {}
    for problem in engine.problems:
        if problem.module is None:
            continue
        if problem.optimizer is None or problem.name in stateless:
            states[problem.name] = {"module": get_model_state_dict(problem.module)}
            continue
        module_state, optimizer_state = get_state_dict(problem.module, problem.optimizer)
        states[problem.name] = {"module": module_state, "optimizer": optimizer_state}
    return states


def _stateless(engine: Engine) -> set[str]:
    return {p.name for p in engine.problems if p.optimizer is not None and not p.optimizer.state}


def _strip_sharded(state: dict[str, Any]) -> None:
    """Drop from an `engine_state` what DCP holds (an optimizer without state stays)."""
    for training in state["problems"].values():
        training["state"].pop("module", None)
        optimizer = training["state"].get("optimizer")
        if optimizer is not None and optimizer["state"]:
            del training["state"]["optimizer"]


def _side_state(engine: Engine) -> dict[str, Any]:
    state = checkpoint.engine_state(engine)
    _strip_sharded(state)
    for name, training in state["problems"].items():
        if _holds_shards(training["roll_back"]):
            raise CheckpointError(
                f"cannot checkpoint global step {engine.global_step}: problem '{name}' holds "
                "the roll_back snapshot of its window start, which under strategy='fsdp' is "
                "each rank's shards; save where its window has rolled back (a global step "
                "that ends the window, e.g. checkpoint_step a multiple of unroll_steps)")
    return state


def _holds_shards(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_holds_shards(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_shards(v) for v in value)
    return hasattr(value, "to_local")  # a DTensor


def _all_finite(engine: Engine) -> bool:
    """Whether every floating tensor of the modules holds finite values, on every rank."""
    bad = torch.zeros(())
    for problem in engine.problems:
        if problem.module is None:
            continue
        for tensor in problem.module.state_dict().values():
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            if local.is_floating_point() and local.numel():
                bad = bad + (~torch.isfinite(local.detach())).sum().cpu()
    if _distributed():
        dist.all_reduce(bad)
    return int(bad.item()) == 0


def save(engine: Engine, path: str | None) -> str:
    """Every rank: write ``engine``'s sharded checkpoint folder at ``path`` (default:
    ``<checkpoint_dir>/step_<N>.dcp``, then keep the newest ``keep_checkpoints``)."""
    import torch.distributed.checkpoint as dcp

    strategy = engine.strategy
    path = os.path.abspath(default_path(engine) if path is None else path)
    if not _all_finite(engine):
        raise CheckpointError(f"not saving a checkpoint of global step {engine.global_step}: "
                              "a module holds NaN or inf; the last saved checkpoint is left "
                              "as it was")
    side = _side_state(engine)  # first: a refusal leaves nothing behind
    parent = os.path.dirname(path)
    tmp = strategy.broadcast_object(
        os.path.join(parent, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp"))
    if strategy.is_main:
        _remove_stale_temporaries(parent)
        os.makedirs(tmp, exist_ok=True)
    strategy.barrier()
    try:
        dcp.save(_problem_states(engine, _stateless(engine)), checkpoint_id=tmp,
                 no_dist=not _distributed())
        strategy.run_on_main(lambda: checkpoint.atomic_save(side, os.path.join(tmp, SIDE_FILE)))
        strategy.run_on_main(lambda: _replace(tmp, path))
    except BaseException:
        if strategy.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    directory = engine.config.checkpoint_dir
    if strategy.is_main and directory is not None and engine.config.keep_checkpoints > 0 \
            and parent == os.path.abspath(directory):
        checkpoint.prune(directory, engine.config.keep_checkpoints)
    strategy.barrier()
    return path


_TEMPORARY = re.compile(r"^\..+\.[0-9a-f]{32}\.tmp(\.old)?$")


def _remove_stale_temporaries(directory: str) -> None:
    """Folders a save killed midway left behind (one run writes its checkpoints at a time,
    so any such folder here is litter)."""
    if os.path.isdir(directory):
        for name in os.listdir(directory):
            if _TEMPORARY.match(name) and os.path.isdir(os.path.join(directory, name)):
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def _replace(tmp: str, path: str) -> None:
    """Rename the finished folder over ``path`` (an older folder there is removed)."""
    old = None
    if os.path.exists(path):
        old = f"{tmp}.old"
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load(engine: Engine, path: str) -> None:
    """Every rank: restore ``engine`` from a sharded checkpoint folder, or from a one-file
    checkpoint (whose whole tensors are then split into this rank's shards)."""
    if os.path.isdir(path):
        side_path = os.path.join(path, SIDE_FILE)
        if not os.path.isfile(side_path):
            raise CheckpointError(f"{path} is a folder without {SIDE_FILE}: not a betty "
                                  "sharded checkpoint (or its save did not finish)")
        state = checkpoint.safe_load(side_path)
        check_signature(state["signature"], checkpoint.signature(engine), path)
        stateless = {name for name, training in state["problems"].items()
                     if "optimizer" in training["state"]}
        _load_sharded(engine, path, stateless)
    else:
        state = checkpoint.safe_load(path)
        check_signature(state["signature"], checkpoint.signature(engine), path)
        _load_whole(engine, state)
        _strip_sharded(state)
    apply_state(engine, state)  # the optimizers without state load theirs here


def _load_sharded(engine: Engine, path: str, stateless: set[str]) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    states = _problem_states(engine, stateless)
    try:
        dcp.load(states, checkpoint_id=path, no_dist=not _distributed())
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} could not be read ({type(err).__name__}: "
                              f"{err})") from err
    for problem in engine.problems:
        if problem.name not in states:
            continue
        state = states[problem.name]
        if "optimizer" not in state:
            set_model_state_dict(problem.module, state["module"])
        else:
            set_state_dict(problem.module, problem.optimizer, model_state_dict=state["module"],
                           optim_state_dict=state["optimizer"])


def _load_whole(engine: Engine, state: dict[str, Any]) -> None:
    """Whole tensors of a one-file checkpoint into this rank's shards."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_state_dict,
    )

    options = StateDictOptions(full_state_dict=True)
    for problem in engine.problems:
        if problem.module is None:
            continue
        saved = state["problems"][problem.name]["state"]
        if problem.optimizer is None or not saved.get("optimizer", {}).get("state"):
            set_model_state_dict(problem.module, saved["module"], options=options)
            continue
        set_state_dict(problem.module, problem.optimizer, model_state_dict=saved["module"],
                       optim_state_dict=_by_name(problem, saved["optimizer"]), options=options)


def _by_name(problem: Problem, optimizer_state: dict[str, Any]) -> dict[str, Any]:
    """An ``Optimizer.state_dict()`` (parameters by position) keyed by parameter names, as
    ``torch.distributed.checkpoint.state_dict`` reads it."""
    assert problem.module is not None and problem.optimizer is not None
    name_of = {id(p): name for name, p in problem.module.named_parameters()}
    names = [name_of.get(id(p)) for g in problem.optimizer.param_groups for p in g["params"]]
    if None in names:
        raise CheckpointError(f"problem '{problem.name}': its optimizer holds parameters "
                              "outside its module; a sharded load cannot name them")
    groups = [{**g, "params": [names[i] for i in g["params"]]}
              for g in optimizer_state["param_groups"]]
    return {"state": {names[i]: s for i, s in optimizer_state["state"].items()},
            "param_groups": groups}
