"""Running one program as several processes: one `Strategy` per engine (``engine.strategy``).

``EngineConfig.strategy`` picks it: ``"default"``/``"cpu"``/``"gpu"`` run one process
(`Strategy`, every collective the identity); ``"distributed"`` is data parallelism
(`DataParallel`), ``"zero"`` adds sharded optimizer state (`Zero`), ``"fsdp"`` shards
parameters too (`FullyShard`, FSDP2). The distributed ones join the process group torchrun
sets up. Layout: ``group`` (process group, failures), ``strategy`` (the interface),
``data_parallel``, ``zero``, ``fsdp``, ``sampling`` (sharded data loaders).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from betty.distributed.group import PeerFailure, launched
from betty.distributed.strategy import SINGLE_PROCESS, Strategy, strategy_of

if TYPE_CHECKING:
    from betty.configs import EngineConfig

DISTRIBUTED_STRATEGIES = ("distributed", "zero", "fsdp")


def make_strategy(config: EngineConfig, device: torch.device | None = None) -> Strategy:
    """The strategy for ``config.strategy`` (joining the process group if distributed).

    Args:
        config: the engine's config; ``strategy``, ``backend`` and ``distributed_timeout``
            are read.
        device: the device of a single-process run (ignored by the distributed strategies,
            which take ``cuda:<LOCAL_RANK>`` or the CPU).

    Raises:
        ConfigError: a distributed strategy outside torchrun (no process group to join).
    """
    if config.strategy == "distributed":
        from betty.distributed.data_parallel import DataParallel

        return DataParallel(config)
    if config.strategy == "zero":
        from betty.distributed.zero import Zero

        return Zero(config)
    if config.strategy == "fsdp":
        from betty.distributed.fsdp import FullyShard

        return FullyShard(config)
    return Strategy(device)


__all__ = [
    "DISTRIBUTED_STRATEGIES",
    "SINGLE_PROCESS",
    "PeerFailure",
    "Strategy",
    "launched",
    "make_strategy",
    "strategy_of",
]
