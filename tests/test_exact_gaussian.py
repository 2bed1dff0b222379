"""Kernels that are exact on the Laplace approximation (``exact_gaussian=True``), and the traced
potential (``jit_compile=True``) that makes their steps cheap."""

from __future__ import annotations

import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import MCMC

import mcmc_models as models
from pyro_sgmcmc.infer import SGLD, SGNHT, ModelPotential
from pyro_sgmcmc.infer.potential import PotentialEvaluator
from pyro_sgmcmc.infer.potential import model_sites
from pyro_sgmcmc.infer.subsample import SubsampleControl, full_data_potential
from test_control_variates import scale_model
from test_mcmc import _regression_data, check


@pytest.mark.slow
def test_exact_gaussian_kernel_takes_near_independent_steps_on_a_regression_posterior():
    """Control variates, a dense preconditioner and exact_gaussian on minibatches of 200 out of
    4000 (20 independent 3-coefficient regressions): the posterior is Gaussian and the Hessian is
    measured exactly (the data walked in 20 pieces), so the whitened curvature is 1 and only the
    control-variate noise limits the step: 0.53 here (plain SGLD's rule: 4 * 0.02 / (1 + B) <
    0.08), steps of autocorrelation ~0.74 instead of ~0.96. Tolerance: 4 MCSE plus
    the 2% variance bias the rule aims at (1% on the sd)."""
    x, y, mean, cov, _ = _regression_data(n=4000)
    pyro.set_rng_seed(0)
    kernel = SGLD(models.linear_regression, control_variates=True, full_mass=True, exact_gaussian=True,
                  jit_compile=True, ignore_jit_warnings=True)
    mcmc = MCMC(kernel, num_samples=600, warmup_steps=50, disable_progbar=True)
    mcmc.run(x, y, 20, 200)
    check(mcmc.get_samples()["w"], mean, cov.diagonal(), 0.02, "SGLD exact_gaussian + CV")
    diagnostics = kernel.diagnostics()
    assert diagnostics["step size"] > 0.5, diagnostics
    assert 0.99 < diagnostics["smallest curvature"] <= diagnostics["curvature"] < 1.01, diagnostics


@pytest.mark.slow
def test_exact_gaussian_without_a_fitting_preconditioner_takes_small_steps():
    """Safe without a Hessian-shaped preconditioner: no mass adaptation, a curvature far from 1,
    so the rule falls back to steps of plain SGLD's order."""
    x, y, *_ = _regression_data()
    pyro.set_rng_seed(0)
    kernel = SGLD(models.linear_regression, adapt_mass_matrix=False, exact_gaussian=True)
    MCMC(kernel, num_samples=5, warmup_steps=50, disable_progbar=True).run(x, y, 2, 20)
    curvature = kernel.diagnostics()["curvature"]
    assert kernel.diagnostics()["step size"] < 4 * 0.02 / curvature * 1.5


def test_exact_gaussian_needs_a_sampler_with_a_reference_curvature():
    with pytest.raises(ValueError, match="Invalid exact_gaussian: SGNHT has no reference_curvature"):
        SGNHT(models.scalar_normal, exact_gaussian=True)
    with pytest.raises(ValueError, match="Invalid exact_gaussian"):
        SGLD(models.scalar_normal, exact_gaussian=1)


@pytest.mark.parametrize("jit", [False, True])
def test_traced_and_light_evaluations_equal_the_trace(jit):
    """The potential after the first (validated, traced by poutine.trace) evaluation is summed
    without a trace, and with jit_compile replayed from a TorchScript graph: both equal Pyro's
    trace log density, on minibatches, on weighted pieces of a full-data walk (Jacobian counted
    once), and for a pair of points on one minibatch."""
    x = torch.randn(103, generator=torch.Generator().manual_seed(0))
    sites = model_sites(scale_model, (x, 10), {})
    transforms, plates = sites.transforms, sites.plates
    names = sorted(transforms)
    potential = ModelPotential(scale_model, transforms, (x, 10), {})

    def unflatten(flat):
        return {name: flat[i] for i, name in enumerate(names)}

    evaluate = PotentialEvaluator(potential, unflatten, is_model=True, jit_compile=jit, ignore_jit_warnings=True)

    def by_trace(flat, control, jacobian=True):
        values = {name: transforms[name].inv(flat[i]) for i, name in enumerate(names)}
        trace = poutine.trace(control(poutine.condition(scale_model, data=values))).get_trace(x, 10)
        log_det = sum(transforms[n].inv.log_abs_det_jacobian(flat[i], values[n]) for i, n in enumerate(names))
        return -(trace.log_prob_sum() + (log_det if jacobian else 0.0))

    point, other = torch.tensor([0.3, 1.5]), torch.tensor([-0.2, 0.7])
    for seed in range(3):
        rows = torch.randperm(103, generator=torch.Generator().manual_seed(seed))[:10]
        control = SubsampleControl({"data": rows})
        u, v = evaluate([point, other], control)
        assert float(u) == pytest.approx(float(by_trace(point, control)), rel=1e-6)
        assert float(v) == pytest.approx(float(by_trace(other, control)), rel=1e-6)
    walked = full_data_potential(lambda control, jacobian: evaluate([point], control, jacobian)[0], plates[0])
    exact = ModelPotential(scale_model, transforms, (x, None), {})(unflatten(point))
    assert float(walked) == pytest.approx(float(exact), rel=1e-6)


@pytest.mark.slow
def test_jit_compiled_kernel_runs_the_same_chain():
    x, y, *_ = _regression_data()
    draws = []
    for jit in (False, True):
        pyro.set_rng_seed(3)
        kernel = SGLD(models.linear_regression, control_variates=True, full_mass=True, jit_compile=jit,
                      ignore_jit_warnings=True)
        mcmc = MCMC(kernel, num_samples=30, warmup_steps=20, disable_progbar=True)
        mcmc.run(x, y, 2, 20)
        draws.append(mcmc.get_samples()["w"])
    assert torch.allclose(draws[0], draws[1], atol=1e-4, rtol=1e-4)


@pytest.mark.slow
def test_exact_gaussian_on_a_skewed_constrained_posterior():
    """Beta(41, 21) sampled in logit space (Jacobian included): not Gaussian there (skewed), so
    the measured curvature spreads around 1 and the rule's bias bound must hold where the
    Gaussian correction is not exact. Full data, dense preconditioner; tolerance 4 MCSE plus the
    2% variance bias the rule aims at."""
    a, b = 41.0, 21.0  # Beta(1, 1) prior, 40 ones and 20 zeros
    mean = torch.tensor(a / (a + b), dtype=torch.float64)
    var = torch.tensor(a * b / ((a + b) ** 2 * (a + b + 1)), dtype=torch.float64)
    pyro.set_rng_seed(1)
    kernel = SGLD(models.beta_bernoulli, full_mass=True, exact_gaussian=True)
    mcmc = MCMC(kernel, num_samples=1500, warmup_steps=200, disable_progbar=True)
    mcmc.run(models.BERNOULLI, 20)
    check(mcmc.get_samples()["p"], mean, var, 0.02, "SGLD exact_gaussian, Beta-Bernoulli")
    diagnostics = kernel.diagnostics()
    assert diagnostics["smallest curvature"] < 0.99 or diagnostics["curvature"] > 1.01, diagnostics
    assert diagnostics["step size"] > 0.3, diagnostics  # plain SGLD's rule: 4 * 0.02 = 0.08
