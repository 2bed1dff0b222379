"""Warmup arrives from anywhere: a property over random starts and several models, not a
regression test pinned to the seeds where something once went wrong.

For each model and sampler, :data:`STARTS` chains start from ``init_to_uniform`` (uniform in
(-2, 2) in unconstrained space: for a scale parameter anything from 0.14 to 7.4 times its prior
median) with the default kernel and a short warmup of :data:`WARMUP` steps. The property: every
chain ends warmup with a potential ``U`` (unconstrained coordinates) no higher than the
posterior's ``1 - 1e-4`` quantile of ``U``:

* the scale model and non-centred eight schools (non-Gaussian: a scale parameter, a funnel
  whose left tail in ``log tau`` is linear) against the quantile of ``U`` over exact posterior
  draws (:mod:`exact_posteriors`, by quadrature);
* the logistic regression (500 rows, a log-concave and near-Gaussian posterior) against
  ``U_min + T q``, with ``q`` the ``1 - 1e-4`` quantile of Gamma(d/2): near a Gaussian mode
  ``(U - U_min) / T`` is Gamma(d/2).

A chain whose end point were an exact posterior draw would fail with probability ``1e-4``, so a
test of :data:`STARTS` chains raises a false alarm with probability at most ``STARTS * 1e-4``
(0.12%); a chain that is still arriving, or was thrown out (into the linear tail of eight
schools' ``log tau``, where the potential rises only one nat per unit), sits several to thousands
of nats above. :data:`STARTS` and :data:`WARMUP` are sized so that the six tests take about 90 s
on one core.
"""

from __future__ import annotations

import math
import warnings
from functools import lru_cache

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC

import exact_posteriors
import mcmc_models as models
from pyro_sgmcmc.infer import SGLD, SGNHT, MixingWarning, ModelPotential
from pyro_sgmcmc.infer.potential import FlatLayout, model_sites

STARTS = 12
WARMUP = 100
#: The tail probability of the limit each chain's end point is held to.
TAIL = 1e-4


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
EXACT = {"scale model": exact_posteriors.scale_model, "eight schools": exact_posteriors.eight_schools}


def potential_of(case):
    """``U`` of a dict of unconstrained values, and the model's transforms."""
    model, args = CASES[case]
    sites = model_sites(model, args, {})
    return ModelPotential(model, sites.transforms, args, {}), sites.transforms


def minimum(potential, start):
    """The lowest potential L-BFGS finds from ``start`` (a flat tensor)."""
    theta = start.detach().clone().requires_grad_(True)
    optimizer = torch.optim.LBFGS([theta], max_iter=500, tolerance_grad=1e-9, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        value = potential(theta)
        value.backward()
        return value

    optimizer.step(closure)
    return float(potential(theta.detach()))


@lru_cache(maxsize=None)
def limit(case):
    """The ``1 - TAIL`` quantile of the posterior's ``U`` (see the module's docstring)."""
    potential, _ = potential_of(case)
    if case in EXACT:
        draws, energies = EXACT[case](*CASES[case][1])
        for i in range(3):  # the draws' U is the kernels' U
            point = {name: value[i].float() for name, value in draws.items()}
            assert math.isclose(float(potential(point)), float(energies[i]), rel_tol=1e-5, abs_tol=1e-4)
        return exact_posteriors.potential_quantile(energies, 1 - TAIL)
    # log-concave (a Gaussian prior, a logistic likelihood): one minimum, found from the prior's mean
    model, args = CASES[case]
    layout = FlatLayout({name: torch.zeros_like(value) for name, value in _prior_sample(model, args).items()})
    u_min = minimum(lambda theta: potential(layout.unflatten(theta)), torch.zeros(layout.size))
    return u_min + exact_posteriors.gamma_quantile(layout.size / 2, 1 - TAIL)


def _prior_sample(model, args):
    trace = pyro.poutine.trace(model).get_trace(*args)
    return {name: site["value"] for name, site in trace.nodes.items()
            if site["type"] == "sample" and not site["is_observed"]}


@pytest.mark.slow
@pytest.mark.parametrize("kernel_cls", [SGLD, SGNHT])
@pytest.mark.parametrize("case", list(CASES))
def test_warmup_ends_in_the_typical_set_from_any_start(case, kernel_cls):
    model, args = CASES[case]
    potential, transforms = potential_of(case)
    bound = limit(case)
    far = []
    for seed in range(STARTS):
        pyro.set_rng_seed(seed)
        mcmc = MCMC(kernel_cls(model), num_samples=1, warmup_steps=WARMUP, disable_progbar=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MixingWarning)
            mcmc.run(*args)
        point = {name: transforms[name](value[0]) for name, value in mcmc.get_samples().items()}
        energy = float(potential(point))
        if not energy <= bound:
            far.append((seed, round(energy - bound, 1)))
    assert not far, (f"{case}: chains (seed, U - limit) that ended warmup beyond the posterior's 1 - {TAIL:g} "
                     f"quantile of U: {far}")
