"""Sample collection and the guide's refusals."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

import pyro_sgmcmc.optim as optim
from pyro_sgmcmc.infer import AutoUnconstrainedDelta, SampleCollector, run_svi


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


def test_local_latents_in_subsampled_plates_are_refused_clearly():
    def local_model(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", 100, subsample_size=10) as idx:
            z = pyro.sample("z", dist.Normal(mu, 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=data[idx])

    pyro.clear_param_store()
    guide = AutoUnconstrainedDelta(local_model)
    with pytest.raises(NotImplementedError, match="'z' is local to the subsampled plate 'rows'"):
        guide(torch.randn(100))


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
