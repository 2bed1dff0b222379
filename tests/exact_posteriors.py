"""Exact posteriors of the robustness tests' models, as draws, and the quantiles of the potential
energy ``U`` (in the kernels' unconstrained coordinates) that the tests compare chains against.

Both models have a non-Gaussian part in two coordinates and, given those, nothing left to sample
or an exactly Gaussian rest, so they are drawn by quadrature:

* the two-coordinate marginal is tabulated on a product grid; a cell is drawn with probability
  proportional to the density at its centre and the point uniformly inside it. This is the
  density with each cell's value replaced by its centre's, so the error is how much the log
  density changes across a cell: at the grids below, 0.02 nats on average over the posterior
  (at most 0.3 where the density exceeds 1e-8 of a cell), far below the spread of ``U``
  (several nats);
* the grids reach far enough that the cells on their edges carry less than 3e-8 of the mass
  (scale model) and 5e-9 (eight schools), and the density falls off beyond them, so the mass
  left out is far below the 1e-4 tail the tests look at;
* the rest (eight schools' ``eta``) is drawn from its exact Gaussian conditional.

``U`` of each draw is its exact potential (validated against
:class:`~pyro_sgmcmc.infer.ModelPotential` at the draws, to float32 rounding), so a quantile of the
draws' ``U`` is the posterior's, up to Monte Carlo error: from ``n`` draws, the empirical
``1 - p`` quantile sits at a level whose tail probability has a relative standard deviation of
``1 / sqrt(n p)`` (2.2% of ``p = 1e-4`` for the default ``n = 200000``).

For a near-Gaussian posterior (no exact draws), :func:`gamma_quantile` gives the tail of
``(U - U_min) / T``, which near a Gaussian mode is a Gamma(d/2) variable.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

D = torch.distributions
DRAWS = 200_000


def _grid_draws(log_density, axes, num, generator):
    """Draws from a density tabulated on the product grid ``axes``: cells by their weight, the
    point uniformly inside its cell."""
    mesh = torch.meshgrid(*axes, indexing="ij")
    logp = log_density(*mesh)
    weights = (logp - logp.max()).exp().flatten()
    index = torch.multinomial(weights, num, replacement=True, generator=generator)
    out = []
    for axis, grid in zip(axes, mesh):
        width = float(axis[1] - axis[0])
        jitter = torch.rand(num, generator=generator, dtype=axis.dtype) - 0.5
        out.append(grid.flatten()[index] + jitter * width)
    return out


def scale_model(data, num=DRAWS, seed=0):
    """``loc ~ N(0, 10)``, ``scale ~ LogNormal(0, 1)``, ``data ~ N(loc, scale)``
    (``mcmc_models.scalar_normal``): draws of ``{"loc", "scale"}`` in unconstrained coordinates
    (``scale`` as its log) and their potential ``U``."""
    data = data.double()

    def log_joint(loc, log_scale):  # the log-Jacobian of scale = exp(u) turns LogNormal into Normal
        return (D.Normal(loc[..., None], log_scale.exp()[..., None]).log_prob(data).sum(-1)
                + D.Normal(0.0, 10.0).log_prob(loc) + D.Normal(0.0, 1.0).log_prob(log_scale))

    generator = torch.Generator().manual_seed(seed)
    axes = (torch.linspace(-6.0, 8.0, 1401, dtype=torch.float64),
            torch.linspace(-4.0, 3.0, 701, dtype=torch.float64))
    loc, log_scale = _grid_draws(log_joint, axes, num, generator)
    return {"loc": loc, "scale": log_scale}, -log_joint(loc, log_scale)


def eight_schools(sigma, y, num=DRAWS, seed=0):
    """Non-centred eight schools: ``(mu, log tau)`` by quadrature of their marginal (``eta``
    integrated out: ``y_j ~ N(mu, sigma_j^2 + tau^2)``), then ``eta | mu, tau, y``, which is
    Gaussian with precision ``1 + tau^2 / sigma^2`` per school. Draws of ``{"mu", "tau", "eta"}``
    in unconstrained coordinates (``tau`` as its log) and their potential ``U``."""
    sigma, y = sigma.double(), y.double()

    def log_marginal(mu, log_tau):
        tau = log_tau.exp()
        sd = (sigma**2 + tau[..., None] ** 2).sqrt()
        return (D.Normal(mu[..., None], sd).log_prob(y).sum(-1) + D.Normal(0.0, 5.0).log_prob(mu)
                + D.HalfCauchy(5.0).log_prob(tau) + log_tau)

    generator = torch.Generator().manual_seed(seed)
    axes = (torch.linspace(-25.0, 35.0, 1201, dtype=torch.float64),
            torch.linspace(-14.0, 7.0, 841, dtype=torch.float64))
    mu, log_tau = _grid_draws(log_marginal, axes, num, generator)
    tau = log_tau.exp()[:, None]
    precision = 1 + tau**2 / sigma**2
    mean = tau * (y - mu[:, None]) / sigma**2 / precision
    eta = mean + precision.rsqrt() * torch.randn(num, len(y), generator=generator, dtype=torch.float64)
    log_joint = (D.Normal(0.0, 5.0).log_prob(mu) + D.HalfCauchy(5.0).log_prob(tau[:, 0]) + log_tau
                 + D.Normal(0.0, 1.0).log_prob(eta).sum(-1)
                 + D.Normal(mu[:, None] + tau * eta, sigma).log_prob(y).sum(-1))
    return {"mu": mu, "tau": log_tau, "eta": eta}, -log_joint


def potential_quantile(potentials, level):
    """The ``level`` quantile of the draws' potentials (float64)."""
    return float(torch.quantile(potentials.double(), level))


@lru_cache(maxsize=None)
def gamma_quantile(shape, level):
    """The ``level`` quantile of a Gamma(``shape``, 1) variable: bisection on its upper
    regularised incomplete gamma function ``Q(shape, x) = P(X > x)`` (float64, to 1e-10)."""
    tail = torch.tensor(1.0 - level, dtype=torch.float64)
    a = torch.tensor(float(shape), dtype=torch.float64)
    low, high = 0.0, max(1.0, 2.0 * shape)
    while float(torch.special.gammaincc(a, torch.tensor(high, dtype=torch.float64))) > tail:
        high *= 2
    while high - low > 1e-10 * max(1.0, high):
        middle = (low + high) / 2
        if float(torch.special.gammaincc(a, torch.tensor(middle, dtype=torch.float64))) > tail:
            low = middle
        else:
            high = middle
    return (low + high) / 2


assert math.isclose(gamma_quantile(1.0, 0.5), math.log(2.0), rel_tol=1e-8)  # Exponential(1)'s median
