"""SG-MCMC kernels in pyro.infer.MCMC: exact posteriors (with and without subsampling) and Pyro's
MCMC API patterns.

Exact-posterior tolerances: 4 Monte Carlo standard errors (ESS from Pyro, all chains) plus the
known bias, written out per case. For SGLD on a target of curvature lam with gradient noise of
variance B per evaluation (B = 0 on full data; with minibatches of m out of N,
B = N^2 / m * (N - m) / (N - 1) * var_i(grad_i)), the stationary variance of a Gaussian target is
inflated by about lr * (lam + B) / 4 (relative): the O(lr) discretisation bias plus the minibatch
noise, which SGLD does not correct.
"""

from __future__ import annotations

import io
import contextlib

import pyro
import pytest
import torch
from pyro.infer import MCMC, Predictive
from pyro.ops.stats import effective_sample_size

import mcmc_models as models
from pyro_sgmcmc.infer import PSGLD, SGHMC, SGLD, SGNHT, SGMCMCKernel


def run(kernel, *args, num_samples=1500, warmup=300, seed=0, **kwargs):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=True, **kwargs)
    mcmc.run(*args)
    return mcmc


def check(draws, mean, var, rel_bias, what):
    """draws [samples, chains, ...]: per-component mean and variance within MC error + bias.

    The chains of one model share each step's minibatch, so they are not independent: the
    standard error comes from the series of chain averages (its own ESS), which carries their
    correlation, and is never taken below the independent-chains value."""
    x = draws.double().transpose(0, 1)
    for f, exact, name in ((x, mean, "mean"), ((x - mean) ** 2, var, "variance")):
        est = f.mean((0, 1))
        ess = effective_sample_size(f, chain_dim=0, sample_dim=1).clamp(min=1)
        averages = f.mean(0, keepdim=True)  # [1, samples, ...]
        ess_avg = effective_sample_size(averages, chain_dim=0, sample_dim=1).clamp(min=1)
        stderr = torch.maximum(f.std((0, 1)) / ess.sqrt(), averages.std((0, 1)) / ess_avg.sqrt())
        scale = var.sqrt() if name == "mean" else var
        # a chain still drifting (or stuck) has a huge standard error, which would excuse any
        # error: the test must be able to see a 10% error (of the sd, or of the variance)
        assert bool((stderr <= 0.1 * scale).all()), f"{what} {name}: too little information (stderr {stderr})"
        bias = rel_bias * (var if name == "variance" else var.sqrt())
        assert bool(((est - exact).abs() <= 4 * stderr + bias).all()), (
            f"{what} {name}: est {est}, exact {exact}, stderr {stderr}, bias allowance {bias}")


CHAINS = 200
FIXED = dict(adapt_step_size=False, adapt_mass_matrix=False)  # the bias allowances need a known step size


@pytest.mark.slow
@pytest.mark.parametrize("batch", [None, 15])
def test_beta_bernoulli_constrained_with_and_without_subsampling(batch):
    n, a, b = 60, 41.0, 21.0
    mean = torch.tensor(a / (a + b), dtype=torch.float64)
    var = torch.tensor(a * b / ((a + b) ** 2 * (a + b + 1)), dtype=torch.float64)
    lr = 0.002
    lam = (a + b) / 4  # curvature in logit space: (a + b) p (1 - p) <= (a + b) / 4
    big_b = 0.0 if batch is None else n**2 / batch * (n - batch) / (n - 1) * (40 * 20 / 60**2)
    mcmc = run(SGLD(models.beta_bernoulli, step_size=lr, num_steps=5, **FIXED), models.BERNOULLI, CHAINS, batch)
    check(mcmc.get_samples()["p"], mean, var, lr * (lam + big_b) / 4, f"SGLD batch={batch}")


def _regression_data(n=400, d=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = x @ torch.tensor([1.0, -0.5, 0.25]) + torch.randn(n, generator=gen)
    precision = x.T @ x + torch.eye(d) / 100
    cov = torch.linalg.inv(precision).double()
    return x, y, (cov @ (x.T @ y).double()), cov, precision.double()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["SGLD", "SGNHT"])
def test_bayesian_linear_regression_on_minibatches(name):
    x, y, mean, cov, precision = _regression_data()
    n, batch = len(y), 100
    lam = float(torch.linalg.eigvalsh(precision).max())
    if name == "SGLD":
        lr = 0.02 / lam
        # per-datum gradient variance ~ E[x^2 r^2] ~ 1 (unit features and noise)
        big_b = n**2 / batch * (n - batch) / (n - 1) * 1.0
        kernel, rel_bias = SGLD(models.linear_regression, step_size=lr, num_steps=5, **FIXED), lr * (lam + big_b) / 4
    else:
        # the thermostat absorbs the minibatch noise; bias about h * xi / 2 with xi ~ A + h B / 2
        h = 0.1 / lam**0.5
        big_b = n**2 / batch * (n - batch) / (n - 1)
        kernel = SGNHT(models.linear_regression, step_size=h, num_steps=10, diffusion_factor=1.0, **FIXED)
        rel_bias = h * (1.0 + h * big_b / 2) / 2
    mcmc = run(kernel, x, y, CHAINS, batch, warmup=400)
    draws = mcmc.get_samples()["w"]  # [samples, chains, d]
    check(draws, mean, cov.diagonal(), rel_bias, name)


@pytest.mark.slow
def test_gaussian_chain_posterior():
    # joint precision of (mu_0, mu_1, mu_2) given y: tridiagonal, exact posterior by solving it
    obs = torch.tensor(2.0)
    prec = torch.tensor([[2.0, -1.0, 0.0], [-1.0, 2.0, -1.0], [0.0, -1.0, 2.0]], dtype=torch.float64)
    cov = torch.linalg.inv(prec)
    mean = cov @ torch.tensor([0.0, 0.0, 2.0], dtype=torch.float64)
    lr = 0.02
    lam = float(torch.linalg.eigvalsh(prec).max())
    mcmc = run(SGLD(models.gaussian_chain, step_size=lr, num_steps=5, **FIXED), obs, CHAINS)
    samples = mcmc.get_samples()
    draws = torch.stack([samples[f"mu_{k}"] for k in range(3)], -1)
    check(draws, mean, cov.diagonal(), lr * lam / 4, "Gaussian chain")


# ----------------------------------------------------------------------- MCMC API patterns


@pytest.mark.parametrize("num_chains", [1, 2])
def test_sample_shapes_and_group_by_chain(num_chains):
    data = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0])
    mcmc = run(SGLD(models.scalar_normal, step_size=1e-3), data, num_samples=20, warmup=5,
               num_chains=num_chains, mp_context="spawn" if num_chains > 1 else None)
    samples = mcmc.get_samples()
    assert samples["loc"].shape == (20 * num_chains,) and bool((samples["scale"] > 0).all())
    grouped = mcmc.get_samples(group_by_chain=True)
    assert grouped["loc"].shape == (num_chains, 20)
    diagnostics = mcmc.diagnostics()
    assert set(diagnostics["divergences"]) == {f"chain {i}" for i in range(num_chains)}
    assert "r_hat" in diagnostics["loc"]


def test_sequential_runs_with_the_same_seed_agree_and_setup_resets():
    data = torch.tensor([0.5, 1.5, 1.0])
    kernel = SGNHT(models.scalar_normal, step_size=1e-2)
    a = run(kernel, data, num_samples=30, warmup=10).get_samples()
    b = run(kernel, data, num_samples=30, warmup=10).get_samples()  # the same kernel object again
    assert torch.equal(a["loc"], b["loc"]) and torch.equal(a["scale"], b["scale"])


def test_hooks_save_params_and_predictive():
    data = torch.tensor([0.5, 1.5, 1.0])
    calls = []
    mcmc = run(SGLD(models.scalar_normal, step_size=1e-3), data, num_samples=10, warmup=4,
               hook_fn=lambda kernel, params, stage, i: calls.append((stage, i)), save_params=["loc"])
    assert calls[:4] == [("Warmup", i) for i in range(4)] and calls[4] == ("Sample", 0) and len(calls) == 14
    assert set(mcmc.get_samples()) == {"loc"}
    mcmc = run(SGLD(models.scalar_normal, step_size=1e-3), data, num_samples=10, warmup=4)
    predictive = Predictive(models.scalar_normal, posterior_samples=mcmc.get_samples())
    assert predictive(data)["x"].shape == (10, 3)


def test_summary_reports_divergences_and_nothing_nonfinite_enters_the_chain():
    # a potential that is NaN beyond |u| > 1: with large steps, many proposals land there
    def potential(params):
        u = params["u"]
        value = 0.5 * (u**2).sum()
        return torch.where(u.abs().max() > 1.0, torch.tensor(float("nan")), value)

    kernel = SGLD(potential_fn=potential, step_size=0.5, **FIXED)
    mcmc = run(kernel, num_samples=200, warmup=50, initial_params={"u": torch.zeros(2)})
    samples = mcmc.get_samples()["u"]
    assert bool(torch.isfinite(samples).all()) and float(samples.abs().max()) <= 1.0
    divergences = mcmc.diagnostics()["divergences"]["chain 0"]
    assert len(divergences) > 0 and all(0 <= i < 200 for i in divergences)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        mcmc.summary()
    assert f"Number of divergences: {len(divergences)}" in out.getvalue()

    with pytest.raises(RuntimeError, match="Divergence at iteration"):
        run(SGLD(potential_fn=potential, step_size=0.5, on_divergence="raise", **FIXED), num_samples=200, warmup=0,
            initial_params={"u": torch.zeros(2)})


def test_logging_is_cheap_and_json_serialisable():
    import json

    kernel = SGLD(models.scalar_normal, step_size=1e-3)
    run(kernel, torch.tensor([1.0]), num_samples=3, warmup=1)
    assert set(json.loads(json.dumps(kernel.logging()))) == {"step size", "divergences", "accept"}


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: SGLD(), ValueError, "exactly one of model and potential_fn"),
        (lambda: SGLD(models.scalar_normal, potential_fn=lambda p: 0), ValueError, "exactly one"),
        (lambda: SGLD(models.scalar_normal, step_size=-1.0), ValueError, "Invalid step_size: -1.0"),
        (lambda: SGLD(models.scalar_normal, adapt_step_size=False), ValueError, "Invalid step_size: None"),
        (lambda: SGLD(models.scalar_normal, target_bias=0.0), ValueError, "Invalid target_bias"),
        (lambda: SGLD(models.scalar_normal, temperature=0.0), ValueError, "Invalid temperature"),
        (lambda: SGLD(models.scalar_normal, num_steps=0), ValueError, "Invalid num_steps"),
        (lambda: SGLD(models.scalar_normal, on_divergence="ignore"), ValueError, "Invalid on_divergence"),
        (lambda: SGLD(models.scalar_normal, jit_compile="yes"), ValueError, "jit_compile"),
        (lambda: SGLD(models.scalar_normal, mass_rank=-1), ValueError, r"Invalid mass_rank: -1 \(must be an integer >= 0\)"),
        (lambda: SGLD(models.scalar_normal, mass_rank=2, full_mass=True), ValueError, "full_mass=True or mass_rank"),
        (lambda: SGLD(models.scalar_normal, step_size_schedule=3), ValueError, "Invalid step_size_schedule"),
    ],
)
def test_bad_kernel_arguments(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_discrete_local_and_empty_models_are_refused():
    import pyro.distributions as dist

    def discrete():
        k = pyro.sample("k", dist.Bernoulli(0.5))
        pyro.sample("x", dist.Normal(k, 1.0), obs=torch.tensor(0.0))

    def local(data):  # local to two subsampled plates: refused (one local plate is supported)
        mu = pyro.sample("mu", dist.Normal(0.0, 1.0))
        with pyro.plate("rows", 100, subsample_size=10, dim=-1) as idx:
            with pyro.plate("cols", 20, subsample_size=5, dim=-2) as jdx:
                z = pyro.sample("z", dist.Normal(mu, 1.0))
                pyro.sample("x", dist.Normal(z, 1.0), obs=data[jdx][:, idx])

    def empty():
        pyro.sample("x", dist.Normal(0.0, 1.0), obs=torch.tensor(0.0))

    with pytest.raises(ValueError, match="'k' is discrete"):
        run(SGLD(discrete), num_samples=2, warmup=0)
    with pytest.raises(NotImplementedError, match="'z' is local to 2 subsampled plates"):
        run(SGLD(local), torch.randn(20, 100), num_samples=2, warmup=0)
    with pytest.raises(ValueError, match="no latent sites"):
        run(SGLD(empty), num_samples=2, warmup=0)


def test_kernels_exist_for_every_sampler():
    from pyro_sgmcmc.samplers import SAMPLERS
    import pyro_sgmcmc.infer as infer

    for name, sampler in SAMPLERS.items():
        kernel_cls = getattr(infer, name)
        assert issubclass(kernel_cls, SGMCMCKernel) and kernel_cls.sampler_class is sampler


@pytest.mark.slow
def test_parallel_chains_with_spawn(monkeypatch):
    """Parallel chains run in worker processes; the supported context is "spawn" (with Linux's
    default "fork", a parent that already ran torch ops can deadlock in OpenMP). Pyro draws chains
    sequentially when it sees fewer than num_chains + 1 CPUs, so the test says there are more."""
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 4)
    data = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0])
    mcmc = run(SGLD(models.scalar_normal, step_size=1e-3), data, num_samples=15, warmup=5, num_chains=2,
               mp_context="spawn")
    grouped = mcmc.get_samples(group_by_chain=True)
    assert grouped["loc"].shape == (2, 15) and not torch.equal(grouped["loc"][0], grouped["loc"][1])
    assert set(mcmc.diagnostics()["divergences"]) == {"chain 0", "chain 1"}


# ---------------------------------------------------------------------- warmup adaptation


def _collinear_data(n=500, seed=0):
    gen = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, generator=gen)
    x = torch.cat([base, base + 0.1 * torch.randn(n, 1, generator=gen), torch.randn(n, 1, generator=gen)], 1)
    y = x @ torch.tensor([1.0, -0.5, 0.25]) + torch.randn(n, generator=gen)
    precision = (x.T @ x + torch.eye(3) / 100).double()
    cov = torch.linalg.inv(precision)
    return x, y, cov @ (x.T @ y).double(), cov, precision


@pytest.mark.slow
def test_dense_adaptation_samples_a_collinear_regression():
    """Collinear regressors (condition number ~380): with no step size given, warmup measures the
    curvature, whitens with the dense inverse Hessian and picks the step size from SGLD's bias rule
    (relative variance bias lr * lambda / 4 = target_bias = 2%, lambda ~ 1 once whitened): the
    posterior comes out right. The same run without adaptation barely moves along the collinear
    pair (its effective sample size there is ~40x smaller)."""
    x, y, mean, cov, _ = _collinear_data()
    chains = 20
    adapted = run(SGLD(models.linear_regression, num_steps=2, full_mass=True), x, y, chains,
                  num_samples=1500, warmup=600)
    draws = adapted.get_samples()["w"]  # [samples, chains, 3]
    check(draws, mean, cov.diagonal(), 2 * 0.02, "dense-adapted SGLD")
    diagnostics = adapted.diagnostics()
    assert diagnostics["preconditioner"]["chain 0"] == "dense"
    assert 0.5 < diagnostics["curvature"]["chain 0"] < 2.0  # whitened: curvature ~ 1

    fixed_lr = 0.02 / float(torch.linalg.eigvalsh(torch.linalg.inv(cov)).max())  # lambda_max * lr = 0.02
    plain = run(SGLD(models.linear_regression, step_size=fixed_lr, num_steps=2, **FIXED), x, y, chains,
                num_samples=1500, warmup=600)
    ess = lambda d: effective_sample_size(d[..., 0].T.double(), chain_dim=0, sample_dim=1)  # noqa: E731
    assert float(ess(draws)) > 10 * float(ess(plain.get_samples()["w"]))


@pytest.mark.slow
@pytest.mark.parametrize("kernel_cls", [SGLD, SGNHT, SGHMC, PSGLD])
def test_default_adaptation_on_minibatches(kernel_cls):
    """``SGLD(model)`` / ``SGNHT(model)`` with nothing tuned, started from Pyro's default
    initialisation tens of posterior sds away, on minibatches of 100 out of 400: an arrival phase
    at the largest stable step, then diagonal whitening and a step size whose discretisation plus
    minibatch-noise bias is about target_bias = 2% (allowance: twice that)."""
    x, y, mean, cov, _ = _regression_data()
    adapted = run(kernel_cls(models.linear_regression, num_steps=5), x, y, 50, 100, num_samples=1500, warmup=500)
    check(adapted.get_samples()["w"], mean, cov.diagonal(), 2 * 0.02, f"default {kernel_cls.__name__} on minibatches")
    diagnostics = adapted.diagnostics()
    assert diagnostics["preconditioner"]["chain 0"] == "diagonal"
    assert diagnostics["gradient noise"]["chain 0"] > 0  # minibatch noise measured


def test_step_size_is_frozen_after_warmup():
    sizes = []
    data = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0])
    run(SGNHT(models.scalar_normal), data, num_samples=30, warmup=60,
        hook_fn=lambda kernel, params, stage, i: sizes.append((stage, kernel.logging()["step size"])))
    after = {size for stage, size in sizes if stage == "Sample"}
    assert len(after) == 1


@pytest.mark.slow
@pytest.mark.parametrize("kernel_cls", [SGLD, SGNHT, SGHMC, PSGLD])
def test_untuned_kernels_start_far_and_stay_finite_on_logistic_regression(kernel_cls):
    """From Pyro's default initialisation (uniform in (-2, 2), some 20 posterior sds away, where
    the logistic likelihood is saturated and its curvature underestimates the mode's), an untuned
    kernel arrives without a divergence (NUTS as the reference). A short run: this checks the
    arrival (within 3 posterior sds of the mean, from ~20), not the accuracy, which the exact tests
    above check."""
    from pyro.infer import NUTS

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2000, 5, generator=gen)
    y = torch.bernoulli(torch.sigmoid(x @ torch.tensor([0.5, -0.3, 0.2, 0.0, 0.1])), generator=gen)
    reference = run(NUTS(models.logistic_regression), x, y, num_samples=300, warmup=200).get_samples()["w"]
    mcmc = run(kernel_cls(models.logistic_regression, num_steps=2), x, y, 200, num_samples=400, warmup=300)
    draws = mcmc.get_samples()["w"]
    assert mcmc.diagnostics()["divergent steps"]["chain 0"] == 0
    assert float(((draws.mean(0) - reference.mean(0)).abs() / reference.std(0)).max()) < 3.0
    assert bool(torch.isfinite(draws).all())


def test_given_transforms_express_the_initial_values_in_their_coordinates():
    from pyro.distributions.transforms import SoftplusTransform

    data = torch.tensor([0.5, 1.5, 1.0])
    pyro.set_rng_seed(0)
    default = SGLD(models.scalar_normal, step_size=1e-3)
    default.setup(0, data)
    pyro.set_rng_seed(0)
    given = SGLD(models.scalar_normal, step_size=1e-3, transforms={"scale": SoftplusTransform().inv})
    given.setup(0, data)
    # the same constrained starting point, in softplus coordinates instead of log ones
    start = default.transforms["scale"].inv(default.initial_params["scale"])
    assert torch.allclose(given.transforms["scale"].inv(given.initial_params["scale"]), start)
    assert not torch.allclose(given.initial_params["scale"], default.initial_params["scale"])


@pytest.mark.slow
def test_low_rank_plus_diagonal_adaptation_whitens_collinear_pairs():
    """A Gaussian posterior of 30 regression coefficients with two nearly collinear pairs
    (condition number ~1700; a potential_fn, so that the test is cheap): the diagonal leaves the
    two soft directions (and their stiff partners) unwhitened, so SGLD barely moves along them;
    ``mass_rank=4`` finds those four directions by Lanczos on Hessian-vector products and whitens
    them too: the posterior comes out right (2% bias target) with many times the effective sample
    size of the diagonal run along the collinear pairs."""
    d, n = 30, 500
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d, generator=gen)
    x[:, 1] = x[:, 0] + 0.05 * torch.randn(n, generator=gen)
    x[:, 3] = x[:, 2] + 0.05 * torch.randn(n, generator=gen)
    precision = (x.T @ x + torch.eye(d) / 100).double()
    cov = torch.linalg.inv(precision)
    mean = cov @ torch.randn(d, generator=gen).double() * 10
    p32, m32 = precision.float(), mean.float()

    def potential(params):
        r = params["w"] - m32
        return 0.5 * r @ p32 @ r

    def sample(num_samples, **options):
        pyro.set_rng_seed(0)
        kernel = SGLD(potential_fn=potential, num_steps=5, **options)
        mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=500, disable_progbar=True,
                    initial_params={"w": torch.zeros(d)})
        mcmc.run()
        return mcmc, mcmc.get_samples()["w"].unsqueeze(1)  # [samples, 1, d]

    low_rank, draws = sample(3000, mass_rank=4)
    check(draws, mean, cov.diagonal(), 2 * 0.02, "low-rank-plus-diagonal SGLD")
    assert low_rank.diagnostics()["preconditioner"]["chain 0"] == "diagonal + rank 4"
    _, diagonal = sample(1000, full_mass=False)
    ess = lambda d: effective_sample_size(d[:, 0, :4].T.double().unsqueeze(0), chain_dim=0, sample_dim=2)  # noqa: E731
    assert float(ess(draws).min()) / 3000 > 5 * float(ess(diagonal).min()) / 1000  # per draw


def test_the_hessian_diagonal_is_exact_for_few_coordinates():
    """Hutchinson's estimate of H_ii is off by sum_j H_ij mean(v_i v_j); with 2 strongly coupled
    coordinates it can cancel the diagonal. Up to as many coordinates as probes, the unit
    vectors give the exact diagonal for no more products."""
    from pyro_sgmcmc.infer.adaptation import hutchinson_diagonal

    hessian = torch.tensor([[0.3, 2.0], [2.0, 9.0]], dtype=torch.float64)
    calls = []
    hvp = lambda v: calls.append(v) or hessian @ v  # noqa: E731
    assert torch.equal(hutchinson_diagonal(hvp, 2, torch.device("cpu")), hessian.diagonal())
    assert len(calls) == 2
    big = torch.eye(20, dtype=torch.float64) + 0.01
    estimate = hutchinson_diagonal(lambda v: big @ v, 20, torch.device("cpu"))
    assert estimate.shape == (20,) and bool((estimate - big.diagonal()).abs().max() < 0.1)


def test_a_saddle_counts_by_its_diagonal():
    from pyro_sgmcmc.infer.adaptation import usable_curvature, whitening_from_curvature

    positive = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
    assert torch.equal(usable_curvature(positive), positive)
    saddle = torch.tensor([[0.27, 2.06], [2.06, 9.4]], dtype=torch.float64)  # det < 0
    assert torch.equal(usable_curvature(saddle), torch.diag(torch.tensor([0.27, 9.4], dtype=torch.float64)))
    scale = whitening_from_curvature(saddle, 1.0, torch.float64).scale
    assert torch.allclose(scale @ scale.T, torch.diag(1 / torch.tensor([0.27, 9.4], dtype=torch.float64)))
