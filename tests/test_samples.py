"""Sample collection and the guide's refusals."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_sgmcmc.optim as optim
from pyro_sgmcmc.infer import AutoUnconstrainedDelta, SampleCollector, run_svi
from pyro_sgmcmc.infer.samples import log_likelihood


def test_burn_in_and_thinning():
    collector = SampleCollector(burn_in=3, thin=2)
    kept = [collector({"x": torch.tensor(float(i))}) for i in range(10)]
    assert kept == [False, False, False, True, False, True, False, True, False, True]
    assert collector.samples["x"].tolist() == [3.0, 5.0, 7.0, 9.0]
    assert collector.num_samples == 4 and collector.steps == 10


def test_moments_mode_matches_the_stored_samples():
    gen = torch.Generator().manual_seed(0)
    draws = [{"a": torch.randn(3, generator=gen), "b": torch.randn(2, 2, generator=gen)} for _ in range(200)]
    full, light = SampleCollector(burn_in=10), SampleCollector(burn_in=10, keep="moments")
    for d in draws:
        full(d), light(d)
    for site in ("a", "b"):
        assert torch.allclose(full.mean[site], light.mean[site])
        assert torch.allclose(full.variance[site], light.variance[site])
    with pytest.raises(RuntimeError, match="keep='moments'"):
        light.samples


@pytest.mark.parametrize("kwargs, match", [
    (dict(burn_in=-1), "Invalid burn_in"), (dict(thin=0), "Invalid thin"), (dict(keep="some"), "Invalid keep"),
])
def test_bad_collector_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SampleCollector(**kwargs)


def model(data):
    p = pyro.sample("p", dist.Beta(2.0, 2.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Bernoulli(p), obs=data)


def test_ctrl_c_keeps_what_was_collected():
    pyro.clear_param_store()
    guide = AutoUnconstrainedDelta(model)
    svi = SVI(model, guide, optim.SGLD({"lr": 0.01}), Trace_ELBO())
    calls = {"n": 0}
    step = svi.step

    def interrupted_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    svi.step = interrupted_step
    data = torch.tensor([1.0, 0.0, 1.0])
    with pytest.warns(UserWarning, match="interrupted after 7 steps"):
        collector = run_svi(svi, 100, SampleCollector(burn_in=2), data, progress_bar=False)
    assert collector.samples["p"].shape == (5,)

    # any other exception propagates, and the collector the caller holds keeps its samples
    calls["n"] = 0
    mine = SampleCollector()

    def failing_step(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("boom")
        return step(*args, **kwargs)

    svi.step = failing_step
    with pytest.raises(RuntimeError, match="boom"):
        run_svi(svi, 100, mine, data, progress_bar=False)
    assert mine.samples["p"].shape == (3,)


def test_samples_convert_to_arviz():
    arviz = pytest.importorskip("arviz")
    collector = SampleCollector()
    for i in range(5):
        collector({"w": torch.full((2,), float(i)), "s": torch.tensor(1.0 + i)})
    data = collector.to_arviz()
    assert isinstance(data, arviz.InferenceData)
    assert data.posterior["w"].shape == (1, 5, 2)
    assert float(arviz.summary(data, var_names=["s"])["mean"].iloc[0]) == 3.0


def test_local_latents_get_a_table_and_two_subsampled_plates_are_refused_clearly():
    def local_model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", 100, subsample_size=10) as idx:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])

    def two_plates(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", 100, subsample_size=10, dim=-1) as idx:
            with pyro.plate("cols", 20, subsample_size=5, dim=-2) as jdx:
                z = pyro.sample("z", dist.Normal(mu, 1.0))
                pyro.sample("x", dist.Normal(z, 1.0), obs=data[jdx][:, idx])

    pyro.clear_param_store()
    guide = AutoUnconstrainedDelta(local_model)
    assert guide(torch.randn(100))["z"].shape == (10,)
    assert guide.current_sample(torch.randn(100))["z"].shape == (100,)
    pyro.clear_param_store()
    guide = AutoUnconstrainedDelta(two_plates)
    with pytest.raises(NotImplementedError, match="'z' is local to 2 subsampled plates"):
        guide(torch.randn(20, 100))


def test_global_latents_with_subsampled_likelihood_are_fine():
    def global_model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
        with pyro.plate("rows", len(data), subsample_size=10) as idx:
            pyro.sample("x", dist.Normal(mu, 1.0), obs=data[idx])

    pyro.clear_param_store()
    guide = AutoUnconstrainedDelta(global_model)
    svi = SVI(global_model, guide, optim.SGLD({"lr": 1e-4}), Trace_ELBO())
    svi.step(torch.randn(100))


def test_discrete_latents_and_models_without_latents_are_refused():
    def discrete(data):
        k = pyro.sample("k", dist.Categorical(torch.ones(3)))
        pyro.sample("x", dist.Normal(k.float(), 1.0), obs=data)

    pyro.clear_param_store()
    with pytest.raises(ValueError, match="'k' is discrete"):
        AutoUnconstrainedDelta(discrete)(torch.tensor(0.0))

    def no_latents(data):
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=data)

    with pytest.raises(ValueError, match="no latent sites"):
        AutoUnconstrainedDelta(no_latents)(torch.tensor(0.0))


@pytest.mark.filterwarnings("ignore:var\\(\\)")
def test_one_sample_has_a_mean_and_no_variance_in_both_modes():
    full, light = SampleCollector(), SampleCollector(keep="moments")
    full({"a": torch.tensor([1.0, 2.0])}), light({"a": torch.tensor([1.0, 2.0])})
    for collector in (full, light):
        assert collector.mean["a"].tolist() == [1.0, 2.0]
        assert bool(collector.variance["a"].isnan().all())


@pytest.mark.parametrize("sites", ["p", ["p"], ("p",)])
def test_sites_take_a_name_or_a_list_of_names(sites):
    collector = SampleCollector(sites=sites)
    collector({"p": torch.tensor(0.5), "q": torch.tensor(1.0)})
    assert set(collector.samples) == {"p"}


def test_a_site_name_is_matched_exactly_not_as_a_substring():
    collector = SampleCollector(sites="mu")
    collector({"mu": torch.tensor(0.0), "m": torch.tensor(1.0), "u": torch.tensor(2.0)})
    assert set(collector.samples) == {"mu"}


def test_unknown_sites_are_refused_with_the_closest_name_before_burn_in():
    pyro.clear_param_store()
    guide = AutoUnconstrainedDelta(model)
    svi = SVI(model, guide, optim.SGLD({"lr": 0.01}), Trace_ELBO())
    data = torch.tensor([1.0, 0.0, 1.0])
    collector = SampleCollector(burn_in=100, sites=["p", "pp"])
    with pytest.raises(ValueError, match=r"Invalid sites: 'pp' \(must be one of 'p'\); did you mean 'p'\?"):
        run_svi(svi, 200, collector, data, progress_bar=False)
    assert collector.steps == 0
    with pytest.raises(ValueError, match=r"Invalid sites: 'nope' \(must be one of 'p'\)$"):
        run_svi(svi, 200, SampleCollector(sites=["nope"]), data, progress_bar=False)


@pytest.mark.parametrize("sites", [3, [], ["p", 1], {"p": 1}])
def test_sites_of_the_wrong_type_are_refused(sites):
    with pytest.raises(ValueError, match="Invalid sites"):
        SampleCollector(sites=sites)


def test_to_arviz_without_arviz_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "arviz", None)  # an import of arviz now raises ImportError
    collector = SampleCollector()
    collector({"p": torch.tensor(0.5)})
    with pytest.raises(ImportError, match=r"pip install 'pyro_sgmcmc\[arviz\]'"):
        collector.to_arviz()


# ---------------------------------------------------------------- pointwise log-likelihood


def regression(x, y, batch=None):
    w = pyro.sample("w", dist.Normal(0.0, 2.0).expand([2]).to_event(1))
    with pyro.plate("data", len(y), subsample_size=batch) as idx:
        pyro.sample("y", dist.Normal(x[idx] @ w, 1.0), obs=y[idx])


def regression_data(n: int = 100, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.stack([torch.ones(n), torch.randn(n, generator=gen)], -1)
    return x, x @ torch.tensor([0.5, -1.0]) + torch.randn(n, generator=gen)


@pytest.mark.parametrize("batch", [30, 50, 99])
def test_log_likelihood_walks_the_subsampled_plate_in_full(batch):
    """With a subsampled plate, every row's log density, unscaled, once per draw: N columns (the
    last piece padded when the batch does not divide N), the same as without subsampling."""
    x, y = regression_data(103)
    draws = {"w": torch.randn(7, 2)}
    pointwise = log_likelihood(regression, draws, x, y, batch)["y"]
    assert pointwise.shape == (7, 103)
    full = log_likelihood(regression, draws, x, y)["y"]
    assert torch.allclose(pointwise, full)
    exact = dist.Normal(draws["w"] @ x.T, 1.0).log_prob(y)
    assert torch.allclose(pointwise, exact, atol=1e-5)


def test_log_likelihood_keeps_other_plates_and_sites_outside_the_plate():
    """A chain-vectorised model (plate of chains at dim -1, data at dim -2) keeps both
    dimensions; an observed site outside the subsampled plate is evaluated once per draw."""
    from mcmc_models import linear_regression

    x, y = regression_data(40)
    draws = {"w": torch.randn(5, 3, 2)}  # 5 draws of 3 chains
    pointwise = log_likelihood(linear_regression, draws, x, y, 3, 15)["y"]
    assert pointwise.shape == (5, 40, 3)
    assert torch.allclose(pointwise, log_likelihood(linear_regression, draws, x, y, 3)["y"])

    def with_global_observation(x, y, batch=None):
        regression(x, y, batch)
        pyro.sample("anchor", dist.Normal(0.0, 1.0), obs=torch.tensor(0.5))

    out = log_likelihood(with_global_observation, {"w": torch.randn(4, 2)}, x, y, 10)
    assert out["y"].shape == (4, 40) and out["anchor"].shape == (4,)
    assert torch.allclose(out["anchor"], dist.Normal(0.0, 1.0).log_prob(torch.tensor(0.5)).expand(4))


def test_log_likelihood_refuses_what_it_cannot_evaluate():
    x, y = regression_data(20)
    with pytest.raises(ValueError, match=r"no draws of the latent sites \['w'\]"):
        log_likelihood(regression, {"other": torch.zeros(3)}, x, y)
    with pytest.raises(ValueError, match="same leading dimension"):
        log_likelihood(regression, {"w": torch.zeros(3, 2), "v": torch.zeros(4)}, x, y)

    def two_plates(x, y):
        w = pyro.sample("w", dist.Normal(0.0, 1.0))
        with pyro.plate("a", 10, subsample_size=5, dim=-1), pyro.plate("b", 10, subsample_size=5, dim=-2):
            pyro.sample("y", dist.Normal(w, 1.0), obs=torch.zeros(5, 5))

    with pytest.raises(NotImplementedError, match="more than one subsampled plate"):
        log_likelihood(two_plates, {"w": torch.zeros(2)}, x, y)

    def no_data():
        pyro.sample("w", dist.Normal(0.0, 1.0))

    with pytest.raises(ValueError, match="no observed sites"):
        log_likelihood(no_data, {"w": torch.zeros(2)})


def test_to_arviz_after_run_svi_has_the_full_data_log_likelihood():
    arviz = pytest.importorskip("arviz")
    x, y = regression_data(60)
    pyro.clear_param_store()
    svi = SVI(regression, AutoUnconstrainedDelta(regression), optim.SGLD({"lr": 1e-3}), Trace_ELBO())
    collector = run_svi(svi, 30, SampleCollector(burn_in=10), x, y, 20, progress_bar=False)
    data = collector.to_arviz()
    assert data.log_likelihood["y"].shape == (1, 20, 60)  # N columns, not the batch size
    assert "log_likelihood" not in collector.to_arviz(log_likelihood=False).groups()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ may doubt 20 draws of a chain still arriving
        assert math.isfinite(arviz.waic(data).elpd_waic)


# ---------------------------------------------------------------- LOO and WAIC against NUTS


def elpd_with_mcse(pointwise: torch.Tensor) -> dict[str, tuple[float, float]]:
    """``{"loo" | "waic": (elpd, Monte Carlo standard error)}`` of a log-likelihood
    [chains, draws, N], the standard error from each estimator's influence function per draw
    (delta method: importance-sampling LOO, ``sum_i (1 - w_si / mean_s w_si)`` with
    ``w = 1 / p``; WAIC, ``sum_i (p_si / mean_s p_si - 1 - ((l_si - mean_s l_si)^2 - var_s l_si))``)
    and its effective sample size (:func:`pyro.ops.stats.effective_sample_size`)."""
    from pyro.ops.stats import effective_sample_size

    ll = pointwise.double()
    draws = (0, 1)
    p, w = ll.exp(), (-ll).exp()
    p_mean, w_mean, l_mean, l_var = p.mean(draws), w.mean(draws), ll.mean(draws), ll.var(draws)
    influence = {
        "loo": (1 - w / w_mean).sum(-1),
        "waic": (p / p_mean - 1 - ((ll - l_mean) ** 2 - l_var)).sum(-1),
    }
    values = {"loo": float(-w_mean.log().sum()), "waic": float((p_mean.log() - l_var).sum())}
    out = {}
    for name, phi in influence.items():
        ess = float(effective_sample_size(phi, chain_dim=0, sample_dim=1))
        out[name] = values[name], float(phi.std()) / max(ess, 1.0) ** 0.5
    return out


class Reference:
    """NUTS on the regression (full data), its log-likelihood and elpd, and the elpd of its draws
    widened about their mean (variance times ``1 + r``): the elpd's sensitivity to a relative
    variance bias ``r`` of a sampler."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        from pyro.infer import MCMC, NUTS

        self.x, self.y = x, y
        pyro.set_rng_seed(0)
        mcmc = MCMC(NUTS(regression), num_samples=800, warmup_steps=200, disable_progbar=True)
        mcmc.run(x, y)
        self.draws = mcmc.get_samples()["w"]
        self.elpd = elpd_with_mcse(log_likelihood(regression, {"w": self.draws}, x, y)["y"][None])

    def widened(self, r: float) -> dict[str, float]:
        mean = self.draws.mean(0)
        draws = mean + (self.draws - mean) * (1 + r) ** 0.5
        pointwise = log_likelihood(regression, {"w": draws}, self.x, self.y)["y"][None]
        return {name: value for name, (value, _) in elpd_with_mcse(pointwise).items()}


def check_elpd(data, reference: Reference, rel_var_bias: float, what: str) -> None:
    """``arviz.loo`` and ``arviz.waic`` of an SG-MCMC run within 4 Monte Carlo standard errors (of
    the run and of NUTS) plus the elpd shift of the sampler's known variance bias of NUTS's; and a
    posterior twice too wide would have failed."""
    import arviz

    pointwise = torch.as_tensor(data.log_likelihood["y"].values)
    assert pointwise.shape[-1] == len(reference.y)
    ours = elpd_with_mcse(pointwise)
    biased, wide = reference.widened(rel_var_bias), reference.widened(1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # ArviZ's own advice on the estimators
        found = {"loo": arviz.loo(data).elpd_loo, "waic": arviz.waic(data).elpd_waic}
    for name in ("loo", "waic"):
        ref, ref_se = reference.elpd[name]
        assert found[name] == pytest.approx(ours[name][0], abs=0.05)  # ArviZ's PSIS-LOO and WAIC
        tolerance = 4 * (ours[name][1] ** 2 + ref_se**2) ** 0.5 + abs(biased[name] - ref)
        assert abs(found[name] - ref) <= tolerance, f"{what} {name}: {found[name]} vs NUTS {ref} +- {tolerance}"
        assert abs(wide[name] - ref) > tolerance, f"{what} {name}: the test cannot see a posterior twice too wide"


@pytest.fixture(scope="module")
def reference() -> Reference:
    return Reference(*regression_data())


@pytest.mark.slow
def test_loo_and_waic_of_an_svi_run_match_nuts(reference):
    """SGLD through SVI on minibatches of 50 of 100 rows: ``to_arviz()`` holds the full-data
    log-likelihood, and LOO/WAIC agree with NUTS's. Known bias: SGLD's stationary variance is high
    by about ``lr (lambda + B) / 4`` (posterior curvature lambda, minibatch gradient noise B at the
    posterior mean)."""
    x, y = reference.x, reference.y
    batch, lr = 50, 1e-3
    precision = x.T @ x + torch.eye(2) / 4
    mean = torch.linalg.solve(precision, x.T @ y)
    per_row = x * (y - x @ mean)[:, None]  # each row's gradient of the log-likelihood at the mean
    noise = len(y) ** 2 / batch * (len(y) - batch) / (len(y) - 1) * torch.linalg.eigvalsh(torch.cov(per_row.T)).max()
    rel_var_bias = lr * float(torch.linalg.eigvalsh(precision).max() + noise) / 4
    pyro.clear_param_store()
    pyro.set_rng_seed(1)
    svi = SVI(regression, AutoUnconstrainedDelta(regression), optim.SGLD({"lr": lr}), Trace_ELBO())
    collector = run_svi(svi, 6500, SampleCollector(burn_in=500, thin=6), x, y, batch, progress_bar=False)
    check_elpd(collector.to_arviz(), reference, rel_var_bias, "SVI")


@pytest.mark.slow
def test_loo_and_waic_of_an_mcmc_run_match_nuts(reference):
    """``MCMC(pyro_sgmcmc.infer.SGLD(model))`` on minibatches of 50 of 100 rows, converted as
    :func:`~pyro_sgmcmc.infer.samples.log_likelihood` documents (``from_pyro`` without its
    log-likelihood, which would replay one minibatch, plus ours); LOO/WAIC agree with NUTS's.
    Known bias: the kernel's target_bias on the variances, with twice that allowed (as in
    test_mcmc)."""
    import arviz
    from pyro.infer import MCMC

    from pyro_sgmcmc.infer import SGLD
    x, y = reference.x, reference.y
    pyro.set_rng_seed(2)
    kernel = SGLD(regression, full_mass=True, exact_gaussian=True, control_variates=True)
    mcmc = MCMC(kernel, num_samples=1000, warmup_steps=300, disable_progbar=True)
    mcmc.run(x, y, 50)
    pointwise = log_likelihood(regression, mcmc.get_samples(), x, y, 50)
    assert pointwise["y"].shape == (1000, len(y))
    data = arviz.from_pyro(mcmc, log_likelihood=False)
    data.add_groups(log_likelihood={k: v.reshape(mcmc.num_chains, -1, *v.shape[1:]).numpy() for k, v in pointwise.items()})
    check_elpd(data, reference, 2 * kernel.target_bias, "MCMC")
