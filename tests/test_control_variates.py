"""Control variates (Baker et al. 2019): the estimator, the full-data walk through a model's
minibatches, the plain-torch helper for any sampler, and the kernels."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC

import mcmc_models as models
from pyro_sgmcmc.functional import control_variate_gradient_
from pyro_sgmcmc.infer import SGLD, SGNHT, ModelPotential
from pyro_sgmcmc.infer.potential import model_sites
from pyro_sgmcmc.infer.subsample import SubsampleControl, full_data_potential
from pyro_sgmcmc.samplers import SAMPLERS
from pyro_sgmcmc.samplers import ControlVariate
from test_mcmc import _regression_data, check


@pytest.mark.parametrize("foreach", [True, False])
def test_estimator_arithmetic(foreach):
    g = [torch.tensor([1.0, 2.0]), torch.tensor([[3.0]])]
    control_variate_gradient_(g, [torch.tensor([0.5, 0.5]), torch.tensor([[1.0]])],
                              [torch.tensor([10.0, 20.0]), torch.tensor([[30.0]])], foreach=foreach)
    assert torch.equal(g[0], torch.tensor([10.5, 21.5])) and torch.equal(g[1], torch.tensor([[32.0]]))


def scale_model(x, batch):
    """A constrained global (a scale, with its Jacobian) and a likelihood in a subsampled plate."""
    sigma = pyro.sample("sigma", dist.LogNormal(0.0, 1.0))
    w = pyro.sample("w", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(x), subsample_size=batch) as idx:
        pyro.sample("y", dist.Normal(w * x[idx], sigma), obs=2.0 * x[idx])


@pytest.mark.parametrize("n, batch", [(100, 10), (103, 10)])  # the last piece padded with weight-0 rows
def test_full_data_walk_is_the_exact_full_potential(n, batch):
    x = torch.randn(n, generator=torch.Generator().manual_seed(0))
    pyro.set_rng_seed(0)
    sites = model_sites(scale_model, (x, batch), {})
    transforms, plates = sites.transforms, sites.plates
    assert [(p.name, p.size, p.subsample_size) for p in plates] == [("data", n, batch)]
    params = {"sigma": torch.tensor(0.3), "w": torch.tensor(1.5)}
    walked = full_data_potential(
        lambda control, jacobian: ModelPotential(scale_model, transforms, (x, batch), {})(params, control, jacobian),
        plates[0])
    exact = ModelPotential(scale_model, transforms, (x, None), {})(params)  # no subsampling at all
    assert float(walked) == pytest.approx(float(exact), rel=1e-6)


def test_recorded_minibatch_is_replayed():
    x = torch.randn(50)
    potential = ModelPotential(scale_model, model_sites(scale_model, (x, 5), {}).transforms,
                               (x, 5), {})
    params = {"sigma": torch.tensor(0.0), "w": torch.tensor(0.5)}
    record = SubsampleControl()
    first = potential(params, record)
    again = potential(params, SubsampleControl(indices=record.recorded))
    assert float(first) == float(again) and record.recorded["data"].shape == (5,)


def regression_loss(w, x, y, n):
    return n / len(y) * ((x @ w - y) ** 2).sum() / 2 + (w**2).sum() / 200


def test_torch_helper_is_unbiased_and_cuts_the_noise_near_the_anchor():
    x, y, mean, _, _ = _regression_data()
    n, batch = len(y), 40
    w = torch.nn.Parameter(mean.float().clone())
    cv = ControlVariate([w], full_loss=lambda: regression_loss(w, x, y, n))
    with torch.no_grad():
        w.add_(0.05)  # near the anchor, not at it
    plain, corrected = [], []
    batches = torch.arange(n).split(batch)
    for rows in batches:
        w.grad = torch.autograd.grad(regression_loss(w, x[rows], y[rows], n), w)[0]
        plain.append(w.grad.clone())
        cv.correct(lambda: regression_loss(w, x[rows], y[rows], n))
        corrected.append(w.grad.clone())
    full = torch.autograd.grad(regression_loss(w, x, y, n), w)[0]
    # averaged over a partition of the data, both estimators are the full gradient
    assert torch.allclose(torch.stack(plain).mean(0), full, rtol=1e-4, atol=1e-3)
    assert torch.allclose(torch.stack(corrected).mean(0), full, rtol=1e-4, atol=1e-3)
    assert torch.equal(w.detach(), mean.float() + 0.05)  # the swap to the anchor and back left w as it was
    assert float(torch.stack(corrected).var(0).sum()) < 0.01 * float(torch.stack(plain).var(0).sum())


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_torch_helper_works_with_every_sampler(name):
    x, y, mean, _, _ = _regression_data()
    w = torch.nn.Parameter(mean.float().clone())
    cv = ControlVariate([w], full_loss=lambda: regression_loss(w, x, y, len(y)))
    sampler = SAMPLERS[name]([w], lr=1e-4)
    for rows in torch.randperm(len(y)).split(50):
        sampler.zero_grad()
        regression_loss(w, x[rows], y[rows], len(y)).backward()
        cv.correct(lambda: regression_loss(w, x[rows], y[rows], len(y)))
        sampler.step()
    assert bool(torch.isfinite(w).all())


@pytest.mark.slow
def test_kernel_with_control_variates_samples_the_regression_posterior():
    """SGLD + control variates on minibatches of 20 out of 400: the chain starts at the mode
    found by L-BFGS; near it the gradient noise is tiny, so the default step-size rule gives
    steps some 6x SGLD's (a test on the adapted step size below) for the same 2% bias target."""
    x, y, mean, cov, _ = _regression_data()
    pyro.set_rng_seed(0)
    kernel = SGLD(models.linear_regression, control_variates=True, num_steps=5)
    mcmc = MCMC(kernel, num_samples=1500, warmup_steps=300, num_chains=1, disable_progbar=True)
    mcmc.run(x, y, 20, 20)
    check(mcmc.get_samples()["w"], mean, cov.diagonal(), 2 * 0.02, "SGLD + CV on minibatches")
    diagnostics = mcmc.diagnostics()
    assert diagnostics["control variates"]["chain 0"]["full-data evaluations"] > 1
    pyro.set_rng_seed(0)
    plain = SGLD(models.linear_regression, num_steps=5)
    MCMC(plain, num_samples=10, warmup_steps=300, disable_progbar=True).run(x, y, 20, 20)
    assert diagnostics["step size"]["chain 0"] > 5 * plain.diagnostics()["step size"]


def test_kernel_with_a_given_anchor():
    x, y, mean, cov, _ = _regression_data()
    pyro.set_rng_seed(0)
    kernel = SGNHT(models.linear_regression, control_variates={"w": mean.float().expand(20, 3)})
    mcmc = MCMC(kernel, num_samples=200, warmup_steps=100, disable_progbar=True)
    mcmc.run(x, y, 20, 20)
    assert kernel.diagnostics()["control variates"]["full-data evaluations"] == 1
    draws = mcmc.get_samples()["w"]  # [samples, chains, d]: a short run, a loose check of the pooled mean
    assert float(((draws.mean((0, 1)) - mean) / cov.diagonal().sqrt()).abs().max()) < 0.3


def test_control_variates_bad_input():
    x, y, *_ = _regression_data()
    with pytest.raises(ValueError, match="Invalid control_variates: the model has no subsampled plate"):
        MCMC(SGLD(models.linear_regression, control_variates=True), num_samples=2, warmup_steps=0,
             disable_progbar=True).run(x, y, 20, None)
    with pytest.raises(ValueError, match="Invalid control_variates: needs a model"):
        SGLD(potential_fn=lambda p: (p["x"] ** 2).sum(), control_variates=True)
    with pytest.raises(ValueError, match="Invalid control_variates: 'yes'"):
        SGLD(models.linear_regression, control_variates="yes")
    with pytest.raises(ValueError, match=r"Invalid control_variates: the anchor misses the sites \['w'\]"):
        MCMC(SGLD(models.linear_regression, control_variates={}), num_samples=2, warmup_steps=0,
             disable_progbar=True).run(x, y, 20, 20)


def test_fast_minibatch_draws_are_uniform_distinct_rows():
    """The kernels draw minibatches in O(m) (Pyro's plate uses an O(N) randperm): distinct rows
    in range, each row in about m/N of the draws (a chi-square-sized check over 2000 draws)."""
    from pyro_sgmcmc.infer.subsample import SubsampledPlate, draw_indices

    plate = SubsampledPlate("data", 1000, 50, torch.device("cpu"))
    torch.manual_seed(0)
    counts = torch.zeros(1000)
    for _ in range(2000):
        rows = draw_indices(plate)
        assert rows.shape == (50,) and rows.unique().numel() == 50 and 0 <= int(rows.min()) and int(rows.max()) < 1000
        counts[rows] += 1
    expected = 2000 * 50 / 1000  # 100 per row, binomial sd ~9.7
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert 1000 - 4 * (2 * 1000) ** 0.5 < chi2 < 1000 + 4 * (2 * 1000) ** 0.5  # chi-square(999): mean 999, sd ~45
    small = SubsampledPlate("data", 10, 5, torch.device("cpu"))  # 4 m > N: randperm
    assert draw_indices(small).unique().numel() == 5


@pytest.mark.slow
def test_svi_path_control_variate_gradient_is_unbiased_and_samples_the_posterior():
    """ControlVariateELBO with AutoUnconstrainedDelta: its loss is the potential estimate and its
    gradient the control-variate estimator; SGLD through SVI on minibatches of 20 out of 400, from
    the anchor at the exact posterior mean, samples the exact posterior (bias allowance: SGLD's
    lr * (lambda + B) / 4 with the control-variate noise B ~ 0 near the anchor, 2% here)."""
    from pyro.infer import SVI

    from pyro_sgmcmc import optim as pyro_optim
    from pyro_sgmcmc.infer import AutoUnconstrainedDelta, ControlVariateELBO, SampleCollector, run_svi

    x, y, mean, cov, precision = _regression_data()
    chains, batch = 20, 20
    lam = float(torch.linalg.eigvalsh(precision).max())
    lr = 0.08 / lam  # lr * lam / 4 = 2%
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoUnconstrainedDelta(models.linear_regression)
    elbo = ControlVariateELBO(anchor={"w": mean.float().expand(chains, 3)})
    svi = SVI(models.linear_regression, guide, pyro_optim.SGLD({"lr": lr}), elbo)
    collector = run_svi(svi, 3000, SampleCollector(burn_in=500), x, y, chains, batch, progress_bar=False)
    draws = collector.samples["w"]  # [samples, chains, 3]
    check(draws, mean, cov.diagonal(), 2 * 0.02, "SVI + ControlVariateELBO")


def test_svi_path_control_variate_bad_input():
    from pyro_sgmcmc.infer import ControlVariateELBO

    with pytest.raises(ValueError, match="Invalid anchor"):
        ControlVariateELBO(anchor=[1.0])
    x, y, *_ = _regression_data()
    with pytest.raises(TypeError, match="needs an AutoUnconstrainedDelta guide"):
        ControlVariateELBO().loss(models.linear_regression, pyro.infer.autoguide.AutoDelta(models.linear_regression),
                                  x, y, 2, 20)
