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

import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC

import hierarchical_normal as exact
import mcmc_models as models
from test_mcmc import FIXED, check, run
from pyro_sgmcmc.infer import SGLD, MixingWarning
from pyro_sgmcmc.infer.sites import LocalSite

GROUPS, OBS, BATCH, CHAINS = 8, 5, 2, 100
STEP, LOCAL_STEP = 0.02, 1 / 12  # local: lr * curvature = 0.5 (curvature 1/tau^2 + n/sigma^2 = 6)


def _data(seed=0):
    gen = torch.Generator().manual_seed(seed)
    theta = 1.0 + torch.randn(GROUPS, generator=gen)
    return theta + torch.randn(OBS, GROUPS, generator=gen)


def nested(y):
    """The hierarchical normal with the observations' plate subsampled too, inside the groups'."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("groups", y.shape[1], subsample_size=BATCH, dim=-1) as idx:
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))
        with pyro.plate("obs", y.shape[0], subsample_size=2, dim=-2) as jdx:
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y[jdx][:, idx])


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


def test_local_control_variates_keep_the_anchors_gradient_and_match_the_exact_law():
    """control_variates=True with local latents: the globals' gradient corrected at an anchor whose
    full-data gradient follows the rows as they move. On this model mu's gradient is linear, so the
    corrected gradient is the full-data one at the table exactly (no minibatch noise), and the
    chain's exact law is the blocked chain's with exact globals; the anchor's gradient, updated
    step by step, equals one computed afresh at the end."""
    from pyro_sgmcmc.infer.local import LocalControlVariates, LocalLatents
    from pyro_sgmcmc.infer.subsample import full_data_value_and_grad

    y = _data()
    kernel = SGLD(models.hierarchical_normal, step_size=STEP, local_step_size=LOCAL_STEP, num_steps=5,
                  local_samples="all", control_variates=True, **FIXED)
    draws = _draws(kernel, y)
    mean, cov = exact.blocked_sgld_moments(y, BATCH, STEP, LOCAL_STEP, exact_globals=True)
    check(draws, mean, cov.diagonal(), 0.0, "blocked SGLD with local control variates vs its exact law")
    # without the minibatch noise mu's variance is closer to the posterior's than the plain chain's
    plain_mean, plain_cov = exact.blocked_sgld_moments(y, BATCH, STEP, LOCAL_STEP)
    post_mean, post_cov = exact.exact_moments(y)
    assert abs(cov[0, 0] / post_cov[0, 0] - 1) < abs(plain_cov[0, 0] / post_cov[0, 0] - 1) / 2

    estimator = kernel._estimator
    assert isinstance(estimator, LocalControlVariates)

    def full_gradient(point):
        leaf = point.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            _, (grad,) = full_data_value_and_grad(lambda control, jacobian: estimator.evaluator([leaf], control, jacobian)[0],
                                                  estimator.plates[0], [leaf])
        return grad.double()

    # 200 samples of 5 steps after the anchor was last set, each moving a minibatch's rows
    torch.testing.assert_close(estimator.anchor_full_grad, full_gradient(estimator.anchor_point), rtol=1e-5, atol=1e-4)
    point = kernel._theta() + 0.3
    corrected = torch.stack([estimator.estimate(point).grad for _ in range(20)]).double()
    torch.testing.assert_close(corrected, full_gradient(point).expand_as(corrected), rtol=1e-4, atol=1e-3)
    plain = torch.stack([LocalLatents.estimate(estimator, point).grad for _ in range(20)])
    assert float(plain.std(0).max()) > 1.0  # the minibatch noise the control variates remove
    # warmup's secants are differences of gradients on one minibatch: at the estimate's own point
    # the gradient on its minibatch is the estimate's (with the correction: without it, a secant
    # carries the minibatch noise at the anchor, and the preconditioner came out 16 times too stiff)
    for estimate in (estimator.estimate(point), LocalLatents.estimate(estimator, point)):
        torch.testing.assert_close(estimator.gradient_on(point, estimate), estimate.grad)


def test_rows_exact_on_their_gaussian_conditional_take_large_steps_and_match_the_exact_law():
    """local_exact_gaussian: the rows' noise scaled to 1 - lr c / 4 with c the measured row
    curvature (6 in every row here), at lr * c = 1.8: each visit nearly redraws the row, and its
    conditional variance is exact (plain SGLD at this step would make it 1 / (1 - lr c / 4) = 1.8x too large)."""
    y = _data()
    local_step = 0.3
    kernel = SGLD(models.hierarchical_normal, step_size=STEP, local_step_size=local_step, local_exact_gaussian=True,
                  num_steps=5, local_samples="all", **FIXED)
    draws = _draws(kernel, y)
    assert kernel.diagnostics()["local reference curvatures"]["theta"] == pytest.approx(6.0, rel=1e-4)
    mean, cov = exact.blocked_sgld_moments(y, BATCH, STEP, local_step, local_noise=1 - local_step * 6 / 4)
    check(draws, mean, cov.diagonal(), 0.0, "blocked SGLD, rows exact on their Gaussian, vs its exact law")
    plain = exact.blocked_sgld_moments(y, BATCH, STEP, local_step)[1].diagonal()
    posterior = exact.exact_moments(y)[1].diagonal()
    assert float((cov.diagonal()[1:] / posterior[1:] - 1).abs().max()) < 0.02 < float((plain[1:] / posterior[1:] - 1).min())


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


def _scale_model(y, batch):
    """A constrained local: s_i ~ LogNormal(0, 1) per group, y_ji ~ N(mu, s_i^2)."""
    mu = pyro.sample("mu", dist.Normal(0.0, 3.0))
    with pyro.plate("groups", y.shape[1], subsample_size=batch, dim=-1) as idx:
        s = pyro.sample("s", dist.LogNormal(0.0, 1.0))
        with pyro.plate("obs", y.shape[0], dim=-2):
            pyro.sample("y", dist.Normal(mu, s), obs=y[:, idx])


def test_row_gradient_is_the_unscaled_conditional_gradient_with_its_jacobian():
    from pyro_sgmcmc.infer.local import LocalLatents, LocalTable
    from pyro_sgmcmc.infer.potential import FlatLayout, ModelPotential, PotentialEvaluator, model_sites

    y = _data()
    groups, batch = y.shape[1], 3
    sites = model_sites(_scale_model, (y, batch), {}, allow_local=True)
    assert list(sites.transforms) == ["mu"] and [s.name for s in sites.local_sites] == ["s"]
    u = torch.linspace(-0.5, 0.5, groups)
    table = LocalTable(sites.local_sites, {"s": u.clone()})
    layout = FlatLayout({"mu": torch.tensor(0.3)})
    potential = ModelPotential(_scale_model, sites.transforms, (y, batch), {}, sites.local_sites)
    evaluator = PotentialEvaluator(potential, layout.unflatten, is_model=True, local_rows=table.gather)
    estimate = LocalLatents(evaluator, sites.plates, table).estimate(torch.tensor([0.3]))
    idx = estimate.block.indices["groups"]
    mu, rows, obs = 0.3, u[idx].double(), y[:, idx].double()
    squares = ((obs - mu) ** 2).sum(0)
    # -l_i = u^2 / 2 + n u + sum_j (y_ji - mu)^2 / (2 e^{2u}) + const: its gradient, once per row
    torch.testing.assert_close(estimate.block.grads["s"].double(), rows + y.shape[0] - squares * (-2 * rows).exp(),
                               rtol=1e-5, atol=1e-5)  # float32
    # the global's gradient keeps the plate's N/m: an unbiased estimate over the groups
    scale = groups / batch
    grad_mu = mu / 9 - scale * ((obs - mu) * (-2 * rows).exp()).sum()
    torch.testing.assert_close(estimate.grad.double(), grad_mu.reshape(1), rtol=1e-5, atol=1e-5)
    normal = torch.distributions.Normal
    log_joint = normal(0.0, 3.0).log_prob(torch.tensor(mu).double()) + scale * (
        normal(0.0, 1.0).log_prob(rows) + normal(mu, rows.exp()).log_prob(obs).sum(0)).sum()
    torch.testing.assert_close(estimate.potential.double(), -log_joint, rtol=1e-5, atol=1e-4)


def test_measured_local_step_size_follows_sglds_bias_rule():
    # the rows' conditional curvature is 1 / tau^2 + n / sigma^2 = 6 in every row
    kernel = SGLD(models.hierarchical_normal, target_bias=0.05)
    run(kernel, _data(), 1, BATCH, num_samples=5, warmup=30)
    assert kernel.diagnostics()["local step sizes"]["theta"] == pytest.approx(4 * 0.05 / 6, rel=1e-4)
    moments = kernel.local_moments()["theta"]
    assert moments.count == 5 and moments.mean.shape == (GROUPS, 1)
    with pytest.raises(RuntimeError, match="local_samples='all'"):
        kernel.local_samples()


class _Curvatures:
    """A stand-in estimator whose rows' curvature is given, call by call."""

    def __init__(self, *largest):
        self.largest = list(largest)

    def row_curvature(self, point, name, minibatches=4, smallest=True):
        from pyro_sgmcmc.infer.local import RowCurvature

        value = self.largest.pop(0)
        return RowCurvature(value, value / 2)


def _steps():
    from pyro_sgmcmc.infer.local import LocalSteps, LocalTable

    site = LocalSite("theta", "groups", 0, GROUPS, BATCH, torch.Size([GROUPS]), 0, dist.transforms.identity_transform)
    return LocalSteps(LocalTable([site], {"theta": torch.zeros(GROUPS)}), temperature=1.0)


def test_local_step_holds_the_rule_over_every_curvature_measured_after_arrival():
    """The rows' curvature depends on the globals: the step is the rule's at the largest curvature
    measured since the last fresh measurement, not at the last point (arrival's own measurements
    set the arrival step by the same rule and are forgotten)."""
    steps, point = _steps(), torch.zeros(1)
    estimator = _Curvatures(100.0, 2.0, 8.0, 4.0)
    steps.measure(estimator, point, 0.05, arrival=True)
    assert steps.step_sizes["theta"] == pytest.approx(4 * 0.05 / 100)
    for _ in range(3):
        steps.measure(estimator, point, 0.05, arrival=False)
    assert steps.step_sizes["theta"] == pytest.approx(4 * 0.05 / 8)  # not 4 * 0.05 / 4, the last one
    assert steps.measured["theta"].largest == 8.0 and steps.measured["theta"].smallest == 1.0
    # a fresh measurement (the first of the second half of warmup) forgets where the chain came from
    steps.measure(_Curvatures(3.0), point, 0.05, arrival=False, fresh=True)
    assert steps.step_sizes["theta"] == pytest.approx(4 * 0.05 / 3)


def test_a_local_step_too_large_for_the_globals_visited_after_warmup_is_reported():
    steps, point = _steps(), torch.zeros(1)
    steps.measure(_Curvatures(6.0), point, 0.05, arrival=False)
    steps.probe(_Curvatures(6.0), point)
    assert steps.problems(0.05) == []  # where warmup measured, the rule holds
    steps.probe(_Curvatures(30.0), point)  # bias 5 times the target there
    (problem,) = steps.problems(0.05)
    assert "'theta'" in problem and "curvature of 30" in problem and "5.0 times target_bias" in problem
    steps.probe(_Curvatures(200.0), point)
    assert "unstable" in steps.problems(0.05)[0]
    # the user's step: its bias is the user's choice, an unstable one is still reported
    steps.given = True
    assert "unstable" in steps.problems(0.05)[0]
    steps.probed.clear()
    steps.probe(_Curvatures(30.0), point)
    assert steps.problems(0.05) == []


def test_kernel_reports_an_unstable_local_step():
    """A local step beyond SGLD's stability (lr * curvature = 4.8, curvature 6) is never silent."""
    kernel = SGLD(models.hierarchical_normal, step_size=STEP, local_step_size=0.8, num_steps=5, **FIXED)
    with pytest.warns(MixingWarning, match="rows of the local site 'theta'.*unstable"):
        run(kernel, _data(), 1, BATCH, num_samples=5, warmup=0)
        problems = kernel.diagnostics()["mixing problems"]
    assert any("unstable" in problem for problem in problems)


def test_measuring_the_rows_curvature_leaves_the_chain_as_it_was(monkeypatch):
    """The rows' curvature is measured on minibatches and power iterations of a generator of its
    own: the probes after warmup (every PROBE_EVERY samples) do not move torch's global generator,
    so the chain is the same with and without them."""
    from pyro_sgmcmc.infer.local import LocalSteps

    def chain():
        kernel = SGLD(models.hierarchical_normal, local_samples="all")
        mcmc = run(kernel, _data(), 1, BATCH, num_samples=120, warmup=40)
        return mcmc.get_samples()["mu"], kernel.local_samples()["theta"]

    probed_mu, probed_theta = chain()
    monkeypatch.setattr(LocalSteps, "probe", lambda self, estimator, point: None)
    mu, theta = chain()
    assert torch.equal(mu, probed_mu) and torch.equal(theta, probed_theta)


def test_nested_subsampled_plate_inside_the_local_plate_runs_and_continues_from_a_state():
    y = _data()
    kernel = SGLD(nested, local_samples="all", local_thin=2)
    mcmc = run(kernel, y, num_samples=10, warmup=20)
    assert mcmc.get_samples()["mu"].shape == (10,)
    assert kernel.local_samples()["theta"].shape == (5, GROUPS)
    state = kernel.state_dict()
    table = state["locals"]["table"]["theta"]
    assert table.shape == (GROUPS,) and bool(torch.isfinite(table).all())
    again = SGLD(nested)
    again.load_state_dict(state)
    run(again, y, num_samples=3, warmup=0)
    assert again.diagnostics()["local step sizes"] == kernel.diagnostics()["local step sizes"]


def test_crossed_subsampled_plates_match_their_exact_law_and_the_posterior():
    """Two subsampled plates side by side, each with a local site (users' and items' effects),
    and the ratings inside both: each row's gradient undoes its own plate's scaling and keeps the
    other's (an unbiased estimate of its conditional gradient, whose noise the rows' rule does
    not count). At fixed steps the chain is linear and Gaussian; its exact stationary law
    (hierarchical_normal.crossed_sgld_moments, over every pair of minibatches) is what the draws
    are compared with, and that law is the posterior's up to O(step): the same mean, and at a
    tenth and a hundredth of the steps variances within 3% and 0.3% of the posterior's (the bias
    at these steps, 3-28%, is what the draws must be able to tell from the posterior: they do)."""
    users, items, users_batch, items_batch = 6, 5, 3, 2
    step, local_step = 0.01, 0.1
    gen = torch.Generator().manual_seed(0)
    r = (1.0 + torch.randn(users, 1, generator=gen) + torch.randn(1, items, generator=gen)
         + torch.randn(users, items, generator=gen))
    kernel = SGLD(models.crossed_effects, step_size=step, local_step_size=local_step, num_steps=5,
                  local_samples="all", **FIXED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixingWarning)  # the 100 chains' ESS is what check() weighs
        mcmc = run(kernel, r, CHAINS, users_batch, items_batch, num_samples=400, warmup=200)
    samples = kernel.local_samples()
    draws = torch.cat([mcmc.get_samples()["mu"][:, :, None], samples["a"].transpose(1, 2),
                       samples["b"].reshape(-1, items, CHAINS).transpose(1, 2)], -1)
    mean, cov = exact.crossed_sgld_moments(r, users_batch, items_batch, step, local_step)
    check(draws, mean, cov.diagonal(), 0.0, "crossed plates vs the chain's exact law")
    precision, c = exact.crossed_potential(r, range(users), range(items))
    posterior_cov = torch.linalg.inv(precision)
    torch.testing.assert_close(mean, posterior_cov @ c)
    for shrink, allowed in ((10, 0.03), (100, 0.003)):
        _, small_cov = exact.crossed_sgld_moments(r, users_batch, items_batch, step / shrink, local_step / shrink)
        assert float((small_cov.diagonal() / posterior_cov.diagonal() - 1).abs().max()) < allowed
    with pytest.raises(AssertionError, match="variance"):
        check(draws, mean, posterior_cov.diagonal(), 0.0, "crossed plates vs the posterior")


def test_what_stays_unsupported_is_refused_naming_the_site():
    y = _data()
    with pytest.raises(NotImplementedError, match="control_variates.*'theta'.*use True"):
        run(SGLD(models.hierarchical_normal, control_variates={"mu": torch.zeros(1)}), y, 1, BATCH, num_samples=2,
            warmup=0)

    with pytest.raises(NotImplementedError, match="control_variates: True needs exactly one subsampled plate"):
        run(SGLD(nested, control_variates=True, step_size=0.01), y, num_samples=2, warmup=0)
    with pytest.raises(NotImplementedError, match="jit_compile.*'theta'"):
        run(SGLD(models.hierarchical_normal, jit_compile=True), y, 1, BATCH, num_samples=2, warmup=0)

    def only_local(y):
        with pyro.plate("groups", y.shape[1], subsample_size=BATCH) as idx:
            theta = pyro.sample("theta", dist.Normal(0.0, 1.0))
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y[0, idx])

    with pytest.raises(NotImplementedError, match="'theta'.*all local"):
        run(SGLD(only_local), y, num_samples=2, warmup=0)
    with pytest.raises(ValueError, match="Invalid local_samples"):
        SGLD(models.hierarchical_normal, local_samples="rows")
    with pytest.raises(ValueError, match="Invalid local_thin"):
        SGLD(models.hierarchical_normal, local_thin=0)


@pytest.mark.slow
@pytest.mark.parametrize("options", [{}, {"control_variates": True},
                                     {"control_variates": True, "exact_gaussian": True, "local_exact_gaussian": True}],
                         ids=["plain", "control_variates", "all_exact"])
def test_default_kernel_samples_the_hierarchical_posterior(options):
    """Warmup's choices (the globals' preconditioner and step, the locals' measured steps) against
    the exact posterior: each block's step follows a bias rule designed for a relative bias of
    target_bias on variances, which is the allowance. With local control variates too (their
    secants, anchors and noise measured where warmup moves them), and with every step exact on
    its Gaussian (the configuration of benchmarks/local_latents.py at 100,000 groups: on this model
    the globals' corrected gradient is exact and both blocks' conditionals are Gaussian, so the
    steps near 2 / curvature redraw each block; what is left of the allowance covers the measured
    reference curvatures)."""
    y = _data()
    kernel = SGLD(models.hierarchical_normal, num_steps=5, local_samples="all", **options)
    draws = _draws(kernel, y, num_samples=1500, warmup=200)
    mean, cov = exact.exact_moments(y)
    check(draws, mean, cov.diagonal(), kernel.target_bias, "default SGLD with local latents")


@pytest.mark.parametrize("name", ["SGNHT", "SGHMC", "PSGLD"])
def test_every_kernel_takes_local_latents(name):
    import pyro_sgmcmc.infer as infer

    kernel = getattr(infer, name)(models.hierarchical_normal)
    # 30 samples: every one of the 8 rows is visited (a row missed by 10 single-step samples of
    # minibatches of 2, probability 6%, has variance 0 by chance)
    mcmc = run(kernel, _data(), 1, BATCH, num_samples=30, warmup=20)
    assert bool(torch.isfinite(mcmc.get_samples()["mu"]).all())
    moments = kernel.local_moments()["theta"]
    assert bool((moments.variance > 0).all()) and kernel.diagnostics()["divergent steps"] == 0


def test_local_samples_and_globals_thinned_alike_feed_predictive():
    from pyro.infer import Predictive

    y = _data()
    kernel = SGLD(models.hierarchical_normal, local_samples="all", local_thin=2)
    mcmc = run(kernel, y, 1, BATCH, num_samples=6, warmup=10)
    samples = {**{k: v[::2] for k, v in mcmc.get_samples().items()}, **kernel.local_samples()}
    assert samples["mu"].shape == (3, 1) and samples["theta"].shape == (3, GROUPS, 1)
    # on the model without subsampling, every group's theta is the kept row
    trace = Predictive(models.hierarchical_normal, samples, return_sites=["theta", "y"])(y, 1, None)
    torch.testing.assert_close(trace["theta"].reshape(3, GROUPS, 1), samples["theta"])
    assert trace["y"].shape[0] == 3


@pytest.mark.filterwarnings("ignore:num_chains=2 is more than available_cpu")
def test_local_samples_by_chain_and_globals_thinned_alike_feed_arviz(monkeypatch):
    arviz = pytest.importorskip("arviz")
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 1)  # Pyro then runs the chains in sequence
    y = _data()
    kernel = SGLD(models.hierarchical_normal, local_samples="all", local_thin=2)
    mcmc = run(kernel, y, 1, BATCH, num_samples=6, warmup=10, num_chains=2)
    grouped = {k: v[:, ::2] for k, v in mcmc.get_samples(group_by_chain=True).items()}
    local = kernel.local_samples(group_by_chain=True)
    assert local["theta"].shape == (2, 3, GROUPS, 1)
    torch.testing.assert_close(local["theta"].reshape(6, GROUPS, 1), kernel.local_samples()["theta"])
    data = arviz.from_dict(posterior={k: v.numpy() for k, v in {**grouped, **local}.items()})
    assert data.posterior.sizes["chain"] == 2 and data.posterior.sizes["draw"] == 3
    assert data.posterior["theta"].shape == (2, 3, GROUPS, 1)


def test_svi_path_runs_the_same_chain_and_matches_its_exact_law():
    """SVI + AutoUnconstrainedDelta + SGLD, the tables masked to the minibatch's rows and at their
    own step: the kernels' blocked chain, against the same exact stationary law."""
    from pyro.infer import SVI, Trace_ELBO

    import pyro_sgmcmc.optim
    from pyro_sgmcmc.infer import AutoUnconstrainedDelta, SampleCollector, run_svi

    y = _data()
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoUnconstrainedDelta(models.hierarchical_normal)
    guide(y, CHAINS, BATCH)
    optim = pyro_sgmcmc.optim.SGLD(lambda name: {"lr": STEP, **guide.local_options(name, lr=LOCAL_STEP)})
    svi = SVI(models.hierarchical_normal, guide, optim, Trace_ELBO())
    # one step moves the minibatch's rows only (the optimizer holds the guide's live mask)
    before = guide.current_sample()["theta"]
    svi.step(y, CHAINS, BATCH)
    moved = (guide.current_sample()["theta"] != before).all(1)
    assert int(moved.sum()) == BATCH and bool(moved[guide._local_masks["theta"][:, 0].bool()].all())
    collector = run_svi(svi, 1250, SampleCollector(burn_in=250, thin=5), y, CHAINS, BATCH, progress_bar=False)
    samples = collector.samples
    draws = torch.cat([samples["mu"][:, :, None], samples["theta"].transpose(1, 2)], -1)
    mean, cov = exact.blocked_sgld_moments(y, BATCH, STEP, LOCAL_STEP)
    check(draws, mean, cov.diagonal(), 0.0, "SVI blocked SGLD vs its exact law")
    # a resumed optimizer still follows the guide's live mask (its saved mask is copied into it)
    resumed = pyro_sgmcmc.optim.SGLD(lambda name: {"lr": STEP, **guide.local_options(name, lr=LOCAL_STEP)})
    resumed.set_state(optim.get_state())
    svi = SVI(models.hierarchical_normal, guide, resumed, Trace_ELBO())
    for _ in range(3):
        before = guide.current_sample()["theta"]
        svi.step(y, CHAINS, BATCH)
        moved = (guide.current_sample()["theta"] != before).all(1)
        assert int(moved.sum()) == BATCH and bool(moved[guide._local_masks["theta"][:, 0].bool()].all())


def test_svi_without_the_tables_mask_warns_that_rows_drift():
    from pyro.infer import SVI, Trace_ELBO

    import pyro_sgmcmc.optim
    from pyro_sgmcmc.infer import AutoUnconstrainedDelta

    y = _data()
    pyro.clear_param_store()
    guide = AutoUnconstrainedDelta(models.hierarchical_normal)
    svi = SVI(models.hierarchical_normal, guide, pyro_sgmcmc.optim.SGLD({"lr": 0.01}), Trace_ELBO())
    svi.step(y, 1, BATCH)
    with pytest.warns(UserWarning, match="rows of the local site 'theta' outside the last minibatch"):
        svi.step(y, 1, BATCH)


def _logistic_matches_nuts(seed, num_samples, information, compare_sds=True):
    """A non-conjugate model: a random intercept per group (non-centred, local to the subsampled
    plate of groups), a constrained global scale, minibatches of 5 of 20 groups, against NUTS on
    the full data (tests/data/hierarchical_logistic_nuts.json). As in test_real_models: the
    standard error of each difference (ours from our ESS, NUTS's from its own) must be at most
    ``information`` NUTS sds; means within 4 of them plus 0.1 sd (sigma's posterior is skewed: the
    bias of the step moves its mean by a fraction of the variance bias), sds within 4 of theirs plus
    the step-size rule's target bias (on variances, so half of it on sds, doubled for the two blocks).
    ``seed`` draws the chain's start (init_to_uniform: log sigma up to 2, sigma up to 7) and its path.

    Warmup: from sigma near 7 the chain arrives in about 200 iterations (sigma moves only as the
    etas, tied to it, do; the rows' step is small where sigma is large): 600 let the rows' step be
    measured after arrival (0.05, the rule at a curvature near 4; 0.013 at 300, from a curvature of
    16 measured on the way in, and a fifth of the ESS)."""
    from real_models import reference

    x, y = models.hierarchical_logistic_data()
    kernel = SGLD(models.hierarchical_logistic, num_steps=5, target_bias=0.05, local_samples="all")
    pyro.set_rng_seed(seed)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=LOGISTIC_WARMUP, disable_progbar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixingWarning)  # the information check below is this test's own
        mcmc.run(x, y, x.shape[0], 5)
    # the rows' step held its rule at every globals probed after warmup
    assert not _local_step_problems(kernel)
    draws = models.hierarchical_logistic_draws({**mcmc.get_samples(), **kernel.local_samples()})
    print(f"seed {seed}: local step {kernel.diagnostics()['local step sizes']}")
    _compare_with_nuts(draws, reference("hierarchical_logistic"), information=information, mean_bias=0.1,
                       sd_bias=kernel.target_bias if compare_sds else None)


def _local_step_problems(kernel) -> list:
    """The kernel's mixing problems about the rows' step (LocalStepper.problems), not the others
    (the effective-sample-size problem also names local sites among its remedies)."""
    return [problem for problem in kernel.diagnostics()["mixing problems"]
            if problem.startswith("the rows of the local site")]


def _compare_with_nuts(draws, ref, information, mean_bias, sd_bias):
    """``draws [samples, k]`` (one chain) against a NUTS reference (``tests/data/*_nuts.json``):
    the standard error of each difference of means, ours from our ESS and NUTS's from its own,
    must be at most ``information`` NUTS sds (the check's resolution); the means must then agree
    within 4 of them plus ``mean_bias`` NUTS sds, the sds (unless ``sd_bias`` is None) within 4
    standard errors (delta method on the variances') plus ``sd_bias`` NUTS sds."""
    from test_real_models import thinned_ess

    nuts_mean, nuts_sd = torch.tensor(ref["mean"]), torch.tensor(ref["sd"])
    ess = thinned_ess(draws[None])
    stderr = torch.sqrt(draws.var(0) / ess + nuts_sd**2 / torch.tensor(ref["ess_mean"]))
    error = (draws.mean(0) - nuts_mean).abs()
    centred = (draws - draws.mean(0)) ** 2
    variance_stderr = torch.sqrt(centred.var(0) / thinned_ess(centred[None])
                                 + torch.tensor(ref["variance_sd"]) ** 2 / torch.tensor(ref["ess_variance"]))
    sd_stderr = variance_stderr / (2 * nuts_sd)  # delta method
    sd_error = (draws.std(0) - nuts_sd).abs()
    print(f"|mean error| / NUTS sd {[round(v, 3) for v in (error / nuts_sd).tolist()]}; its stderr / sd "
          f"{[round(v, 3) for v in (stderr / nuts_sd).tolist()]}; sd / NUTS sd "
          f"{[round(v, 3) for v in (draws.std(0) / nuts_sd).tolist()]}; its stderr / sd "
          f"{[round(v, 3) for v in (sd_stderr / nuts_sd).tolist()]}; ESS {[round(v) for v in ess.tolist()]}")
    assert bool((stderr <= information * nuts_sd).all()), f"too little information: {stderr / nuts_sd}"
    assert bool((error <= 4 * stderr + mean_bias * nuts_sd).all()), (error / nuts_sd, stderr / nuts_sd)
    if sd_bias is not None:
        assert bool((sd_error <= 4 * sd_stderr + sd_bias * nuts_sd).all()), (draws.std(0) / nuts_sd,
                                                                             sd_stderr / nuts_sd)


LOGISTIC_WARMUP = 600


@pytest.mark.slow
def test_hierarchical_logistic_regression_matches_nuts():
    """15,000 samples: sigma's ESS is near 1 in 100 (it moves only as the etas do), and its sd,
    of a skewed law whose tail the chain visits rarely, needs them (the first 7,000 of this chain
    give 0.79 NUTS sds with a standard error of 0.03: the variances' error bars are too small until
    the tail has been visited a few times; all 15,000 give 0.94)."""
    _logistic_matches_nuts(0, num_samples=15000, information=0.1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2])
def test_hierarchical_logistic_regression_matches_nuts_from_other_starts(seed):
    """The same check from other starts and paths, on the means (the bug this guards against: a
    random-effect scale collapsed during arrival, a step measured there, and a chain thrown out by
    it, depended on where the chain started; a collapsed sigma is many sds off): warmup's choices
    must hold wherever it begins. 4,000 samples resolve 0.2 NUTS sds."""
    _logistic_matches_nuts(seed, num_samples=4000, information=0.2, compare_sds=False)


# 8000 samples: the Monte Carlo error of every compared mean is then below the 0.1 NUTS sd the
# check needs
PMF_WARMUP, PMF_SAMPLES, PMF_STEPS = 500, 8000, 5


@pytest.mark.slow
def test_matrix_factorisation_matches_nuts():
    """Probabilistic matrix factorisation (mcmc_models.pmf, 40 users x 10 items, rank 2): the
    user factors local to the subsampled plate of users (minibatches of 10), the item factors and
    the noise sd global, against NUTS on the full data (tests/data/pmf_nuts.json, 2 chains). The
    factors are identified only up to a rotation (and the scale traded between u and v under the
    priors), so the comparison is on invariant quantities: predicted ratings u_i . v_j and sigma.

    Monte Carlo error: the standard error of each difference from the ESS of both chains, which
    must be at most 0.1 NUTS sds (the test can see a 10% error, as test_mcmc.check). Bias: each
    block's step follows a rule for a relative bias of ``target_bias`` on its conditional
    variances; sds are allowed ``target_bias`` (relative; half of it per block, two blocks), and
    means the same in sds (a relative bias t on the factors' (co)variances moves E[u_i . v_j] by
    t cov(u_i, v_j), a fraction t of the product's spread)."""
    from real_models import reference

    ratings = models.pmf_data()
    kernel = SGLD(models.pmf, num_steps=PMF_STEPS, target_bias=0.05, local_samples="all")
    pyro.set_rng_seed(0)
    mcmc = MCMC(kernel, num_samples=PMF_SAMPLES, warmup_steps=PMF_WARMUP, disable_progbar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixingWarning)  # the information check below is this test's own
        mcmc.run(ratings, 10)
    assert not _local_step_problems(kernel)
    samples = mcmc.get_samples()
    draws = models.pmf_draws(samples["v"], samples["sigma"], kernel.local_samples()["u"])
    _compare_with_nuts(draws, reference("pmf"), information=0.1, mean_bias=kernel.target_bias,
                       sd_bias=kernel.target_bias)


def test_slow_mixing_of_globals_tied_to_rows_names_the_minibatch_as_a_remedy():
    """Each row moves once every N/m steps and mu, tied to the rows' mean, relaxes at their pace:
    at N/m = 100 a short run has a handful of effective samples, and the warning says that a
    larger subsample_size is a remedy (a model without local sites is not told so: test_kernel)."""
    y = torch.randn(OBS, 2000, generator=torch.Generator().manual_seed(0)) + 1.0
    kernel = SGLD(models.hierarchical_normal, local_exact_gaussian=True)
    pyro.set_rng_seed(0)
    mcmc = MCMC(kernel, num_samples=300, warmup_steps=200, disable_progbar=True)
    with pytest.warns(MixingWarning, match="effective sample size.*a larger subsample_size"):
        mcmc.run(y, 1, 20)
        kernel.diagnostics()
