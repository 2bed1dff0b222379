r"""Gradient estimators: what a kernel steps with, behind one interface.

An estimator gives, at a flat point :math:`\theta` (unconstrained coordinates), an
:class:`Estimate` of the potential :math:`U(\theta)` and of its gradient; the kernel never knows how
they were obtained (the shape of blackjax's ``gradients.estimator`` / ``control_variates`` and of
NumPyro's ``HMCECS(inner, proxy=...)``):

* :class:`ExactPotential` -- the potential itself (a model without subsampling, or a
  ``potential_fn``);
* :class:`MinibatchPotential` -- a fresh minibatch of every subsampled plate at every call (Pyro
  scales the log likelihood by ``N/m``: unbiased);
* :class:`SelfSubsampledPotential` -- a ``potential_fn`` that draws its own minibatch at every call
  (the user says so; its values at two points are not comparable);
* :class:`ControlVariates` -- the minibatch estimate corrected on the same minibatch at an anchor
  (the posterior mode, found here by L-BFGS on the exact full-data potential, or given), whose
  full-data value and gradient are computed once (Baker et al. 2019).

:attr:`GradientEstimator.exact` says whether values at different points can be compared (the
warmup's safety rules use it). Curvature -- Hessian-vector products for preconditioners and step
sizes -- is taken of a *fixed* potential (:meth:`GradientEstimator.fixed_potential`: the same
minibatch, drawn once as explicit indices, at every point), by one function,
:func:`hessian_vector_product`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from ..functional import control_variate_gradient_
from ..functional.distributed import Ranks, average
from .potential import PotentialEvaluator
from .subsample import SubsampleControl, SubsampledPlate, draw_indices, full_data_potential, full_data_value_and_grad

__all__ = [
    "Anchor",
    "ControlVariates",
    "Estimate",
    "ExactPotential",
    "GradientEstimator",
    "MinibatchPotential",
    "SelfSubsampledPotential",
    "hessian_vector_product",
]

#: Data walked in at most this many minibatches counts as small: its curvature is taken on all of
#: it, and the mode search needs no first pass on a subset.
SMALL_DATA_MINIBATCHES = 32
#: Minibatches averaged for the curvature of big data: one minibatch's Hessian (``N/m`` times a sum
#: over ``m`` rows) is off by a relative ``~sqrt(d/m)``; the average of 16 by a quarter of that.
CURVATURE_MINIBATCHES = 16

#: Errors of a potential that Pyro's HMC counts as a divergence rather than a crash
#: (``pyro.ops.integrator.potential_grad``): a matrix that is singular or not positive definite at
#: the point.
_LINEAR_ALGEBRA_FAILURES = ("singular", "not positive-definite", "positive definite")


def is_linear_algebra_failure(error: RuntimeError) -> bool:
    """Whether ``error``, raised by a potential or its gradient, is a failure of the point (a
    matrix singular or not positive definite there, :data:`_LINEAR_ALGEBRA_FAILURES`) that the
    chain counts as a divergence, rather than a bug to raise."""
    return any(word in str(error) for word in _LINEAR_ALGEBRA_FAILURES)


@dataclass(frozen=True)
class Estimate:
    """The potential and its gradient at one point, as the sampler will see them (detached)."""

    potential: Tensor
    grad: Tensor

    @property
    def finite(self) -> bool:
        return bool(torch.isfinite(self.potential)) and bool(torch.isfinite(self.grad).all())

    @classmethod
    def failed(cls, point: Tensor) -> "Estimate":
        """A point where the potential could not be evaluated (a divergence)."""
        return cls(point.new_tensor(float("nan")), torch.zeros_like(point))


def value_and_grad(potential: Callable[[Tensor], Tensor], point: Tensor) -> Estimate:
    """``U`` and ``grad U`` at ``point``; a linear-algebra failure of the potential (a singular
    matrix) gives a failed estimate, as Pyro's HMC turns it into a divergence."""
    point = point.detach().requires_grad_(True)
    try:
        with torch.enable_grad():
            value = potential(point)
            (grad,) = torch.autograd.grad(value, point)
    except RuntimeError as error:
        if is_linear_algebra_failure(error):
            return Estimate.failed(point.detach())
        raise
    return Estimate(value.detach(), grad)


def per_row(x: Tensor, dim: int) -> Tensor:
    """``x`` as ``[rows, everything else]`` (rows along ``dim``)."""
    return x.movedim(dim, 0).reshape(x.shape[dim], -1)


def row_shape(x: Tensor, dim: int) -> tuple[int, ...]:
    """The shape that broadcasts one number per row against ``x``."""
    return tuple(x.shape[d] if d == dim else 1 for d in range(x.dim()))


def power_iteration(operator: Callable[[Tensor], Tensor], like: Tensor, iterations: int,
                    generator: torch.Generator | None = None, dim: int | None = None) -> Tensor:
    """The largest eigenvalue in magnitude of a symmetric ``operator`` (``|H v|`` at the last of
    ``iterations`` power steps, from a start drawn from ``generator``, default torch's global one):
    of the whole of it (``dim=None``, a 0-dim tensor), or, for an operator block-diagonal over the
    rows along ``dim`` of ``like`` (latents local to a plate, independent given the rest), of each
    row's block at once (``[rows]``; exact in one step for a scalar per row). Stops early where
    every value is zero or one is not finite (returned as it is)."""
    v = torch.randn(like.shape, dtype=like.dtype, device=like.device, generator=generator)
    rows = (lambda x: x.reshape(1, -1)) if dim is None else (lambda x: per_row(x, dim))  # noqa: E731
    shape = (1,) * like.dim() if dim is None else row_shape(like, dim)
    value = like.new_zeros(rows(like).shape[0], dtype=torch.float64)
    for _ in range(iterations):
        v = v / rows(v).norm(dim=1).clamp_min(1e-30).reshape(shape).to(v.dtype)
        w = operator(v)
        value = rows(w).norm(dim=1).double()
        if not bool(torch.isfinite(value).all()) or not bool(value.any()):
            break
        v = w.to(v.dtype)
    return value.reshape(()) if dim is None else value


def hessian_vector_product(potential: Callable[[Tensor], Tensor], point: Tensor) -> Callable[[Tensor], Tensor]:
    """``v -> H v`` (float64) for the Hessian of ``potential`` at ``point``: exact, by double
    backward through one evaluation (kept for every product); where the potential has no double
    backward (a custom autograd function), central finite differences of its gradient, which
    needs ``potential`` to be deterministic (a fixed minibatch)."""
    point = point.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(potential(point), point, create_graph=True)
    zero = lambda v: torch.zeros_like(v, dtype=torch.float64)  # noqa: E731
    if not grad.requires_grad:  # linear in the point: no curvature
        return zero
    eps = 1e-3 * max(1.0, float(point.detach().norm())) / math.sqrt(point.numel())

    def finite_difference(v: Tensor) -> Tensor:
        v = v.to(point.dtype)
        plus = value_and_grad(potential, point.detach() + eps * v).grad
        minus = value_and_grad(potential, point.detach() - eps * v).grad
        return ((plus - minus) / (2 * eps)).double()

    double_backward = True

    def product(v: Tensor) -> Tensor:
        nonlocal double_backward
        if double_backward:
            try:
                (out,) = torch.autograd.grad(grad, point, v.to(grad.dtype), retain_graph=True, allow_unused=True)
                return zero(v) if out is None else out.detach().double()
            except RuntimeError:
                double_backward = False
        return finite_difference(v)

    return product


class GradientEstimator:
    """The interface every estimator gives the kernel.

    :attr exact: whether the potential's values at different points can be compared (no
        minibatch noise, or little: control variates).
    :attr noisy_gradient: whether the gradient carries minibatch noise (to be measured).
    """

    exact = True
    noisy_gradient = False
    #: Whether :meth:`gradient_on` gives a step's gradient on the minibatch it started from
    #: (noise-free secants for warmup's preconditioner despite a noisy gradient).
    fixed_minibatch_secants = False
    #: Whether warmup's arrival may take the sampler's largest stable step (else its bias rule).
    arrival_steps = True

    def gradient_on(self, point: Tensor, estimate: Estimate) -> Tensor | None:
        """The gradient at ``point`` of the potential ``estimate`` was computed on (its minibatch
        and whatever else it held fixed), or ``None`` if not available."""
        return None

    def prepare(self, point: Tensor) -> Tensor:
        """Called once, with the chain's initial point; returns where the chain starts
        (control variates: at the anchor)."""
        return point

    @property
    def anchor_point(self) -> Tensor | None:
        """A control-variate anchor, where the gradient's noise vanishes (``None``: none)."""
        return None

    def estimate(self, point: Tensor) -> Estimate:
        """The potential and its gradient at ``point`` (a fresh minibatch where there are any)."""
        raise NotImplementedError

    def fixed_potential(self, averaged: bool = False) -> Callable[[Tensor], Tensor]:
        """A deterministic ``point -> U`` for curvature: one minibatch drawn now and used at every
        point; with ``averaged``, the exact full-data potential on small data, or the average over
        :data:`CURVATURE_MINIBATCHES` minibatches."""
        raise NotImplementedError

    def hessian_vector_product(self, point: Tensor, averaged: bool = False) -> Callable[[Tensor], Tensor]:
        """``v -> H v`` (float64) for the Hessian of :meth:`fixed_potential` at ``point``
        (:func:`hessian_vector_product`)."""
        return hessian_vector_product(self.fixed_potential(averaged), point)

    def state_dict(self) -> dict:
        """What must be saved to continue a chain with this estimator (e.g. an anchor)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ExactPotential(GradientEstimator):
    """The potential itself, evaluated by ``evaluator`` (no minibatch)."""

    exact = True

    def __init__(self, evaluator: PotentialEvaluator):
        self.evaluator = evaluator

    def _potential(self, point: Tensor) -> Tensor:
        return self.evaluator([point])[0]

    def estimate(self, point: Tensor) -> Estimate:
        return value_and_grad(self._potential, point)

    def fixed_potential(self, averaged: bool = False) -> Callable[[Tensor], Tensor]:
        return self._potential


class SelfSubsampledPotential(ExactPotential):
    """A ``potential_fn`` that draws its own minibatch at every call: an unbiased but noisy
    potential. Its curvature can only be taken within one call (double backward), and its
    values are never compared between points."""

    exact = False
    noisy_gradient = True

    def fixed_potential(self, averaged: bool = False) -> Callable[[Tensor], Tensor]:
        if not averaged:
            return self._potential
        return lambda point: sum(self._potential(point) for _ in range(CURVATURE_MINIBATCHES)) / CURVATURE_MINIBATCHES


class MinibatchPotential(GradientEstimator):
    """A model's potential on a fresh minibatch of every subsampled plate at every call, drawn
    here as explicit indices in ``O(m log m)`` (:func:`~pyro_sgmcmc.infer.subsample.draw_indices`)
    instead of by the plate's ``O(N)`` ``randperm``."""

    exact = False
    noisy_gradient = True

    def __init__(self, evaluator: PotentialEvaluator, plates: list[SubsampledPlate]):
        self.evaluator = evaluator
        self.plates = plates

    def minibatch(self, generator: torch.Generator | None = None) -> SubsampleControl:
        """Fresh indices for every subsampled plate (from ``generator``; default: torch's global one)."""
        return SubsampleControl(indices={plate.name: draw_indices(plate, generator) for plate in self.plates})

    def on(self, control: SubsampleControl | None) -> Callable[[Tensor], Tensor]:
        """``point -> U`` on the minibatch (or full-data piece) ``control``."""
        return lambda point: self.evaluator([point], control)[0]

    def estimate(self, point: Tensor) -> Estimate:
        return value_and_grad(self.on(self.minibatch()), point)

    @property
    def small_data(self) -> bool:
        """One subsampled plate walked in at most :data:`SMALL_DATA_MINIBATCHES` pieces."""
        return len(self.plates) == 1 and self.plates[0].num_minibatches <= SMALL_DATA_MINIBATCHES

    def full_potential(self, point: Tensor, rows: Tensor | None = None) -> Tensor:
        """The exact full-data potential (one subsampled plate walked in minibatch-sized pieces),
        or its unbiased estimate on ``rows`` only."""
        return full_data_potential(lambda control, jacobian: self.evaluator([point], control, jacobian)[0],
                                   self.plates[0], rows)

    def fixed_potential(self, averaged: bool = False) -> Callable[[Tensor], Tensor]:
        if not averaged:
            return self.on(self.minibatch())
        if self.small_data:
            return self.full_potential
        controls = [self.minibatch() for _ in range(CURVATURE_MINIBATCHES)]
        return lambda point: sum(self.on(control)(point) for control in controls) / len(controls)


@dataclass(frozen=True)
class Anchor:
    """A control-variate anchor: the point, and the exact full-data potential and gradient there."""

    point: Tensor
    potential: Tensor
    grad: Tensor


class _Converged(Exception):
    """Raised from an L-BFGS closure to end the search (see :func:`find_mode`)."""


def find_mode(potential: Callable[[Tensor], Tensor], point: Tensor, temperature: float = 1.0,
              subset_potential: Callable[[Tensor], Tensor] | None = None, max_iter: int = 100
              ) -> tuple[Tensor, Estimate | None]:
    """The minimum of ``potential`` by L-BFGS from ``point``, and the estimate there if the last
    evaluation was at it. With ``subset_potential`` (an unbiased estimate on a fixed subset of
    the data) a first search runs on it: it does the long way in at a fraction of the cost, and
    the full search goes on from near the mode with the curvature pairs the first collected.

    The search stops once two evaluations in a row come within ``0.01 T`` nats of the best
    value (``U - U* = d^2 / 2`` for a point ``d`` posterior sds from the mode: a small fraction
    of an sd, all a control-variate anchor needs; L-BFGS's own tolerances go on polishing float32
    rounding, and its step tolerance is not scale-free)."""
    theta = point.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=20,
                                  line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-12)

    def minimise(objective: Callable[[Tensor], Tensor], stop_early: bool) -> tuple | None:
        best, streak, last = math.inf, 0, None

        def closure() -> Tensor:
            nonlocal best, streak, last
            optimizer.zero_grad()
            with torch.enable_grad():
                value = objective(theta)
                value.backward()
            current = float(value.detach())
            streak = streak + 1 if abs(current - best) < 0.01 * temperature else 0
            best = min(best, current)
            last = (theta.detach().clone(), value.detach(), theta.grad.detach().clone())
            if stop_early and streak >= 2:
                raise _Converged
            return value

        try:
            optimizer.step(closure)
        except _Converged:
            pass
        return last

    if subset_potential is not None:
        minimise(subset_potential, stop_early=False)
        # the next iteration must not pair the subset's last gradient with the full one: a zero
        # last step makes L-BFGS skip that pair and keep the others
        optimizer.state[theta]["t"] = 0.0
    last = minimise(potential, stop_early=True)
    found = theta.detach().clone()
    if last is not None and torch.equal(last[0], found):
        return found, Estimate(last[1], last[2])
    return found, None


class ControlVariates(GradientEstimator):
    r"""The control-variate estimator of Baker et al. (2019) around an :class:`Anchor`
    :math:`\hat\theta`:

    .. math:: \tilde U(\theta) = \hat U(\theta) - \hat U(\hat\theta) + U(\hat\theta), \qquad
              \nabla\tilde U(\theta) = \nabla\hat U(\theta) - \nabla\hat U(\hat\theta) + \nabla U(\hat\theta),

    with :math:`\hat U` one minibatch's potential, the same at both points, and :math:`U` the
    exact full-data potential (the gradient through
    :func:`~pyro_sgmcmc.functional.control_variate_gradient_`, the one implementation of the
    formula). Its noise shrinks with the distance to the anchor, so its values can be compared
    (:attr:`exact`) up to that noise.

    :param inner: the minibatch estimator (one subsampled plate).
    :param anchor: the anchor's point, or ``None`` to search for the mode in :meth:`prepare`.
    :param temperature: the scale of the mode search's stopping rule.
    """

    exact = True
    noisy_gradient = True

    def __init__(self, inner: MinibatchPotential, anchor: Tensor | None = None, temperature: float = 1.0):
        if len(inner.plates) != 1:
            raise NotImplementedError(
                f"control variates need exactly one subsampled plate (found {[p.name for p in inner.plates]})")
        self.inner = inner
        self.given = anchor
        self.temperature = temperature
        self.anchor: Anchor | None = None
        self.full_evaluations = 0

    def _full(self, point: Tensor, rows: Tensor | None = None) -> Tensor:
        if rows is None:
            self.full_evaluations += 1
        return self.inner.full_potential(point, rows)

    def prepare(self, point: Tensor) -> Tensor:
        """Choose the anchor (the mode found from ``point``, or the one given) and compute the
        full-data potential and gradient there; the chain starts at the anchor."""
        if self.anchor is not None:
            return self.anchor.point.clone()
        known = None
        if self.given is not None:
            anchor = self.given.detach().to(point)
        else:
            plate = self.inner.plates[0]
            subset = None
            if plate.num_minibatches > SMALL_DATA_MINIBATCHES:
                rows = torch.randperm(plate.size, device=plate.device)[: CURVATURE_MINIBATCHES * plate.subsample_size]
                subset = lambda theta: self._full(theta, rows)  # noqa: E731
            anchor, known = find_mode(self._full, point, self.temperature, subset)
        if known is None or not known.finite:
            self.full_evaluations += 1
            leaf = anchor.detach().requires_grad_(True)
            with torch.enable_grad():
                value, (grad,) = full_data_value_and_grad(
                    lambda control, jacobian: self.inner.evaluator([leaf], control, jacobian)[0],
                    self.inner.plates[0], [leaf])
            known = Estimate(value, grad)
        self.anchor = Anchor(anchor.detach(), known.potential, known.grad)
        return self.anchor.point.clone()

    def estimate(self, point: Tensor) -> Estimate:
        """The control-variate estimate (before :meth:`prepare`, the plain minibatch one)."""
        anchor = self.anchor
        if anchor is None:
            return self.inner.estimate(point)
        control = self.inner.minibatch()
        here = point.detach().requires_grad_(True)
        there = anchor.point.detach().requires_grad_(True)
        try:
            with torch.enable_grad():
                value, at_anchor = self.inner.evaluator([here, there], control)
                grad, anchor_grad = torch.autograd.grad(value + at_anchor, [here, there])
        except RuntimeError as error:
            if is_linear_algebra_failure(error):
                return Estimate.failed(point.detach())
            raise
        control_variate_gradient_([grad], [anchor_grad], [anchor.grad])
        return Estimate((value - at_anchor).detach() + anchor.potential, grad)

    def fixed_potential(self, averaged: bool = False) -> Callable[[Tensor], Tensor]:
        # the correction is linear in the point: the curvature is the minibatch potential's
        return self.inner.fixed_potential(averaged)

    @property
    def anchor_point(self) -> Tensor | None:
        return None if self.anchor is None else self.anchor.point

    def state_dict(self) -> dict:
        if self.anchor is None:
            return {}
        return {"anchor": {"point": self.anchor.point, "potential": self.anchor.potential, "grad": self.anchor.grad}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("anchor")
        if saved is not None:
            self.anchor = Anchor(saved["point"], saved["potential"], saved["grad"])


class ShardedPotential(GradientEstimator):
    r"""The potential of data sharded across the ranks of ``torch.distributed``: each rank's
    ``inner`` estimator evaluates the potential :math:`U_r` of its own shard, and every rank gets
    the average :math:`\frac1W \sum_r U_r` and its gradient (one all-reduce of the potential and
    the gradient per estimate), and the average of the ranks' Hessian-vector products. Each
    rank's model must therefore be the whole potential as its shard estimates it: the prior once
    and the shard's likelihood scaled by :math:`W` (so that the average counts every row once).
    A collective: every rank calls it in the same order, which the kernel guarantees by deciding
    only from these averages. It offers no :meth:`fixed_potential` (nothing uses one over the
    ranks: the curvature comes from :meth:`hessian_vector_product`).

    An exception in one rank's ``inner`` (its model raised) is raised there, and on the other
    ranks a ``RuntimeError`` saying so, at once: the ranks vote on it in the same all-reduce as
    the potential (one more number), instead of leaving the others waiting until the process
    group's timeout. Only :meth:`estimate` votes; an exception elsewhere (e.g. in a curvature
    product) still leaves the others waiting.

    :param inner: this rank's estimator (exact, or on minibatches of its shard).
    :param ranks: the group.
    """

    def __init__(self, inner: GradientEstimator, ranks: "Ranks") -> None:
        self.inner = inner
        self.ranks = ranks
        self.exact = inner.exact
        self.noisy_gradient = inner.noisy_gradient

    def prepare(self, point: Tensor) -> Tensor:
        return self.inner.prepare(point)

    def estimate(self, point: Tensor) -> Estimate:
        failure: Exception | None = None
        try:
            local = self.inner.estimate(point)
        except Exception as error:  # the others must hear of it, not wait for this rank
            failure = error
        if failure is None:
            dtype = local.grad.dtype
            both = torch.cat([local.potential.reshape(1).to(dtype), local.grad.reshape(-1),
                              torch.zeros(1, dtype=dtype, device=local.grad.device)])
        else:
            both = torch.zeros(point.numel() + 2, dtype=point.dtype, device=point.device)
            both[-1] = 1.0
        average([both], self.ranks)  # potential, gradient, and whether a rank failed
        if failure is not None:
            raise failure
        if bool(both[-1] != 0):
            raise RuntimeError("another rank failed to estimate the potential (its model raised: see its error); "
                               "this rank stops with it")
        return Estimate(both[0].to(local.potential.dtype), both[1:-1].view_as(local.grad))

    def hessian_vector_product(self, point: Tensor, averaged: bool = False) -> Callable[[Tensor], Tensor]:
        """The average over the ranks of their Hessian-vector products (``v`` must be the same on
        every rank: the kernel draws it from a generator in the same state on every rank)."""
        local = self.inner.hessian_vector_product(point, averaged)

        def product(v: Tensor) -> Tensor:
            result = local(v).detach().clone()
            average([result], self.ranks)
            return result

        return product

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)
