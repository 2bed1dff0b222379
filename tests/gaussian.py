"""Gaussian targets with exact answers, for the stationary tests.

For a Gaussian potential :math:`U(\\theta) = \\frac12(\\theta-\\mu)^\\top\\Sigma^{-1}(\\theta-\\mu)`
at temperature :math:`T`, localization :math:`\\gamma` toward :math:`\\theta_0` and weight decay
:math:`\\lambda`, the target is Gaussian with precision :math:`P = \\Sigma^{-1}/T + (\\gamma+\\lambda)I`
and mean :math:`P^{-1}(\\Sigma^{-1}\\mu/T + \\gamma\\theta_0)`.

Both samplers are linear in :math:`\\theta` on such a target, so the stationary law of the
*discretised* chain is known exactly too:

* SGLD: :math:`\\theta' = (I - \\tfrac{\\epsilon}{2}P)\\theta + \\dots + \\sqrt\\epsilon\\,\\xi` has stationary
  covariance :math:`(P - \\epsilon P^2/4)^{-1}`: a relative bias of :math:`+\\epsilon\\lambda_i/4` in
  the eigen-direction of eigenvalue :math:`\\lambda_i` (the O(step size) bias).
* preconditioned SGLD with a frozen diagonal preconditioner :math:`G`: the same recursion with
  :math:`A = I - \\tfrac{\\epsilon}{2}GP` and noise covariance :math:`\\epsilon G`, a discrete Lyapunov equation;
* SGHMC: the fixed-friction recursion below, with the friction :math:`C` and the exact
  Ornstein-Uhlenbeck noise :math:`1 - e^{-2Ch}` per step (in closed form: SGHMC's docstring);
* SGNHT: for a fixed friction :math:`\\xi = c`, each eigen-direction is a 2-d linear recursion in
  :math:`(\\theta, p)` whose stationary covariance solves a discrete Lyapunov equation; the
  thermostat settles at the :math:`c` that makes the mean of :math:`p^2` over all entries 1. The
  thermostat's own fluctuations are of order :math:`d^{-1/2}` and negligible for the thousands of
  entries used here.

Monte Carlo error: statistics are averaged over many independent chains (one batch row each) and
their standard error comes from the effective sample size of Pyro's estimator
(:func:`pyro.ops.stats.effective_sample_size`), counting every chain.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from pyro.ops.stats import effective_sample_size


@dataclass
class GaussianTarget:
    mean: torch.Tensor  # mu
    cov: torch.Tensor  # Sigma

    @property
    def precision(self) -> torch.Tensor:
        return torch.linalg.inv(self.cov)

    def grad(self, theta: torch.Tensor) -> torch.Tensor:
        """Gradient of U for a batch of chains, theta: [chains, d]."""
        return (theta - self.mean) @ self.precision

    def tempered(self, temperature=1.0, localization=0.0, weight_decay=0.0, anchor=None):
        """(mean, precision) of the sampled law."""
        d = self.mean.numel()
        prec = self.precision / temperature + (localization + weight_decay) * torch.eye(d, dtype=torch.float64)
        rhs = self.precision @ self.mean / temperature
        if localization:
            rhs = rhs + localization * anchor
        return torch.linalg.solve(prec, rhs), prec


ANISOTROPIC = GaussianTarget(
    mean=torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
    cov=torch.diag(torch.tensor([1.0, 0.25, 0.04], dtype=torch.float64)),
)


def _correlated() -> GaussianTarget:
    sd = torch.tensor([1.0, 0.5, 0.3], dtype=torch.float64)
    corr = torch.tensor([[1.0, 0.9, 0.5], [0.9, 1.0, 0.7], [0.5, 0.7, 1.0]], dtype=torch.float64)
    return GaussianTarget(mean=torch.tensor([0.5, 1.0, -1.0], dtype=torch.float64), cov=corr * sd[:, None] * sd[None, :])


CORRELATED = _correlated()


def sgld_stationary_cov(precision: torch.Tensor, lr: float) -> torch.Tensor:
    """Exact stationary covariance of SGLD on a Gaussian of this precision: (P - lr P^2 / 4)^-1."""
    return torch.linalg.inv(precision - lr * precision @ precision / 4)


def _momentum_direction(omega2: float, h: float, friction: float, noise: float) -> np.ndarray:
    """Stationary covariance of (theta, p) for one eigen-direction of curvature ``omega2`` of the
    momentum step ``p' = exp(-friction h) p - h omega2 theta + noise``, ``theta' = theta + h p'``
    (SGHMC; SGNHT at a fixed thermostat), with ``noise`` the total variance per step added to
    ``p`` (injected and from the gradient): the discrete Lyapunov equation S = M S M^T + Q."""
    decay = np.exp(-friction * h)  # the sampler's friction factor
    m = np.array([[1 - h * h * omega2, h * decay], [-h * omega2, decay]])
    b = np.array([h, 1.0])
    q = noise * np.outer(b, b)
    v = np.linalg.solve(np.eye(4) - np.kron(m, m), q.reshape(-1))
    return v.reshape(2, 2)


def _sgnht_direction(omega2: float, h: float, friction: float, diffusion: float) -> np.ndarray:
    """SGNHT's direction at a fixed thermostat ``friction``: momentum noise ``2 A h`` per step."""
    return _momentum_direction(omega2, h, friction, 2 * diffusion * h)


def sghmc_momentum_noise(h: float, friction: float, gradient_noise: float = 0.0, estimate: float = 0.0,
                         paper_noise: bool = False) -> float:
    """The total variance per step that SGHMC adds to each momentum entry: what it injects,
    ``1 - exp(-2 C h) - h^2 V_hat`` (with ``paper_noise``, the noise ``2 C h - h^2 V_hat`` of Chen et
    al. paired with the same friction factor ``exp(-C h)``: the scheme that runs hot), plus the
    gradient noise's ``h^2 V``. ``V`` and ``V_hat`` are variances of the gradient of the tempered
    potential (``V / T^2`` in the samplers' terms)."""
    injected = 2 * friction * h if paper_noise else -np.expm1(-2 * friction * h)
    return injected - h * h * estimate + h * h * gradient_noise


def sghmc_stationary_cov(precision: torch.Tensor, h: float, friction: float, gradient_noise: float = 0.0,
                         estimate: float = 0.0, paper_noise: bool = False) -> torch.Tensor:
    """Stationary covariance of SGHMC's theta on a Gaussian target: the fixed-friction recursion
    of every eigen-direction, with the momentum noise of :func:`sghmc_momentum_noise`."""
    noise = sghmc_momentum_noise(h, friction, gradient_noise, estimate, paper_noise)
    evals, evecs = torch.linalg.eigh(precision)
    var = torch.tensor([_momentum_direction(w, h, friction, noise)[0, 0] for w in evals.tolist()], dtype=torch.float64)
    return evecs @ torch.diag(var) @ evecs.T


def sghmc_stationary_variance(omega2: float, h: float, friction: float) -> float:
    """The closed form of theta's stationary variance in one direction (SGHMC's docstring):
    ``((1 + a) / 2) / (omega2 (1 - h^2 omega2 / (2 (1 + a))))`` with ``a = exp(-C h)``."""
    a = math.exp(-friction * h)
    return (1 + a) / 2 / (omega2 * (1 - h * h * omega2 / (2 * (1 + a))))


def _baoab_direction(omega2: float, h: float, friction: float, gradient_noise: float, injected: float) -> np.ndarray:
    """Stationary covariance of (theta, p) for one eigen-direction of SGHMC's BAOAB splitting, the
    merged step ``q = p - h (omega2 theta + eta)``, ``theta += h q / 2``, ``p = a q + xi``,
    ``theta += h p / 2`` with ``a = exp(-friction h)``, ``Var eta = gradient_noise`` and
    ``Var xi = injected``: the discrete Lyapunov equation S = M S M^T + Q."""
    a = np.exp(-friction * h)
    half = np.array([[1.0, h / 2], [0.0, 1.0]])
    kick = np.array([[1.0, 0.0], [-h * omega2, 1.0]])
    ou = np.diag([1.0, a])
    m = half @ ou @ half @ kick
    b_eta = half @ ou @ half @ np.array([0.0, -h])
    b_xi = half @ np.array([0.0, 1.0])
    q = gradient_noise * np.outer(b_eta, b_eta) + injected * np.outer(b_xi, b_xi)
    v = np.linalg.solve(np.eye(4) - np.kron(m, m), q.reshape(-1))
    return v.reshape(2, 2)


def baoab_stationary_cov(precision: torch.Tensor, h: float, friction: float, gradient_noise: float = 0.0,
                         estimate: float = 0.0) -> torch.Tensor:
    """Stationary covariance of theta of SGHMC with ``splitting="baoab"`` on a Gaussian target
    (gradient noise ``V`` and its estimate ``V_hat``, of the tempered gradient): the injected
    noise is ``1 - exp(-2 C h) - h^2 V_hat`` as in the Euler splitting."""
    injected = -np.expm1(-2 * friction * h) - h * h * estimate
    evals, evecs = torch.linalg.eigh(precision)
    var = torch.tensor([_baoab_direction(w, h, friction, gradient_noise, injected)[0, 0] for w in evals.tolist()],
                       dtype=torch.float64)
    return evecs @ torch.diag(var) @ evecs.T


def baoab_stationary_variance(omega2: float, h: float, friction: float, gradient_noise: float = 0.0,
                              estimate: float = 0.0) -> float:
    """The closed form of SGHMC's docstring for BAOAB: ``omega2 Var theta = 1 - h^2 V_hat / (1 - a^2)
    + h^2 V (1 + a) / ((1 - a) (4 - h^2 omega2))``."""
    a = math.exp(-friction * h)
    return (1 - h * h * estimate / (1 - a * a)
            + h * h * gradient_noise * (1 + a) / ((1 - a) * (4 - h * h * omega2))) / omega2


def preconditioned_sgld_stationary_cov(precision: torch.Tensor, lr: float, g: torch.Tensor) -> torch.Tensor:
    """Stationary covariance of SGLD with a fixed diagonal preconditioner ``g``:
    theta' = A theta + ... + sqrt(lr g) xi with A = I - (lr/2) diag(g) P solves
    Sigma = A Sigma A^T + lr diag(g)."""
    d = precision.shape[0]
    a = torch.eye(d, dtype=torch.float64) - lr / 2 * torch.diag(g) @ precision
    q = lr * torch.diag(g)
    v = torch.linalg.solve(torch.eye(d * d, dtype=torch.float64) - torch.kron(a, a), q.reshape(-1))
    return v.reshape(d, d)


def sgnht_stationary_cov(precision: torch.Tensor, h: float, diffusion: float) -> torch.Tensor:
    """Stationary covariance of SGNHT's theta (paper's discretisation) on a Gaussian target."""
    return sgnht_stationary(precision, h, diffusion)[0]


def sgnht_stationary(precision: torch.Tensor, h: float, diffusion: float) -> tuple[torch.Tensor, float]:
    """(theta's stationary covariance, the friction the thermostat settles at)."""
    evals, evecs = torch.linalg.eigh(precision)
    evals = evals.tolist()

    def mean_kinetic(c):
        return np.mean([_sgnht_direction(w, h, c, diffusion)[1, 1] for w in evals]) - 1.0

    lo, hi = 1e-6, 50.0  # mean_kinetic decreases in the friction c
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if mean_kinetic(mid) > 0 else (lo, mid)
    c = 0.5 * (lo + hi)
    var = torch.tensor([_sgnht_direction(w, h, c, diffusion)[0, 0] for w in evals], dtype=torch.float64)
    return evecs @ torch.diag(var) @ evecs.T, c


@dataclass
class Estimate:
    value: torch.Tensor
    stderr: torch.Tensor


def moments(samples: torch.Tensor, mean_ref: torch.Tensor) -> tuple[Estimate, Estimate]:
    """Mean and covariance of ``samples`` [steps, chains, d] with Monte Carlo standard errors.

    The covariance is estimated around the exact mean (so each entry is the average of one
    function of the state), and every standard error is ``sd(f) / sqrt(ESS(f))``.
    """
    x = samples.to(torch.float64).transpose(0, 1)  # [chains, steps, d]
    d = x.shape[-1]
    centred = x - mean_ref
    funcs = [x[..., i] for i in range(d)] + [centred[..., i] * centred[..., j] for i in range(d) for j in range(d)]
    values, errors = [], []
    for f in funcs:
        ess = float(effective_sample_size(f, chain_dim=0, sample_dim=1))
        values.append(f.mean())
        errors.append(f.std() / math.sqrt(max(ess, 1.0)))
    values, errors = torch.stack(values), torch.tensor(errors, dtype=torch.float64)
    mean = Estimate(values[:d], errors[:d])
    cov = Estimate(values[d:].reshape(d, d), errors[d:].reshape(d, d))
    return mean, cov


def assert_close_mc(estimate: Estimate, reference: torch.Tensor, bias: torch.Tensor | float = 0.0, z: float = 4.0,
                    what="", scale: torch.Tensor | None = None):
    """|estimate - reference| <= z * stderr + |bias|, entry by entry, with a readable failure.

    :param scale: if given, the standard errors must be below 10% of it (the run must be able to
        see a 10% error; otherwise any error would pass)."""
    if scale is not None:
        assert bool((estimate.stderr <= 0.1 * scale).all()), f"{what}: too little information ({estimate.stderr})"
    bias = torch.as_tensor(bias, dtype=torch.float64).abs()
    err = (estimate.value - reference).abs()
    tol = z * estimate.stderr + bias
    bad = err > tol
    assert not bool(bad.any()), (
        f"{what}: estimate\n{estimate.value}\nreference\n{reference}\n|error|\n{err}\ntolerance (z={z} MCSE + bias)\n{tol}"
    )
