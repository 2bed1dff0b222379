"""Warmup adaptation for the SG-MCMC kernels: a preconditioner and a step size.

Preconditioning is a change of variables, ``theta = L z``: the sampler runs on ``z`` against the
potential ``U(L z)``, whose gradient is ``L^T grad U``. SGLD on ``z`` is then exactly preconditioned
SGLD on ``theta`` with the fixed matrix ``M = L L^T``,

    theta <- theta - (lr/2) M grad U + sqrt(lr) L N(0, I),

which keeps the target (the spec's form), and the same holds for every sampler (for SGNHT, ``M``
is a mass matrix). No update rule is written again: the kernel changes coordinates, the sampler
is unchanged.

``M`` is ``T H^-1``, with ``H`` the Hessian of the potential (its diagonal by default, all of it
with ``full_mass``, or its diagonal corrected along the few directions where the diagonally
whitened Hessian is furthest from the identity with ``mass_rank``), measured at the start and at the end of warmup windows that double in length
(as in Stan), averaged over those points, and frozen after warmup. Stan estimates ``M`` from the
draws of each window instead; that fails here: an SG-MCMC chain needs hundreds of steps to cross
its posterior, far more than a window, so the draws under-spread, the estimate shrinks the slow
directions, and the next window is slower still (measured: the variance of a collinear pair
collapsed to 2% of its value). The Hessian needs no mixing.

The step size comes from the sampler's own bias rule (``suggest_lr``) with two quantities measured
in the ``z`` coordinates: the largest curvature of the potential (power iteration on
finite-difference Hessian-vector products, every evaluation on the same minibatch) and the
variance of the minibatch gradient noise (a few gradients at one point, fresh minibatches).
"""

from __future__ import annotations

import math
from typing import Callable

import pyro
import torch
from torch import Tensor


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

    @property
    def kind(self) -> str:
        return "dense" if self.dense else "diagonal"


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

    @property
    def kind(self) -> str:
        return f"diagonal + rank {self.vectors.shape[1]}"


def hutchinson_diagonal(hvp: Callable[[Tensor], Tensor], size: int, device: torch.device, probes: int = 16,
                        dtype: torch.dtype = torch.float64) -> Tensor:
    """The Hessian's diagonal (float64) from ``probes`` products with ``hvp``: Hutchinson's
    estimate ``E[v * H v]`` over Rademacher ``v`` (of ``dtype``), or, when ``size <= probes``, the
    exact diagonal from the ``size`` unit vectors, which costs no more products. Hutchinson's
    estimate of ``H_ii`` is off by ``sum_j H_ij mean(v_i v_j)``: where two coordinates are
    strongly coupled (a location and a log-scale far from the mode) this can cancel the
    diagonal, and a near-zero curvature then whitens that coordinate to a huge scale (measured:
    the first arrival step of a two-site model jumped 90 posterior sds)."""
    if size <= probes:
        eye = torch.eye(size, dtype=dtype, device=device)
        return torch.stack([hvp(e)[i] for i, e in enumerate(eye)]).double()
    estimate = torch.zeros(size, dtype=torch.float64, device=device)
    for _ in range(probes):
        v = torch.randint(0, 2, (size,), device=device).to(dtype) * 2 - 1
        estimate += v.double() * hvp(v).double()
    return estimate / probes


def low_rank_whitening(hvp: Callable[[Tensor], Tensor], diagonal: Tensor, rank: int, temperature: float,
                       dtype: torch.dtype) -> LowRankWhitening:
    """Whitening from the Hessian's ``diagonal`` (averaged by the caller) plus the ``rank``
    eigen-directions of the diagonally whitened Hessian ``A = S H S`` whose eigenvalues are
    furthest (in log) from ``T``: the stiffest directions limit the step size, the softest
    (e.g. collinear regressors) mix slowest. Lanczos with full re-orthogonalisation, ``4 rank + 20``
    products with ``hvp`` (``v -> H v`` in theta coordinates, float64, e.g. by double backward on
    one minibatch: finite differences in float32 cannot resolve directions 1000x softer than the
    stiffest), then one product per kept direction to check it (residual within 10% of its
    eigenvalue)."""
    diag = diagonal.abs().clamp(min=max(float(diagonal.abs().max()), 1e-12) * 1e-8)
    scale = (temperature / diag).sqrt()
    size = diagonal.numel()
    device = diagonal.device
    steps = min(size, 4 * rank + 20)
    basis = torch.zeros(size, steps, dtype=torch.float64, device=device)
    alphas, betas = [], []
    v = torch.randn(size, dtype=torch.float64, device=device)
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


def window_ends(warmup_steps: int) -> list[int]:
    """Iterations (0-based, counted in samples) after which the preconditioner is re-estimated:
    a first 15% to arrive, then windows of 25, 50, 100, ... draws, the last stretched to end 10%
    before the end of warmup (whose last part adapts the step size only). None below 40 steps."""
    if warmup_steps < 40:
        return []
    start, end = int(0.15 * warmup_steps), warmup_steps - int(0.1 * warmup_steps)
    ends, size, position = [], 25, start
    while position + size < end:
        next_position = position + size
        if next_position + 2 * size > end:  # the next window would not fit: stretch this one
            next_position = end
        ends.append(next_position)
        position, size = next_position, 2 * size
    if not ends or ends[-1] != end:
        ends.append(end)
    return ends


def _same_batch_hvp(gradient: Callable[[Tensor], Tensor], z: Tensor) -> Callable[[Tensor], Tensor]:
    """``v -> H v`` at ``z`` by a finite difference of ``gradient``, every call on the minibatch of
    the first (the RNG state is replayed)."""
    state = pyro.util.get_rng_state()
    base = gradient(z)
    eps = 1e-3 * max(1.0, float(z.norm())) / math.sqrt(z.numel())

    def hvp(v: Tensor) -> Tensor:
        pyro.util.set_rng_state(state)
        return (gradient(z + eps * v) - base) / eps

    return hvp


def _power_iteration(operator: Callable[[Tensor], Tensor], like: Tensor, iterations: int) -> float:
    """The largest eigenvalue (in magnitude) of ``operator`` by ``iterations`` power steps."""
    v = torch.randn_like(like)
    v /= v.norm()
    value = 0.0
    for _ in range(iterations):
        w = operator(v)
        value = float(w.norm())
        if not math.isfinite(value) or value == 0.0:
            break
        v = w / value
    return value


def measure_scales(
    gradient: Callable[[Tensor], Tensor], z: Tensor, power_iterations: int = 8, noise_draws: int = 12,
    smallest: bool = False, hvp: Callable[[Tensor], Tensor] | None = None, noise_point: Tensor | None = None,
) -> tuple[float, float, float]:
    """``(largest curvature, largest per-coordinate gradient-noise variance, smallest curvature)``
    at ``z``; the smallest only with ``smallest`` (else 0): by power iteration on ``s I - H`` with
    ``s`` a little above the largest.

    :param gradient: ``z -> grad U(z)`` (a fresh minibatch at each call, as the sampler sees it).
    :param hvp: ``v -> H v`` at ``z`` for the curvatures (default: finite differences of
        ``gradient`` on one minibatch).
    :param noise_point: where to measure the gradient noise (default ``z``): a control-variate
        gradient has no noise at its anchor, so a chain that starts there measures it a typical
        distance away.
    """
    state = pyro.util.get_rng_state()
    if hvp is None:
        hvp = _same_batch_hvp(gradient, z)  # the same minibatch for every curvature probe
    else:
        given = hvp
        hvp = lambda v: given(v).to(z.dtype)  # noqa: E731
    largest = _power_iteration(hvp, z, power_iterations)
    least = 0.0
    if smallest and math.isfinite(largest) and largest > 0:
        shift = 1.1 * largest
        least = shift - _power_iteration(lambda v: shift * v - hvp(v), z, 2 * power_iterations)
    pyro.util.set_rng_state(state)
    at = z if noise_point is None else noise_point
    draws = torch.stack([gradient(at) for _ in range(noise_draws)])
    noise = float(draws.var(0).max()) if noise_draws > 1 else 0.0
    return largest, noise, least


def curvature(gradient: Callable[[Tensor], Tensor], z: Tensor, whitening: Whitening, dense: bool,
              probes: int = 16) -> Tensor:
    """The Hessian of the potential in theta coordinates at ``theta = L z``, from finite-difference
    Hessian-vector products on one minibatch: all of it (``D`` products, float64 ``[D, D]``) when
    ``dense``, else its diagonal (:func:`hutchinson_diagonal` with ``probes`` products).

    :param gradient: ``z -> grad U(z)`` in the current coordinates.
    """
    state = pyro.util.get_rng_state()
    size = z.numel()
    eps = 1e-3 * max(1.0, float(z.norm())) / math.sqrt(size)

    def hvp(v: Tensor) -> Tensor:
        pyro.util.set_rng_state(state)  # every product on the same minibatch
        plus = gradient(z + eps * v)
        pyro.util.set_rng_state(state)
        minus = gradient(z - eps * v)
        return ((plus - minus) / (2 * eps)).double()

    scale = whitening.scale.double()
    if dense:
        h_z = torch.stack([hvp(e) for e in torch.eye(size, dtype=z.dtype, device=z.device)], 1)
        lower = scale if whitening.dense else torch.diag(scale)
        inv = torch.linalg.inv(lower)
        h = inv.T @ ((h_z + h_z.T) / 2) @ inv
        result = (h + h.T) / 2
    else:
        estimate = hutchinson_diagonal(hvp, size, z.device, probes, dtype=z.dtype)
        diag_scale = scale.diagonal() if whitening.dense else scale
        result = estimate / diag_scale**2  # diagonal in theta coordinates (approximate if L was dense)
    pyro.util.set_rng_state(state)
    return result


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
