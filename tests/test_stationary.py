"""Stationary laws of SGLD and SGNHT on Gaussian targets, against exact answers.

Every statistic is compared twice:

1. with the exact stationary law of the discretised chain (see ``tests/gaussian.py``), with a
   tolerance of 4 Monte Carlo standard errors and nothing else: this catches any error in the
   update, however small;
2. with the target itself, with the same Monte Carlo tolerance plus the known O(step size) bias
   (the difference between the two references), which is written out and stays small.

A sampler that drops its thermostat, mis-scales its noise, or tempers wrongly fails (1) by many
standard errors (see ``test_wrong_sampler_is_caught``).
"""

from __future__ import annotations

import pytest
import torch

from pyro_sgmcmc.optim.sgld import SGLD
from pyro_sgmcmc.optim.sgnht import SGNHT

from gaussian import (
    ANISOTROPIC,
    CORRELATED,
    assert_close_mc,
    moments,
    sgld_stationary_cov,
    sgnht_stationary,
    sgnht_stationary_cov,
)

CHAINS = 500
STEPS = 2000
BURN_IN = 400


def run(sampler_cls, target, *, chains=CHAINS, steps=STEPS, burn_in=BURN_IN, seed=0, start=None, **options):
    """Run ``chains`` independent chains (rows of one parameter) and return [steps, chains, d]."""
    torch.manual_seed(seed)
    d = target.mean.numel()
    if start is None:
        start = target.mean.expand(chains, d)
    theta = torch.nn.Parameter(start.clone().to(torch.float32))
    sampler = sampler_cls([theta], **options)
    samples = torch.empty(steps, chains, d)
    for t in range(burn_in + steps):
        theta.grad = target.grad(theta.detach().double()).float()
        sampler.step()
        if t >= burn_in:
            samples[t - burn_in] = theta.detach()
    return samples, sampler


def _draw(mean, cov, chains, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    z = torch.randn(chains, mean.numel(), generator=gen, dtype=torch.float64)
    return mean + z @ torch.linalg.cholesky(cov).T


def step_size(name, precision):
    """Step sizes at which the discretisation bias is a few percent: SGLD lr * lambda_max = 0.1,
    SGNHT h * sqrt(lambda_max) = 0.2."""
    lam_max = float(torch.linalg.eigvalsh(precision).max())
    return 0.1 / lam_max if name == "SGLD" else 0.2 / lam_max**0.5


def check_sampler(name, target, temperature=1.0, localization=0.0, weight_decay=0.0, anchor=None, **extra):
    anchor = target.mean if anchor is None else anchor
    mean, prec = target.tempered(temperature, localization, weight_decay, anchor)
    lr = step_size(name, prec)
    if name == "SGLD":
        sampler_cls, options = SGLD, dict(lr=lr)
        disc_cov = sgld_stationary_cov(prec, lr)
    else:
        sampler_cls, options = SGNHT, dict(lr=lr, diffusion_factor=1.0)
        disc_cov = sgnht_stationary_cov(prec, lr, 1.0)
    cov = torch.linalg.inv(prec)
    start = _draw(mean, disc_cov, CHAINS, 0)
    if localization:
        # theta0 is the value at the first step: start every chain at the anchor, then burn in
        start = anchor.expand(CHAINS, -1)
        extra.setdefault("burn_in", 1500)
    samples, _ = run(sampler_cls, target, start=start, temperature=temperature, localization=localization,
                     weight_decay=weight_decay, **options, **extra)
    est_mean, est_cov = moments(samples, mean)
    label = f"{name} T={temperature} gamma={localization} lambda={weight_decay}"
    sd = cov.diagonal().sqrt()
    assert_close_mc(est_mean, mean, what=f"{label} mean", scale=sd)
    assert_close_mc(est_cov, disc_cov, what=f"{label} covariance vs exact discretised chain", scale=sd.outer(sd))
    # the known O(step size) bias, written out: relative lr*lambda/4 (SGLD), ~h*xi/2 (SGNHT)
    bias = disc_cov - cov
    assert float((bias.abs() / cov.diagonal().outer(cov.diagonal()).sqrt()).max()) < 0.05
    assert_close_mc(est_cov, cov, bias=bias, what=f"{label} covariance vs target + known bias")


@pytest.mark.parametrize("name", ["SGLD", "SGNHT"])
@pytest.mark.parametrize("target", [ANISOTROPIC, CORRELATED], ids=["anisotropic", "correlated"])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0])
def test_gaussian_stationary(name, target, temperature):
    check_sampler(name, target, temperature=temperature)


@pytest.mark.parametrize("name", ["SGLD", "SGNHT"])
def test_localization_and_weight_decay_move_the_target_exactly(name):
    # anchor away from the mode so that localization visibly moves the mean
    anchor = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)
    check_sampler(name, ANISOTROPIC, temperature=1.0, localization=2.0, weight_decay=0.5, anchor=anchor)


@pytest.mark.parametrize("name", ["SGLD", "SGNHT"])
def test_wrong_sampler_is_caught(name):
    """The check above can fail: a chain sampled at T = 1 (as a sampler that mis-tempers, or an
    SGNHT that lost its thermostat and runs hot, would give) is rejected against the T = 1.2 answer."""
    mean, prec = ANISOTROPIC.tempered(1.0)
    _, wrong_prec = ANISOTROPIC.tempered(1.2)
    lr = step_size(name, prec)
    cls, opts = (SGLD, dict(lr=lr)) if name == "SGLD" else (SGNHT, dict(lr=lr, diffusion_factor=1.0))
    samples, _ = run(cls, ANISOTROPIC, start=_draw(mean, torch.linalg.inv(prec), CHAINS, 0), **opts)
    _, est_cov = moments(samples, mean)
    ref = sgld_stationary_cov(wrong_prec, lr) if name == "SGLD" else sgnht_stationary_cov(wrong_prec, lr, 1.0)
    with pytest.raises(AssertionError):
        assert_close_mc(est_cov, ref, what="wrong temperature")


def test_sgnht_thermostat_absorbs_gradient_noise():
    """With noisy gradients (variance B per entry) plain SGLD-like friction would heat up; SGNHT's
    thermostat rises by about B*h/2 and keeps theta's variance at the target's."""
    target = ANISOTROPIC
    mean, prec = target.tempered(1.0)
    h = step_size("SGNHT", prec)
    torch.manual_seed(3)
    theta = torch.nn.Parameter(_draw(mean, torch.linalg.inv(prec), CHAINS, 3).float())
    sampler = SGNHT([theta], lr=h, diffusion_factor=1.0)
    noise_sd = 3.0
    samples = []
    for t in range(BURN_IN + STEPS):
        g = target.grad(theta.detach().double()).float()
        theta.grad = g + noise_sd * torch.randn_like(g)
        sampler.step()
        if t >= BURN_IN:
            samples.append(theta.detach().clone())
    samples = torch.stack(samples)
    _, est_cov = moments(samples, mean)
    # The gradient noise adds h^2 B to p's variance per step, as if the diffusion were
    # A + B h / 2 (Ding et al. 2014, Sec. 3): the discretised chain with that diffusion is the
    # reference, and the thermostat must settle at its friction (stationary sd of xi: d^-1/2).
    ref, friction = sgnht_stationary(prec, h, 1.0 + noise_sd**2 * h / 2)
    xi = float(sampler.param_groups[0]["thermostat"])
    assert friction > 1.0 + 0.9 * noise_sd**2 * h / 2  # the noise is absorbed by more friction
    assert abs(xi - friction) < 4 / theta.numel() ** 0.5
    assert_close_mc(est_cov, ref, what="SGNHT with noisy gradients")
