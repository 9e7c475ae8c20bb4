"""Sharding a problem's data loader across ranks, with `DistributedSampler` semantics.

Rank ``r`` of ``W`` reads the samples ``r, r + W, r + 2W, ...`` of each epoch's order (the
dataset's order, or a permutation seeded by ``seed + epoch`` when the loader shuffles); every
rank has the same number of samples and so the same number of batches per epoch, so epoch
ends line up and no rank waits for another. When ``len(dataset)`` is not a multiple of ``W``
the first samples are repeated to fill the last round (``drop_last=True`` on the loader drops
the remainder instead), as `torch.utils.data.distributed.DistributedSampler` does. The
engine calls ``sampler.set_epoch(epoch)`` at each restart (`betty.problems.data.BatchSource`).

What is sharded and what is not:

* a ``DataLoader`` over a map-style dataset with the default sequential or random sampler
  is rebuilt with a `DistributedSampler` and the same batch size (per rank: the global batch
  is ``world_size * batch_size``), workers, collate function and memory pinning;
* a loader whose sampler is already distributed (has ``num_replicas`` and ``rank``) is
  the user's own sharding and is used as it is;
* any other sampler or batch sampler is an error (each rank would read everything);
* other iterables (lists of batches, iterable datasets, ``get_batch`` overrides) are used
  as given on every rank: the program shards them itself.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    IterableDataset,
    RandomSampler,
    SequentialSampler,
)
from torch.utils.data.distributed import DistributedSampler

from betty.errors import ConfigError

if TYPE_CHECKING:
    from betty.distributed.strategy import Strategy

log = logging.getLogger("betty")

_LOADER_OPTIONS = ("num_workers", "collate_fn", "pin_memory", "timeout", "worker_init_fn",
                   "multiprocessing_context", "persistent_workers", "pin_memory_device",
                   "in_order")


def is_distributed_sampler(sampler: Any) -> bool:
    """A sampler that shards by itself (DistributedSampler or one like it)."""
    return hasattr(sampler, "num_replicas") and hasattr(sampler, "rank")


def shard_loader(loader: Any, strategy: Strategy, *, owner: str) -> Any:
    """``loader`` reading only this rank's shard (see the module docstring); ``loader``
    itself when it is already sharded or is not a DataLoader."""
    if not isinstance(loader, DataLoader):
        log.warning("problem '%s': its data (a %s) is not a DataLoader, so every rank reads "
                    "all of it; shard it yourself or pass a DataLoader", owner,
                    type(loader).__name__)
        return loader
    if isinstance(loader.dataset, IterableDataset):
        log.warning("problem '%s': an IterableDataset cannot be sharded by index; every "
                    "rank reads the stream it yields (shard it inside the dataset)", owner)
        return loader
    batch_sampler = loader.batch_sampler
    sampler = loader.sampler
    if is_distributed_sampler(sampler) or is_distributed_sampler(batch_sampler):
        return loader
    where = (f"problem '{owner}': its DataLoader uses {{}}; under strategy="
             f"'{strategy.name}' each rank must read its own shard. Give the DataLoader a "
             "torch.utils.data.distributed.DistributedSampler (betty then uses it as it is) "
             "or use the default sampler (shuffle=True/False), which betty shards")
    if batch_sampler is not None and type(batch_sampler) is not BatchSampler:
        raise ConfigError(where.format(f"the batch sampler {type(batch_sampler).__name__}"))
    if type(sampler) not in (SequentialSampler, RandomSampler) or (
            isinstance(sampler, RandomSampler)
            and (sampler.replacement or sampler._num_samples is not None)):
        raise ConfigError(where.format(f"the sampler {type(sampler).__name__}"))
    shuffle = isinstance(sampler, RandomSampler)
    seed = _common_seed(loader, sampler, strategy) if shuffle else 0
    drop_last = bool(loader.drop_last)
    distributed = DistributedSampler(loader.dataset, num_replicas=strategy.world_size,
                                     rank=strategy.rank, shuffle=shuffle, seed=seed,
                                     drop_last=drop_last)
    options = {name: getattr(loader, name) for name in _LOADER_OPTIONS if hasattr(loader, name)}
    if loader.num_workers > 0:
        options["prefetch_factor"] = loader.prefetch_factor
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=distributed,
                      drop_last=drop_last, generator=loader.generator, **options)


def _common_seed(loader: DataLoader, sampler: RandomSampler, strategy: Strategy) -> int:
    """The shuffling seed, equal on every rank: the loader's generator's seed if it has
    one, else drawn from rank 0's global random state."""
    generator = sampler.generator if sampler.generator is not None else loader.generator
    if generator is not None:
        return int(generator.initial_seed()) % (2**62)
    seed = int(torch.randint(0, 2**62, (), dtype=torch.int64).item()) if strategy.is_main \
        else 0
    return int(strategy.broadcast_object(seed))
