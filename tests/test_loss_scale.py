"""Second-order hops under fp16 receive vectors carrying the loss scale (thousands): CG and
Neumann must solve at unit scale, or Hessian-vector products under fp16 autocast overflow
(seen on an H200 as a NaN cg hypergradient with the default GradScaler)."""

from __future__ import annotations

import pytest
import torch

from betty.configs import Config
from betty.hypergradient import Hop, cg, neumann


def _hop(x: torch.Tensor, w: torch.nn.Parameter, lam: torch.nn.Parameter) -> Hop:
    def loss() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.float16):
            h = torch.nn.functional.linear(x, w)  # fp16 under autocast
            return (h.float() ** 2).mean() + (lam * w.float() ** 2).sum()

    return Hop([w], [lam], loss)


@pytest.mark.parametrize("method, config", [
    (cg, Config(type="cg", cg_iterations=4)),
    (neumann, Config(type="neumann", neumann_iterations=4, neumann_alpha=2e-4)),
])
def test_hop_is_linear_in_a_loss_scaled_vector(method, config):
    """Reference: the hop is linear in v, so hop(S v) = S hop(v) for a loss scale S = 2**16
    (without unit scaling, fp16 products of S v overflow to inf and the result is NaN)."""
    torch.manual_seed(0)
    x = torch.randn(32, 8) * 30
    w = torch.nn.Parameter(torch.randn(4, 8))
    lam = torch.nn.Parameter(torch.rand(4, 8))
    v = [torch.randn(4, 8)]
    scale = 2.0 ** 16
    with _hop(x, w, lam) as hop:
        small = method(hop, v, config)[0]
    with _hop(x, w, lam) as hop:
        large = method(hop, [v[0] * scale], config)[0]
    assert torch.isfinite(large).all()
    torch.testing.assert_close(large / scale, small, rtol=1e-3, atol=1e-6)
