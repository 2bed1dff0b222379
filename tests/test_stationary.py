"""Stationary laws of every sampler on Gaussian targets, against exact answers.

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

import math

import pytest
import torch

from pyro_sgmcmc.samplers import PSGLD
from pyro_sgmcmc.samplers import SGHMC
from pyro_sgmcmc.samplers import SGLD
from pyro_sgmcmc.samplers import SGNHT

pytestmark = pytest.mark.slow  # 500 chains per statistic: the exact-law checks of every sampler

from gaussian import (
    GaussianTarget,
    ANISOTROPIC,
    CORRELATED,
    assert_close_mc,
    baoab_stationary_cov,
    baoab_stationary_variance,
    moments,
    preconditioned_sgld_stationary_cov,
    sghmc_stationary_cov,
    sghmc_stationary_variance,
    sgld_stationary_cov,
    sgnht_stationary,
    sgnht_stationary_cov,
)

CHAINS = 500
STEPS = 2000
BURN_IN = 400
# SGHMC's friction times step, the same at every temperature: a bias of about -C h / 2 = -4%, and
# the paper's noise 2 C h would be hotter by 2 C h / (1 - exp(-2 C h)) = +8.2%, which every
# setting resolves (more than 8 MCSE on some entry)
SGHMC_FRICTION_TIMES_STEP = 0.08


def run(sampler_cls, target, *, chains=CHAINS, steps=STEPS, burn_in=BURN_IN, seed=0, start=None, after_burn_in=None,
        device="cpu", **options):
    """Run ``chains`` independent chains (rows of one parameter, on ``device``) and return [steps,
    chains, d] (in host memory). ``after_burn_in(sampler)`` runs once between burn-in and sampling."""
    torch.manual_seed(seed)
    d = target.mean.numel()
    if start is None:
        start = target.mean.expand(chains, d)
    theta = torch.nn.Parameter(start.clone().to(device=device, dtype=torch.float32))
    sampler = sampler_cls([theta], **options)
    samples = torch.empty(steps, chains, d)
    for t in range(burn_in + steps):
        theta.grad = target.grad(theta.detach().double().cpu()).float().to(device)
        sampler.step()
        if t == burn_in - 1 and after_burn_in is not None:
            after_burn_in(sampler)
        if t >= burn_in:
            samples[t - burn_in] = theta.detach().cpu()
    return samples, sampler


def _draw(mean, cov, chains, seed):
    gen = torch.Generator().manual_seed(seed + 1000)
    z = torch.randn(chains, mean.numel(), generator=gen, dtype=torch.float64)
    return mean + z @ torch.linalg.cholesky(cov).T


def step_size(name, precision):
    """Step sizes at which the discretisation bias is a few percent: SGLD lr * lambda_max = 0.1,
    SGNHT and SGHMC h * sqrt(lambda_max) = 0.2 (SGHMC: at most 0.05), PSGLD lr * lambda_max(G P) = 0.1 with G the
    preconditioner it settles at, about diag(P)^(-1/2)."""
    lam_max = float(torch.linalg.eigvalsh(precision).max())
    if name == "SGLD":
        return 0.1 / lam_max
    if name == "PSGLD":
        g = precision.diagonal() ** -0.25
        return 0.1 / float(torch.linalg.eigvalsh(g[:, None] * precision * g[None, :]).max())
    if name == "SGHMC":  # with the friction C = SGHMC_FRICTION_TIMES_STEP / h
        return min(0.2 / lam_max**0.5, 0.05)
    return 0.2 / lam_max**0.5


def share_and_freeze_preconditioner(sampler):
    """Every chain (row) gets the same V, the mean of the adapted ones, and V is frozen: a
    preconditioned SGLD with one fixed G, whose stationary law is known exactly."""
    square_avg = sampler.state[sampler.param_groups[0]["params"][0]]["square_avg"]
    square_avg.copy_(square_avg.mean(0, keepdim=True).expand_as(square_avg))
    sampler.freeze_adaptation()


def setup(name, prec, lr):
    """(sampler class, options, callback after burn-in, function of the sampler -> exact
    stationary covariance of the discretised chain)."""
    if name == "SGLD":
        return SGLD, dict(lr=lr), None, lambda s: sgld_stationary_cov(prec, lr)
    if name == "SGNHT":
        return SGNHT, dict(lr=lr, diffusion_factor=1.0), None, lambda s: sgnht_stationary_cov(prec, lr, 1.0)
    if name == "SGHMC":
        friction = SGHMC_FRICTION_TIMES_STEP / lr
        return SGHMC, dict(lr=lr, friction=friction), None, lambda s: sghmc_stationary_cov(prec, lr, friction)

    def psgld_cov(sampler):
        square_avg = sampler.state[sampler.param_groups[0]["params"][0]]["square_avg"][0].double().cpu()
        return preconditioned_sgld_stationary_cov(prec, lr, 1.0 / (square_avg.sqrt() + sampler.defaults["eps"]))

    return PSGLD, dict(lr=lr), share_and_freeze_preconditioner, psgld_cov


def check_sampler(name, target, temperature=1.0, localization=0.0, weight_decay=0.0, anchor=None, **extra):
    anchor = target.mean if anchor is None else anchor
    mean, prec = target.tempered(temperature, localization, weight_decay, anchor)
    lr = step_size(name, prec)
    sampler_cls, options, after_burn_in, exact_cov = setup(name, prec, lr)
    cov = torch.linalg.inv(prec)
    start = _draw(mean, cov, CHAINS, 0)
    if localization:
        # theta0 is the value at the first step: start every chain at the anchor, then burn in
        start = anchor.expand(CHAINS, -1)
        extra.setdefault("burn_in", 1500)
    samples, sampler = run(sampler_cls, target, start=start, temperature=temperature, localization=localization,
                           weight_decay=weight_decay, after_burn_in=after_burn_in, **options, **extra)
    disc_cov = exact_cov(sampler)
    est_mean, est_cov = moments(samples, mean)
    label = f"{name} T={temperature} gamma={localization} lambda={weight_decay}"
    sd = cov.diagonal().sqrt()
    assert_close_mc(est_mean, mean, what=f"{label} mean", scale=sd)
    assert_close_mc(est_cov, disc_cov, what=f"{label} covariance vs exact discretised chain", scale=sd.outer(sd))
    if name == "SGHMC":
        check_paper_noise_is_excluded(est_cov, prec, lr, options["friction"], label)
    # the known O(step size) bias, written out: relative lr*lambda/4 (SGLD, PSGLD in G's metric),
    # ~h*xi/2 (SGNHT, SGHMC)
    bias = disc_cov - cov
    assert float((bias.abs() / cov.diagonal().outer(cov.diagonal()).sqrt()).max()) < 0.05
    assert_close_mc(est_cov, cov, bias=bias, what=f"{label} covariance vs target + known bias")


def check_paper_noise_is_excluded(est_cov, prec, lr, friction, label=""):
    """The exact stationary covariance of SGHMC with the paper's noise ``2 C h`` (and the same
    friction factor ``exp(-C h)``) lies more than 8 MCSE from the exact chain's on some entry: as
    the estimate is within 4 MCSE of the exact chain's, it is more than 4 MCSE from the paper's
    there, and the check that passed would have rejected that sampler."""
    exact = sghmc_stationary_cov(prec, lr, friction)
    paper = sghmc_stationary_cov(prec, lr, friction, paper_noise=True)
    assert bool(((paper - exact).abs() > 8 * est_cov.stderr).any()), (
        f"{label}: the paper's noise is not resolved: |difference| {(paper - exact).abs()}, MCSE {est_cov.stderr}")
    with pytest.raises(AssertionError):
        assert_close_mc(est_cov, paper, what="SGHMC with the paper's noise")


@pytest.mark.parametrize("name", ["SGLD", "SGNHT", "SGHMC", "PSGLD"])
@pytest.mark.parametrize("target", [ANISOTROPIC, CORRELATED], ids=["anisotropic", "correlated"])
@pytest.mark.parametrize("temperature", [0.1, 1.0, 4.0])
def test_gaussian_stationary(name, target, temperature):
    check_sampler(name, target, temperature=temperature)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["SGLD", "SGNHT", "SGHMC", "PSGLD"])
def test_gaussian_stationary_on_cuda(name):
    """The same exact law with the chains on a CUDA device: the noise from its generator, drawn
    by the eager step's device plans."""
    check_sampler(name, CORRELATED, device="cuda")


@pytest.mark.parametrize("name", ["SGLD", "SGNHT", "SGHMC", "PSGLD"])
def test_localization_and_weight_decay_move_the_target_exactly(name):
    # anchor away from the mode so that localization visibly moves the mean
    anchor = torch.tensor([2.0, -1.0, 0.0], dtype=torch.float64)
    check_sampler(name, ANISOTROPIC, temperature=1.0, localization=2.0, weight_decay=0.5, anchor=anchor)


@pytest.mark.parametrize("name", ["SGLD", "SGNHT", "SGHMC", "PSGLD"])
def test_wrong_sampler_is_caught(name):
    """The check above can fail: a chain sampled at T = 1 (as a sampler that mis-tempers, or an
    SGNHT that lost its thermostat and runs hot, would give) is rejected against the T = 1.2 answer."""
    mean, prec = ANISOTROPIC.tempered(1.0)
    _, wrong_prec = ANISOTROPIC.tempered(1.2)
    lr = step_size(name, prec)
    cls, opts, after_burn_in, _ = setup(name, prec, lr)
    samples, sampler = run(cls, ANISOTROPIC, start=_draw(mean, torch.linalg.inv(prec), CHAINS, 0),
                           after_burn_in=after_burn_in, **opts)
    _, est_cov = moments(samples, mean)
    ref = setup(name, wrong_prec, lr)[3](sampler)
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


def _noisy_gradient_cov(variance, seed, **options):
    """The covariance estimate of SGHMC chains on ANISOTROPIC (at T = 1, started at its law) whose
    gradients carry a noise of ``variance`` per entry."""
    mean, prec = ANISOTROPIC.tempered(1.0)
    torch.manual_seed(seed)
    theta = torch.nn.Parameter(_draw(mean, torch.linalg.inv(prec), CHAINS, seed).float())
    sampler = SGHMC([theta], **options)
    samples = []
    for t in range(BURN_IN + STEPS):
        g = ANISOTROPIC.grad(theta.detach().double()).float()
        theta.grad = g + variance**0.5 * torch.randn_like(g)
        sampler.step()
        if t >= BURN_IN:
            samples.append(theta.detach().clone())
    return moments(torch.stack(samples), mean)[1]


@pytest.mark.parametrize("estimate", [True, False])
def test_sghmc_noise_estimate_cancels_the_gradient_noise(estimate):
    """Gradient noise of variance V adds h^2 V to the momentum's variance per step: with
    gradient_noise_variance=V the injected noise is lowered by exactly that (the exact
    Ornstein-Uhlenbeck noise 1 - exp(-2 C h) in all), without it the chain runs hot (by the factor
    1 + h^2 V / (1 - exp(-2 C h)), 95% here). Both are exact references."""
    mean, prec = ANISOTROPIC.tempered(1.0)
    h, friction, variance = 0.05, 1.0, 36.0
    est_cov = _noisy_gradient_cov(variance, 6, lr=h, friction=friction,
                                  gradient_noise_variance=variance if estimate else 0.0)
    sd = torch.linalg.inv(prec).diagonal().sqrt()
    exact = sghmc_stationary_cov(prec, h, friction, gradient_noise=variance, estimate=variance if estimate else 0.0)
    assert_close_mc(est_cov, exact, what=f"SGHMC estimate={estimate}", scale=sd.outer(sd))
    with pytest.raises(AssertionError):  # and the other reference is rejected
        other = sghmc_stationary_cov(prec, h, friction, gradient_noise=variance, estimate=0.0 if estimate else variance)
        assert_close_mc(est_cov, other, what="the other estimate")


@pytest.mark.parametrize("friction", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("h_omega", [0.05, 0.2, 1.0])
def test_sghmc_stationary_variance_in_closed_form(friction, h_omega):
    """The closed form of SGHMC's docstring is the Lyapunov solution of the linear chain, its
    leading terms are -C h / 2 + h^2 (C^2 + omega^2) / 4 (the rest, from the series of the closed
    form, -C^3 h^3 / 12 + (C^4 + 3 omega^4) h^4 / 48 + O(h^5)), and the paper's noise 2 C h is
    hotter by exactly 2 C h / (1 - exp(-2 C h))."""
    omega2 = 3.0
    h = h_omega / omega2**0.5
    closed = sghmc_stationary_variance(omega2, h, friction)
    lyapunov = float(sghmc_stationary_cov(torch.tensor([[omega2]], dtype=torch.float64), h, friction))
    assert closed == pytest.approx(lyapunov, rel=1e-10)
    paper = float(sghmc_stationary_cov(torch.tensor([[omega2]], dtype=torch.float64), h, friction, paper_noise=True))
    assert paper / lyapunov == pytest.approx(2 * friction * h / -math.expm1(-2 * friction * h), rel=1e-10)

    def rest(step):
        relative = sghmc_stationary_variance(omega2, step, friction) * omega2 - 1
        return relative - (-friction * step / 2 + step**2 * (friction**2 + omega2) / 4)

    small = 3e-3
    assert rest(small) == pytest.approx(-friction**3 * small**3 / 12 + (friction**4 + 3 * omega2**2) * small**4 / 48,
                                        rel=1e-3)


@pytest.mark.parametrize("curvature, noise, friction, temperature", [
    (1.0, 0.0, 1.0, 1.0), (400.0, 0.0, 1.0, 1.0), (25.0, 36.0, 6.0, 1.0), (25.0, 36.0, 1.0, 0.5), (1e4, 1e3, 30.0, 4.0),
])
def test_sghmc_suggested_step_meets_its_bias_target(curvature, noise, friction, temperature):
    """The step of SGHMC's bias rule keeps the exact stationary variance of every direction with
    curvature up to the largest within the target (the closed form), and the heat of the
    gradient noise within it too; it is the largest such step unless a stability bound binds."""
    target = 0.02
    h = SGHMC.suggest_lr(curvature, noise, target, temperature, friction=friction)
    lam = curvature / temperature
    omega2 = torch.linspace(1e-6, 1.0, 201, dtype=torch.float64) * lam
    relative = torch.tensor([sghmc_stationary_variance(w, h, friction) * w - 1 for w in omega2.tolist()])
    heat = h * h * noise / temperature**2 / -math.expm1(-2 * friction * h)
    assert float(relative.abs().max()) <= target + 1e-9 and heat <= target + 1e-9
    stability = min(0.5 / friction, 0.5 / lam**0.5)
    assert h == pytest.approx(stability) or max(float(relative.abs().max()), heat) == pytest.approx(target, rel=1e-3)


@pytest.mark.parametrize("curvature, noise, friction, temperature", [
    (400.0, 0.0, 1.0, 1.0), (25.0, 36.0, 6.0, 1.0), (25.0, 36.0, 1.0, 0.5), (1e4, 1e3, 30.0, 4.0),
])
def test_sghmc_baoab_suggested_step_meets_its_bias_target(curvature, noise, friction, temperature):
    """BAOAB's rule: its Gaussian law is exact, so only the gradient noise's heat (the closed form
    at every curvature up to the largest) limits the step below the stability bounds."""
    target = 0.02
    h = SGHMC.suggest_lr(curvature, noise, target, temperature, friction=friction, splitting="baoab")
    lam = curvature / temperature
    heat = max(baoab_stationary_variance(w, h, friction, noise / temperature**2) * w - 1
               for w in (torch.linspace(1e-6, 1.0, 201, dtype=torch.float64) * lam).tolist())
    assert heat <= target + 1e-9
    stability = min(0.5 / friction, 0.5 / lam**0.5)
    assert h == pytest.approx(stability) or heat == pytest.approx(target, rel=1e-3)
    assert h >= SGHMC.suggest_lr(curvature, noise, target, temperature, friction=friction)  # no cold bias to fit


def test_sghmc_with_the_paper_noise_is_caught():
    """A sampler with the paper's noise 2 C h (emulated: noise_level^2 = 2 C h / (1 - exp(-2 C h)))
    at the stationary test's settings matches the exact chain of that scheme and fails the test
    against the exact Ornstein-Uhlenbeck chain."""
    mean, prec = ANISOTROPIC.tempered(1.0)
    lr = step_size("SGHMC", prec)
    cls, options, _, _ = setup("SGHMC", prec, lr)
    friction = options["friction"]
    hot = (2 * friction * lr / -math.expm1(-2 * friction * lr)) ** 0.5
    with pytest.warns(UserWarning, match="noise_level"):
        samples, _ = run(cls, ANISOTROPIC, start=_draw(mean, torch.linalg.inv(prec), CHAINS, 0), noise_level=hot,
                         **options)
    _, est_cov = moments(samples, mean)
    assert_close_mc(est_cov, sghmc_stationary_cov(prec, lr, friction, paper_noise=True), what="the paper's scheme")
    with pytest.raises(AssertionError):
        assert_close_mc(est_cov, sghmc_stationary_cov(prec, lr, friction), what="the exact chain")


@pytest.mark.parametrize("alpha, low, high", [(0.99, 0.05, 0.40), (0.999, -0.02, 0.08)])
def test_adaptive_preconditioner_bias(alpha, low, high):
    """The bias of PSGLD while its preconditioner adapts (no correction term), as documented in
    its docstring: variances high by 12-32% with alpha = 0.99, 3-5% with alpha = 0.999 (exact
    gradients, anisotropic target). The bounds leave room for the Monte Carlo error (~1.5%)."""
    mean, prec = ANISOTROPIC.tempered(1.0)
    lr = 0.1 / float(torch.linalg.eigvalsh(prec).max()) ** 0.5
    start = _draw(mean, torch.linalg.inv(prec), CHAINS, 0)
    samples, _ = run(PSGLD, ANISOTROPIC, start=start, steps=4000, burn_in=2000, lr=lr, alpha=alpha)
    excess = samples.double().var((0, 1)) * prec.diagonal() - 1.0
    assert bool((excess > low).all()) and bool((excess < high).all()), excess


@pytest.mark.parametrize("temperature", [0.5, 2.0])
@pytest.mark.parametrize("lr_times_c", [1.0, 2.0, 3.0])
def test_reference_curvature_is_exact_on_its_gaussian_at_any_step(temperature, lr_times_c):
    """SGLD with reference_curvature c on a Gaussian whose tempered precision is c I: exact for
    any lr < 4 / c, here up to lr = 3 / c, where plain SGLD would be off by 300% (lr c / 4 / (1 -
    lr c / 4)); at lr = 2 / c every step is an independent draw. The target itself is the
    reference, with no bias term."""
    c = 4.0
    target = GaussianTarget(mean=torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
                            cov=torch.eye(3, dtype=torch.float64) / (c * temperature))
    mean, prec = target.tempered(temperature)
    cov = torch.linalg.inv(prec)
    samples, _ = run(SGLD, target, start=_draw(mean, cov, CHAINS, 1), steps=1000, burn_in=100, seed=1,
                     lr=lr_times_c / c, temperature=temperature, reference_curvature=c)
    est_mean, est_cov = moments(samples, mean)
    sd = cov.diagonal().sqrt()
    assert_close_mc(est_mean, mean, what="mean", scale=sd)
    assert_close_mc(est_cov, cov, what=f"covariance at lr c = {lr_times_c}", scale=sd.outer(sd))


def test_reference_curvature_elsewhere_matches_the_exact_discretised_chain():
    """Where the curvature is not c (a correlated target, c its mean eigenvalue), the chain is the
    SGLD recursion with noise variance lr (1 - lr c / 4): stationary covariance
    (1 - lr c / 4) (P - lr P^2 / 4)^-1, checked to 4 MCSE. Its bias per eigen-direction,
    (1 - lr c/4) / (1 - lr lambda / 4) - 1 = lr (lambda - c) / 4 / (1 - lr lambda / 4), is below plain
    SGLD's lr lambda / 4 / (1 - lr lambda / 4) where lambda > c / 2 (and cold, not hot, below c)."""
    mean, prec = CORRELATED.tempered(1.0)
    evals = torch.linalg.eigvalsh(prec)
    c = float(evals.mean())
    lr = 1.0 / float(evals.max())
    samples, _ = run(SGLD, CORRELATED, start=_draw(mean, torch.linalg.inv(prec), CHAINS, 2), seed=2, lr=lr,
                     reference_curvature=c)
    _, est_cov = moments(samples, mean)
    exact = (1 - lr * c / 4) * sgld_stationary_cov(prec, lr)
    cov = torch.linalg.inv(prec)
    sd = cov.diagonal().sqrt()
    assert_close_mc(est_cov, exact, what="reference curvature on a correlated target", scale=sd.outer(sd))
    corrected = (1 - lr * c / 4) / (1 - lr * evals / 4) - 1
    assert torch.allclose(corrected, lr * (evals - c) / 4 / (1 - lr * evals / 4))
    plain = lr * evals / 4 / (1 - lr * evals / 4)
    assert bool((corrected.abs() < plain)[evals > c / 2].all()) and bool((corrected < 0)[evals < c].all())


def test_gradient_noise_variance_is_subtracted_exactly():
    """Gradient noise of variance V with gradient_noise_variance=V and the matching reference
    curvature: exact at lr c = 1.5 (without the estimate the chain runs hot by lr V / 4 / (1 - lr c / 4))."""
    c, variance = 1.0, 0.5
    target = GaussianTarget(mean=torch.zeros(3, dtype=torch.float64), cov=torch.eye(3, dtype=torch.float64) / c)
    mean, prec = target.tempered(1.0)
    cov = torch.linalg.inv(prec)
    torch.manual_seed(4)
    theta = torch.nn.Parameter(_draw(mean, cov, CHAINS, 4).float())
    lr = 1.5 / c
    sampler = SGLD([theta], lr=lr, reference_curvature=c, gradient_noise_variance=variance)
    samples = []
    for t in range(100 + 1000):
        g = target.grad(theta.detach().double()).float()
        theta.grad = g + variance**0.5 * torch.randn_like(g)
        sampler.step()
        if t >= 100:
            samples.append(theta.detach().clone())
    _, est_cov = moments(torch.stack(samples), mean)
    sd = cov.diagonal().sqrt()
    assert_close_mc(est_cov, cov, what="noise subtracted", scale=sd.outer(sd))
    hot = cov * (1 + lr * variance / 4 / (1 - lr * c / 4))
    with pytest.raises(AssertionError):
        assert_close_mc(est_cov, hot, what="without the subtraction")


def test_reference_curvature_refuses_a_step_that_leaves_no_noise():
    theta = torch.nn.Parameter(torch.zeros(3))
    sampler = SGLD([theta], lr=4.0, reference_curvature=1.0)
    theta.grad = torch.zeros(3)
    with pytest.raises(ValueError, match="Invalid lr.*reference_curvature"):
        sampler.step()
    with pytest.raises(ValueError, match="reference_curvature"):
        SGLD([theta], lr=1.0, reference_curvature=-1.0)


@pytest.mark.parametrize("target", [ANISOTROPIC, CORRELATED], ids=["anisotropic", "correlated"])
@pytest.mark.parametrize("temperature", [0.1, 4.0])
def test_sghmc_baoab_samples_a_gaussian_exactly(target, temperature):
    """BAOAB's theta is exactly at the target's law on a Gaussian with exact gradients, at a step
    h * sqrt(lambda_max) = 1.2 and a friction C h = 0.3 where the Euler splitting's covariance is off
    by -12% to +48% on the variances (its exact law is rejected: the check can fail), and the chains start at the
    target's law, so nothing but the sampler's own law is tested."""
    mean, prec = target.tempered(temperature)
    lam_max = float(torch.linalg.eigvalsh(prec).max())
    h = 1.2 / lam_max**0.5
    friction = 0.3 / h
    cov = torch.linalg.inv(prec)
    assert torch.allclose(baoab_stationary_cov(prec, h, friction), cov, rtol=1e-9, atol=1e-12)
    samples, _ = run(SGHMC, target, start=_draw(mean, cov, CHAINS, 2), temperature=temperature, seed=2, lr=h,
                     friction=friction, splitting="baoab")
    est_mean, est_cov = moments(samples, mean)
    sd = cov.diagonal().sqrt()
    assert_close_mc(est_mean, mean, what="BAOAB mean", scale=sd)
    assert_close_mc(est_cov, cov, what="BAOAB covariance vs the target", scale=sd.outer(sd))
    with pytest.raises(AssertionError):
        assert_close_mc(est_cov, sghmc_stationary_cov(prec, h, friction), what="the Euler splitting's law")


def test_sghmc_baoab_gradient_noise_heats_as_its_closed_form_says():
    """With a gradient noise of variance V (and no estimate) BAOAB's variances are hot by
    h^2 V (1 + a) / ((1 - a)(4 - h^2 omega^2)) (about h V / (2 C): 40-41% here): the chains match
    that exact law and not the target; the closed form of SGHMC's docstring is the Lyapunov
    solution."""
    mean, prec = ANISOTROPIC.tempered(1.0)
    h, friction, variance = 0.05, 1.0, 16.0
    for omega2 in torch.linalg.eigvalsh(prec).tolist():
        lyapunov = float(baoab_stationary_cov(torch.tensor([[omega2]], dtype=torch.float64), h, friction, variance, 2.0))
        assert baoab_stationary_variance(omega2, h, friction, variance, 2.0) == pytest.approx(lyapunov, rel=1e-10)
    est_cov = _noisy_gradient_cov(variance, 7, lr=h, friction=friction, splitting="baoab")
    sd = torch.linalg.inv(prec).diagonal().sqrt()
    exact = baoab_stationary_cov(prec, h, friction, gradient_noise=variance)
    assert_close_mc(est_cov, exact, what="BAOAB with gradient noise", scale=sd.outer(sd))
    with pytest.raises(AssertionError):
        assert_close_mc(est_cov, torch.linalg.inv(prec), what="the target")
