"""Warmup arrives from anywhere: a property over many random starts and several models, not a
regression test pinned to the seeds where something once went wrong.

For each model, ``STARTS`` chains start from ``init_to_uniform`` (uniform in (-2, 2) in
unconstrained space: for a scale parameter anything from 0.14 to 7.4 times its prior median) with
the default kernel and a warmup of ``WARMUP`` steps. The property: every chain ends warmup in the
typical set of the posterior, ``U <= q``, with ``q`` the posterior's ``1 - 1e-4`` quantile of the
potential ``U`` (so a false alarm has probability about ``STARTS * 1e-4 = 0.2%`` per test). ``q`` is
exact where the posterior is not Gaussian: the scale model and eight schools, from 200,000 exact
draws (``exact_posteriors.py``); for the logistic regression (500 rows, 5 coefficients: near
Gaussian) ``U - U_min`` is ``T`` times a Gamma(d/2) variable and ``q`` is its quantile above the
minimum that L-BFGS finds.

Not covered: SGLD on eight schools, which fails this today (from about 1 start in 7 the
preconditioner, a Hessian measured where the curvature along ``log tau`` is small, makes steps
that dive down the funnel's linear tail during warmup; SGNHT arrives).
"""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC

import exact_posteriors
import mcmc_models as models
from pyro_sgmcmc.infer import SGLD, SGNHT, MixingWarning, ModelPotential
from pyro_sgmcmc.infer.potential import FlatLayout, model_sites

STARTS = 15
WARMUP = 200
QUANTILE = 1 - 1e-4


def logistic_data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=gen)
    x[:, 1] = x[:, 0] + 0.3 * torch.randn(500, generator=gen)  # correlated pair
    y = torch.bernoulli(torch.sigmoid(x @ torch.tensor([1.5, -1.0, 0.5, 0.0, 0.25])), generator=gen)
    return x, y


def eight_schools(sigma, y):
    """Non-centred eight schools (Rubin 1981): a hierarchical model with a scale parameter."""
    mu = pyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = pyro.sample("tau", dist.HalfCauchy(5.0))
    with pyro.plate("schools", len(y)):
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))
        pyro.sample("y", dist.Normal(mu + tau * eta, sigma), obs=y)


CASES = {
    "scale model": (models.scalar_normal, (torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0]),)),
    "logistic regression": (models.logistic_regression, logistic_data()),
    "eight schools": (eight_schools, (torch.tensor([15.0, 10, 16, 11, 9, 11, 10, 18]),
                                      torch.tensor([28.0, 8, -3, 7, -1, 1, 18, 12]))),
}


def minimum(potential, points):
    """The lowest potential L-BFGS finds from any of ``points``."""
    best = math.inf
    for start in points:
        theta = start.detach().clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([theta], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            optimizer.zero_grad()
            value = potential(theta)
            value.backward()
            return value

        optimizer.step(closure)
        value = float(potential(theta.detach()))
        if math.isfinite(value):
            best = min(best, value)
    return best


def gamma_quantile(shape: float, probability: float) -> float:
    """The ``probability`` quantile of a Gamma(shape, 1) variable (bisection on its tail)."""
    low, high = 0.0, 10.0 * shape + 100.0
    target = torch.tensor(1.0 - probability, dtype=torch.float64)
    for _ in range(200):
        middle = (low + high) / 2
        tail = torch.special.gammaincc(torch.tensor(shape, dtype=torch.float64), torch.tensor(middle, dtype=torch.float64))
        low, high = (middle, high) if tail > target else (low, middle)
    return (low + high) / 2


EXACT = {"scale model": exact_posteriors.scale_model, "eight schools": exact_posteriors.eight_schools}
COMBINATIONS = [(case, kernel) for case in CASES for kernel in (SGLD, SGNHT)
                if not (case == "eight schools" and kernel is SGLD)]


@pytest.mark.slow
@pytest.mark.parametrize("case, kernel_cls", COMBINATIONS, ids=[f"{c}-{k.__name__}" for c, k in COMBINATIONS])
def test_warmup_ends_in_the_typical_set_from_any_start(case, kernel_cls):
    model, args = CASES[case]
    sites = model_sites(model, args, {})
    potential = ModelPotential(model, sites.transforms, args, {})
    ends, layout = [], None
    for seed in range(STARTS):
        pyro.set_rng_seed(seed)
        kernel = kernel_cls(model)
        mcmc = MCMC(kernel, num_samples=1, warmup_steps=WARMUP, disable_progbar=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MixingWarning)
            mcmc.run(*args)
        point = {name: sites.transforms[name](value[0]) for name, value in mcmc.get_samples().items()}
        layout = layout or FlatLayout(point)
        ends.append(layout.flatten(point))
    flat_potential = lambda theta: potential(layout.unflatten(theta))  # noqa: E731
    values = torch.tensor([float(flat_potential(theta)) for theta in ends])
    if case in EXACT:
        _, exact_u = EXACT[case](*args, num=200_000)
        limit = float(torch.quantile(exact_u, QUANTILE))
    else:
        u_min = minimum(flat_potential, [*ends[:5], torch.zeros_like(ends[0])])
        limit = u_min + gamma_quantile(layout.size / 2, QUANTILE)
    far = [(seed, round(float(v - limit), 1)) for seed, v in enumerate(values) if v > limit]
    assert not far, f"{case}: chains (seed, U - q) outside the typical set after warmup: {far}"
