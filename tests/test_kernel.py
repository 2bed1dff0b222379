"""The MCMC kernels as a user meets them: no returned sample the chain would reject, a valid start,
options checked at construction, honest end-of-run warnings, continuing a run from a saved state."""

from __future__ import annotations

import io
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC

import mcmc_models as models
from pyro_sgmcmc.infer import KERNELS, PSGLD, SGHMC, SGLD, SGNHT, MixingWarning

FIXED = dict(adapt_step_size=False, adapt_mass_matrix=False)


def run(kernel, *args, num_samples=200, warmup=50, seed=0, **kwargs):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=True, **kwargs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MixingWarning)
        mcmc.run(*args)
    return mcmc


def nan_above_half(data):
    """A likelihood that is NaN for mu > 0.5: every sample must stay at or below it."""
    mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
    pyro.factor("cut", torch.where(mu > 0.5, torch.tensor(float("nan")), torch.tensor(0.0)))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=data)


@pytest.mark.parametrize("kernel_cls", list(KERNELS.values()))
def test_no_returned_sample_is_a_point_the_chain_rejects(kernel_cls):
    """The potential is evaluated where a step lands before the sample is returned; a landing in
    the NaN region is undone and counted. (The kernels used to return the landing point and test it
    at the next call, after MCMC had stored it: 11-47 of 1000 samples in the NaN region.)"""
    data = torch.full((20,), 0.45)
    mcmc = run(kernel_cls(nan_above_half), data, num_samples=600, warmup=100)
    mu = mcmc.get_samples()["mu"]
    assert bool(torch.isfinite(mu).all()) and float(mu.max()) <= 0.5
    assert mcmc.diagnostics()["divergent steps"]["chain 0"] > 0  # the boundary was hit, and counted


def test_a_potential_fn_with_a_nan_region_never_returns_a_sample_there():
    def potential(params):
        u = params["u"]
        return torch.where(u.abs().max() > 1.0, torch.tensor(float("nan")), 0.5 * (u**2).sum())

    mcmc = run(SGLD(potential_fn=potential, step_size=0.5, **FIXED), num_samples=300, warmup=0,
               initial_params={"u": torch.zeros(2)})
    samples = mcmc.get_samples()["u"]
    assert bool(torch.isfinite(samples).all()) and float(samples.abs().max()) <= 1.0
    assert len(mcmc.diagnostics()["divergences"]["chain 0"]) > 0


def nan_corner(data):
    """A 2-d model whose density is NaN where a + b > 1.2 (a quarter of init_to_uniform's box)."""
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    pyro.factor("cut", torch.where(a + b > 1.2, torch.tensor(float("nan")), torch.tensor(0.0)))
    pyro.sample("x", dist.Normal(a - b, 1.0), obs=data)


@pytest.mark.parametrize("seed", range(8))
def test_the_initial_point_is_valid(seed):
    """The init strategy is retried until the potential and its gradient are finite (as Pyro's
    initialize_model does): no chain starts, and stays, in the NaN region."""
    kernel = SGLD(nan_corner, step_size=1e-3, **FIXED)
    pyro.set_rng_seed(seed)
    kernel.setup(0, torch.tensor(0.3))
    start = kernel.initial_params
    assert float(start["a"] + start["b"]) <= 1.2


def test_no_valid_initial_point_is_a_clear_error():
    def nowhere(data):
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        pyro.factor("cut", torch.tensor(float("nan")) * mu)

    with pytest.raises(ValueError, match="Could not find a valid initial point in 100 tries"):
        run(SGLD(nowhere, step_size=1e-3), torch.tensor(0.0), num_samples=2, warmup=0)
    with pytest.raises(ValueError, match="Invalid initial_params: the potential energy or its gradient is not finite"):
        run(SGLD(potential_fn=lambda p: (p["u"] ** 2).sum() * float("nan"), step_size=1e-3), num_samples=2,
            warmup=0, initial_params={"u": torch.zeros(2)})


@pytest.mark.parametrize("make, match", [
    (lambda: SGLD(models.scalar_normal, lr=1e-3), "Invalid option 'lr' of SGLD: the kernel's step size is step_size"),
    (lambda: SGNHT(models.scalar_normal, diffusion_factr=2.0), "did you mean 'diffusion_factor'"),
    (lambda: SGLD(models.scalar_normal, max_plate_nesting=1), "need no max_plate_nesting"),
    (lambda: SGLD(models.scalar_normal, target_accept_prob=0.8), "target_bias"),
    (lambda: SGLD(models.scalar_normal, dense_mass=True), "full_mass=True"),
    (lambda: SGLD(models.scalar_normal, full_mass="no"), r"Invalid full_mass: 'no' \(must be True or False\)"),
    (lambda: SGLD(models.scalar_normal, jit_compile=1), "Invalid jit_compile"),
    (lambda: SGLD(models.scalar_normal, init_strategy=3), "Invalid init_strategy: 3"),
    (lambda: SGLD(models.scalar_normal, transforms=[1]), "Invalid transforms"),
    (lambda: SGLD(models.scalar_normal, num_steps=2.0), r"Invalid num_steps: 2.0 \(must be an integer >= 1\)"),
    (lambda: SGLD(models.scalar_normal, target_bias=2.0), "Invalid target_bias"),
    (lambda: SGLD(models.scalar_normal, temperature=float("inf")), "Invalid temperature"),
    (lambda: SGLD(models.scalar_normal, step_size=10**400), "overflows"),
    (lambda: SGNHT(models.scalar_normal, diffusion_factor=-1.0), "diffusion_factor"),
    (lambda: SGLD(models.scalar_normal, localization=-1.0), "Invalid localization"),
    (lambda: SGLD(models.scalar_normal, on_divergence="ignore"), "Invalid on_divergence: 'ignore'"),
    (lambda: SGLD(models.scalar_normal, stochastic_potential=True), "Invalid stochastic_potential"),
    (lambda: SGLD(potential_fn=lambda p: 0.0, control_variates=True), "Invalid control_variates"),
])
def test_options_are_checked_at_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_initial_params_must_be_a_dict_and_a_potential_a_tensor():
    kernel = SGLD(potential_fn=lambda p: (p["u"] ** 2).sum(), step_size=0.1)
    with pytest.raises(ValueError, match="Invalid initial_params"):
        kernel.initial_params = [torch.zeros(2)]
    with pytest.raises(TypeError, match="Invalid potential_fn: it returned float"):
        run(SGLD(potential_fn=lambda p: 1.0, step_size=0.1), num_samples=2, warmup=0, initial_params={"u": torch.zeros(1)})


@pytest.mark.slow
def test_a_self_subsampling_potential_fn_samples_its_target():
    """A potential_fn that draws its own minibatch (the user says so): its values are not
    compared between points, so warmup does not mistake its noise for jumps. The Gaussian
    posterior of a mean, N data points of variance 1, prior N(0, 10^2)."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randn(1000, generator=gen) + 2.0
    n, m = len(data), 50
    precision = n + 1 / 100
    mean = float(data.sum()) / precision

    def potential(params):
        batch = data[torch.randint(n, (m,))]
        mu = params["mu"]
        return n / m * 0.5 * ((batch - mu) ** 2).sum() + 0.5 * (mu / 10) ** 2

    kernel = SGLD(potential_fn=potential, stochastic_potential=True, num_steps=2)
    mcmc = run(kernel, num_samples=3000, warmup=300, initial_params={"mu": torch.tensor(0.0)})
    draws = mcmc.get_samples()["mu"].double()
    sd = precision**-0.5
    assert abs(float(draws.mean()) - mean) < 0.3 * sd
    # the noise of a minibatch gradient inflates SGLD's variance by lr * B / 4 (<= 2 target_bias by
    # the step-size rule); an estimate from 3000 correlated draws: within 35% of the exact sd
    assert 0.8 * sd < float(draws.std()) < 1.35 * sd
    assert mcmc.diagnostics()["warmup jumps undone"]["chain 0"] == 0


def test_a_singular_matrix_is_a_divergence():
    def potential(params):
        u = params["u"]
        if float(u.detach().abs().max()) > 1.5:
            torch.linalg.cholesky(torch.tensor([[1.0, 2.0], [2.0, 1.0]]))  # raises: not positive-definite
        return 0.5 * (u**2).sum()

    mcmc = run(SGLD(potential_fn=potential, step_size=0.5, **FIXED), num_samples=200, warmup=0,
               initial_params={"u": torch.zeros(2)})
    assert float(mcmc.get_samples()["u"].abs().max()) <= 1.5
    assert len(mcmc.diagnostics()["divergences"]["chain 0"]) > 0


def test_zero_curvature_at_the_start_is_not_an_error():
    def potential(params):  # flat for |u| < 3
        u = params["u"]
        return ((u - 3).relu() ** 2 + (-u - 3).relu() ** 2).sum()

    with pytest.warns(RuntimeWarning, match="Could not measure the curvature"):
        mcmc = run(SGLD(potential_fn=potential), num_samples=50, warmup=30, initial_params={"u": torch.zeros(2)})
    assert bool(torch.isfinite(mcmc.get_samples()["u"]).all())


def test_a_run_that_has_not_mixed_says_so_and_a_good_one_does_not():
    """A NUTS-sized budget on a logistic regression with 300 rows and minibatches of 30: the
    chain has barely moved, which the end of the run must say; a Gaussian posterior sampled on
    its full data by steps that are exact for it mixes, and nothing is said."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen)
    x[:, 1] = x[:, 0] + 0.05 * torch.randn(300, generator=gen)
    y = torch.bernoulli(torch.sigmoid(x @ torch.linspace(-1, 1, 8)), generator=gen)
    pyro.set_rng_seed(0)
    mcmc = MCMC(SGLD(models.logistic_regression), num_samples=300, warmup_steps=200, disable_progbar=True)
    with pytest.warns(MixingWarning, match="effective sample size") as record:
        mcmc.run(x, y, 30)
    assert "remedies" in str(record[0].message)
    assert "subsample_size" not in str(record[0].message)  # no local sites: the rows' pace is not the cause
    assert mcmc.diagnostics()["mixing problems"]["chain 0"]

    obs = torch.tensor(2.0)
    pyro.set_rng_seed(0)
    kernel = SGLD(models.gaussian_chain, full_mass=True, exact_gaussian=True)  # exact on a Gaussian: steps near 2
    mcmc = MCMC(kernel, num_samples=400, warmup_steps=200, disable_progbar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MixingWarning)
        mcmc.run(obs, 1)
    assert mcmc.diagnostics()["mixing problems"]["chain 0"] == []


def test_a_chain_that_does_not_move_says_so():
    """A step too small to change a float32 point: every sample is the same, the effective sample
    size and R-hat are 0 / 0, and the end of the run must still say that nothing was sampled."""
    potential = lambda params: 0.5 * (params["u"] ** 2).sum()  # noqa: E731
    pyro.set_rng_seed(0)
    mcmc = MCMC(SGLD(potential_fn=potential, step_size=1e-30, **FIXED), num_samples=100, warmup_steps=0,
                initial_params={"u": torch.ones(2)}, disable_progbar=True)
    with pytest.warns(MixingWarning, match="did not move") as record:
        mcmc.run()
    assert "remedies" in str(record[0].message)
    assert bool((mcmc.get_samples()["u"] == 1.0).all())


def test_a_chain_that_barely_moves_says_so():
    """A step of 1e-8 on a unit-scale posterior: 300 samples move about 2e-3 in all."""
    potential = lambda params: 0.5 * (params["u"] ** 2).sum()  # noqa: E731
    pyro.set_rng_seed(0)
    mcmc = MCMC(SGLD(potential_fn=potential, step_size=1e-8, **FIXED), num_samples=300, warmup_steps=0,
                initial_params={"u": torch.ones(2)}, disable_progbar=True)
    with pytest.warns(MixingWarning, match="effective sample size"):
        mcmc.run()


def test_a_chain_thrown_out_once_then_creeping_is_not_called_mixed():
    """The records of a chain thrown far out by one step, then drifting slowly: its variance is the
    one jump, so the raw effective sample size (about n/3) and split R-hat (about 1) call it mixed;
    on ranks it is a trend."""
    from pyro.ops.stats import effective_sample_size, split_gelman_rubin

    from pyro_sgmcmc.infer.kernel import ChainStats, MixingMonitor

    n = 300
    steps = torch.arange(n, dtype=torch.float64)
    potential = torch.where(steps < 2, 50.0, 1.8e14 - 4e9 * steps)
    coordinate = torch.where(steps < 2, 0.1, 1e10 + 1e5 * steps)
    raw = torch.stack([potential, coordinate], -1)[None]
    assert float(effective_sample_size(raw, 0, 1).min()) > 75 and float(split_gelman_rubin(raw, 0, 1).max()) < 1.1
    monitor = MixingMonitor(torch.zeros(1))
    monitor.records = list(raw[0])
    problems = monitor.problems(ChainStats(), exact=True, langevin=True, minibatches=False, dense=True)
    assert any("effective sample size" in problem for problem in problems)
    assert any("drifted" in problem for problem in problems)


def test_a_step_size_that_collapsed_during_warmup_says_so():
    """A potential finite only at the start: every step lands where it is infinite and is undone,
    and warmup's safety rule halves the step each time, 10 times in the last 10% of warmup after
    the last measurement."""
    potential = lambda params: torch.where(params["u"] == 0, 0.5 * params["u"] ** 2, torch.inf).sum()  # noqa: E731
    pyro.set_rng_seed(0)
    mcmc = MCMC(SGLD(potential_fn=potential), num_samples=10, warmup_steps=100, initial_params={"u": torch.zeros(1)},
                disable_progbar=True)
    with pytest.warns(MixingWarning, match="warmup ended with step size") as record:
        mcmc.run()
    message = str(record[0].message)
    assert "1024 times smaller" in message and "10 halvings" in message and "remedies" in message


def test_the_progress_bar_shows_the_acceptance_and_divergences():
    import json

    kernel = SGLD(models.scalar_normal, step_size=1e-3)
    run(kernel, torch.tensor([1.0, 2.0]), num_samples=5, warmup=2)
    shown = json.loads(json.dumps(kernel.logging()))
    assert set(shown) == {"step size", "divergences", "accept"}


@pytest.mark.parametrize("kernel_cls", [SGLD, SGNHT, SGHMC, PSGLD])
def test_a_run_continues_exactly_from_a_saved_state(kernel_cls, tmp_path):
    """200 samples in one run, or 100, a checkpoint (through torch.save and a weights-only load)
    and 100 more from a new kernel with no warmup: the same chain, bit for bit."""
    data = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0])
    whole = run(kernel_cls(models.scalar_normal), data, num_samples=200, warmup=60).get_samples()

    kernel = kernel_cls(models.scalar_normal)
    first = run(kernel, data, num_samples=100, warmup=60).get_samples()
    torch.save({"kernel": kernel.state_dict(), "rng": torch.get_rng_state()}, tmp_path / "chain.pt")
    pyro.set_rng_seed(123)  # anything in between
    saved = torch.load(tmp_path / "chain.pt", weights_only=True)
    resumed = kernel_cls(models.scalar_normal)
    resumed.load_state_dict(saved["kernel"])
    torch.set_rng_state(saved["rng"])
    mcmc = MCMC(resumed, num_samples=100, warmup_steps=0, disable_progbar=True)
    mcmc.run(data)
    second = mcmc.get_samples()
    for name in whole:
        assert torch.equal(torch.cat([first[name], second[name]]), whole[name])
    assert resumed.diagnostics()["step size"] == kernel.diagnostics()["step size"]


def test_no_warmup_needs_a_step_size_or_a_saved_state():
    data = torch.tensor([0.5, 1.5])
    with pytest.raises(ValueError, match="warmup_steps=0"):
        run(SGLD(models.scalar_normal), data, num_samples=2, warmup=0)
    mcmc = run(SGLD(models.scalar_normal, step_size=1e-3), data, num_samples=5, warmup=0)
    assert mcmc.get_samples()["loc"].shape == (5,)
    with pytest.raises(ValueError, match="Invalid state: it is a SGLD kernel's, not a SGNHT's"):
        kernel = SGLD(models.scalar_normal)
        run(kernel, data, num_samples=2, warmup=30)
        SGNHT(models.scalar_normal).load_state_dict(kernel.state_dict())


def test_help_reads_well():
    import pydoc

    for name, kernel_cls in KERNELS.items():
        doc = kernel_cls.__doc__.strip()
        assert doc[0].isupper() and "pyro.infer.MCMC" in doc and "Example::" in doc, name
        page = pydoc.render_doc(kernel_cls, renderer=pydoc.plaintext)
        assert f"pyro_sgmcmc.samplers.{name}" in page and "step_size" in page, name


@pytest.mark.parametrize("interruption", [KeyboardInterrupt, RuntimeError])
def test_draws_before_an_interruption_are_kept(interruption):
    from pyro_sgmcmc.infer import MCMC as KeepingMCMC

    def stop(kernel, params, stage, i):
        if stage == "Sample" and i == 50:
            raise interruption("stop")

    data = torch.tensor([0.5, 1.5, 1.0])
    mcmc = KeepingMCMC(SGLD(models.scalar_normal, step_size=1e-3), num_samples=200, warmup_steps=20,
                       disable_progbar=True, hook_fn=stop)
    with pytest.raises(interruption):
        mcmc.run(data)
    samples = mcmc.get_samples()
    assert samples["loc"].shape == (50,) and bool((samples["scale"] > 0).all())  # constrained, as usual
    assert mcmc.num_samples_drawn == 50 and isinstance(mcmc.interrupted, interruption)
    assert "divergences" in mcmc.diagnostics()
    mcmc.summary()


def test_the_mixing_report_offers_only_remedies_the_run_does_not_use():
    from pyro_sgmcmc.infer.kernel import ChainStats, MixingMonitor

    monitor = MixingMonitor(torch.zeros(2))
    walk = torch.randn(400, 3, generator=torch.Generator().manual_seed(0)).cumsum(0)  # a random walk: ESS ~ a few
    for row in walk:
        monitor.record(row[1:], row[0])
    (plain,) = monitor.problems(ChainStats(), exact=False, langevin=True, minibatches=True, dense=True)[:1]
    (with_cv,) = monitor.problems(ChainStats(), exact=False, langevin=True, minibatches=True, dense=True,
                                  control_variates=True)[:1]
    assert "effective sample size" in plain and "control_variates=True" in plain
    assert "effective sample size" in with_cv and "control_variates=True" not in with_cv
