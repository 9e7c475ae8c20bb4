"""Pure, out-of-place single-tensor update rules with torch.optim's exact semantics.

Every rule is a pair of pure functions over one parameter ``p``, its gradient ``g`` and an
explicit state dict holding the same keys torch.optim keeps in ``optimizer.state[p]``:

- ``init(p, group) -> state``: the state torch.optim creates before a parameter's first step;
- ``update(p, g, state, group) -> (p_new, state_new)``: one step, with no in-place operation,
  so autograd differentiates it with respect to ``p``, ``g``, the state and any hyperparameter
  given as a tensor (e.g. a meta-learned ``lr``).

``group`` is the torch.optim param group (the hyperparameters), read afresh at every call so
that learning-rate schedulers, which edit ``group["lr"]``, are honoured. Each rule first forms
the direction torch.optim feeds its recursion,

    g' = s·g + λ·p,   s = -1 if maximize else 1,   λ = weight_decay (coupled decay),

and counts steps ``t`` from 1, as torch.optim does.

Two deliberate differences from torch.optim, neither of which changes any value:

- SGD's first momentum buffer is ``g'`` itself, not a detached copy, so reverse mode sees the
  whole dependence of the update on the first gradient.
- Square roots use `safe_sqrt`, whose derivative at 0 is 0 instead of ``inf``: a zero
  gradient entry at Adam's first step would otherwise turn a hypergradient into ``nan``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

Group = Mapping[str, Any]
State = dict[str, Any]


def scalar(value: Any) -> Any:
    """A one-element tensor squeezed to 0-dim, as torch.optim does; floats unchanged."""
    if isinstance(value, Tensor) and value.dim() != 0:
        return value.reshape(())
    return value


def hyper(group: Group, key: str) -> Any:
    """Read a hyperparameter of a param group (see `scalar`)."""
    return scalar(group[key])


def is_active(value: Any) -> bool:
    """Whether an optional term (momentum, weight decay) is switched on.

    A tensor counts as on: comparing it with zero would cost a device sync every step, and
    a tensor-valued hyperparameter is given to be differentiated, so its term must be there.
    """
    return isinstance(value, Tensor) or value != 0


def direction(p: Tensor, g: Tensor, group: Group, *, coupled_decay: bool = True) -> Tensor:
    """The gradient the rule consumes: ``g' = s·g + λ·p`` (maximize sign, L2 decay)."""
    d = -g if group.get("maximize", False) else g
    weight_decay = hyper(group, "weight_decay")
    if coupled_decay and is_active(weight_decay):
        d = d + weight_decay * p
    return d


def safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)`` with derivative 0 (not ``inf``) at ``x = 0``; same values everywhere."""
    zero = x == 0
    return torch.where(zero, 0.0, torch.sqrt(torch.where(zero, 1.0, x)))


def mix(old: Tensor, new: Tensor, weight: Any) -> Tensor:
    """``old + weight·(new - old)``: an exponential moving average, via lerp when it can."""
    if isinstance(weight, Tensor):
        return old + weight * (new - old)
    return torch.lerp(old, new, weight)


def coef(value: Any, p: Tensor) -> Any:
    """A scalar coefficient in ``p``'s dtype, so a 0-dim float64 never promotes ``p``."""
    return value.to(p.dtype) if isinstance(value, Tensor) else value


def count(step: Tensor, group: Group | None = None) -> Tensor:
    """The step counter in the dtype torch.optim computes its bias corrections in.

    torch.optim reads the counter into a Python float (a double), except in Adam's
    ``capturable`` and ``differentiable`` modes, which keep it a tensor of its own dtype
    (float32 unless the default dtype is float64); there ``1 - β2^t`` carries float32
    round-off, about 1e-5 relative at small t, and this follows suit. Fused kernels use
    doubles. ``group=None`` means the double path.
    """
    if group is not None and not group.get("fused"):
        if group.get("capturable") or group.get("differentiable"):
            return step
    return step.to(torch.float32 if step.device.type == "mps" else torch.float64)


def zero_count(p: Tensor, group: Group) -> Tensor:
    """A fresh step counter placed and typed where torch.optim would put it."""
    fused = bool(group.get("fused") or False)
    on_device = fused or bool(group.get("capturable") or False)
    wide = torch.get_default_dtype() == torch.float64
    dtype = torch.float32 if fused or not wide else torch.float64
    return torch.zeros((), dtype=dtype, device=p.device if on_device else "cpu")


# --- SGD -------------------------------------------------------------------------------


def sgd_init(p: Tensor, group: Group) -> State:
    """SGD keeps no state until its first step creates the momentum buffer."""
    return {}


def sgd_update(p: Tensor, g: Tensor, state: State, group: Group) -> tuple[Tensor, State]:
    """One SGD step (torch.optim.SGD).

    With momentum μ, dampening τ and learning rate η:

        b_1 = g'_1,   b_t = μ·b_{t-1} + (1 - τ)·g'_t,
        d_t = g'_t + μ·b_t (nesterov)  or  b_t,   p_t = p_{t-1} - η·d_t,

    and ``d_t = g'_t`` without momentum.
    """
    lr = hyper(group, "lr")
    momentum = hyper(group, "momentum")
    d = direction(p, g, group)
    new_state: State = {}
    if is_active(momentum):
        buf = state.get("momentum_buffer")
        if buf is None:
            buf = d.clone()  # torch.optim: a copy of g', so later edits of g cannot reach it
        else:
            buf = buf * momentum + (1 - hyper(group, "dampening")) * d
        d = d + momentum * buf if group["nesterov"] else buf
        new_state["momentum_buffer"] = buf
    return p - coef(lr, p) * d, new_state


# --- Adam and AdamW ----------------------------------------------------------------------


def adam_init(p: Tensor, group: Group) -> State:
    """Adam's fresh state: step 0 and zero moments (and a zero running max for amsgrad)."""
    state: State = {
        "step": zero_count(p, group),
        "exp_avg": torch.zeros_like(p),
        "exp_avg_sq": torch.zeros_like(p),
    }
    if group["amsgrad"]:
        state["max_exp_avg_sq"] = torch.zeros_like(p)
    return state


def adam_moments(
    p: Tensor, g: Tensor, state: State, group: Group, *, decoupled: bool
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shared by the step and its Jacobian: ``(t, g', m_t, v_t, v̂max_t)``.

    ``v̂max_t = max(v̂max_{t-1}, v_t)`` for amsgrad and ``v_t`` otherwise.
    """
    beta1, beta2 = map(scalar, group["betas"])
    step = state["step"] + 1
    d = direction(p, g, group, coupled_decay=not decoupled)
    m = mix(state["exp_avg"], d, 1 - beta1)
    v = state["exp_avg_sq"] * beta2 + (1 - beta2) * (d * d)
    v_max = torch.maximum(state["max_exp_avg_sq"], v) if group["amsgrad"] else v
    return step, d, m, v, v_max


def adam_update(
    p: Tensor, g: Tensor, state: State, group: Group, *, decoupled: bool | None = None
) -> tuple[Tensor, State]:
    """One Adam step (torch.optim.Adam; AdamW is ``decoupled=True``).

    With β1, β2, ε, learning rate η and t the new step count:

        m_t = β1·m_{t-1} + (1 - β1)·g',   v_t = β2·v_{t-1} + (1 - β2)·g'²,
        p_t = p_{t-1}·(1 - η·λ) [AdamW only] - η/(1 - β1^t) · m_t / (√v_t/√(1 - β2^t) + ε),

    with ``v_t`` replaced by ``max(vmax_{t-1}, v_t)`` in the denominator for amsgrad.
    Reference: Kingma & Ba, "Adam" (2015); Loshchilov & Hutter, "Decoupled Weight Decay
    Regularization" (2019); Reddi et al., "On the Convergence of Adam and Beyond" (2018).
    """
    if decoupled is None:
        decoupled = bool(group.get("decoupled_weight_decay", False))
    lr = hyper(group, "lr")
    weight_decay = hyper(group, "weight_decay")
    beta1, beta2 = map(scalar, group["betas"])
    step, _, m, v, v_max = adam_moments(p, g, state, group, decoupled=decoupled)
    if decoupled and is_active(weight_decay):
        p = p * coef(1 - lr * weight_decay, p)
    t = count(step, group)
    step_size = lr / (1 - beta1**t)
    denom = safe_sqrt(v_max) / coef(torch.sqrt(1 - beta2**t), p) + hyper(group, "eps")
    new_state: State = {"step": step, "exp_avg": m, "exp_avg_sq": v}
    if group["amsgrad"]:
        new_state["max_exp_avg_sq"] = v_max
    return p - coef(step_size, p) * (m / denom), new_state


def adamw_update(p: Tensor, g: Tensor, state: State, group: Group) -> tuple[Tensor, State]:
    """One AdamW step: `adam_update` with decoupled weight decay."""
    return adam_update(p, g, state, group, decoupled=True)


# --- RMSprop -----------------------------------------------------------------------------


def rmsprop_init(p: Tensor, group: Group) -> State:
    """RMSprop's fresh state: step 0, zero square average, buffer and mean as configured."""
    state: State = {"step": zero_count(p, group), "square_avg": torch.zeros_like(p)}
    if is_active(hyper(group, "momentum")):
        state["momentum_buffer"] = torch.zeros_like(p)
    if group["centered"]:
        state["grad_avg"] = torch.zeros_like(p)
    return state


def rmsprop_update(p: Tensor, g: Tensor, state: State, group: Group) -> tuple[Tensor, State]:
    """One RMSprop step (torch.optim.RMSprop).

    With smoothing α, momentum μ, ε and learning rate η:

        s_t = α·s_{t-1} + (1 - α)·g'²,   a_t = α·a_{t-1} + (1 - α)·g'  [centered],
        r_t = √(s_t - a_t²) [centered] or √s_t,   q_t = g' / (r_t + ε),
        b_t = μ·b_{t-1} + q_t,   p_t = p_{t-1} - η·b_t   (η·q_t without momentum).

    Reference: Hinton, Neural Networks for Machine Learning, lecture 6e; Graves (2013).
    """
    lr = hyper(group, "lr")
    alpha = hyper(group, "alpha")
    momentum = hyper(group, "momentum")
    d = direction(p, g, group)
    square_avg = state["square_avg"] * alpha + (1 - alpha) * (d * d)
    new_state: State = {"step": state["step"] + 1, "square_avg": square_avg}
    if group["centered"]:
        grad_avg = mix(state["grad_avg"], d, 1 - alpha)
        new_state["grad_avg"] = grad_avg
        avg = safe_sqrt(square_avg - grad_avg * grad_avg)
    else:
        avg = safe_sqrt(square_avg)
    avg = avg + hyper(group, "eps")
    if is_active(momentum):
        buf = state["momentum_buffer"] * momentum + d / avg
        new_state["momentum_buffer"] = buf
        return p - coef(lr, p) * buf, new_state
    return p - coef(lr, p) * (d / avg), new_state


# --- Adagrad -----------------------------------------------------------------------------


def adagrad_init(p: Tensor, group: Group) -> State:
    """Adagrad's fresh state: step 0 and the sum filled with initial_accumulator_value."""
    return {
        "step": zero_count(p, group),
        "sum": torch.full_like(p, group["initial_accumulator_value"]),
    }


def adagrad_update(p: Tensor, g: Tensor, state: State, group: Group) -> tuple[Tensor, State]:
    """One Adagrad step (torch.optim.Adagrad).

    With learning rate η, decay κ = lr_decay, ε and t the new step count:

        S_t = S_{t-1} + g'²,   η_t = η / (1 + (t - 1)·κ),   p_t = p_{t-1} - η_t·g'/(√S_t + ε).

    Reference: Duchi, Hazan & Singer, "Adaptive Subgradient Methods" (JMLR 2011).
    """
    step = state["step"] + 1
    clr = hyper(group, "lr") / (1 + (count(step) - 1) * hyper(group, "lr_decay"))
    d = direction(p, g, group)
    total = state["sum"] + d * d
    std = safe_sqrt(total) + hyper(group, "eps")
    return p - coef(clr, p) * (d / std), {"step": step, "sum": total}
