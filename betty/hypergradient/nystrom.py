"""Nyström: a rank-k approximation of H from k of its columns, inverted by Woodbury.

    H_k = C W^+ C^T,   C = H[:, S] (n x k),   W = H[S, S] (k x k),
    x   = (H_k + rho I)^-1 v,   hop(v) = -M x.

Hataya & Yamada, "Nyström Method for Accurate and Scalable Implicit Differentiation", AISTATS
2023, Section 3. ``S`` holds k = ``nystrom_rank`` coordinates of the flattened lower parameters
(all of them when k >= n, so that H_k = H); each column is one Hessian-vector product with a
one-hot vector. Cost: k Hessian-vector products + one mixed product, no iterations; memory:
k parameter-sized columns.

Woodbury, written to stay accurate for a W that is singular or indefinite and for a small
rho, keeping nothing parameter-sized but C. From the Gram matrix G = C^T C (accumulated in
float64) and its eigenpairs s_i^2, U (directions with s_i^2 below a round-off floor dropped),
Q = C U diag(1/s) is an orthonormal basis of range(C), never formed; with W^+ the
pseudo-inverse (eigenvalues below k eps of the largest dropped), H_k = Q T Q^T with the k x k
T = (Q^T C) W^+ (Q^T C)^T, Q^T C = diag(1/s) U^T G, so

    (H_k + rho I)^-1 v = Q (T + rho I)^-1 Q^T v + (v - Q Q^T v) / rho,

a k x k solve in float64 plus the part of v outside the columns' range, divided by rho (that
part is absent when the columns span every direction). Algebraically this is the paper's
``v/rho - C (W + C^T C / rho)^-1 C^T v / rho^2``, which needs W invertible and, where v lies
in the columns' range (k >= n, say), subtracts two terms of size |v|/rho for a result of
size |v|/|H|, losing digits in proportion to 1/rho (float32, rho = 1e-4, k = n: 4e-3; this
form: below 1e-6). Memory: the k columns, in float32 (float64 for float64 parameters).

Which coordinates: a private `random.Random` draws them on the host, so the user's random
stream is never advanced. Seeded with ``nystrom_seed`` when that is an int (the same
coordinates at every step). With ``nystrom_seed=None`` (default) the coordinates change from
step to step (as the paper's fresh ``randperm``): each hop through an engine's problem has
its own stream, seeded from a hash of the CPU random state when the problem was set up
(read, not advanced) and the hop's name, and advanced once per hop; it is saved in
checkpoints, so a run is reproducible from ``torch.manual_seed`` and resumes bitwise, and
several ranks (seeded alike before the engine is built) draw what one process on the union
batch draws. A bare `Hop` (no engine) seeds from a hash of the CPU random state (and the
CUDA one of the parameters' device) as it stands when the hop runs.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import Tensor

from betty.configs import Config
from betty.hypergradient.hop import Hop, OptionalVector, OwnedVector, seed_from
from betty.linalg import unit

MEMORY_DRAWS = "nystrom_draws"  # hops taken so far: the position in the hop's random stream
GRAM_BLOCKS = 64
"""C^T C and C^T v are accumulated in float64 over this many blocks of coordinates (at least
4096 each), so the float64 temporary stays a small fraction of C."""


def sample_coordinates(n: int, rank: int, seed: int | None,
                       device: torch.device | None = None) -> list[int]:
    """The ``min(rank, n)`` distinct flat coordinates whose Hessian columns Nyström uses;
    ``seed=None`` seeds from the CPU random state and, for parameters on a CUDA ``device``,
    that device's (where dropout draws), both read, not advanced. Drawn on the host by
    Python's ``random`` (no tensor of ``n`` entries, nothing read back from a device)."""
    if seed is None:
        state = torch.get_rng_state().numpy().tobytes()
        if device is not None and device.type == "cuda":
            state += torch.cuda.get_rng_state(device).numpy().tobytes()
        seed = seed_from(state)
    return random.Random(seed).sample(range(n), min(rank, n))


def _one_hot(like: Sequence[Tensor], index: int) -> list[Tensor]:
    """The flat unit vector ``e_index`` in the shapes of ``like`` (contiguous, so that flat
    positions follow ``reshape(-1)`` even for channels-last parameters)."""
    out = [torch.zeros(t.shape, dtype=t.dtype, device=t.device) for t in like]
    for t in out:
        if index < t.numel():
            t.view(-1)[index] = 1.0
            break
        index -= t.numel()
    return out


def woodbury_solve(rows: Tensor, block: Tensor, v: Tensor, rho: float) -> Tensor:
    """``(C W^+ C^T + rho I)^-1 v`` for ``C = rows^T`` (``rows``: k x n) and ``v`` (n) of one
    dtype, ``W = block`` (k x k, symmetrised); the k x k algebra runs in float64 (module
    docstring)."""
    k, n = rows.shape
    eps = torch.finfo(rows.dtype).eps
    f64 = torch.float64
    gram = torch.zeros(k, k, dtype=f64, device=rows.device)
    rows_v = torch.zeros(k, dtype=f64, device=rows.device)
    size = max(4096, -(-n // GRAM_BLOCKS))
    for start in range(0, n, size):
        chunk = rows[:, start:start + size].to(f64)
        gram += chunk @ chunk.T
        rows_v += chunk @ v[start:start + size].to(f64)
    squares, u = torch.linalg.eigh(0.5 * (gram + gram.T))
    # s^2 below round-off: the columns' own rounding (k eps)^2, or G's (k eps64)
    floor = max((k * eps) ** 2, k * torch.finfo(f64).eps) * squares.max().clamp_min(0)
    keep = squares > floor
    u = u[:, keep] * squares[keep].rsqrt()  # Q = C u
    w64 = block.to(f64)
    eigenvalues, vectors = torch.linalg.eigh(0.5 * (w64 + w64.T))
    kept = eigenvalues.abs() > k * eps * eigenvalues.abs().max()
    half = (u.T @ gram) @ vectors[:, kept]  # T = half diag(1/l) half^T
    inner = (half / eigenvalues[kept]) @ half.T
    coefficients = u.T @ rows_v  # Q^T v
    y = torch.linalg.solve(inner + rho * torch.eye(inner.shape[0], dtype=f64), coefficients)
    x = (u @ y).to(rows.dtype) @ rows
    if u.shape[1] < n:  # the part of v outside range(C): (I - Q Q^T) v / rho
        x += (v - (u @ coefficients).to(rows.dtype) @ rows) / rho
    return x


def nystrom(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """Nyström hop: ``-M (H_k + rho I)^-1 v`` with ``k = nystrom_rank``, ``rho =
    nystrom_rho``."""
    direction, scale = unit(v)  # solve at unit scale (fp16 loss scales overflow HVPs)
    if isinstance(v, OwnedVector):
        v.clear()  # the chain's vector is no longer needed: free it before the k HVPs
    n = sum(t.numel() for t in direction)
    seed, memory = config.nystrom_seed, getattr(hop, "memory", None)
    if seed is None and memory is not None and "seed" in memory:
        draws = memory.get(MEMORY_DRAWS, 0)
        seed = seed_from(memory["seed"], draws)
        memory[MEMORY_DRAWS] = draws + 1
    coordinates = sample_coordinates(n, config.nystrom_rank, seed, direction[0].device)
    # columns in float32 (float64 if the parameters are): half precision would lose the solve
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in direction) else torch.float32
    rows = torch.empty(len(coordinates), n, dtype=dtype, device=direction[0].device)
    for row, i in zip(rows, coordinates):  # row j = H e_i (H is symmetric)
        torch.cat([c.reshape(-1).to(dtype) for c in hop.hvp(_one_hot(direction, i))], out=row)
    block = rows[:, torch.tensor(coordinates, device=rows.device)]
    flat_v = torch.cat([t.reshape(-1).to(dtype) for t in direction])
    flat_x = woodbury_solve(rows, block, flat_v, config.nystrom_rho)
    del rows
    parts = torch.split(flat_x, [t.numel() for t in direction])
    x = [part.view_as(t).to(t.dtype) for part, t in zip(parts, direction)]
    return [None if m is None else m * -scale.to(m.dtype) for m in hop.mixed(x)]
