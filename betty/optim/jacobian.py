"""SAMA's P: the diagonal Jacobian of an optimizer's update with respect to the gradient.

If one step maps ``p`` to ``p - u(g)``, every rule here is elementwise, so ``∂u/∂g`` is
diagonal and ``P = diag(∂u/∂g)`` has the shape of ``p``. Each function evaluates P at the
state the optimizer is in *now*, for the step it *would* take next (step count ``t + 1``,
first-step cases included). With ``g' = s·g + λ·p`` (``s = -1`` for maximize; λ only for
coupled weight decay), ``∂g'/∂g = s``, so ``P = s·∂u/∂g'``. Decoupled (AdamW) decay does
not depend on ``g`` and drops out.

- SGD, learning rate η, momentum μ, dampening τ:
  ``P = s·η`` without momentum; ``s·η`` (or ``s·η(1 + μ)`` nesterov) on the first step, when
  the buffer is ``g'``; ``s·η(1 - τ)`` (or ``s·η(1 + μ(1 - τ))`` nesterov) afterwards.
- Adam/AdamW, ``m̂ = m_t/c1``, ``c1 = 1 - β1^t``, ``c2 = 1 - β2^t``, ``r = √w``
  with ``w = v_t`` (amsgrad: ``max(vmax, v_t)``), ``D = r/√c2 + ε``:
  ``P = s·η/c1 · ((1 - β1)/D - m_t·D'/D²)``, ``D' = (1 - β2)·g'/(√c2·r)``, where ``D' = 0``
  if ``r = 0`` or, for amsgrad, if the old maximum is kept (``v_t <= vmax``, ties included).
- RMSprop, ``A = s_t - a_t²`` (centered) or ``s_t``, ``A' = 2(1 - α)(g' - a_t)`` (centered)
  or ``2(1 - α)g'``, ``D = √A + ε``: ``P = s·η·(1/D - g'·A'/(2√A·D²))``; momentum does not
  change P since the buffer is linear in the new term.
- Adagrad, ``S = S_{t-1} + g'²``, ``D = √S + ε``, ``η_t = η/(1 + (t - 1)κ)``:
  ``P = s·η_t·(1/D - g'²/(√S·D²))``.

Where the square root's argument is 0 (only when ``g' = 0``) its derivative term is taken as
0, the same convention as `betty.optim.steps.safe_sqrt`. Results are detached.
Reference: Choe et al., "Making Scalable Meta Learning Practical" (SAMA, NeurIPS 2023).
"""

from __future__ import annotations

import torch
from torch import Tensor

from betty.optim.steps import (
    Group,
    State,
    adam_moments,
    coef,
    count,
    direction,
    hyper,
    is_active,
    mix,
    safe_sqrt,
    scalar,
)


def _sign(group: Group) -> float:
    return -1.0 if group.get("maximize", False) else 1.0


def _over_root(numerator: Tensor, root: Tensor) -> Tensor:
    """``numerator / root`` where ``root > 0``, else 0 (the square root's kink at 0)."""
    positive = root > 0
    return torch.where(positive, numerator / torch.where(positive, root, 1.0), 0.0)


@torch.no_grad()
def sgd_diag(p: Tensor, g: Tensor, state: State, group: Group) -> Tensor:
    """P of torch.optim.SGD (see the module docstring)."""
    lr = hyper(group, "lr")
    momentum = hyper(group, "momentum")
    scale = lr
    if is_active(momentum):
        keep = 1.0 if state.get("momentum_buffer") is None else 1 - hyper(group, "dampening")
        scale = lr * (1 + momentum * keep) if group["nesterov"] else lr * keep
    value = coef(_sign(group) * scale, p)
    if not isinstance(value, Tensor):
        value = torch.full((), value, dtype=p.dtype, device=p.device)
    return value.to(p.device).expand_as(p)  # constant: a view, no parameter-sized memory


def adam_diag(
    p: Tensor, g: Tensor, state: State, group: Group, *, decoupled: bool | None = None
) -> Tensor:
    """P of torch.optim.Adam (AdamW: ``decoupled=True``), see the module docstring."""
    if decoupled is None:
        decoupled = bool(group.get("decoupled_weight_decay", False))
    with torch.no_grad():  # P is a constant preconditioner: no graph, even for tensor lr
        beta1, beta2 = map(scalar, group["betas"])
        step, d, m, v, v_max = adam_moments(p, g, state, group, decoupled=decoupled)
        t = count(step, group)
        c1 = coef(1 - beta1**t, p)
        c2_root = coef(torch.sqrt(1 - beta2**t), p)
        root = safe_sqrt(v_max)
        denom = root / c2_root + hyper(group, "eps")
        slope = _over_root((1 - beta2) * d / c2_root, root)
        if group["amsgrad"]:
            slope = torch.where(v > state["max_exp_avg_sq"], slope, 0.0)
        lr = coef(hyper(group, "lr"), p)
        return _sign(group) * lr / c1 * ((1 - beta1) / denom - m * slope / (denom * denom))


def adamw_diag(p: Tensor, g: Tensor, state: State, group: Group) -> Tensor:
    """P of torch.optim.AdamW: `adam_diag` with decoupled weight decay."""
    return adam_diag(p, g, state, group, decoupled=True)


@torch.no_grad()
def rmsprop_diag(p: Tensor, g: Tensor, state: State, group: Group) -> Tensor:
    """P of torch.optim.RMSprop (see the module docstring)."""
    alpha = hyper(group, "alpha")
    d = direction(p, g, group)
    square_avg = state["square_avg"] * alpha + (1 - alpha) * (d * d)
    if group["centered"]:
        grad_avg = mix(state["grad_avg"], d, 1 - alpha)
        spread = square_avg - grad_avg * grad_avg
        spread_slope = 2 * (1 - alpha) * (d - grad_avg)
    else:
        spread, spread_slope = square_avg, 2 * (1 - alpha) * d
    root = safe_sqrt(spread)
    denom = root + hyper(group, "eps")
    slope = _over_root(spread_slope / 2, root)
    lr = coef(hyper(group, "lr"), p)
    return _sign(group) * lr * (1 / denom - d * slope / (denom * denom))


@torch.no_grad()
def adagrad_diag(p: Tensor, g: Tensor, state: State, group: Group) -> Tensor:
    """P of torch.optim.Adagrad (see the module docstring)."""
    t = count(state["step"] + 1)
    lr = hyper(group, "lr")
    clr = coef(lr / (1 + (t - 1) * hyper(group, "lr_decay")), p)
    d = direction(p, g, group)
    total = state["sum"] + d * d
    root = safe_sqrt(total)
    denom = root + hyper(group, "eps")
    slope = _over_root(d, root)
    return _sign(group) * clr * (1 / denom - d * slope / (denom * denom))
