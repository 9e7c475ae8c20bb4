"""Peak memory of one hop, in parameter-sized vectors (CPU tensor allocator, counted exactly).

The lower problem is a two-layer network whose 512x512 middle weight holds 98% of the
parameters, on a batch of 4 (activations are a few kB), so the peak of live tensor bytes during
a hop, above what was live when it started, counts the parameter-sized vectors the method
creates. ``torch.profiler`` records every allocation and free of the CPU allocator; the running
sum over the hop is exact and does not depend on the machine. Each bound is the method's
floor from benchmarks/README.md plus PyTorch's double-backward temporaries, with a margin below
the next whole vector, so a reintroduced copy (a clone of the parameters, a kept ``dL/dw``, a
solution vector) fails it. Measured: darts 0.03, neumann 2.97, cg 3.97, f2sa 2.01; before
the probes and solvers worked in place (commit cb64345): 2.0, 6.97, 9.97 (f2sa: 3.01 before
it used v's storage).

The direction ``v`` is handed over as an `OwnedVector`, as the chain does: the methods may use
its storage.
"""

from __future__ import annotations

import pytest
import torch
from live_bytes import peak_live_bytes

from betty.configs import Config
from betty.hypergradient import METHODS, Hop
from betty.hypergradient.hop import OwnedVector

WIDTH = 512


def program():
    gen = torch.Generator().manual_seed(0)
    w = [torch.randn(16, WIDTH, generator=gen).mul_(0.1).requires_grad_(),
         torch.randn(WIDTH, WIDTH, generator=gen).mul_(0.03).requires_grad_()]
    lam = torch.zeros(4, requires_grad=True)
    x = torch.randn(4, 16, generator=gen)

    def loss():
        h = torch.tanh(torch.tanh(x @ w[0]) @ w[1])
        return (torch.softmax(lam, 0) * h[:, :4].pow(2).sum(1)).sum()

    return w, lam, loss


def peak_vectors(method: str, config: Config) -> float:
    """Peak live bytes during one hop above those at its start, in units of the parameters'
    bytes."""
    w, lam, loss = program()
    gen = torch.Generator().manual_seed(1)
    v = OwnedVector(torch.randn(p.shape, generator=gen) for p in w)
    hop = Hop(w, [lam], loss)

    def one_hop():
        with hop:
            return METHODS[method](hop, v, config)

    peak, out = peak_live_bytes(one_hop)
    assert all(t is not None and torch.isfinite(t).all() for t in out)
    return peak / sum(p.numel() * p.element_size() for p in w)


CASES = {
    # probes in v's storage: nothing parameter-sized
    "darts": (Config(type="darts"), 0.2),
    # Neumann: the term takes v's storage; the double backward of each product sums a
    # weight's two contributions out of place: 3 parameter-sized temporaries
    "neumann": (Config(type="neumann", neumann_iterations=3, neumann_alpha=0.1), 3.5),
    # CG: direction (the residual takes v's storage) and the product's 3 temporaries
    "cg": (Config(type="cg", cg_iterations=3), 4.5),
    # F2SA: the penalized copy y and one gradient; u / lambda - dg/dw(z) takes v's storage
    # (measured 2.01; 3.01 when v was copied)
    "f2sa": (Config(type="f2sa", f2sa_steps=3), 2.5),
}


@pytest.mark.parametrize("method", list(CASES))
def test_hop_peak_in_parameter_sized_vectors(method):
    config, bound = CASES[method]
    assert peak_vectors(method, config) < bound
