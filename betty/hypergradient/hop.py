"""One hop of a hypergradient path, seen by a method as closures over the lower problem.

For a lower problem with parameters ``w`` and loss ``L(w, lam)`` (``lam``: the parameters of
the next problem up the path), a `Hop` offers

* ``hvp(x)   = H x``            with ``H = d2L/dw2``           (double backward),
* ``mixed(x) = d/dlam <dL/dw, x>``                             (one backward through dL/dw),
* ``upper_grads_at(d, scales)`` = ``dL/dlam`` at ``w + s d`` for each ``s`` (finite differences).

A solver that updates one vector in place (CG's search direction, a Neumann term) first
binds it (`bind`): the products with it then run through a graph of ``<dL/dw, u>`` that does not
keep ``dL/dw`` itself alive.

Every loss evaluation here runs with the same random-number state (dropout draws the same
mask for each probe), leaves the user's random stream, module buffers (BatchNorm running
statistics) and lower parameters exactly as they were. The finite-difference probes run inside
``probe_context`` (the engine passes `betty.problems.precision.full_precision`, so that a
bf16/fp16 problem's probes are evaluated in fp32: the difference of two probes cancels, and
low-precision rounding would swamp it).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import Tensor

OptionalVector = list[Tensor | None]


def seed_from(*parts: object) -> int:
    """A 63-bit seed from ``parts`` (bytes as they are, anything else by its repr): the same
    in every process that hashes the same parts."""
    digest = hashlib.blake2b(digest_size=8)
    for part in parts:
        digest.update(part if isinstance(part, bytes) else repr(part).encode())
    return int.from_bytes(digest.digest(), "little") >> 1


class OwnedVector(list):  # type: ignore[type-arg]
    """A vector handed over to a method: the method may empty it once it no longer needs its
    tensors, so they are freed before the probes' forward passes (darts' and sama's peak
    memory). The chain passes its vectors this way; direct callers' lists are left alone."""


@contextmanager
def frozen_state(buffers: Sequence[Tensor], devices: Sequence[int]) -> Any:
    """Snapshot RNG and ``buffers``; yield a function that rewinds the RNG; restore both."""
    cpu_state = torch.get_rng_state()
    cuda_states = [torch.cuda.get_rng_state(d) for d in devices]
    saved = [b.clone() for b in buffers]

    def rewind() -> None:
        torch.set_rng_state(cpu_state)
        for d, s in zip(devices, cuda_states):
            torch.cuda.set_rng_state(s, d)

    try:
        yield rewind
    finally:
        rewind()
        with torch.no_grad():
            for b, s in zip(buffers, saved):
                b.copy_(s)


class Hop:
    """Closures over one lower problem for one hop of a path (see module docstring)."""

    def __init__(self, lower_params: Sequence[Tensor], upper_params: Sequence[Tensor],
                 loss_fn: Callable[[], Tensor], buffers: Sequence[Tensor] = (),
                 devices: Sequence[int] = (),
                 probe_context: Callable[[], AbstractContextManager[Any]] = nullcontext,
                 average: Callable[[list[Tensor]], list[Tensor]] | None = None) -> None:
        self.w = list(lower_params)
        self.lam = list(upper_params)
        self._loss_fn = loss_fn
        self._buffers = list(buffers)
        self._devices = list(devices)
        self._probe_context = probe_context
        # mean over ranks (betty.distributed): H x is averaged so that every rank's solver
        # iterates stay those of one process on the union batch; None = one process
        self._average = average
        self._grad_w: tuple[Tensor, ...] | None = None
        # (u, <dL/dw, u>) after `bind`: products with u through a graph that frees dL/dw
        self._bound: tuple[list[Tensor], Tensor | None] | None = None
        # diagonal dU/dg of the lower optimizer's update, for optimizer-aware methods (sama)
        self.update_jacobian: Callable[[], list[Tensor]] | None = None
        # the same P multiplied into a vector in place, one tensor at a time (no list of P)
        self.scale_by_update_jacobian: Callable[[list[Tensor]], Any] | None = None
        # v arrives multiplied by that P already (the upper's backward formed it as each
        # gradient arrived: betty.problems.update_jacobian.HeadScaling)
        self.prescaled = False
        # where methods report diagnostics (key, 0-d tensor); None = diagnostics off, so a
        # method must not spend anything on them (betty.diagnostics)
        self.report: Callable[[str, Tensor], None] | None = None
        self._state: Any = None
        self._rewind: Callable[[], None] | None = None

    # -- second-order closures ---------------------------------------------------------
    def __enter__(self) -> Hop:
        self._state = frozen_state(self._buffers, self._devices)
        self._rewind = self._state.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._grad_w = None
        self._bound = None
        self._state.__exit__(*exc)

    def _loss(self) -> Tensor:
        assert self._rewind is not None, "use a Hop inside `with hop:`"
        self._rewind()
        return self._loss_fn()

    def _gradient_graph(self) -> tuple[Tensor, ...]:
        if self._grad_w is None:
            loss = self._loss()
            self._grad_w = torch.autograd.grad(loss, self.w, create_graph=True,
                                               allow_unused=True, materialize_grads=True)
        return self._grad_w

    def bind(self, u: Sequence[Tensor]) -> None:
        """Tie later products with ``u`` to a graph of ``<dL/dw, u>`` built once: `hvp` and
        `mixed` called with ``u`` itself then read ``u``'s current contents, so a solver that
        updates ``u`` in place needs no copy of ``dL/dw`` (a parameter-sized vector) to be
        kept alive. Products with other vectors still work (through a graph of their own)."""
        u = list(u)
        g = self._gradient_graph()
        self._grad_w = None  # only the graph of <g, u> keeps what it needs
        terms = []
        for gi, ui in zip(g, u):
            if not gi.requires_grad:
                continue
            # ``ui.data``: an alias whose version counter is its own, so the solver's in-place
            # updates of ``ui`` are read at backward time instead of being refused
            alias = ui.data
            if type(gi) is Tensor and alias.is_contiguous():
                terms.append(torch.dot(gi.reshape(-1), alias.reshape(-1)))  # saves only u
            else:
                terms.append(torch.sum(gi * alias))
        self._bound = (u, torch.stack(terms).sum() if terms else None)

    def _bound_to(self, x: Sequence[Tensor]) -> Tensor | None | bool:
        """The bound scalar graph if ``x`` is the bound vector (None if it carries nothing),
        else False."""
        if self._bound is None or len(x) != len(self._bound[0]):
            return False
        u, s = self._bound
        if any(a is not b for a, b in zip(x, u)):
            return False
        return s

    def hvp(self, x: Sequence[Tensor]) -> list[Tensor]:
        """``H x`` by double backward through the retained graph of ``dL/dw``."""
        bound = self._bound_to(x)
        if bound is False:
            g = self._gradient_graph()
            out = torch.autograd.grad(g, self.w, grad_outputs=list(x), retain_graph=True,
                                      allow_unused=True, materialize_grads=True)
        elif bound is None:
            out = tuple(torch.zeros_like(p) for p in self.w)
        else:
            assert isinstance(bound, Tensor)
            out = torch.autograd.grad(bound, self.w, retain_graph=True, allow_unused=True,
                                      materialize_grads=True)
        hx = [t.detach() for t in out]
        return hx if self._average is None else self._average(hx)

    def mixed(self, x: Sequence[Tensor]) -> OptionalVector:
        """``d/dlam <dL/dw, x>``; ``None`` for upper parameters the loss does not reach."""
        bound = self._bound_to(x)
        if bound is None:
            return [None] * len(self.lam)
        if isinstance(bound, Tensor):
            out = torch.autograd.grad(bound, self.lam, retain_graph=True, allow_unused=True)
            return list(out)
        g = self._gradient_graph()
        if not any(t.requires_grad for t in g):
            return [None] * len(self.lam)
        out = torch.autograd.grad(g, self.lam, grad_outputs=list(x), retain_graph=True,
                                  allow_unused=True)
        return list(out)  # no create_graph: already free of the graph

    def hvp_and_mixed(self, x: Sequence[Tensor]) -> tuple[list[Tensor], OptionalVector]:
        """``(H x, M x)``; for the bound vector from one backward pass (so a solver can
        accumulate ``M x_K = sum_k c_k M p_k``, upper-sized, instead of keeping ``x_K``)."""
        bound = self._bound_to(x)
        if not isinstance(bound, Tensor):
            return self.hvp(x), self.mixed(x)
        n = len(self.w)
        out = torch.autograd.grad(bound, self.w + self.lam, retain_graph=True,
                                  allow_unused=True)
        hx = [torch.zeros_like(p) if t is None else t.detach() for t, p in zip(out, self.w)]
        return (hx if self._average is None else self._average(hx)), list(out[n:])

    # -- first-order closures ----------------------------------------------------------
    def upper_grads_at(self, direction: Sequence[Tensor], scales: Sequence[Tensor],
                       restore: bool = True) -> list[OptionalVector]:
        """``dL/dlam`` at ``w + s * direction`` for each ``s``; parameters restored bit for
        bit afterwards unless ``restore`` is False (then they hold the last probe).

        The probes are formed in a separate vector that the parameters point at while the
        loss is evaluated (``p.data``), and the parameters' own storage is never written: the
        restore is exact and costs no copy. An `OwnedVector` direction is itself that vector
        (so the probes cost no parameter-sized memory); otherwise it is cloned once."""
        owned = isinstance(direction, OwnedVector)
        probe = [d if owned else d.clone() for d in direction]
        if owned:
            direction.clear()  # type: ignore[attr-defined]  # probe holds its tensors now
        originals = [p.data for p in self.w]
        for i, (d, o) in enumerate(zip(probe, originals)):
            if d.dtype != o.dtype:
                probe[i] = d.to(o.dtype)
        results: list[OptionalVector] = []
        first: Tensor | None = None
        try:
            with self._probe_context():
                for s in scales:
                    with torch.no_grad():
                        if first is None:  # w + s d
                            torch._foreach_mul_(probe, s)
                            torch._foreach_add_(probe, originals)
                            for p, q in zip(self.w, probe):
                                p.data = q
                            first = s
                        else:  # w + s/s0 (probe - w), the mirror of the first probe
                            torch._foreach_sub_(probe, originals)
                            # a zero radius (v = 0) gives 0/0: the perturbation is 0 anyway
                            torch._foreach_mul_(probe, torch.nan_to_num(s / first, nan=0.0))
                            torch._foreach_add_(probe, originals)
                    loss = self._loss()
                    grads = (torch.autograd.grad(loss, self.lam, allow_unused=True)
                             if loss.requires_grad else (None,) * len(self.lam))
                    # The backward to lam skips the nodes that only lead to w, so their saved
                    # activations live as long as the graph: drop it before the next forward.
                    del loss
                    results.append([None if g is None else g.detach() for g in grads])
        finally:
            with torch.no_grad():
                if not restore and first is not None:
                    torch._foreach_copy_(originals, probe)
            for p, o in zip(self.w, originals):
                p.data = o
        return results

    def grads_at(self, point: Sequence[Tensor], *, lower: bool = True, upper: bool = True
                 ) -> tuple[list[Tensor] | None, OptionalVector | None]:
        """First-order gradients ``(dL/dw, dL/dlam)`` of the loss with the lower parameters
        at ``point`` (one backward, no graph kept); ``dL/dw`` averaged over ranks. The
        parameters point at ``point`` while the loss is evaluated and are restored exactly
        (their storage is never written). For fully first-order methods (f2sa)."""
        originals = [p.data for p in self.w]
        wanted = (self.w if lower else []) + (self.lam if upper else [])
        try:
            with self._probe_context():
                for p, q in zip(self.w, point):
                    p.data = q.detach().to(p.dtype)
                loss = self._loss()
                grads = (torch.autograd.grad(loss, wanted, allow_unused=True)
                         if loss.requires_grad else (None,) * len(wanted))
                del loss
        finally:
            for p, o in zip(self.w, originals):
                p.data = o
        n = len(self.w) if lower else 0
        grad_w = None
        if lower:
            grad_w = [torch.zeros_like(p) if g is None else g.detach()
                      for g, p in zip(grads[:n], self.w)]
            grad_w = grad_w if self._average is None else self._average(grad_w)
        grad_lam = [None if g is None else g.detach() for g in grads[n:]] if upper else None
        return grad_w, grad_lam
