"""Exact posterior draws for the robustness tests' models, with the potential energy ``U`` of each
draw in the kernels' unconstrained coordinates.

The non-Gaussian coordinates are drawn from their (marginal) density tabulated on a fine grid
(cells chosen by weight, then jittered uniformly inside the cell: the quadrature error is that of
a piecewise-constant density on cells of width 0.01-0.025, far below the Monte Carlo error of the
quantiles taken from these draws); the rest from their exact Gaussian conditionals. The grids
span the region where the density is above ``1e-12`` of its maximum.
"""
from __future__ import annotations

import math

import torch

D = torch.distributions


def _grid_draws(log_density, axes, num, gen):
    """Draws from a density tabulated on a product grid (cells picked by weight, jittered
    uniformly inside their cell)."""
    mesh = torch.meshgrid(*axes, indexing="ij")
    logp = log_density(*mesh)
    weights = (logp - logp.max()).exp().flatten()
    index = torch.multinomial(weights, num, replacement=True, generator=gen)
    out = []
    for axis, grid in zip(axes, mesh):
        width = float(axis[1] - axis[0])
        out.append(grid.flatten()[index] + (torch.rand(num, generator=gen, dtype=axis.dtype) - 0.5) * width)
    return out


def scale_model(data, num, seed=0):
    """``loc ~ N(0, 10)``, ``scale ~ LogNormal(0, 1)``, data ~ N(loc, scale): (draws of
    (loc, log scale), their U)."""
    data = data.double()

    def log_joint(loc, log_scale):
        return (D.Normal(loc[..., None], log_scale.exp()[..., None]).log_prob(data).sum(-1)
                + D.Normal(0.0, 10.0).log_prob(loc) + D.Normal(0.0, 1.0).log_prob(log_scale))

    gen = torch.Generator().manual_seed(seed)
    axes = (torch.linspace(-6.0, 8.0, 1401, dtype=torch.float64), torch.linspace(-4.0, 3.0, 701, dtype=torch.float64))
    loc, log_scale = _grid_draws(log_joint, axes, num, gen)
    return {"loc": loc, "scale": log_scale}, -log_joint(loc, log_scale)


def eight_schools(sigma, y, num, seed=0):
    """Non-centred eight schools: (mu, log tau) by quadrature of their marginal (the etas
    integrated out: y_j ~ N(mu, sigma_j^2 + tau^2)), then eta_j | mu, tau, y exactly Gaussian."""
    sigma, y = sigma.double(), y.double()

    def log_marginal(mu, log_tau):
        tau = log_tau.exp()
        sd = (sigma**2 + tau[..., None] ** 2).sqrt()
        return (D.Normal(mu[..., None], sd).log_prob(y).sum(-1) + D.Normal(0.0, 5.0).log_prob(mu)
                + D.HalfCauchy(5.0).log_prob(tau) + log_tau)

    gen = torch.Generator().manual_seed(seed)
    axes = (torch.linspace(-25.0, 35.0, 1201, dtype=torch.float64), torch.linspace(-14.0, 7.0, 841, dtype=torch.float64))
    mu, log_tau = _grid_draws(log_marginal, axes, num, gen)
    tau = log_tau.exp()[:, None]
    precision = 1 + tau**2 / sigma**2
    mean = tau * (y - mu[:, None]) / sigma**2 / precision
    eta = mean + precision.rsqrt() * torch.randn(num, len(y), generator=gen, dtype=torch.float64)
    log_joint = (D.Normal(0.0, 5.0).log_prob(mu) + D.HalfCauchy(5.0).log_prob(tau[:, 0]) + log_tau
                 + D.Normal(0.0, 1.0).log_prob(eta).sum(-1)
                 + D.Normal(mu[:, None] + tau * eta, sigma).log_prob(y).sum(-1))
    return {"mu": mu, "tau": log_tau, "eta": eta}, -log_joint
