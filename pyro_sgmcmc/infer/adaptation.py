"""Warmup adaptation for the SG-MCMC kernels: a preconditioner and a step size.

Preconditioning is a change of variables, ``theta = L z``: the sampler runs on ``z`` against the
potential ``U(L z)``, whose gradient is ``L^T grad U`` (:meth:`Whitening.pullback`). SGLD on ``z``
is then exactly preconditioned SGLD on ``theta`` with the fixed matrix ``M = L L^T``,

    theta <- theta - (lr/2) M grad U + sqrt(lr) L N(0, I),

which keeps the target (the spec's form), and the same holds for every sampler (for SGNHT, ``M``
is a mass matrix). No update rule is written again: the kernel changes coordinates, the sampler
is unchanged.

``M`` is ``T Hbar^-1``, with ``Hbar`` the mean Hessian of the potential over the places the
chain visits after arrival (its diagonal by default, all of it with ``full_mass``, or its diagonal
corrected along the few directions where the diagonally whitened Hessian is furthest from the
identity with ``mass_rank``), frozen after warmup. A mean over many places, not the Hessian at a
few: on a non-Gaussian posterior the curvature changes from place to place by orders of
magnitude (non-centred eight schools: along ``log tau`` it grows as ``tau^2``; its 10% and 90%
quantiles over exact posterior draws are 0.02 and 5), and a Hessian taken where it is small
whitens that direction with a scale far beyond the posterior's; a step size measured in those
coordinates is then unstable wherever the curvature is larger (``h s^2 kappa > 4`` for SGLD) and
the chain dives. Over the posterior, the mean is ``E[H]``, and ``T E[H]^-1 <= Cov`` (Cramer-Rao for
a location family: the Fisher information ``E[grad U grad U^T] / T^2 = E[H] / T`` bounds the
covariance from below), so its scales never exceed the posterior's spread.

The mean is taken for free from the chain's own steps (the secant equation of quasi-Newton
methods): a step that moves by ``dtheta`` changes the gradient by ``dg = H_s dtheta``, with
``H_s`` the Hessian averaged along the step, so the least-squares fit

    Hbar = A B^-1,   A = sum_s w_s dg_s dtheta_s^T + sum_k H_k C,   B = sum_s w_s dtheta_s dtheta_s^T + K C,

symmetrised, is the Hessian averaged over the steps since arrival and the ``K`` exact Hessians
``H_k`` measured at the start of the first window and at the ends of the windows. The weight
``w_s = 1 / |dz_s|^2`` (``dz`` the step in the chain's coordinates) and ``C = M / d`` give each step
and each measured Hessian the weight of one place. The windows double in length (Stan's
schedule, as Pyro's ``WarmupAdapter`` builds it). Stan estimates ``M`` from the covariance of
each window's draws instead; that fails here: an SG-MCMC chain needs hundreds of steps to cross
its posterior, far more than a window, so the draws under-spread, the estimate shrinks the slow
directions, and the next window is slower still (measured: the variance of a collinear pair
collapsed to 2% of its value). Curvature needs no mixing. With minibatch noise in the gradient
(control variates included) a secant is biased by the noise of the gradient that moved the step
(``dg`` carries ``-eps_old``, and ``dtheta`` carries ``-(h/2) M eps_old``): only the measured
Hessians count there, each on a fixed minibatch, unless the estimator gives a step's gradient
change on the minibatch the step started from (``fixed_minibatch_secants``: local latent sites,
:mod:`pyro_sgmcmc.infer.local`).

The step size comes from the sampler's own bias rule (``suggest_lr``) with two quantities measured
in the ``z`` coordinates: the largest curvature of the potential (power iteration on exact
Hessian-vector products of one minibatch's potential, at the window's end point, and at least
``T``: the whitening makes the mean curvature ``T I``, and ``lambda_max`` is convex, so its mean over
the places the mean was taken is at least ``T`` whatever one point shows) and the variance of the
minibatch gradient noise (a few gradients at one point, fresh minibatches).

:class:`WarmupAdapter` holds all of it (``init`` / ``step`` / ``final``, as Pyro's
``WarmupAdapter`` and blackjax's ``window_adaptation``); after ``final`` nothing adapts, so
changing warmup cannot change the sampler.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from pyro.infer.mcmc.adaptation import WarmupAdapter as _PyroWarmupAdapter
from torch import Tensor

from .estimators import GradientEstimator, power_iteration


class Whitening:
    """``theta = L z`` with ``L`` a vector (diagonal) or a lower-triangular matrix (dense)."""

    def __init__(self, scale: Tensor):
        self.scale = scale
        self.dense = scale.dim() == 2

    @classmethod
    def identity(cls, size: int, like: Tensor) -> "Whitening":
        return cls(torch.ones(size, dtype=like.dtype, device=like.device))

    def to_theta(self, z: Tensor) -> Tensor:
        return self.scale @ z if self.dense else self.scale * z

    def to_z(self, theta: Tensor) -> Tensor:
        if self.dense:
            return torch.linalg.solve_triangular(self.scale, theta.unsqueeze(-1), upper=False).squeeze(-1)
        return theta / self.scale

    def pullback(self, grad_theta: Tensor) -> Tensor:
        """``L^T g``: a gradient in ``theta`` coordinates as one in ``z`` coordinates."""
        return self.scale.T @ grad_theta if self.dense else self.scale * grad_theta

    @property
    def kind(self) -> str:
        return "dense" if self.dense else "diagonal"

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale}

    @staticmethod
    def from_state_dict(state: dict[str, Any]) -> "Whitening":
        if "vectors" in state:
            return LowRankWhitening(state["scale"], state["vectors"], state["factors"])
        return Whitening(state["scale"])


class LowRankWhitening(Whitening):
    """``theta = S (I + U (F - I) U^T) z``: a diagonal ``S`` and a correction along ``k``
    orthonormal directions ``U`` (``[d, k]``) with factors ``F``; ``O(d k)`` per use. With
    ``S^2 = T / diag(H)`` and ``(U, F^-2 T)`` the extreme eigenpairs of ``S H S``, the whitened
    Hessian ``L^T H L`` is ``T I`` along ``U`` (and as close to it as the diagonal makes it elsewhere).
    """

    def __init__(self, scale: Tensor, vectors: Tensor, factors: Tensor):
        super().__init__(scale)
        self.vectors, self.factors = vectors, factors

    def to_theta(self, z: Tensor) -> Tensor:
        return self.scale * (z + self.vectors @ ((self.factors - 1) * (self.vectors.T @ z)))

    def to_z(self, theta: Tensor) -> Tensor:
        y = theta / self.scale
        return y + self.vectors @ ((1 / self.factors - 1) * (self.vectors.T @ y))

    def pullback(self, grad_theta: Tensor) -> Tensor:
        y = self.scale * grad_theta  # L is symmetric up to the diagonal: L^T = (I + U (F - I) U^T) S
        return y + self.vectors @ ((self.factors - 1) * (self.vectors.T @ y))

    @property
    def kind(self) -> str:
        return f"diagonal + rank {self.vectors.shape[1]}"

    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "scale": self.scale, "vectors": self.vectors, "factors": self.factors}


def hutchinson_diagonal(hvp: Callable[[Tensor], Tensor], size: int, device: torch.device, probes: int = 16,
                        dtype: torch.dtype = torch.float64, generator: torch.Generator | None = None) -> Tensor:
    """The Hessian's diagonal (float64) from ``probes`` products with ``hvp``: Hutchinson's
    estimate ``E[v * H v]`` over Rademacher ``v`` (of ``dtype``), or, when ``size <= probes``, the
    exact diagonal from the ``size`` unit vectors, which costs no more products. Hutchinson's
    estimate of ``H_ii`` is off by ``sum_j H_ij mean(v_i v_j)``: where two coordinates are
    strongly coupled (a location and a log-scale far from the mode) this can cancel the
    diagonal, and a near-zero curvature then whitens that coordinate to a huge scale (measured:
    the first arrival step of a two-site model jumped 90 posterior sds). The probes are drawn
    from ``generator`` (on ``device``; default: torch's global generator)."""
    if size <= probes:
        eye = torch.eye(size, dtype=dtype, device=device)
        return torch.stack([hvp(e)[i] for i, e in enumerate(eye)]).double()
    estimate = torch.zeros(size, dtype=torch.float64, device=device)
    for _ in range(probes):
        v = torch.randint(0, 2, (size,), device=device, generator=generator).to(dtype) * 2 - 1
        estimate += v.double() * hvp(v).double()
    return estimate / probes


def low_rank_whitening(hvp: Callable[[Tensor], Tensor], diagonal: Tensor, rank: int, temperature: float,
                       dtype: torch.dtype, generator: torch.Generator | None = None) -> LowRankWhitening:
    """Whitening from the Hessian's ``diagonal`` (averaged by the caller) plus the ``rank``
    eigen-directions of the diagonally whitened Hessian ``A = S H S`` whose eigenvalues are
    furthest (in log) from ``T``: the stiffest directions limit the step size, the softest
    (e.g. collinear regressors) mix slowest. Lanczos with full re-orthogonalisation, ``4 rank + 20``
    products with ``hvp`` (``v -> H v`` in theta coordinates, float64, e.g. by double backward on
    one minibatch: finite differences in float32 cannot resolve directions 1000x softer than the
    stiffest), then one product per kept direction to check it (residual within 10% of its
    eigenvalue). Lanczos' start is drawn from ``generator`` (default: torch's global generator)."""
    diag = diagonal.abs().clamp(min=max(float(diagonal.abs().max()), 1e-12) * 1e-8)
    scale = (temperature / diag).sqrt()
    size = diagonal.numel()
    device = diagonal.device
    steps = min(size, 4 * rank + 20)
    basis = torch.zeros(size, steps, dtype=torch.float64, device=device)
    alphas, betas = [], []
    v = torch.randn(size, dtype=torch.float64, device=device, generator=generator)
    v /= v.norm()
    for j in range(steps):
        basis[:, j] = v
        w = scale * hvp(scale * v)
        alphas.append(float(w @ v))
        w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)  # full re-orthogonalisation
        w = w - basis[:, : j + 1] @ (basis[:, : j + 1].T @ w)
        beta = float(w.norm())
        if j + 1 == steps or beta < 1e-10:
            basis = basis[:, : j + 1]
            break
        betas.append(beta)
        v = w / beta
    k = len(alphas)
    tridiagonal = torch.diag(torch.tensor(alphas, dtype=torch.float64))
    if k > 1:
        off = torch.tensor(betas[: k - 1], dtype=torch.float64)
        tridiagonal += torch.diag(off, 1) + torch.diag(off, -1)
    values, ritz = torch.linalg.eigh(tridiagonal)
    vectors = basis @ ritz.to(basis.device)
    order = torch.argsort((values.clamp(min=1e-300) / temperature).log().abs(), descending=True)
    # keep the most extreme Ritz pairs that are converged: checked with one more product each
    # (finite-difference products are not exactly symmetric, and unconverged pairs of a short
    # Lanczos run could put a near-zero value on a direction that is not soft at all)
    kept_vectors, kept_values = [], []
    for index in order.tolist():
        if len(kept_vectors) == rank:
            break
        u = vectors[:, index]
        au = scale * hvp(scale * u)
        value = float(u @ au)
        if value > 0 and float((au - value * u).norm()) <= 0.1 * value:
            kept_vectors.append(u)
            kept_values.append(value)
    if not kept_vectors:
        return LowRankWhitening(scale.to(dtype), torch.zeros(size, 0, dtype=dtype, device=device),
                                torch.ones(0, dtype=dtype, device=device))
    vectors = torch.stack(kept_vectors, 1)
    factors = (torch.tensor(kept_values, dtype=torch.float64, device=device) / temperature).rsqrt()
    return LowRankWhitening(scale.to(dtype), vectors.to(dtype), factors.to(dtype))


def usable_curvature(hessian: Tensor) -> Tensor:
    """The curvature a preconditioner can be built from: a positive definite dense ``hessian``
    as it is; at a saddle (not positive definite, e.g. a location and a log-scale coupled far
    from the mode) only its diagonal, with signs dropped, as the diagonal preconditioner takes
    it. The alternatives fail: clamping the negative eigenvalues to ``~0`` gives that direction
    an absurd scale; ``|lambda|`` (SoftAbs) gives a nearly flat negative direction a scale of
    tens of posterior sds, along which the first step jumped to where the potential overflows;
    leaving the point out keeps a preconditioner measured elsewhere, and the chain crawls.
    Measured on a two-site scale model from 30 random starts with 50 warmup steps: 5 chains
    ended warmup far out with ``|lambda|``, 7 with the point left out (the code before), 1 with
    the diagonal (an arrival too short for 50 steps; none with 100). A vector (the diagonal)
    is returned as ``|h|``."""
    if hessian.dim() == 2:
        symmetric = (hessian + hessian.T) / 2
        if float(torch.linalg.eigvalsh(symmetric).min()) > 0:
            return symmetric
        return torch.diag(symmetric.diagonal().abs())
    return hessian.abs()


def whitening_from_curvature(hessian: Tensor, temperature: float, dtype: torch.dtype) -> Whitening:
    """``L`` with ``L L^T = T H^-1`` (``H`` through :func:`usable_curvature`): the posterior
    covariance for a Gaussian target (and nearly so for big-data posteriors). Eigenvalues
    (diagonal entries) are floored at ``1e-8`` of the largest, so a flat direction still gives a
    usable preconditioner."""
    usable = usable_curvature(hessian)
    if usable.dim() == 2:
        values, vectors = torch.linalg.eigh(usable)
        values = values.clamp(min=max(float(values.max()), 1e-12) * 1e-8)
        cov = vectors @ torch.diag(temperature / values) @ vectors.T
        return Whitening(torch.linalg.cholesky((cov + cov.T) / 2).to(dtype))
    diag = usable.clamp(min=max(float(usable.max()), 1e-12) * 1e-8)
    return Whitening((temperature / diag).sqrt().to(dtype))


def adaptation_schedule(warmup_steps: int, arrival: bool = True) -> tuple[int, list[int]]:
    """``(arrival_end, adapt_at)``: the iterations at which warmup re-estimates the
    preconditioner and the step size, from Stan's windows as Pyro's ``WarmupAdapter`` builds
    them, with the start buffer (here: arrival, where the chain travels to the typical set with
    the largest stable step) at 15% of warmup and the end buffer at 10%: an SG-MCMC chain needs
    a larger share of warmup to arrive than HMC's fixed 75 steps. Adaptation happens at the
    start of the iteration after each window; none for fewer than 20 warmup steps. A chain that
    starts at the mode (``arrival=False``) has no arrival: its first window starts at once."""
    if warmup_steps < 20:
        return 0, []
    builder = _PyroWarmupAdapter()
    builder._warmup_steps = warmup_steps
    builder._adapt_start_buffer = int(0.15 * warmup_steps) if arrival else 0
    builder._adapt_end_buffer = int(0.1 * warmup_steps)
    windows = [w for w in builder._build_adaptation_schedule() if w.end >= w.start]
    return windows[0].end + 1 if arrival else 0, [window.end + 1 for window in windows[:-1]]


@dataclass(frozen=True)
class Scales:
    """What warmup measured last, in whitened coordinates: the largest curvature of the
    potential, the largest per-coordinate variance of the gradient noise, and (for
    ``exact_gaussian``) the smallest curvature."""

    curvature: float = math.nan
    noise: float = math.nan
    smallest: float = math.nan


@dataclass(frozen=True)
class Adaptation:
    """The chain's tuning: its coordinates, its step size and the sampler options set from
    measurements (e.g. SGHMC's friction), with the measurements they came from."""

    whitening: Whitening
    step_size: float
    sampler_options: dict[str, Any] = field(default_factory=dict)
    scales: Scales = Scales()


@dataclass
class _Best:
    """The lowest-potential point warmup has seen (exact potentials only)."""

    potential: float = math.inf
    theta: Tensor | None = None
    estimate: Any = None


class WarmupAdapter:
    r"""Everything warmup adapts, in one object with ``init`` / ``step`` / ``final``.

    Schedule (:func:`adaptation_schedule`): the first 15% of warmup is arrival, with the largest
    stable step (the sampler's ``suggest_lr(arrival=True)``; its bias rule for an estimator whose
    ``arrival_steps`` is false: local latent sites); an arrival over whose second half
    the potential still fell by more than the typical set's width ``T (d/2 + 5 sqrt(d/2))`` (the
    chain is still on its way in) goes on for another 15%, with the preconditioner and the step
    measured again where the chain is, up to half of warmup, and the windows are rebuilt over
    the rest; then doubling windows, at whose ends the preconditioner's mean curvature takes in
    the window's steps and the Hessian there (the mean restarts after arrival: the curvature on
    the way in is of a place the chain has left) and the step size is measured again with the
    sampler's bias rule; the last 10% runs with everything fixed, so the sampler's own state
    (momenta, thermostat, PSGLD's average) settles before :meth:`final` freezes it.

    Safety rules, one sentence each (warmup only; warmup draws are discarded):

    * a rejected step (the kernel undoes a landing whose potential or gradient is not finite)
      halves the step size;
    * with a potential whose values can be compared (no minibatch noise, or control variates),
      a step that raises it by more than ``T max(25, 10 sqrt(d))`` (``1000 T`` with control
      variates, for their noise) is rejected too: one Langevin step at the arrival size changes
      ``U`` by ``T sqrt(4 d / 3)`` in sd at stationarity, so this is 8.7 such sds, and 25 nats covers
      the heavy tail of small ``d`` (HMC's fixed 1000 nats misses 130-nat jumps in ``d = 2`` and would
      reject ordinary steps of a model with ``10^6`` parameters);
    * with exact gradients, a step of a Langevin sampler whose MALA log acceptance ratio is below
      ``-max(25, 10 sqrt(d))`` is rejected too: the ratio also weighs how unlikely the step back is,
      so it catches a step that overshot into a region where ``U`` is nearly flat (a linear tail,
      where ``U`` rises little but the drift cannot bring the chain back); at stationarity on a
      Gaussian the log ratio of a step at the arrival size has sd about ``0.3 sqrt(d)``, so this is
      over 30 such sds;
    * with a comparable potential, the chain goes back to the lowest-potential point warmup has
      seen (its start included) when 3 steps in a row were rejected (thrown far out, where every
      step overflows) and when arrival or (with exact values) a window ends more than
      ``T (d/2 + 5 sqrt(d/2))`` above it (near a Gaussian mode ``U - U_min`` is ``T`` times a
      Gamma(d/2) variable: a chain in the typical set fails this with probability below 0.25%; a
      chain thrown into a linear tail of the posterior comes back at the drift's pace, ``(h/2) M``
      times the slope per step, far slower than it left);
    * a Hessian that is not positive definite (a saddle on the way in) counts by its diagonal
      (:func:`usable_curvature`); a curvature that is zero or not finite leaves the
      preconditioner and the step size as they were.

    :param estimator: the kernel's gradient estimator.
    :param sampler_class: the torch sampler (its ``suggest_lr`` and ``adapted_options``).
    :param step_size: the user's step size (the start, and where nothing is measured).
    :param mass: ``"diagonal"``, ``"dense"`` or ``"low-rank"`` (with ``mass_rank`` directions).
    """

    #: Rejections in a row after which warmup goes back to its best point.
    STUCK_AFTER = 3

    def __init__(self, estimator: GradientEstimator, sampler_class: type, *, step_size: float | None,
                 adapt_step_size: bool, adapt_mass_matrix: bool, mass: str, mass_rank: int, target_bias: float,
                 temperature: float, exact_gaussian: bool, sampler_options: dict[str, Any],
                 generator: torch.Generator | None = None):
        self.estimator = estimator
        #: where the random probes of the curvature come from (``None``: torch's global generator);
        #: over sharded data, one in the same state on every rank, whatever each rank's minibatches draw
        self.generator = generator
        self.sampler_class = sampler_class
        self.step_size = step_size
        self.adapt_step_size = adapt_step_size
        self.adapt_mass_matrix = adapt_mass_matrix
        self.mass = mass
        self.mass_rank = mass_rank
        self.target_bias = target_bias
        self.temperature = temperature
        self.exact_gaussian = exact_gaussian
        self.sampler_options = sampler_options
        # the whitened, tempered posterior has curvature 1 where the preconditioner fits it
        self.gaussian_options = {"reference_curvature": 1.0} if exact_gaussian else {}
        self.current: Adaptation | None = None
        self.frozen = False
        self.warmup_steps = 0
        self.arrival_end = 0
        self._arrival_length = 0
        self._arrival_middle = -1
        self._middle_potential = math.nan
        self.adapt_at: list[int] = []
        self._hessians: list[Tensor] = []
        self._secant_a: Tensor | None = None
        self._secant_b: Tensor | None = None
        self._best = _Best()
        self._rejected_in_a_row = 0
        self.jumps = 0
        #: The step size warmup's rule gave last (before any halving by the safety rules).
        self.measured_step_size = math.nan

    # ----------------------------------------------------------------------------- phases

    def init(self, theta: Tensor, warmup_steps: int, at_mode: bool = False, estimate: Any = None) -> Adaptation:
        """The tuning at the chain's start ``theta``: a preconditioner measured there, and the
        step size for arrival (none when the chain starts at the mode, ``at_mode``)."""
        self.warmup_steps = warmup_steps
        adapting = warmup_steps > 0 and (self.adapt_step_size or self.adapt_mass_matrix)
        self.arrival_end, self.adapt_at = adaptation_schedule(warmup_steps, not at_mode) if adapting else (0, [])
        self._arrival_length = self.arrival_end
        self._arrival_middle = self.arrival_end // 2 if self.arrival_end else -1
        self._middle_potential = math.nan
        whitening = Whitening.identity(theta.numel(), theta)
        if self.adapt_mass_matrix and warmup_steps > 0:
            whitening = self._preconditioner(theta, whitening, fresh=True)
        if estimate is not None:
            self.accepted(theta, estimate)
        self.current = Adaptation(whitening, self.step_size if self.step_size is not None else math.nan,
                                  dict(self.gaussian_options))
        if self.adapt_step_size and warmup_steps > 0:
            self.current = self._measure(theta, self.current, arrival=self.arrival_end > 0)
        if not math.isfinite(self.current.step_size):
            raise ValueError("Invalid step_size: None with warmup_steps=0 (the kernel adapts its step size during "
                             "warmup: give warmup_steps > 0, a step_size, or load_state_dict() of an adapted kernel)")
        return self.current

    def step(self, t: int, theta: Tensor, estimate: Any) -> tuple[Adaptation, Tensor, Any] | None:
        """At the start of warmup iteration ``t`` (the chain at ``theta`` with ``estimate``): a new
        tuning, and the point to continue from, at the end of arrival or of a window; else ``None``."""
        if self.frozen:
            return None
        potential = float(estimate.potential)
        if t == self._arrival_middle:
            self._middle_potential = potential
        if t not in self.adapt_at:
            return None
        size = theta.numel()
        arriving = t == self.arrival_end and self._descending(potential, size) and self._extend_arrival(t)
        # at a window's end only with noise-free values: the bound is for exact potentials
        checks = t == self.arrival_end or not self.estimator.noisy_gradient
        if not arriving and checks and not self._arrived(potential, size):
            theta, estimate = self._best.theta, self._best.estimate
        fresh = t == self.arrival_end or arriving
        if t == self.arrival_end and not arriving:
            self._secant_a = self._secant_b = None
        tuning = self.current
        if self.adapt_mass_matrix:
            tuning = replace(tuning, whitening=self._preconditioner(theta, tuning.whitening, fresh=fresh))
        if self.adapt_step_size:
            tuning = self._measure(theta, tuning, arrival=arriving)
        self.current = tuning
        return tuning, theta, estimate

    def _extend_arrival(self, t: int) -> bool:
        """Arrival goes on for another arrival's length from ``t``, and the windows are rebuilt
        over the rest of warmup, unless that would take arrival past half of warmup or leave
        no window."""
        length = self._arrival_length
        end = t + length
        if not length or end > self.warmup_steps // 2:
            return False
        _, ends = adaptation_schedule(self.warmup_steps - end, arrival=False)
        if not ends:
            return False
        self.arrival_end, self._arrival_middle = end, t + length // 2
        self.adapt_at = [end] + [end + offset for offset in ends]
        return True

    def final(self) -> Adaptation:
        """The end of warmup: nothing adapts from here on."""
        self.frozen = True
        return self.current

    # ----------------------------------------------------------------------- safety rules

    @property
    def _compares_values(self) -> bool:
        return self.estimator.exact and not self.frozen

    @property
    def judges_steps(self) -> bool:
        """Whether warmup steps are judged by :meth:`is_jump` (comparable potentials, an adapted
        step size)."""
        return self._compares_values and self.adapt_step_size

    def is_jump(self, previous: float, new: float, dimension: int, log_ratio: float | None = None) -> bool:
        """Whether a warmup step from potential ``previous`` to ``new`` (with MALA's log
        acceptance ratio ``log_ratio``, for the Langevin samplers) is a jump to reject."""
        if not (self.judges_steps and math.isfinite(previous)):
            return False
        limit = max(25.0, 10.0 * math.sqrt(dimension))
        if self.estimator.noisy_gradient:  # control variates: HMC's 1000 T for their minibatch noise
            limit = max(limit, 1000.0)
        if log_ratio is not None and self.scores_steps and not log_ratio >= -limit:
            return True
        return new - previous > self.temperature * limit

    @property
    def scores_steps(self) -> bool:
        """Whether :meth:`is_jump` weighs a Langevin step's MALA ratio (it needs exact gradients)."""
        return self.judges_steps and not self.estimator.noisy_gradient

    def accepted(self, theta: Tensor, estimate: Any, moved: Tensor | None = None,
                 previous_grad: Tensor | None = None, change: Tensor | None = None) -> None:
        """A warmup step landed at ``theta`` (its ``estimate``), having moved by ``moved`` in the
        chain's coordinates from a point whose gradient was ``previous_grad``; ``change``: the
        gradient's change along the step on one minibatch (for a noisy gradient whose estimator
        has ``fixed_minibatch_secants``)."""
        self._rejected_in_a_row = 0
        if change is None and moved is not None and not self.estimator.noisy_gradient:
            change = estimate.grad - previous_grad
        if moved is not None and change is not None and self._fits_secants:
            self._add_secant(self.current.whitening.to_theta(moved), change, float(moved.norm()))
        if self._compares_values:
            potential = float(estimate.potential)
            if potential < self._best.potential:
                self._best = _Best(potential, theta.detach().clone(), estimate)

    def rejected(self, jump: bool) -> tuple[Adaptation, Tensor | None, Any]:
        """A warmup step was undone: the step size halved, and, when the chain is stuck, the
        best point to go back to (``None`` to stay)."""
        self.jumps += int(jump)
        self._rejected_in_a_row += 1
        if self.adapt_step_size:
            self.current = replace(self.current, step_size=self.current.step_size * 0.5)
        if self._rejected_in_a_row >= self.STUCK_AFTER and self._best.theta is not None and self._compares_values:
            self._rejected_in_a_row = 0
            return self.current, self._best.theta, self._best.estimate
        return self.current, None, None

    def _descending(self, potential: float, dimension: int) -> bool:
        """Whether the potential fell by more than the typical set's width over the second half
        of arrival (exact potentials only)."""
        if not self._compares_values or not math.isfinite(potential) or not math.isfinite(self._middle_potential):
            return False
        return self._middle_potential - potential > self._typical_width(dimension)

    def _typical_width(self, dimension: int) -> float:
        half = dimension / 2
        return self.temperature * (half + 5 * math.sqrt(half))

    def _arrived(self, potential: float, dimension: int) -> bool:
        if self._best.theta is None or not self._compares_values or not math.isfinite(potential):
            return True
        return potential - self._best.potential <= self._typical_width(dimension)

    # ---------------------------------------------------------------------- measurements

    def _hvp_z(self, theta: Tensor, whitening: Whitening, averaged: bool) -> Callable[[Tensor], Tensor]:
        """``v -> L^T H L v`` at ``theta``: the Hessian in the coordinates ``z`` (theta's dtype)."""
        hvp = self.estimator.hessian_vector_product(theta, averaged)
        return lambda v: whitening.pullback(hvp(whitening.to_theta(v.to(theta.dtype))).to(theta.dtype))

    def _preconditioner(self, theta: Tensor, whitening: Whitening, fresh: bool) -> Whitening:
        """The preconditioner with the curvature at ``theta`` added to the mean (restarted when
        ``fresh``); the old one if that curvature is not usable."""
        size = theta.numel()
        if self.mass == "low-rank":
            hvp = self.estimator.hessian_vector_product(theta, averaged=True)
            diagonal = hutchinson_diagonal(hvp, size, theta.device, generator=self.generator)
            if not self._usable(diagonal):
                return whitening
            mean = self._add(diagonal, fresh)
            low_rank = low_rank_whitening(hvp, mean, self.mass_rank, self.temperature, theta.dtype, self.generator)
            finite = bool(torch.isfinite(low_rank.vectors).all() and torch.isfinite(low_rank.factors).all())
            return low_rank if finite else whitening
        if self.mass == "dense":
            hvp = self.estimator.hessian_vector_product(theta, averaged=True)
            eye = torch.eye(size, dtype=torch.float64, device=theta.device)
            hessian = torch.stack([hvp(e) for e in eye], 1)
            hessian = (hessian + hessian.T) / 2
        else:
            # Hutchinson's probes in the current whitened coordinates, where the cross terms that
            # bias it are small, then back to theta's diagonal (approximate if L is dense)
            diagonal_z = hutchinson_diagonal(self._hvp_z(theta, whitening, averaged=False), size, theta.device,
                                             dtype=theta.dtype, generator=self.generator)
            scale = whitening.scale.double()
            hessian = diagonal_z / (scale.diagonal() if whitening.dense else scale) ** 2
        if not self._usable(hessian):
            return whitening
        mean = self._add(usable_curvature(hessian), fresh)
        return whitening_from_curvature(mean, self.temperature, theta.dtype)

    @staticmethod
    def _usable(curvature: Tensor) -> bool:
        return bool(torch.isfinite(curvature).all()) and bool((curvature != 0).any())

    @property
    def _fits_secants(self) -> bool:
        return self.adapt_mass_matrix and not self.frozen and (
            not self.estimator.noisy_gradient or self.estimator.fixed_minibatch_secants)

    @property
    def fits_secants(self) -> bool:
        """Whether warmup's preconditioner takes in the steps' secants now."""
        return self._fits_secants

    def _add_secant(self, step: Tensor, change: Tensor, length: float) -> None:
        """One step's secant pair ``(dtheta, dg)`` into the sums ``A`` and ``B`` (their diagonals
        unless dense), with weight ``1 / length^2``."""
        if not (length > 0 and math.isfinite(length)):
            return
        step, change = step.detach().double().reshape(-1), change.detach().double().reshape(-1)
        if self._secant_a is None:
            d = step.numel()
            shape = (d, d) if self.mass == "dense" else (d,)
            self._secant_a = torch.zeros(shape, dtype=torch.float64, device=step.device)
            self._secant_b = torch.zeros(shape, dtype=torch.float64, device=step.device)
        weight = 1.0 / length**2
        if self.mass == "dense":
            self._secant_a.addr_(change, step, alpha=weight)
            self._secant_b.addr_(step, step, alpha=weight)
        else:
            self._secant_a.addcmul_(change, step, value=weight)
            self._secant_b.addcmul_(step, step, value=weight)

    def _add(self, curvature: Tensor, fresh: bool) -> Tensor:
        """The mean curvature with the Hessian ``curvature`` of one more point (the points restart
        when ``fresh``), fitted with the steps' secants (see the module's docstring)."""
        self._hessians = [curvature] if fresh else [*self._hessians, curvature]
        mean = torch.stack(self._hessians).mean(0)
        if fresh or self._secant_a is None:
            return mean
        points = len(self._hessians)
        scale = self.current.whitening.scale.double()
        size = scale.shape[0]
        if self.mass == "dense":
            place = (scale @ scale.T if scale.dim() == 2 else torch.diag(scale**2)) / size  # C = M / d
            fit = torch.linalg.solve(self._secant_b + points * place, (self._secant_a + points * mean @ place).T).T
            return (fit + fit.T) / 2
        place = (scale.diagonal() if scale.dim() == 2 else scale) ** 2 / size
        return (self._secant_a + points * mean * place) / (self._secant_b + points * place)

    def _measure(self, theta: Tensor, tuning: Adaptation, arrival: bool) -> Adaptation:
        """The step size (and the options the sampler adapts) from the curvature and gradient
        noise measured at ``theta`` in ``tuning``'s coordinates."""
        whitening = tuning.whitening
        z = whitening.to_z(theta)
        hvp = self._hvp_z(theta, whitening, averaged=self.exact_gaussian)
        largest = float(power_iteration(hvp, z, 8, self.generator))
        if self.adapt_mass_matrix and math.isfinite(largest) and largest > 0:
            # the whitened mean curvature is T I: by convexity of lambda_max its mean over the window
            # is at least T, whatever the point shows
            largest = max(largest, self.temperature)
        smallest = 0.0
        if self.exact_gaussian and math.isfinite(largest) and largest > 0:
            shift = 1.1 * largest
            smallest = shift - float(power_iteration(lambda v: shift * v - hvp(v), z, 16, self.generator))
        noise = self._noise(theta, whitening)
        scales = Scales(largest, noise, smallest)
        if not (math.isfinite(largest) and math.isfinite(noise) and largest > 0):
            if math.isfinite(tuning.step_size):
                return replace(tuning, scales=scales)  # nothing measurable here: keep the step
            # no curvature at the start (a potential flat where the chain starts): a small step,
            # measured again at the next window's end
            warnings.warn("Could not measure the curvature at the initial point (it is zero or not finite); "
                          "warmup starts with step_size=1e-3 until it can (give step_size to choose it)",
                          RuntimeWarning, stacklevel=2)
            self.measured_step_size = 1e-3
            return replace(tuning, step_size=1e-3, scales=scales)
        adapted = self.sampler_class.adapted_options(largest, noise, self.temperature, self.sampler_options)
        options = {**self.gaussian_options, **self.sampler_options, **adapted}
        if self.exact_gaussian:
            options["smallest_curvature"] = smallest if math.isfinite(smallest) else 0.0
        step_size = self.sampler_class.suggest_lr(largest, noise, self.target_bias, self.temperature,
                                                  arrival=arrival and self.estimator.arrival_steps, **options)
        self.measured_step_size = step_size
        return Adaptation(whitening, step_size, {**self.gaussian_options, **adapted}, scales)

    def _noise(self, theta: Tensor, whitening: Whitening, draws: int = 12) -> float:
        """The largest per-coordinate variance of the gradient (in ``z``) over fresh minibatches;
        0 without any. A control-variate gradient has no noise at its anchor, where its chain
        starts: there it is measured a typical (whitened) distance away, where the chain will be."""
        if not self.estimator.noisy_gradient:
            return 0.0
        z = whitening.to_z(theta)
        anchor = self.estimator.anchor_point
        if anchor is not None and torch.equal(theta, anchor):
            z = z + torch.randn_like(z)
        point = whitening.to_theta(z)
        grads = torch.stack([whitening.pullback(self.estimator.estimate(point).grad) for _ in range(draws)])
        return float(grads.var(0).max())
