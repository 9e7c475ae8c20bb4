"""REINFORCE: hypergradients through samples, for lowers whose loss is not differentiable in
the upper's parameters (the upper defines a distribution p_lam, the lower trains on samples).

The lower's objective is ``E_{s ~ p_lam}[L(w, s)]``; its mixed derivative is, by the
score-function identity (Williams 1992), ``d/dlam E_s[<dL/dw(w, s), x>] = E_s[<dL/dw(w, s), x>
d/dlam log p_lam(s)]``. On a batch of N samples, with ``l_i = <dL_i/dw, x>`` and the
leave-one-out baseline ``b_i = mean_{j != i} l_j`` (Kool, van Hoof & Welling, "Buy 4
REINFORCE samples, get a baseline for free!", ICLR 2019 workshop), which keeps the estimate
unbiased and removes the variance of the samples' common part:

    M x ~ 1/N sum_i (l_i - b_i) d/dlam log p_lam(s_i),      hop(v) = -M v.

How a lower exposes it: its ``training_step`` returns `score_function_loss` of its
per-sample losses and the samples' log-probabilities. That scalar equals ``losses.mean()``
bit for bit and has the same gradient in ``w`` (the lower trains as before); its gradient in
``lam`` carries the score, baseline included, so ``d/dlam <dL/dw, x>`` of it is the estimate
above. `reinforce` then takes the first-order view (``H^-1 ~ I``, as darts) and forms ``M v``
exactly, with one backward through ``dL/dw`` (nothing to tune). The same loss also serves
``cg``, ``neumann`` and ``nystrom`` (the implicit-function hypergradient ``-M H^-1 v`` with the
score estimate of M) and ``darts`` (``M v`` by a central difference: first-order only, its
backward passes reach the log-probabilities and nothing else).

Several processes: the baseline is the leave-one-out mean over the union of the ranks' batches
(the scores are centred by their mean over all ranks, taken by a differentiable all-reduce
whose backward carries the common part to every rank), so the ranks' averaged estimate is
the one of one process on the union batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from betty.configs import Config
from betty.distributed.data_parallel import mean_over_ranks
from betty.errors import HypergradientError
from betty.hypergradient.hop import Hop, OptionalVector

BASELINES = ("leave_one_out", "none")


def score_function_loss(losses: Tensor, log_prob: Tensor, baseline: str = "leave_one_out"
                        ) -> Tensor:
    """``losses.mean()``, carrying the score-function estimate of its dependence on the
    distribution that drew the samples.

    ``losses``: the N per-sample losses of the lower (shape ``(N,)``); ``log_prob``: the
    log-probability of each sample under the upper's distribution (``(N,)``, differentiable
    in the upper's parameters; for a sample of several draws, their sum). ``baseline``:
    ``"leave_one_out"`` (default; needs N >= 2) or ``"none"``.

    The value is ``mean_i losses_i * m_i`` with ``m_i = exp(k (c_i - c_i.detach()))``, which
    is exactly 1 (DiCE's "magic box", Foerster et al., ICML 2018); ``c_i = log_prob_i`` for no
    baseline, ``c_i = log_prob_i - mean_j log_prob_j`` and ``k = N / (N - 1)`` for the
    leave-one-out baseline (centring the scores is the same as centring the losses; k makes it
    leave-one-out, hence unbiased).
    """
    if baseline not in BASELINES:
        raise ValueError(f"score_function_loss: baseline={baseline!r}; choose one of "
                         f"{', '.join(BASELINES)}")
    if losses.dim() != 1 or log_prob.shape != losses.shape:
        raise ValueError("score_function_loss: losses and log_prob must both have shape (N,), "
                         f"got {tuple(losses.shape)} and {tuple(log_prob.shape)}")
    n = losses.shape[0]
    if baseline == "leave_one_out":
        if n < 2:
            raise ValueError("score_function_loss: the leave-one-out baseline needs at least "
                             "2 samples; pass baseline='none' for one")
        ranks = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if ranks == 1:
            centred = log_prob - log_prob.mean()
            exponent = (centred - centred.detach()) * (n / (n - 1))
        else:  # centred by the mean over every rank's samples: [sum, count] averaged
            stats = mean_over_ranks(torch.stack([log_prob.sum(), log_prob.new_tensor(n)]))
            union = stats[1].detach() * ranks  # on the device: no host read
            centred = log_prob - stats[0] / stats[1].detach()
            exponent = (centred - centred.detach()) * (union / (union - 1))
    else:
        exponent = log_prob - log_prob.detach()
    return (losses * torch.exp(exponent).to(losses.dtype)).mean()


def reinforce(hop: Hop, v: Sequence[Tensor], config: Config) -> OptionalVector:
    """REINFORCE hop: ``-M v`` with ``M`` the score-function estimate that the lower's
    `score_function_loss` carries, formed by one backward (no radius, no solve)."""
    out = hop.mixed(v)
    if all(m is None for m in out):
        raise HypergradientError(
            "reinforce: the lower problem's loss does not reach the upper's parameters; "
            "return score_function_loss(per_sample_losses, log_prob) from its training_step "
            "(betty.hypergradient.score_function_loss)"
        )
    return [None if m is None else -m for m in out]
