"""Latent sites local to a subsampled plate (pyro_sgmcmc.infer.local): the kernels' blocked
random-scan scheme against the exact stationary law of that chain and against the exact
posterior, a wrong scheme that fails the same check, and what is refused.

The model is the conjugate hierarchical normal (mcmc_models.hierarchical_normal): mu global,
theta_i local to the subsampled plate of groups. At fixed step sizes the chain is linear and
Gaussian, and its exact stationary mean and covariance (tests/hierarchical_normal.py, summed over
every minibatch) are what the draws are compared with at 4 Monte Carlo standard errors (check of
test_mcmc); the posterior mean is exact, the variances carry the discretisation bias that the
exact law quantifies.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch

import hierarchical_normal as exact
import mcmc_models as models
from test_mcmc import FIXED, check, run
from pyro_sgmcmc.infer import SGLD
from pyro_sgmcmc.infer.sites import LocalSite

GROUPS, OBS, BATCH, CHAINS = 8, 5, 2, 100
STEP, LOCAL_STEP = 0.02, 1 / 12  # local: lr * curvature = 0.5 (curvature 1/tau^2 + n/sigma^2 = 6)


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta = 1.0 + torch.randn(GROUPS, generator=gen)
    return theta + torch.randn(OBS, GROUPS, generator=gen)


def _draws(kernel, y, num_samples=200, warmup=50):
    mcmc = run(kernel, y, CHAINS, BATCH, num_samples=num_samples, warmup=warmup)
    mu = mcmc.get_samples()["mu"]  # [samples, chains]
    theta = kernel.local_samples()["theta"]  # [samples, groups, chains]
    return torch.cat([mu[:, :, None], theta.transpose(1, 2)], -1)  # [samples, chains, 1 + groups]


def test_blocked_chain_matches_its_exact_stationary_law_and_the_posterior():
    y = _data()
    kernel = SGLD(models.hierarchical_normal, step_size=STEP, local_step_size=LOCAL_STEP, num_steps=5,
                  local_samples="all", **FIXED)
    draws = _draws(kernel, y)
    mean, cov = exact.blocked_sgld_moments(y, BATCH, STEP, LOCAL_STEP)
    check(draws, mean, cov.diagonal(), 0.0, "blocked SGLD vs its exact law")
    # the chain's law is the posterior's up to its discretisation bias: the same mean, and
    # variances within the SGLD rule's lr * curvature / 4 (relative), with curvature the largest
    # of each block's conditional (the global's minibatch-noise adds to it)
    post_mean, post_cov = exact.exact_moments(y)
    assert torch.allclose(mean, post_mean, atol=1e-9)
    bias = (cov.diagonal() / post_cov.diagonal() - 1).abs()
    assert float(bias[1:].max()) <= LOCAL_STEP * 6 / 4 / (1 - LOCAL_STEP * 6 / 4), bias
    # moments kept for every row agree with the kept samples
    moments = kernel.local_moments()["theta"]
    assert moments.count == 200 and moments.mean.shape == (GROUPS, CHAINS)
    torch.testing.assert_close(moments.mean, kernel.local_samples()["theta"].mean(0), rtol=1e-4, atol=1e-5)


def test_a_scheme_that_keeps_the_plates_scaling_on_the_local_gradient_fails(monkeypatch):
    """The rows' gradient left N/m times too large (Pyro's plate scale not undone) samples the
    locals at temperature m/N: the same check must see it."""
    y = _data()
    monkeypatch.setattr(LocalSite, "scale", property(lambda self: 1.0))
    kernel = SGLD(models.hierarchical_normal, step_size=STEP, local_step_size=LOCAL_STEP, num_steps=5,
                  local_samples="all", **FIXED)
    draws = _draws(kernel, y)
    mean, cov = exact.blocked_sgld_moments(y, BATCH, STEP, LOCAL_STEP)
    with pytest.raises(AssertionError, match="variance"):
        check(draws, mean, cov.diagonal(), 0.0, "wrong scheme")
