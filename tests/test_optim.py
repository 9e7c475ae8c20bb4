"""betty.optim against torch.optim itself (the reference), step for step, in float64.

Each case builds the same optimizer twice over the same initial parameters (a (3, 4) and a
(4,) tensor in one group, a (2,) tensor in a second group with its own lr): torch.optim
steps one copy, FunctionalOptimizer the other. SAMA's P is checked against the exact
Jacobian of the functional step (torch.func.jacrev), as docs/math.md#sama prescribes.
"""

from __future__ import annotations

import inspect
import itertools

import pytest
import torch
from torch.func import jacrev

from betty.optim import functional_optimizer, update_jacobian_diag

DTYPE = torch.float64
SHAPES = [(3, 4), (4,), (2,)]
TOL = {"atol": 1e-12, "rtol": 1e-12}


def _grid(**options: list) -> list[dict]:
    return [dict(zip(options, values)) for values in itertools.product(*options.values())]


def _cases() -> list[tuple[type, dict]]:
    cases = []
    for kw in _grid(
        momentum=[0.0, 0.9],
        dampening=[0.0, 0.3],
        nesterov=[False, True],
        weight_decay=[0.0, 0.1],
        maximize=[False, True],
    ):
        if kw["nesterov"] and (kw["momentum"] == 0 or kw["dampening"] != 0):
            continue  # torch.optim rejects these
        if kw["momentum"] == 0 and kw["dampening"] != 0:
            continue  # dampening without momentum does nothing
        cases.append((torch.optim.SGD, {"lr": 0.05, **kw}))
    cases.append((torch.optim.SGD, {"lr": torch.tensor(0.05, dtype=DTYPE), "momentum": 0.5}))
    for cls in (torch.optim.Adam, torch.optim.AdamW):
        for kw in _grid(amsgrad=[False, True], weight_decay=[0.0, 0.1], maximize=[False, True]):
            cases.append((cls, {"lr": 0.03, **kw}))
    cases.append((torch.optim.Adam, {"lr": 0.02, "betas": (0.8, 0.95), "eps": 1e-3}))
    cases.append(
        (torch.optim.Adam, {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True})
    )
    cases.append((torch.optim.Adam, {"lr": torch.tensor(0.02, dtype=DTYPE), "amsgrad": True}))
    for kw in _grid(
        centered=[False, True], momentum=[0.0, 0.5], weight_decay=[0.0, 0.1], maximize=[False, True]
    ):
        cases.append((torch.optim.RMSprop, {"lr": 0.01, **kw}))
    for kw in _grid(
        lr_decay=[0.0, 0.05],
        weight_decay=[0.0, 0.1],
        initial_accumulator_value=[0.0, 0.2],
        maximize=[False, True],
    ):
        cases.append((torch.optim.Adagrad, {"lr": 0.1, **kw}))
    return cases


CASES = _cases()
IDS = [
    f"{cls.__name__}-"
    + ",".join(
        "lr=tensor" if k == "lr" else f"{k}={v}"
        for k, v in kw.items()
        if k != "lr" or isinstance(v, torch.Tensor)
    )
    for cls, kw in CASES
]


def _problem(seed: int = 0, device: str = "cpu"):
    """Initial parameters and a fixed quadratic-plus-quartic loss of them."""
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen, dtype=DTYPE).to(device) for s in SHAPES]
    n = sum(p.numel() for p in init)
    a = torch.randn(n, n, generator=gen, dtype=DTYPE).to(device)
    hess = a @ a.T / n + 0.1 * torch.eye(n, dtype=DTYPE, device=device)
    target = torch.randn(n, generator=gen, dtype=DTYPE).to(device)

    def loss(params, sign=1.0):
        x = torch.cat([p.reshape(-1) for p in params]) - target
        return sign * (0.5 * x @ hess @ x + 0.05 * (x**4).sum())

    return init, loss


def _make(cls, kw, init):
    params = [p.clone() for p in init]
    groups = [{"params": params[:2]}, {"params": params[2:], "lr": 0.5 * kw["lr"]}]
    return params, cls(groups, **kw)


def _sign(kw) -> float:
    return -1.0 if kw.get("maximize") else 1.0  # maximize a negated loss: same descent


def _torch_steps(opt, params, loss, sign, n):
    # Gradients at detached copies, so that the parameters need not require grad (the
    # differentiable mode would refuse its in-place step on leaves that do).
    for _ in range(n):
        probe = [p.detach().requires_grad_() for p in params]
        for p, g in zip(params, torch.autograd.grad(loss(probe, sign), probe)):
            p.grad = g
        opt.step()


def _functional_steps(fopt, params, state, loss, sign, n):
    for _ in range(n):
        params = [p.detach().requires_grad_() for p in params]
        grads = torch.autograd.grad(loss(params, sign), params)
        params, state = fopt.step(params, grads, state)
    return params, state


def _assert_state_equal(state, opt, params, tol=TOL):
    for own, st in zip(params, state):
        ref = opt.state.get(own, {})
        assert set(st) == {k for k, v in ref.items() if v is not None}
        for key, value in st.items():
            torch.testing.assert_close(value, ref[key], **tol)


@pytest.mark.parametrize(("cls", "kw"), CASES, ids=IDS)
def test_twenty_steps_match_torch_optim(cls, kw):
    init, loss = _problem()
    ref_params, ref_opt = _make(cls, kw, init)
    fun_params, fun_opt = _make(cls, kw, init)
    _torch_steps(ref_opt, ref_params, loss, _sign(kw), 20)
    fopt = functional_optimizer(fun_opt)
    params, state = _functional_steps(fopt, fun_params, fopt.init_state(), loss, _sign(kw), 20)
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p, ref.detach(), **TOL)
    _assert_state_equal(state, ref_opt, ref_params)


@pytest.mark.parametrize(("cls", "kw"), CASES, ids=IDS)
def test_write_back_lets_torch_optim_continue(cls, kw):
    init, loss = _problem(1)
    ref_params, ref_opt = _make(cls, kw, init)
    fun_params, fun_opt = _make(cls, kw, init)
    _torch_steps(ref_opt, ref_params, loss, _sign(kw), 25)
    fopt = functional_optimizer(fun_opt)
    params, state = _functional_steps(fopt, fun_params, fopt.init_state(), loss, _sign(kw), 20)
    fopt.write_back(state)
    with torch.no_grad():
        for own, p in zip(fun_params, params):
            own.copy_(p)
    _torch_steps(fun_opt, fun_params, loss, _sign(kw), 5)
    for p, ref in zip(fun_params, ref_params):
        torch.testing.assert_close(p, ref, **TOL)
    _assert_state_equal(fopt.init_state(), ref_opt, ref_params)


def test_init_state_continues_a_torch_run_and_reads_schedulers():
    init, loss = _problem(2)
    ref_params, ref_opt = _make(torch.optim.Adam, {"lr": 0.05, "amsgrad": True}, init)
    fun_params, fun_opt = _make(torch.optim.Adam, {"lr": 0.05, "amsgrad": True}, init)
    ref_sched = torch.optim.lr_scheduler.StepLR(ref_opt, step_size=2, gamma=0.5)
    fun_sched = torch.optim.lr_scheduler.StepLR(fun_opt, step_size=2, gamma=0.5)
    for _ in range(3):
        _torch_steps(ref_opt, ref_params, loss, 1.0, 1)
        _torch_steps(fun_opt, fun_params, loss, 1.0, 1)
        ref_sched.step()
        fun_sched.step()
    fopt = functional_optimizer(fun_opt)
    params, state = fun_params, fopt.init_state()
    for _ in range(6):
        _torch_steps(ref_opt, ref_params, loss, 1.0, 1)
        ref_sched.step()
        params, state = _functional_steps(fopt, params, state, loss, 1.0, 1)
        fun_sched.step()
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p, ref.detach(), **TOL)
    _assert_state_equal(state, ref_opt, ref_params)


def test_missing_gradient_leaves_parameter_and_state_alone():
    init, loss = _problem(3)
    kw = {"lr": 0.05, "momentum": 0.9}
    ref_params, ref_opt = _make(torch.optim.SGD, kw, init)
    fun_params, fun_opt = _make(torch.optim.SGD, kw, init)
    fopt = functional_optimizer(fun_opt)
    params, state = fun_params, fopt.init_state()

    def grads_of_first_two(at):
        probe = [p.detach().requires_grad_() for p in at[:2]]
        return list(torch.autograd.grad(loss(probe + [init[2]]), probe)) + [None]

    for _ in range(3):
        for p, g in zip(ref_params, grads_of_first_two(ref_params)):
            p.grad = g  # the last parameter gets no .grad
        ref_opt.step()
        params, state = fopt.step(params, grads_of_first_two(params), state)
    assert state[2] == {} and ref_opt.state.get(ref_params[2], {}) == {}
    torch.testing.assert_close(params[2].detach(), init[2], **TOL)
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p.detach(), ref.detach(), **TOL)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.Adam])
def test_three_steps_are_differentiable_gradcheck(cls):
    """d(final params)/d(λ, lr) where λ scales an L2 term in the loss, by finite differences."""
    init, loss = _problem(4)
    kw = {"lr": 0.05, "momentum": 0.9} if cls is torch.optim.SGD else {"lr": 0.05}
    _, opt = _make(cls, kw, init)
    fopt = functional_optimizer(opt)

    def final_params(lam, lr, first=None):
        for group in opt.param_groups:
            group["lr"] = lr
        params, state = list(start), fopt.init_state()
        if first is not None:
            params[0] = first
        for _ in range(3):
            total = loss(params) + 0.5 * lam * sum((p**2).sum() for p in params)
            grads = torch.autograd.grad(total, params, create_graph=True)
            params, state = fopt.step(params, grads, state)
        return tuple(params)

    start = [p.clone().requires_grad_() for p in init]
    lam = torch.tensor(0.3, dtype=DTYPE, requires_grad=True)
    lr = torch.tensor(0.05, dtype=DTYPE, requires_grad=True)
    assert torch.autograd.gradcheck(final_params, (lam, lr))
    assert torch.autograd.gradcheck(lambda w: final_params(lam, lr, w), (start[0],))


def test_zero_gradient_entry_gives_finite_derivatives():
    p = torch.tensor([1.0, 2.0], dtype=DTYPE, requires_grad=True)
    opt = torch.optim.Adam([torch.zeros(2, dtype=DTYPE, requires_grad=True)], lr=0.1)
    fopt = functional_optimizer(opt)
    g = p * torch.tensor([0.0, 1.0], dtype=DTYPE)  # first entry exactly zero
    (new,), _ = fopt.step([p], [g], fopt.init_state())
    (grad,) = torch.autograd.grad(new.sum(), p)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.LBFGS(ps),
        lambda ps: torch.optim.Adamax(ps),
    ],
)
def test_unsupported_optimizer_names_the_supported_ones(make):
    opt = make([torch.zeros(2, requires_grad=True)])
    for call in (
        lambda: functional_optimizer(opt),
        lambda: update_jacobian_diag(opt, opt.param_groups[0]["params"], [None]),
    ):
        with pytest.raises(TypeError, match="supported optimizers") as err:
            call()
        for name in ("SGD", "Adam", "AdamW", "RMSprop", "Adagrad"):
            assert f"torch.optim.{name}" in str(err.value)


def test_wrong_number_shape_or_kind_of_tensors_is_an_error():
    opt = torch.optim.SGD([torch.zeros(2, requires_grad=True)], lr=0.1)
    with pytest.raises(ValueError, match="1 parameters"):
        functional_optimizer(opt).step([], [], [])
    with pytest.raises(ValueError, match="shape"):
        functional_optimizer(opt).init_state([torch.zeros(3)])
    complex_opt = torch.optim.Adam([torch.zeros(2, dtype=torch.complex128, requires_grad=True)])
    with pytest.raises(TypeError, match="complex"):
        functional_optimizer(complex_opt).init_state()


@pytest.mark.parametrize("warm_steps", [0, 3], ids=["first-step", "after-3-steps"])
@pytest.mark.parametrize(("cls", "kw"), CASES, ids=IDS)
def test_update_jacobian_diag_matches_jacrev(cls, kw, warm_steps):
    init, loss = _problem(5)
    params, opt = _make(cls, kw, init)
    _torch_steps(opt, params, loss, _sign(kw), warm_steps)
    fopt = functional_optimizer(opt)
    state = fopt.init_state()
    point = [p.detach().clone() for p in params]
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(p.shape, generator=gen, dtype=DTYPE) for p in params]
    sizes = [p.numel() for p in params]

    def update(flat_grad):
        gs = [g.reshape(p.shape) for g, p in zip(flat_grad.split(sizes), point)]
        new, _ = fopt.step(point, gs, state)
        return torch.cat([(p - q).reshape(-1) for p, q in zip(point, new)])

    full = jacrev(update)(torch.cat([g.reshape(-1) for g in grads]))
    diag = torch.cat([d.reshape(-1) for d in update_jacobian_diag(opt, params, grads)])
    torch.testing.assert_close(diag, full.diagonal(), atol=1e-10, rtol=1e-10)
    off = full - torch.diag(full.diagonal())
    torch.testing.assert_close(off, torch.zeros_like(off), atol=1e-10, rtol=0)
    assert not diag.requires_grad


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
MODES = {
    "foreach": {"foreach": True},
    "fused": {"fused": True},
    "capturable": {"capturable": True},
    "differentiable": {"differentiable": True},
}


def _mode_cases() -> list:
    """Every (optimizer case, kernel mode) torch.optim offers on this device: a class
    without the mode's flag, or capturable without an accelerator, is left out here rather
    than skipped at run time."""
    out = []
    for (cls, kw), name in zip(CASES, IDS):
        for mode, flags in MODES.items():
            if not set(flags) <= set(inspect.signature(cls).parameters):
                continue
            if mode == "capturable" and DEVICE == "cpu":
                continue
            out.append(pytest.param(cls, kw, mode, id=f"{name}-{mode}"))
    return out


@pytest.mark.parametrize(("cls", "kw", "mode"), _mode_cases())
def test_torch_optim_modes_match(cls, kw, mode):
    """torch.optim's other kernels (on CUDA when there is one) against the functional step.

    Adam's capturable and differentiable modes compute bias corrections with the float32 step
    counter (betty.optim.steps.count follows), then combine the step size, bias corrections
    and eps in float32, in an order that differs between torch's own single-tensor and
    foreach kernels; so they are matched to 1e-6 (float32's resolution) after 20 steps.
    """
    flags = MODES[mode]
    if isinstance(kw["lr"], torch.Tensor):
        kw = {**kw, "lr": float(kw["lr"])}
    init, loss = _problem(7, device=DEVICE)
    ref_params, ref_opt = _make(cls, {**kw, **flags}, init)
    try:
        _torch_steps(ref_opt, ref_params, loss, _sign(kw), 20)
    except RuntimeError as err:  # e.g. no fused float64 kernel on this device
        pytest.skip(f"torch.optim refuses: {err}")
    fun_params, fun_opt = _make(cls, {**kw, **flags}, init)
    fopt = functional_optimizer(fun_opt)
    params, state = _functional_steps(fopt, fun_params, fopt.init_state(), loss, _sign(kw), 20)
    float32_scalars = cls in (torch.optim.Adam, torch.optim.AdamW) and mode in (
        "capturable",
        "differentiable",
    )
    tol = {"atol": 1e-6, "rtol": 1e-6} if float32_scalars else TOL
    for p, ref in zip(params, ref_params):
        torch.testing.assert_close(p, ref, **tol)
    _assert_state_equal(state, ref_opt, ref_params, tol)


@pytest.mark.parametrize("cls,kw", [
    (torch.optim.AdamW, {"lr": 1e-3, "weight_decay": 0.1}),
    (torch.optim.Adam, {"lr": 1e-3, "amsgrad": True}),
    (torch.optim.RMSprop, {"lr": 1e-3, "centered": True}),
    (torch.optim.Adagrad, {"lr": 1e-2})])
def test_in_place_scaling_of_a_large_parameter_is_chunked_and_bit_identical(cls, kw):
    """`scale_by_update_jacobian` forms P over at most DIAG_CHUNK elements at a time (its
    temporaries stay small next to an embedding matrix): elementwise, so the same bits as
    ``v * P`` formed whole."""
    from betty.optim.reader import DIAG_CHUNK

    gen = torch.Generator().manual_seed(0)
    big = torch.nn.Parameter(torch.randn(3 * DIAG_CHUNK + 17, generator=gen))
    small = torch.nn.Parameter(torch.randn(5, 7, generator=gen))
    opt = cls([big, small], **kw)
    for _ in range(2):
        for p in (big, small):
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    grads = [torch.randn(p.shape, generator=gen) for p in (big, small)]
    vectors = [torch.randn(p.shape, generator=gen) for p in (big, small)]
    whole = [v * d for v, d in zip(vectors, update_jacobian_diag(opt, [big, small], grads))]
    functional_optimizer(opt).scale_by_update_jacobian(vectors, [big, small], grads)
    assert whole[0].abs().sum() > 0
    for a, b in zip(whole, vectors):
        assert torch.equal(a, b)
