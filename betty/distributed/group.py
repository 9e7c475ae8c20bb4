"""The process group: read from torchrun's environment, one device per local rank, and a
failure on one rank reported to every rank instead of a hang.

torchrun (or any launcher that sets the same variables) starts one process per device with
``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; `open_group`
joins the default process group with them (``init_method="env://"``), or adopts a group the
program already initialised.

Failures: a rank that raises writes ``"rank R: <error>"`` into the group's key-value store
(first failure wins), then destroys its process group, which closes its connections, so
the other ranks' pending collectives fail at once instead of waiting for the timeout. Each
of them reads the message from the store and raises `PeerFailure` with it. Every collective
also has a timeout (``EngineConfig.distributed_timeout``) as the backstop for a rank that
hangs without raising.
"""

from __future__ import annotations

import atexit
import datetime
import gc
import logging
import os
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from betty.errors import BettyError, ConfigError

log = logging.getLogger("betty")

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
_FAILED = "betty/failed"
_SEEN = "betty/failure_seen"


class PeerFailure(BettyError, RuntimeError):
    """Another rank of the process group failed; the message is that rank's error."""


@dataclass
class Group:
    """The default process group as this process sees it."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str
    timeout: datetime.timedelta
    owned: bool  # betty initialised it, so betty destroys it at exit


def launched() -> bool:
    """True when a launcher such as torchrun set the process-group variables."""
    return all(name in os.environ for name in LAUNCH_VARIABLES)


def pick_device(local_rank: int, *, cpu: bool = False) -> torch.device:
    """``cuda:<local_rank>`` when CUDA is available (and not ``cpu``), else the CPU."""
    if cpu or not torch.cuda.is_available():
        return torch.device("cpu")
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise ConfigError(
            f"LOCAL_RANK={local_rank} but this node has {count} CUDA device(s); launch at "
            f"most {count} processes per node (torchrun --nproc_per_node={count})"
        )
    device = torch.device("cuda", local_rank)
    torch.cuda.set_device(device)
    return device


def pick_backend(requested: str, device: torch.device) -> str:
    """The requested backend, except that NCCL cannot run on the CPU: gloo there."""
    if device.type == "cpu" and requested == "nccl":
        return "gloo"
    return requested


def open_group(strategy: str, *, backend: str, timeout_s: float, cpu: bool = False) -> Group:
    """Join (or adopt) the default process group for ``EngineConfig.strategy=strategy``."""
    if not dist.is_available():
        raise ConfigError(
            f"EngineConfig.strategy={strategy!r} needs torch.distributed, which this PyTorch "
            "build lacks; use strategy='default'"
        )
    timeout = datetime.timedelta(seconds=timeout_s)
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", rank % max(torch.cuda.device_count(), 1)))
        device = pick_device(local, cpu=cpu)
        return Group(rank, world, local, device, str(dist.get_backend()), timeout,
                     owned=False)
    if not launched():
        missing = [name for name in LAUNCH_VARIABLES if name not in os.environ]
        raise ConfigError(
            f"EngineConfig.strategy={strategy!r} runs one process per device, but the "
            f"launch variables {missing} are not set; start the program with torchrun, e.g. "
            "`torchrun --nproc_per_node=2 train.py`, or use strategy='default'"
        )
    local = int(os.environ["LOCAL_RANK"])
    device = pick_device(local, cpu=cpu)
    chosen = pick_backend(backend, device)
    kwargs: dict[str, Any] = {"backend": chosen, "timeout": timeout}
    if device.type == "cuda":
        kwargs["device_id"] = device
    dist.init_process_group(**kwargs)
    group = Group(dist.get_rank(), dist.get_world_size(), local, device, chosen, timeout,
                  owned=True)
    atexit.register(close_group, group)
    log.info("rank %d of %d on %s (backend %s)", group.rank, group.world_size, device, chosen)
    return group


def _default_store() -> Any:
    """The store c10d rendezvoused with (private API: failure reports are best effort).
    Taken only when a failure is reported, so that no reference outlives the group."""
    if not dist.is_initialized():
        return None
    try:
        return dist.distributed_c10d._get_default_store()
    except (AttributeError, RuntimeError, ValueError):
        return None


def close_group(group: Group) -> None:
    """Destroy the default process group if betty created it and it is still open.

    Runs at exit. Garbage engines (reference cycles) still hold the group through ZeRO or
    FSDP objects: collecting them first lets the destruction join the group's worker
    threads. A gloo worker that releases a finished collective while the interpreter
    finalizes aborts the process, so the workers also get a moment to finish."""
    if group.owned and dist.is_initialized():
        gc.collect()  # engines are reference cycles; they hold the group (ZeRO, FSDP)
        dist.destroy_process_group()
        time.sleep(0.05)


# -- failures ------------------------------------------------------------------------------
def describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"


def announce_failure(group: Group, error: BaseException, *, wait_s: float = 10.0) -> None:
    """Tell the other ranks that this one failed with ``error``, break the group so their
    collectives fail now, and give them up to ``wait_s`` to read the message (this
    process may host the store they read it from)."""
    store = _default_store()  # held past the group's end: this process may host it
    if store is not None:
        try:
            store.compare_set(_FAILED, "", f"rank {group.rank}: {describe(error)}")
        except (RuntimeError, ValueError):  # store already gone: nothing more to tell
            store = None
    if dist.is_initialized():
        dist.destroy_process_group()
    if store is None:
        return
    deadline = time.monotonic() + min(wait_s, group.timeout.total_seconds())
    try:
        while time.monotonic() < deadline:
            if int(store.add(_SEEN, 0)) >= group.world_size - 1:
                return
            time.sleep(0.02)
    except (RuntimeError, ValueError):
        return


def peer_failure(group: Group) -> str | None:
    """The failure message another rank announced, if any (acknowledged once read)."""
    store = _default_store()
    if store is None:
        return None
    try:
        store.set_timeout(datetime.timedelta(seconds=5))
        if not store.check([_FAILED]):
            return None
        message = store.get(_FAILED).decode()
        store.add(_SEEN, 1)
    except (RuntimeError, ValueError):  # the failed rank hosted the store and is gone
        return None
    return message or None
