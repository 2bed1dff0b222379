"""The local learning coefficient, WBIC and marginal-likelihood hyperparameters against exact answers.

Every estimate is compared with an exact value at a tolerance of 4 Monte Carlo standard errors
(the estimate's own, from the effective sample size across chains) plus the discretisation bias
the estimate states, nothing else; and each such test checks first that its run can see a 10%
error (4 standard errors below a tenth of the exact value), so that it cannot pass by being noisy.

Exact answers:

* a quadratic loss :math:`L = \\frac12\\sum_i h_i w_i^2` with localization :math:`\\gamma`: with
  :math:`a_i = n\\beta h_i + \\gamma`, :math:`E[\\hat\\lambda] = \\frac12\\sum_i n\\beta h_i/a_i`, and SGLD's
  chain at step :math:`\\epsilon` (with gradients free of noise) gives exactly
  :math:`\\sum_i n\\beta h_i / (2 a_i (1 - \\epsilon a_i/4))`, and with minibatch gradient noise of
  variance :math:`B_i` (independent minibatches) each term is multiplied by :math:`1 + \\epsilon B_i/4`;
* separable even monomials :math:`L = \\sum_i k_i w_i^{p_i}` with :math:`\\gamma = 0`:
  :math:`E[n\\beta L] = \\sum_i 1/p_i` at every :math:`n\\beta`;
* WBIC of a Bayesian linear regression with known noise: the tempered posterior is Gaussian;
* the prior scale that maximises the evidence of a conjugate regression with orthogonal design:
  :math:`\\tau^2 = \\|\\hat w\\|^2/d - \\sigma^2/s` (with :math:`X^\\top X = sI` and :math:`\\hat w` the least squares fit).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import types
import warnings

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.distributions import constraints
from torch.utils.data import DataLoader, TensorDataset

from pyro_sgmcmc.slt import (
    LLCResult,
    LLCWarning,
    default_burn_in,
    estimate_llc,
    marglik_hyperparameters,
    plot_llc,
    tempered_likelihood,
    wbic,
)
from pyro_sgmcmc.slt._engine import LocalEngine, ProcessEngine, WorkerSetup, worker_count
from pyro_sgmcmc.slt._data import Minibatches
from pyro_sgmcmc.slt._objective import ChainObjective, ModuleObjective
from pyro_sgmcmc.slt._scales import ChainStep, Scales, choose_step, control_pays, relaxation_steps, virial
from pyro_sgmcmc.slt._stats import ChainMean, chain_mean, paired_drift, spread_warning
from pyro_sgmcmc.slt.llc import settle_window


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
#: where a test's model and data live: the CPU, and a CUDA device where there is one
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]


def assert_exact(estimate: float, std_error: float, exact: float, bias: float = 0.0, what: str = "") -> None:
    """Within 4 standard errors plus the stated bias of ``exact``, and able to see a 10% error."""
    assert 4 * std_error < 0.1 * abs(exact), f"{what}: the run is too noisy to test ({std_error:.3g} vs {exact:.4g})"
    assert abs(estimate - exact) <= 4 * std_error + bias, (
        f"{what}: {estimate:.4g} vs exact {exact:.4g} (standard error {std_error:.3g}, stated bias {bias:.3g})")


class Quadratic(torch.nn.Module):
    """Per-row loss :math:`\\frac12\\sum_i h_i (w_i - z_i)^2`: with the rows' ``z`` centred, the mean
    loss is :math:`\\frac12\\sum_i h_i w_i^2` plus a constant, and minibatches add gradient noise."""

    def __init__(self, h: torch.Tensor):
        super().__init__()
        self.h = h
        self.w = torch.nn.Parameter(torch.zeros(len(h)))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((self.w - z) ** 2 * self.h).sum(-1)


def mean_output(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return output.mean()


def quadratic_data(n: int, d: int, batch_size: int, seed: int = 0) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=generator)
    z -= z.mean(0)
    return DataLoader(TensorDataset(z, torch.zeros(n)), batch_size=batch_size)


H = torch.tensor([1.0, 1.5, 2.0, 3.0])


def quadratic_exact(h: torch.Tensor, nbeta: float, localization: float, step: float = 0.0) -> float:
    a = nbeta * h.double() + localization
    return float((nbeta * h / (2 * a * (1 - step * a / 4))).sum())


def chain_exact(h: torch.Tensor, result, localization: float) -> float:
    """The quadratic's value for the chain that ran, with exact gradients: SGLD's discretised law at
    its step; BAOAB's law is the target itself."""
    step = result.step_size if result.diagnostics.sampler == "sgld" else 0.0
    return quadratic_exact(h, result.nbeta, localization, step)


def test_quadratic_llc_is_the_exact_discretised_chain_at_the_chosen_step():
    torch.manual_seed(0)
    n, gamma = 1000, 50.0
    result = estimate_llc(Quadratic(H), quadratic_data(n, 4, 100), mean_output, localization=gamma, num_chains=32,
                          num_draws=1000, sampler="sgld", progress_bar=False)
    nbeta = n / math.log(n)
    assert result.n == n and result.nbeta == pytest.approx(nbeta)
    assert result.diagnostics.control_variates and result.diagnostics.vectorized
    # with control variates the quadratic's gradient carries no minibatch noise: the law is exact
    discretised = quadratic_exact(H, nbeta, gamma, result.step_size)
    assert_exact(result.llc, result.std_error, discretised, what="vs the discretised chain")
    continuous = quadratic_exact(H, nbeta, gamma)
    stated = result.diagnostics.step_bias
    assert stated <= 1.5 * result.diagnostics.target_bias
    assert abs((discretised / continuous - 1) / stated - 1) < 0.25  # the stated bias is the true one, as measured
    assert_exact(result.llc, result.std_error, continuous, stated * continuous, what="vs the target")


def test_quadratic_llc_with_baoab_is_the_target_itself_at_the_chosen_step():
    """BAOAB's law is exact on a quadratic potential with exact gradients (the control variates
    leave the quadratic's gradient no minibatch noise): no discretisation bias, stated or true, and
    the flat directions' relaxation sets a burn-in far shorter than SGLD's."""
    torch.manual_seed(0)
    n, gamma = 1000, 50.0
    result = estimate_llc(Quadratic(H), quadratic_data(n, 4, 100), mean_output, localization=gamma, num_chains=32,
                          num_draws=1000, sampler="baoab", progress_bar=False)
    assert result.friction is not None and result.diagnostics.step_bias < 1e-9  # (rounding in the noise measured)
    assert_exact(result.llc, result.std_error, quadratic_exact(H, result.nbeta, gamma), what="BAOAB vs the target")
    sgld = ChainStep(choose_step(result.diagnostics.scales, result.llc, 0.02).size)
    assert relaxation_steps(ChainStep(result.step_size, result.friction), gamma) < relaxation_steps(sgld, gamma) / 5


@needs_cuda
@pytest.mark.parametrize("rows_on", ["cuda", "cpu"])
@pytest.mark.parametrize("sampler", ["sgld", "baoab"])
def test_on_cuda_the_quadratic_llc_is_the_exact_chain_wherever_the_rows_are(sampler, rows_on):
    """The model on a CUDA device and its rows there or in host memory: the chains' law is the
    exact one of the CPU tests above, and what the result holds is in host memory."""
    torch.manual_seed(0)
    n, gamma = 1000, 50.0
    z, zeros = quadratic_data(n, 4, 100).dataset.tensors
    loader = DataLoader(TensorDataset(z.to(rows_on), zeros.to(rows_on)), batch_size=100)
    model = Quadratic(H.cuda()).cuda()
    result = estimate_llc(model, loader, mean_output, localization=gamma, num_chains=32, num_draws=1000,
                          sampler=sampler, progress_bar=False)
    assert model.w.is_cuda and torch.equal(model.w.detach().cpu(), torch.zeros(len(H)))  # w* left as it was
    assert not (result.per_chain.is_cuda or result.loss_trace.is_cuda or result.virial_trace.is_cuda)
    assert_exact(result.llc, result.std_error, chain_exact(H, result, gamma), what=f"{sampler} on cuda")


def test_auto_runs_baoab_where_the_noise_is_small_and_sgld_where_it_dominates():
    """``sampler="auto"``: on the quadratic with exact gradients (full batches, or minibatches with
    control variates, which leave it no noise) BAOAB relaxes the flattest direction many times
    faster and runs, after SGLD's pilots and one of its own, and its estimate is the target itself
    (BAOAB's law on a quadratic is exact), and the virial its equilibrium value: a sampler made
    mid-run is localized at w*, not where the pilots left the chains; where minibatch noise
    dominates (no control variates), SGLD runs."""
    n, gamma = 1000, 50.0
    h = torch.cat([H, torch.zeros(4)])  # four flat directions, held only by the localization
    exact = quadratic_exact(h, n / math.log(n), gamma)
    for seed, batch in ((5, n), (6, 100)):
        torch.manual_seed(seed)
        quiet = estimate_llc(Quadratic(h), quadratic_data(n, 8, batch), mean_output, localization=gamma, num_chains=16,
                             num_draws=600, progress_bar=False)
        diagnostics = quiet.diagnostics
        assert diagnostics.sampler == "baoab" and quiet.friction is not None and diagnostics.full_batch == (batch == n)
        assert_exact(quiet.llc, quiet.std_error, exact, what=f"auto, batch {batch}")
        # the virial sees the flat directions' centre: localized at a point the pilots reached, each
        # would add gamma * offset^2 (about 1) to it
        assert abs(diagnostics.unrelaxed) <= 4 * diagnostics.unrelaxed_std_error, diagnostics
    loader = quadratic_data(n, 4, 10)
    loader.dataset.tensors[0].mul_(3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LLCWarning)  # a short run
        noisy = estimate_llc(LinearNoise(H), loader, mean_output, reduction="mean", localization=gamma, num_chains=8,
                             num_draws=200, control_variates=False, progress_bar=False)
    assert noisy.diagnostics.sampler == "sgld" and noisy.friction is None


def test_a_sampler_made_mid_run_is_localized_where_it_is_told():
    """``set_anchors``: the centre of the localization set explicitly, not the parameters' value at
    the first step; a mismatched shape refused."""
    from pyro_sgmcmc.samplers import SGLD

    w = torch.nn.Parameter(torch.full((3,), 5.0))
    sampler = SGLD([w], lr=0.1, localization=1.0, noise_level=0.0)
    with pytest.raises(ValueError, match=r"Invalid anchors: \[\(2,\)\]"):
        sampler.set_anchors([torch.zeros(2)])
    sampler.set_anchors([torch.zeros(3)])
    for _ in range(200):
        w.grad = torch.zeros(3)
        sampler.step()
    torch.testing.assert_close(w.detach(), torch.zeros(3), atol=1e-3, rtol=0)  # pulled to 0, not to 5


def test_chains_hotter_than_the_stated_bias_are_warned_about(monkeypatch):
    """Chains hotter than the step rule foresaw (simulated: BAOAB on minibatch gradients, its
    gradient noise's heat, 40% by the rule's bound at C = 1, left out of the
    virial's equilibrium value) have a virial far above that value: a warning says the estimate
    is likely too high."""
    from pyro_sgmcmc.slt import llc as module

    monkeypatch.setattr(module, "expected_virial", lambda step, scales, num_sampled, localization: num_sampled)
    torch.manual_seed(7)
    loader = quadratic_data(1000, 4, 100)
    loader.dataset.tensors[0].mul_(0.5)  # gradient noise V up to about 470
    with pytest.warns(LLCWarning, match="the chains run hotter"):
        estimate_llc(LinearNoise(H), loader, mean_output, reduction="mean", localization=50.0, num_chains=8,
                     num_draws=600, num_burnin=300, control_variates=False, sampler="baoab", step_size=0.005,
                     friction=1.0, progress_bar=False)


@pytest.mark.parametrize("at_check, sampler, restarts", [(1, "sgld", 0), (100, "baoab", 1)],
                         ids=["in_its_pilot", "while_sampling"])
def test_auto_after_a_baoab_chain_diverges(monkeypatch, at_check, sampler, restarts):
    """A BAOAB chain that diverges under ``sampler="auto"``: in its pilot run, the chains go back
    to a snapshot and on with SGLD at the step its pilots chose; while sampling, the sampling
    phase starts over from a snapshot with BAOAB's step chosen again there (``restarts``), as
    for any sampler. The divergence is simulated: the ``at_check``-th loss check of BAOAB says so
    (its pilot runs 75 steps here). The chain that goes on is localized at w*, as the estimate
    within its stated bias shows."""
    from pyro_sgmcmc.slt import _engine as module

    original, seen = module.LocalEngine._diverged, []

    def diverge_once(self, values):
        if self.baoab:
            seen.append(True)
            if len(seen) == at_check:
                return True
        return original(self, values)

    monkeypatch.setattr(module.LocalEngine, "_diverged", diverge_once)
    torch.manual_seed(6)
    n, gamma = 1000, 50.0
    result = estimate_llc(Quadratic(H), quadratic_data(n, 4, n), mean_output, localization=gamma, num_chains=32,
                          num_draws=1500, progress_bar=False)
    diagnostics = result.diagnostics
    assert len(seen) >= at_check and diagnostics.sampler == sampler and diagnostics.restarts == restarts
    assert result.draws.shape == (32, 1500) and bool(result.draws.isfinite().all())
    exact = quadratic_exact(H, result.nbeta, gamma)
    assert_exact(result.llc, result.std_error, exact, diagnostics.step_bias * exact, what=f"{sampler} after BAOAB")


def test_quadratic_llc_with_masked_coordinates_counts_only_the_sampled_ones():
    torch.manual_seed(1)
    n, gamma = 1000, 50.0
    mask = torch.tensor([1.0, 0.0, 1.0, 1.0])
    model = Quadratic(H)
    # a given step with a 9% bias, which the discretised law below accounts for exactly: it mixes fast
    result = estimate_llc(model, quadratic_data(n, 4, 100), mean_output, localization=gamma, mask={"w": mask},
                          step_size=1e-3, target_bias=0.1, num_chains=32, num_draws=400, num_burnin=100,
                          progress_bar=False)
    assert bool((result.draws.isfinite()).all()) and torch.equal(model.w.detach(), torch.zeros(4))  # w* untouched
    discretised = quadratic_exact(H[mask.bool()], result.nbeta, gamma, result.step_size)
    assert_exact(result.llc, result.std_error, discretised, what="masked")


class LinearNoise(Quadratic):
    r"""Per-row loss :math:`\sum_i h_i (w_i^2/2 - w_i z_i)`: the mean loss is :math:`\frac12\sum_i h_i w_i^2`
    (centred ``z``), and a minibatch adds noise :math:`-\sum_i h_i w_i \bar z_i` to the loss and
    :math:`-h_i \bar z_i` to the gradient, with no noise left at :math:`w^* = 0`."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return ((0.5 * self.w**2 - self.w * z) * self.h).sum(-1)


def linear_noise_exact(result: LLCResult, z: torch.Tensor, m: int, gamma: float) -> float:
    """The exact mean of :math:`\\hat\\lambda` of SGLD (``result``'s step) on :class:`LinearNoise`
    with plain minibatches of ``m`` distinct rows of ``z``, independent between steps: the
    gradient's noise along :math:`w_i` has variance :math:`B_i = (n\\beta h_i)^2` times that of the
    mean of ``m`` rows of :math:`z_i`, and SGLD's stationary variance is
    :math:`(1 + \\epsilon B_i/4)/(a_i(1 - \\epsilon a_i/4))`; the loss's noise has mean 0 given the point."""
    n = len(z)
    nbeta, eps = result.nbeta, result.step_size
    a = nbeta * H.double() + gamma
    noise = (nbeta * H.double()) ** 2 * (z.double() ** 2).mean(0) / m * (n - m) / (n - 1)
    return float((nbeta * H * (1 + eps * noise / 4) / (2 * a * (1 - eps * a / 4))).sum())


def test_quadratic_llc_without_control_variates_is_the_exact_law_of_the_noisy_chain():
    torch.manual_seed(2)
    n, gamma, m = 1000, 50.0, 100
    loader = quadratic_data(n, 4, m)
    z = loader.dataset.tensors[0].mul_(0.5)  # gradient noise of the order of the curvature: it shrinks the step
    result = estimate_llc(LinearNoise(H), loader, mean_output, reduction="mean", localization=gamma, num_chains=32,
                          num_draws=800, control_variates=False, target_bias=0.05, sampler="sgld", progress_bar=False)
    scales = result.diagnostics.scales
    assert not result.diagnostics.control_variates and scales.noise_trace > 0.5 * scales.hessian_trace
    exact = linear_noise_exact(result, z, m, gamma)
    assert_exact(result.llc, result.std_error, exact, what="minibatch gradients")
    # the stated bias is the true one (measured 0.047-0.052 against 0.049-0.053 stated, on four runs)
    true_bias = exact / quadratic_exact(H, result.nbeta, gamma) - 1
    assert 0.8 < result.diagnostics.step_bias / true_bias < 1.25


def test_quadratic_llc_with_baoab_without_control_variates_is_the_exact_law_of_the_noisy_chain():
    """BAOAB on minibatch gradients: each direction's variance is hot by its closed form
    :math:`h^2 B_i (1 + f)/((1 - f)(4 - h^2 a_i))` (:class:`~pyro_sgmcmc.samplers.SGHMC`), and the
    stated bias is that heat averaged as the rule averages it (an upper bound: it weighs each
    direction's noise by 1, the exact law by :math:`n\beta h_i/a_i`)."""
    torch.manual_seed(2)
    n, gamma, m = 1000, 50.0, 100
    loader = quadratic_data(n, 4, m)
    z = loader.dataset.tensors[0].mul_(0.5)
    result = estimate_llc(LinearNoise(H), loader, mean_output, reduction="mean", localization=gamma, num_chains=32,
                          num_draws=800, control_variates=False, target_bias=0.05, sampler="baoab",
                          progress_bar=False)
    nbeta, h, c = result.nbeta, result.step_size, result.friction
    a = nbeta * H.double() + gamma
    noise = (nbeta * H.double()) ** 2 * (z.double() ** 2).mean(0) / m * (n - m) / (n - 1)
    f = math.exp(-c * h)
    heat = h * h * noise * (1 + f) / ((1 - f) * (4 - h * h * a))
    exact = float((nbeta * H * (1 + heat) / (2 * a)).sum())
    assert_exact(result.llc, result.std_error, exact, what="BAOAB on minibatch gradients")
    true_bias = exact / quadratic_exact(H, nbeta, gamma) - 1
    assert true_bias > 0.01 and true_bias <= result.diagnostics.step_bias <= 1.5 * result.diagnostics.target_bias


class ScaledRows(Quadratic):
    r"""Per-row loss :math:`\frac12\sum_i h_i (1 + z_i) w_i^2`: the mean loss is
    :math:`\frac12\sum_i h_i w_i^2` (centred ``z``), and a minibatch multiplies the gradient along
    :math:`w_i` by :math:`1 + \bar z_i`: no noise at :math:`w^* = 0`, where the control variates
    take their values, and the same noise as a plain estimate everywhere else."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return 0.5 * ((1 + z) * self.h * self.w**2).sum(-1)


def scaled_rows_exact(result: LLCResult, z: torch.Tensor, m: int, gamma: float) -> float:
    r"""The exact mean of :math:`\hat\lambda` of SGLD (``result``'s step) on :class:`ScaledRows`
    (curvatures ``H``) with plain minibatches of ``m`` distinct rows of ``z``: along :math:`w_i`,
    :math:`V = E[(1 - \epsilon(a_i + n\beta h_i\bar z_i)/2)^2] V + \epsilon`, so
    :math:`V_i = 1/(a_i(1 - \epsilon a_i/4) - \epsilon (n\beta h_i)^2 v_i/4)` with :math:`v_i` the
    variance of :math:`\bar z_i` over minibatches."""
    n = len(z)
    nbeta, eps = result.nbeta, result.step_size
    a = nbeta * H.double() + gamma
    v = (z.double() ** 2).mean(0) / m * (n - m) / (n - 1)
    variance = 1 / (a * (1 - eps * a / 4) - eps * (nbeta * H.double()) ** 2 * v / 4)
    return float((nbeta * H * variance / 2).sum())


def test_control_variates_are_dropped_where_they_do_not_pay_and_the_chain_stays_exact():
    r"""Control variates at w* cannot reduce a noise that is nil at w* and grows away from it:
    after the pilots the chains run on plain minibatches (half the work a step), and the estimate
    is the exact law of SGLD with that multiplicative noise, :math:`\mathrm{Var}_i =
    1/(a_i(1 - \epsilon a_i/4) - \epsilon (n\beta h_i)^2 v_i/4)` with :math:`v_i` the variance of
    :math:`\bar z_i` over minibatches of m distinct rows (from :math:`V = E[(1 - \epsilon(a_i +
    n\beta h_i\bar z_i)/2)^2] V + \epsilon`). Where the noise at w* dominates (:class:`Quadratic`,
    :class:`LinearNoise`) they are kept: see the tests above and below."""
    torch.manual_seed(3)
    n, gamma, m = 1000, 50.0, 50
    loader = quadratic_data(n, 4, m)
    z = loader.dataset.tensors[0].mul_(8.0)  # noise that sets the step (half the step of z alone)
    result = estimate_llc(ScaledRows(H), loader, mean_output, reduction="mean", localization=gamma, num_chains=32,
                          num_draws=800, target_bias=0.05, sampler="sgld", progress_bar=False)
    assert not result.diagnostics.control_variates and not result.diagnostics.full_batch
    exact = scaled_rows_exact(result, z, m, gamma)
    assert_exact(result.llc, result.std_error, exact, what="plain minibatches after the pilots")


def test_control_variates_are_kept_where_they_pay():
    """:class:`LinearNoise`: the gradient's noise is nil at w* only through the control variates,
    which remove it everywhere: they stay on."""
    torch.manual_seed(2)
    loader = quadratic_data(1000, 4, 100)
    loader.dataset.tensors[0].mul_(0.5)
    result = estimate_llc(LinearNoise(H), loader, mean_output, reduction="mean", localization=50.0, num_chains=4,
                          num_draws=200, progress_bar=False)
    assert result.diagnostics.control_variates


def test_control_variates_are_judged_by_the_sampler_that_may_run():
    r"""Gradient noise as large as the averaged curvature, and a fifth of it with control variates:
    SGLD's step (bias from curvature and noise) grows only 1.6 times, BAOAB's (exact on the
    curvature; its bias is the noise's heat) grows enough that it relaxes the flat directions
    about 5 times as fast as the faster chain without them. The control variates pay where BAOAB
    runs (``"baoab"``, and ``"auto"``, which picks it with them), not where SGLD does; a loss
    estimate with a fifth of the variance pays with either."""
    plain = Scales(curvature=2e3, hessian_trace=1e4, noise_trace=1e4, noise_max=1e4, loss_noise=1.0)
    controlled = dataclasses.replace(plain, noise_trace=2e3, noise_max=2e3)
    llc, target, gamma = 5.0, 0.05, 1.0
    sgld = [choose_step(s, llc, target).size for s in (controlled, plain)]
    assert 1.5 < sgld[0] / sgld[1] < 2
    steps = [relaxation_steps(choose_step(s, llc, target, baoab=True, localization=gamma), gamma)
             for s in (controlled, plain)]  # to relax the flattest direction
    assert min(steps[1], relaxation_steps(ChainStep(sgld[1]), gamma)) > 4 * steps[0]
    assert not control_pays(controlled, plain, llc, target, sampler="sgld", localization=gamma)
    assert control_pays(controlled, plain, llc, target, sampler="baoab", localization=gamma)
    # "auto": BAOAB would run with them (prefer_baoab), SGLD without
    assert control_pays(controlled, plain, llc, target, sampler="auto", localization=gamma)
    quieter = dataclasses.replace(plain, loss_noise=plain.loss_noise / math.sqrt(5))
    assert control_pays(quieter, plain, llc, target, sampler="sgld", localization=gamma)
    # no localization and no curvature measured: the slowest direction's precision at its floor,
    # where BAOAB's overdamped rate h(C - sqrt(C^2 - 4a))/2 cancelled to 0 (a division by zero)
    flat = Scales(curvature=1e3, hessian_trace=0.0, noise_trace=1e2, noise_max=1e2, loss_noise=1.0)
    noisier = dataclasses.replace(flat, noise_trace=1e3, noise_max=1e3)
    assert control_pays(flat, noisier, llc, target, sampler="baoab", localization=0.0)


def inflate_noise_from_the_burn_in(monkeypatch) -> list[ChainStep]:
    """From the burn-in on, every measurement of the scales says the gradient noise is 10 times what
    it is (as where a network's chains reach noisier regions); returns the list that receives the
    step each sampling phase starts with (the pilots' choice)."""
    from pyro_sgmcmc.slt import llc as module

    original_measure, original_sample, started = module.LocalEngine.measure, module._Chains.sample, []

    def measure(self, plain=False):
        scales = original_measure(self, plain)
        if getattr(self, "inflated", False):
            return dataclasses.replace(scales, noise_trace=10 * scales.noise_trace, noise_max=10 * scales.noise_max)
        return scales

    def sample(self, burn_in, num_draws, step, target_bias):
        started.append(step)
        self.engine.inflated = True
        return original_sample(self, burn_in, num_draws, step, target_bias)

    monkeypatch.setattr(module.LocalEngine, "measure", measure)
    monkeypatch.setattr(module._Chains, "sample", sample)
    return started


def test_a_step_too_large_where_the_burn_in_took_the_chains_is_chosen_again(monkeypatch):
    """The pilots measure the scales near w*; a network's chains reach noisier regions only as their
    flat directions relax. Simulated: from the burn-in on, the noise measured is 10 times the
    chains' true noise. At the burn-in's end the pilots' step biases the estimate beyond twice the
    target by those scales: it is chosen again, a burn-in for it runs on, and the draws are the
    exact law of SGLD at the new step with the true noise (as in the test above)."""
    def run():
        torch.manual_seed(4)
        n, m = 1000, 100
        loader = quadratic_data(n, 4, m)
        z = loader.dataset.tensors[0].mul_(0.5)
        result = estimate_llc(LinearNoise(H), loader, mean_output, reduction="mean", localization=50.0,
                              num_chains=64, num_draws=2000, control_variates=False, target_bias=0.05, sampler="sgld",
                              progress_bar=False)
        return result, linear_noise_exact(result, z, m, 50.0)

    plain = run()[0]  # the same pilots, no re-choice: the noise is what they measured
    assert plain.diagnostics.rechoices == 0
    pilots_step = plain.step_size
    inflate_noise_from_the_burn_in(monkeypatch)
    result, exact = run()
    assert result.step_size < pilots_step / 2
    # the pilots' step's burn-in, then the new step's until the loss stopped drifting: whole
    # windows, the first check after ten
    assert result.diagnostics.rechoices == 1
    settled = result.diagnostics.burn_in - default_burn_in(pilots_step, 50.0, 2000)
    window = settle_window(ChainStep(result.step_size), 50.0, 2000)
    assert settled >= 10 * window and settled % window == 0
    assert result.diagnostics.step_bias <= 2 * result.diagnostics.target_bias
    assert_exact(result.llc, result.std_error, exact, what="at the step chosen again")


@pytest.mark.filterwarnings("ignore::pyro_sgmcmc.slt.LLCWarning")  # a short run, on purpose
def test_the_users_friction_is_kept_when_the_step_is_chosen_again(monkeypatch):
    """BAOAB at a given friction: the pilots' step, and the step chosen again at the burn-in's end
    (forced, as above, by noise measured 10 times larger from then on), both keep it."""
    chosen = inflate_noise_from_the_burn_in(monkeypatch)
    torch.manual_seed(4)
    result = estimate_llc(LinearNoise(H), quadratic_data(1000, 4, 100), mean_output, reduction="mean",
                          localization=50.0, num_chains=4, num_draws=400, control_variates=False, target_bias=0.05,
                          sampler="baoab", friction=40.0, progress_bar=False)
    assert chosen[0].friction == 40.0 and result.friction == 40.0
    assert result.step_size < chosen[0].size  # chosen again


def test_a_flat_direction_relaxes_over_every_burn_in_when_the_step_is_chosen_again(monkeypatch):
    """A given ``num_burnin`` is the user's to size for the pilots' step; when the step is chosen
    again at its end (forced as above), the burn-in runs on at the new step until the loss stops
    drifting, and a direction held only by the localization (whose variance hardly depends on the
    step) counts its relaxation over both: too short a given burn-in is warned about, with the
    burn-in it needs at the first step; that burn-in is not. Without a re-choice it is not either."""
    def run(burn_in):
        torch.manual_seed(4)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = estimate_llc(LinearNoise(H), quadratic_data(1000, 4, 100), mean_output, reduction="mean",
                                  localization=50.0, num_chains=4, num_draws=400, num_burnin=burn_in,
                                  control_variates=False, target_bias=0.05, sampler="sgld", progress_bar=False)
        return result, [str(w.message) for w in caught if issubclass(w.category, LLCWarning)]

    result, messages = run(10)
    assert result.diagnostics.rechoices == 0
    assert not any("chosen again" in m for m in messages)
    started = inflate_noise_from_the_burn_in(monkeypatch)
    result, messages = run(10)
    first = started[0]
    assert result.diagnostics.rechoices == 1
    settled = result.diagnostics.burn_in - 10
    missing = math.exp(-50.0 * (first.size * 10 + result.step_size * settled))
    assert missing > 0.25  # the premise: 10 steps at the first step, and the settling, leave it short
    needed = relaxation_steps(first, 50.0)
    assert any("chosen again at the burn-in's end" in m and f"give num_burnin={needed}" in m for m in messages)
    started.clear()
    result, messages = run(needed)
    assert started[0] == first and result.diagnostics.rechoices == 1
    assert not any("lacking about" in m for m in messages)


class DriftingEngine:
    """An engine whose chains' loss (``n beta = 1``, ``L* = 0``) is ``level + excess e^{-t/decay}``
    plus each chain's own lasting offset (sd ``offset``) and AR(1) noise (sd ``noise``, lag-one
    correlation ``rho``): what ``_Chains._settle`` sees after a re-choice, with the answer known."""

    def __init__(self, chains: int, excess: float, decay: float, seed: int, level: float = 100.0,
                 offset: float = 20.0, noise: float = 5.0, rho: float = 0.9):
        self.num_chains, self.num_sampled, self.exact = chains, 10, False
        self.generator = torch.Generator().manual_seed(seed)
        self.offsets = offset * torch.randn(chains, generator=self.generator, dtype=torch.float64)
        self.state = noise * torch.randn(chains, generator=self.generator, dtype=torch.float64)
        self.level, self.excess, self.decay, self.noise, self.rho, self.t = level, excess, decay, noise, rho, 0

    def run(self, steps: int, virials: bool = True):
        from pyro_sgmcmc.slt._engine import ChainChunk

        values = []
        for _ in range(steps):
            kick = torch.randn(self.num_chains, generator=self.generator, dtype=torch.float64)
            self.state = self.rho * self.state + math.sqrt(1 - self.rho**2) * self.noise * kick
            values.append(self.level + self.excess * math.exp(-self.t / self.decay) + self.offsets + self.state)
            self.t += 1
        values = torch.stack(values, 1)
        return ChainChunk(values, torch.zeros_like(values), None)

    def measure(self, plain: bool = False) -> Scales:
        return Scales(1.0, 1.0, 0.0, 0.0, 0.0)

    def set_limit(self, limit: float) -> None:
        pass

    def use(self, baoab: bool) -> None:
        pass

    def set_step(self, step: ChainStep) -> None:
        pass


def settle(engine: DriftingEngine, target_bias: float = 0.02):
    from pyro_sgmcmc.slt.llc import _Chains

    chains = _Chains(engine, 1.0, 1.0, 0.0, False, 400)
    step = ChainStep(1e-3)  # relaxation_steps 3000 at localization 1: windows of 100 steps
    chains.set_step(step)
    return chains._settle(step, 400, target_bias), settle_window(step, 1.0, 400)


def test_the_burn_in_after_a_re_choice_runs_while_the_loss_drifts_and_stops_when_it_settles():
    """Property, over 20 seeds, falls of 30 and 100 (30% and 100% of the level) and decay times up
    to the slowest that matters to the estimate (1/(2 eps gamma) = 500 steps here; windows of 100,
    the first check after 1000 steps), on
    synthetic chains (known fall, lasting per-chain offsets four times the noise): the burn-in
    never stops while the expected fall between the last two quarters of its stretch is above 6
    standard errors of the check (a 2-standard-error check stops at a fall of k of them with
    probability Phi(2 - k), 3e-5 at 6, below 1% over these 100 runs and their checks; an unpaired
    check, whose error the offsets would swell to ~10, would stop at once), and stops within three
    windows of it falling below one; without a fall it mostly stops at its first check."""
    first_check = 0
    for seed in range(20):
        for excess, decay in ((30.0, 100.0), (30.0, 300.0), (30.0, 500.0), (100.0, 300.0), (100.0, 500.0)):
            engine = DriftingEngine(8, excess=excess, decay=decay, seed=seed)
            settling, window = settle(engine)
            assert settling.reason is None

            def error(t):  # two quarters of t / 4 draws of AR(1) noise (integrated time (1 + rho)/(1 - rho)
                return math.sqrt(2 * 25 * 19 / (t / 4) / 8)  # = 19), 8 chains

            def fall(t):  # the expected change from the stretch's third quarter to its fourth
                quarter = t / 4
                return -excess * decay / quarter * math.exp(-2 * quarter / decay) * (1 - math.exp(-quarter / decay)) ** 2

            assert abs(fall(settling.steps)) <= 6 * error(settling.steps), (seed, decay, settling)
            later = next(t for t in range(10 * window, 100 * window, window) if abs(fall(t)) < error(t))
            assert settling.steps <= later + 3 * window or settling.capped, (seed, decay, settling)
            assert not settling.capped or later + 3 * window > 30 * window, (seed, decay, settling)
        quiet, _ = settle(DriftingEngine(8, excess=0.0, decay=1.0, seed=seed))
        first_check += quiet.steps == 10 * window
    assert first_check >= 15


def test_the_burn_in_after_a_re_choice_ends_at_its_cap_still_drifting():
    engine = DriftingEngine(8, excess=1e4, decay=1e5, seed=0)  # 10 a window
    settling, window = settle(engine)
    assert settling.capped and settling.steps == 30 * window
    assert settling.drift.change < -4 * settling.drift.std_error


def test_the_paired_drift_error_is_calibrated_with_lasting_chain_offsets():
    """Over 400 replicates without drift (8 AR(1) chains with lasting offsets four times their
    noise), the paired change's spread matches its standard error: at most 10% below it (the
    larger of two estimates leans high), and not far below it either, as the unpaired error
    (about ten times too large here) or one that ignored the autocorrelation would be."""
    ratios = []
    for seed in range(400):
        engine = DriftingEngine(8, excess=0.0, decay=1.0, seed=seed)
        values = engine.run(400).values
        drift = paired_drift(values[:, :200], values[:, 200:])
        ratios.append(drift.change / drift.std_error)
    spread = float(torch.tensor(ratios).std())
    assert 0.75 <= spread <= 1.1, spread  # the spread of 400 ratios is itself within about 4%


def test_the_drift_warning_says_which_way_the_estimate_is_off():
    """Shared by the LLC and WBIC: a rise of the quantity (the loss, the negative log likelihood)
    from the draws' first half to their second makes the estimate too low, a fall too high; a
    change within 4 standard errors is not warned about."""
    from pyro_sgmcmc.slt._stats import Drift, drift_warning

    assert "too low" in drift_warning(Drift(5.0, 1.0), "loss", "give more num_burnin")
    assert "too high" in drift_warning(Drift(-5.0, 1.0), "loss", "give more num_burnin")
    assert drift_warning(Drift(3.9, 1.0), "loss", "give more num_burnin") is None


def test_draws_that_still_drift_are_warned_about():
    """From w* at a small given step with no burn-in (full batches: no minibatch noise on the loss),
    every direction's variance is still growing
    through the draws (along the stiffest, a = n beta h + gamma = 484, over 1/(eps a) = 207 steps;
    the draws are 400): the loss's rise from their first half to their second is warned about and
    said to make the estimate too low. After a burn-in that relaxes them (3/(eps gamma) = 6000
    steps) it is not."""
    def run(burn_in):
        torch.manual_seed(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            result = estimate_llc(LinearNoise(H), quadratic_data(1000, 4, 1000), mean_output, reduction="mean",
                                  localization=50.0, num_chains=64, num_draws=400, num_burnin=burn_in, step_size=1e-5,
                                  control_variates=False, progress_bar=False)
        return result, [str(w.message) for w in caught if issubclass(w.category, LLCWarning)]

    result, messages = run(0)
    assert result.diagnostics.drift > 4 * result.diagnostics.drift_std_error
    assert any("still drifted during the draws" in m and "too low" in m for m in messages)
    result, messages = run(6000)
    assert abs(result.diagnostics.drift) <= 4 * result.diagnostics.drift_std_error
    assert not any("drifted" in m for m in messages)


def test_minibatches_are_uniform_distinct_rows_drawn_anew_at_every_step():
    from pyro_sgmcmc.slt._data import Minibatches

    torch.manual_seed(17)
    for n, m in ((40, 20), (1000, 10)):  # a permutation's first rows (4 m > n), or distinct draws
        batches = Minibatches.from_loader(DataLoader(TensorDataset(torch.arange(n)), batch_size=m))
        index = torch.cat([batches.indices(8) for _ in range(2000)])  # [2000 * 8, m]
        assert index.shape == (16000, m)
        assert bool((index.sort(1).values.diff(1) > 0).all())  # distinct within a minibatch
        counts = torch.bincount(index.reshape(-1), minlength=n).double()
        expected = index.numel() / n
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < n - 1 + 5 * math.sqrt(2 * (n - 1)), (n, m, chi2)  # chi^2_{n-1}: 5 sds, about p = 1e-5
        # and independent between steps: two consecutive minibatches of a chain share rows as often as
        # two independent ones (m^2 / n on average), not never, as in an epoch's walk
        shared = (index[:-8, :, None] == index[8:, None, :]).any(-1).sum(1).double()
        assert abs(float(shared.mean()) - m * m / n) < 5 * float(shared.std()) / math.sqrt(len(shared)), (n, m)


class Monomials(torch.nn.Module):
    r"""Per-row loss :math:`\sum_i k_i |w_i|^{p_i} x_i`; with the rows' ``x`` of mean 1, the mean loss is
    :math:`\sum_i k_i |w_i|^{p_i}`."""

    def __init__(self, powers: torch.Tensor, k: torch.Tensor):
        super().__init__()
        self.powers, self.k = powers, k
        self.w = torch.nn.Parameter(torch.zeros(len(powers)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.k * self.w.abs() ** self.powers * x).sum(-1)


def monomial_llc(nbeta: float | None, seed: int, num_draws: int = 500, sampler: str = "sgld") -> tuple[float, object]:
    torch.manual_seed(seed)
    powers, k = torch.tensor([2.0, 4.0, 4.0]), torch.tensor([1.0, 2.0, 0.5])
    n = 2000
    x = 1 + 0.5 * torch.randn(n, 3)
    x += 1 - x.mean(0)
    loader = DataLoader(TensorDataset(x, torch.zeros(n)), batch_size=200)
    result = estimate_llc(Monomials(powers, k), loader, mean_output, reduction="mean", localization=0.0, nbeta=nbeta,
                          num_chains=128, num_draws=num_draws, target_bias=0.05, sampler=sampler, progress_bar=False)
    return float((1 / powers).sum()), result


@pytest.mark.parametrize("sampler", ["sgld", "baoab"])
def test_even_monomials_give_the_sum_of_inverse_powers(sampler):
    """Non-quadratic (quartic) directions, where BAOAB's law is not exact: its bias, outside the
    rule's quadratic bound, must still be within the Monte Carlo error of this run (a 10% error
    shows)."""
    exact, result = monomial_llc(None, seed=3, sampler=sampler)
    assert_exact(result.llc, result.std_error, exact, result.diagnostics.step_bias * exact, what=f"monomials {sampler}")


@pytest.mark.slow
@pytest.mark.parametrize("sampler", ["sgld", "baoab"])
@pytest.mark.parametrize("nbeta", [30.0, 1000.0])
def test_even_monomials_give_the_sum_of_inverse_powers_at_any_temperature(nbeta, sampler):
    exact, result = monomial_llc(nbeta, seed=int(nbeta), num_draws=800, sampler=sampler)
    assert_exact(result.llc, result.std_error, exact, result.diagnostics.step_bias * exact,
                 what=f"nbeta={nbeta} {sampler}")


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::pyro_sgmcmc.slt.LLCWarning")  # judged by the exact values
def test_the_default_chain_over_starts_and_models_gives_the_exact_values():
    """``sampler="auto"`` (the default), as a property over seeds and models: whichever chain it
    picks, and after whatever restarts, each estimate is within 4 standard errors plus its stated
    bias of the exact value. The quadratic with flat directions (full batch, and minibatches with
    control variates: BAOAB's cases), its noisy variant without control variates (SGLD's), and
    the separable monomials (quartic directions, no localization)."""
    n, gamma = 1000, 50.0
    h = torch.cat([H, torch.zeros(2)])
    quadratic = quadratic_exact(h, n / math.log(n), gamma)
    picked = []
    for seed in range(4):
        for batch, model, options in ((n, Quadratic(h), {}), (100, Quadratic(h), {}),
                                      (200, LinearNoise(h), dict(reduction="mean", control_variates=False,
                                                                num_chains=32, num_draws=2000))):
            torch.manual_seed(100 + seed)
            loader = quadratic_data(n, 6, batch, seed=seed)
            result = estimate_llc(model, loader, mean_output, localization=gamma, progress_bar=False,
                                  **{"num_chains": 16, "num_draws": 800, **options})
            # the noisy chain's law has its noise's heat in it: SGLD's exact factor (1 + eps B / 4) is
            # within its stated bias, which counts the measured noise
            assert_exact(result.llc, result.std_error, quadratic, result.diagnostics.step_bias * quadratic,
                         what=f"seed {seed}, batch {batch}, {result.diagnostics.sampler}")
            picked.append(result.diagnostics.sampler)
        exact, result = monomial_llc(None, seed=200 + seed, sampler="auto")
        assert_exact(result.llc, result.std_error, exact, result.diagnostics.step_bias * exact,
                     what=f"monomials, seed {seed}, {result.diagnostics.sampler}")
    assert "baoab" in picked and "sgld" in picked  # both of auto's choices were exercised


@pytest.mark.parametrize("sampler", ["sgld", "baoab"])
def test_the_standard_error_is_honest_across_independent_groups_of_chains(sampler):
    torch.manual_seed(4)
    n, gamma, groups, chains = 1000, 50.0, 32, 4
    # a larger target bias: short chains of many relaxation times, so that the error estimate of
    # each group is not limited by their length (the exact value accounts for the step anyway)
    result = estimate_llc(Quadratic(H), quadratic_data(n, 4, 100), mean_output, localization=gamma,
                          num_chains=groups * chains, num_draws=600, target_bias=0.1, sampler=sampler,
                          progress_bar=False)
    exact = quadratic_exact(H, result.nbeta, gamma, 0.0 if sampler == "baoab" else result.step_size)
    expected_virial = d_virial(result)
    z, z_virial = [], []
    for g in range(groups):
        summary = chain_mean(result.draws[g * chains : (g + 1) * chains])
        z.append((result.nbeta * (summary.mean - result.init_loss) - exact) / (result.nbeta * summary.std_error))
        virial = chain_mean(result.virial_trace[g * chains : (g + 1) * chains, result.num_excluded :])
        z_virial.append((virial.mean - expected_virial) / virial.std_error)
    z, z_virial = torch.tensor(z), torch.tensor(z_virial)
    # mean of z^2 is chi^2_32 / 32 for honest errors: within [0.43, 1.85] with probability 0.998;
    # errors off by a factor 1.6 either way put it near 2.6 or 0.4
    assert 0.43 < float((z**2).mean()) < 1.85, z
    # the same for the virial of equilibrated chains against its exact value, SGLD's offset
    # included: honest errors, and no false alarms of the unrelaxed-directions check
    assert 0.43 < float((z_virial**2).mean()) < 1.85, z_virial


def ar1_with_white_noise(replicates: int, chains: int, draws: int, slow: float, correlation_time: float,
                         seed: int) -> torch.Tensor:
    """``[replicates, chains, draws]``: unit white noise plus a stationary AR(1) component of
    standard deviation ``slow`` and autocorrelation ``exp(-1/correlation_time)`` a draw."""
    generator = torch.Generator().manual_seed(seed)
    rho = math.exp(-1.0 / correlation_time)
    state = slow * torch.randn(replicates, chains, generator=generator, dtype=torch.float64)
    x = torch.empty(replicates, chains, draws, dtype=torch.float64)
    for t in range(draws):
        state = rho * state + math.sqrt(1 - rho**2) * slow * torch.randn(replicates, chains, generator=generator,
                                                                         dtype=torch.float64)
        x[:, :, t] = state + torch.randn(replicates, chains, generator=generator, dtype=torch.float64)
    return x


def ar1_mean_variance(chains: int, draws: int, slow: float, correlation_time: float) -> float:
    """The exact variance of the mean of :func:`ar1_with_white_noise`'s draws."""
    rho = math.exp(-1.0 / correlation_time)
    lags = torch.arange(1, draws, dtype=torch.float64)
    pairs = draws + 2 * float(((draws - lags) * rho**lags).sum())
    return (1.0 / draws + slow**2 * pairs / draws**2) / chains


@pytest.mark.parametrize("slow, correlation_time", [(0.0, 1.0), (0.1, 500.0), (0.1, 4500.0), (1.0, 50.0)])
def test_the_standard_error_sees_a_slow_component_hidden_in_white_noise(slow, correlation_time):
    # 4 chains of 500 draws: a slow component 10% of the per-draw noise shifts each chain's mean
    # (its share of the mean's variance: 3-5 times the white noise's at 500 draws) while its
    # autocorrelation is lost in the noise where Geyer's sum is cut
    replicates, chains, draws = 300, 4, 500
    x = ar1_with_white_noise(replicates, chains, draws, slow, correlation_time, seed=11)
    exact = ar1_mean_variance(chains, draws, slow, correlation_time)
    summaries = [chain_mean(x[r]) for r in range(replicates)]
    squared = torch.tensor([s.std_error**2 for s in summaries]) / exact  # in units of the exact variance
    autocorrelation = torch.tensor([s.autocorrelation_std_error**2 for s in summaries]) / exact
    # the mean squared standard error is at least 1 (honest: the spread's square alone is unbiased)
    # within 4 of its Monte Carlo errors, and at most 1.45 (the larger of two estimates overstates a
    # right one by ~1.3 in the square with 4 chains, ChainMean's docstring)
    monte_carlo = math.sqrt(float(squared.var()) / replicates)
    assert 1.0 - 4 * monte_carlo <= float(squared.mean()) <= 1.45 + 4 * monte_carlo, (squared.mean(), monte_carlo)
    flagged = sum(s.spread_p < 0.01 for s in summaries)
    if slow == 0.1:  # where the autocorrelation alone understates the error (to a quarter, in the square)
        assert float(autocorrelation.mean()) < 0.5, autocorrelation.mean()
        assert flagged > 0.2 * replicates, flagged  # 41% and 52% here
    else:  # white noise, or a slow part the autocorrelation sees: the spread test fires at its 1% rate
        assert flagged <= 0.01 * replicates + 4 * math.sqrt(0.01 * replicates), flagged  # 3 and 0 here


def test_chains_spread_beyond_their_autocorrelation_are_warned_about_with_the_remedy():
    # how often the spread test fires is tested above; here, what the warning says
    summary = ChainMean(1.0, 0.09, 170.0, 1.03, autocorrelation_std_error=0.03, spread_std_error=0.09, spread_p=1e-4)
    message = spread_warning(summary, 2.0, "loss", "num_samples")
    assert "num_chains" in message and "num_samples" in message and "0.18" in message and "0.06" in message
    assert spread_warning(dataclasses.replace(summary, spread_p=0.02), 1.0, "loss", "num_samples") is None


@pytest.mark.filterwarnings("ignore:.*drifted during sampling")  # the WBIC run is short, on purpose
def test_llc_and_wbic_warn_when_their_chains_spread_beyond_their_autocorrelation(monkeypatch):
    """The warning is wired into both: ``chain_mean`` made to report a spread test at p = 1e-4; and
    both results carry the two errors and say which one they give."""
    import importlib

    llc_module = importlib.import_module("pyro_sgmcmc.slt.llc")
    wbic_module = importlib.import_module("pyro_sgmcmc.slt.wbic")  # the package's ``wbic`` is the function

    def spread(module):
        original = module.chain_mean
        monkeypatch.setattr(module, "chain_mean", lambda draws: dataclasses.replace(original(draws), spread_p=1e-4))

    spread(llc_module)
    spread(wbic_module)
    torch.manual_seed(0)
    with pytest.warns(LLCWarning, match="spread more than their autocorrelation.*num_draws"):
        llc = estimate_llc(Quadratic(H), quadratic_data(1000, 4, 100), mean_output, localization=50.0,
                           num_chains=2, num_draws=200, progress_bar=False)
    pyro.set_rng_seed(0)
    x, y = linear_regression_data(100, 2, 0.5, seed=0)
    with pytest.warns(LLCWarning, match="spread more than their autocorrelation.*num_samples"):
        evidence = wbic(regression(x.float(), y.float(), 0.5, 1.0), (x.float(), y.float()), num_samples=50,
                        warmup_steps=50, num_chains=2, kernel_options={"full_mass": True, "exact_gaussian": True},
                        progress_bar=False)
    for result, errors in ((llc, llc.diagnostics), (evidence, evidence)):
        assert result.std_error == pytest.approx(max(errors.autocorrelation_std_error, errors.spread_std_error))
        spread = errors.spread_std_error > errors.autocorrelation_std_error
        assert ("from the chains' spread" if spread else "from the autocorrelation") in str(result)
    assert evidence.spread_p == 1e-4


def d_virial(result) -> float:
    """The exact mean virial of SGLD's stationary law on :class:`Quadratic` with :data:`H`:
    ``sum_i a_i var_i`` with ``var_i = (1 + step B_i / 4) / (a_i (1 - step a_i / 4))``, the curvature
    ``a_i = n beta h_i + gamma``, and the minibatch noise ``B_i`` of direction ``i`` (per-row
    gradients ``h_i (w_i - z_i)``, ``z`` of unit variance: ``B_i`` in proportion to ``h_i^2``) from the
    measured total. BAOAB's with control variates (no noise on a quadratic): ``d`` exactly."""
    h = H.double()
    if result.friction is not None:
        assert result.diagnostics.control_variates
        return float(len(h))
    a = result.nbeta * h + result.localization
    noise = result.diagnostics.scales.noise_trace * h**2 / (h**2).sum()
    return float(((1 + result.step_size * noise / 4) / (1 - result.step_size * a / 4)).sum())


@pytest.mark.filterwarnings("ignore::pyro_sgmcmc.slt.LLCWarning")  # a short run, on purpose
def test_sum_and_mean_reductions_give_the_same_chain_and_n_is_the_data_set_size():
    n = 500
    loader = quadratic_data(n, 4, 50)
    results = []
    for reduction in ("mean", "sum"):
        torch.manual_seed(5)
        loss = lambda out, target, r=reduction: out.mean() if r == "mean" else out.sum()  # noqa: E731
        results.append(estimate_llc(Quadratic(H), loader, loss, localization=50.0, num_chains=2, num_draws=40,
                                    step_size=1e-4, progress_bar=False))
    mean, total = results
    assert mean.n == total.n == n and mean.nbeta == pytest.approx(n / math.log(n))  # not the batch size, 50
    torch.testing.assert_close(mean.loss_trace, total.loss_trace, rtol=1e-4, atol=1e-6)
    exact = float(0.5 * (H * loader.dataset.tensors[0] ** 2).sum(1).mean())  # L_n(0), one full pass
    assert mean.init_loss == pytest.approx(exact, rel=1e-6)
    # burn-in and adaptation are excluded: the estimate is the mean of the draws only; the default
    # burn-in relaxes the flattest direction (precision gamma) to 5%, at most half the draws
    assert mean.num_excluded == mean.loss_trace.shape[1] - 40 == mean.diagnostics.burn_in
    assert mean.diagnostics.burn_in == default_burn_in(1e-4, 50.0, 40) == 20
    assert default_burn_in(1e-3, 50.0, 1000) == 100 and default_burn_in(1e-4, 50.0, 1000) == 500
    assert default_burn_in(2e-4, 50.0, 1000) == 300 and default_burn_in(1e-4, 0.0, 1000) == 100
    assert mean.llc == pytest.approx(mean.nbeta * (float(mean.draws.double().mean()) - mean.init_loss))


@pytest.mark.parametrize("loss, reduction", [
    (torch.nn.MSELoss(), "mean"),
    (torch.nn.MSELoss(reduction="sum"), "sum"),
    (lambda out, y: ((out - y) ** 2).mean(), "mean"),
    (lambda out, y: ((out - y) ** 2).sum(), "sum"),
    (lambda out, y: ((out - y) ** 2).sum(-1), "none"),
])
def test_the_reduction_is_detected(loss, reduction):
    from pyro_sgmcmc.slt._data import detect_reduction

    torch.manual_seed(6)
    model = torch.nn.Linear(3, 2)
    batch = (torch.randn(10, 3), torch.randn(10, 2))
    assert detect_reduction(lambda b: loss(model(b[0]), b[1]), batch, None, loss) == reduction


def test_a_reduction_that_cannot_be_detected_is_an_error():
    from pyro_sgmcmc.slt._data import detect_reduction

    batch = (torch.randn(10, 3), torch.randn(10))
    with pytest.raises(ValueError, match="Invalid reduction: None .*it is zero on these rows"):
        detect_reduction(lambda b: b[0].sum() * 0, batch, None, None)
    with pytest.raises(ValueError, match="neither the mean nor the sum"):
        detect_reduction(lambda b: b[0].pow(2).mean().sqrt(), batch, None, None)  # a root mean square
    with pytest.raises(ValueError, match="Invalid reduction: 'avg' .*must be one of 'mean', 'sum', 'none'"):
        detect_reduction(lambda b: b[0].sum(), batch, "avg", None)


@pytest.mark.filterwarnings("ignore::pyro_sgmcmc.slt.LLCWarning")  # a short run, on purpose
def test_a_subset_of_parameters_is_sampled_and_the_rest_stays_at_w_star():
    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    x = torch.randn(200, 3)
    y = model(x).detach() + 0.1 * torch.randn(200, 1)
    loader = DataLoader(TensorDataset(x, y), batch_size=50)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = estimate_llc(model, loader, torch.nn.MSELoss(), params=["2.weight", "2.bias"], num_chains=2,
                          num_draws=50, progress_bar=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])  # the module is not modified
    assert result.diagnostics.scales.hessian_trace > 0
    with pytest.raises(ValueError, match="Invalid params: 'nope' is not a parameter"):
        estimate_llc(model, loader, torch.nn.MSELoss(), params=["nope"], progress_bar=False)
    with pytest.raises(ValueError, match=r"Invalid mask\[0\]: shape \(3,\) does not match"):
        estimate_llc(model, loader, torch.nn.MSELoss(), params=["2.weight"], mask={"2.weight": torch.ones(3)},
                     progress_bar=False)


@pytest.mark.filterwarnings("ignore::pyro_sgmcmc.slt.LLCWarning")  # a short run, on purpose
def test_chains_one_by_one_are_the_vectorized_chains():
    loader = quadratic_data(500, 4, 50)
    traces = []
    for vectorize in (True, False):
        torch.manual_seed(8)
        result = estimate_llc(Quadratic(H), loader, mean_output, localization=50.0, num_chains=3, num_draws=30,
                              step_size=2e-4, vectorize=vectorize, progress_bar=False)
        assert result.diagnostics.vectorized == vectorize
        traces.append(result.loss_trace)
    torch.testing.assert_close(traces[0], traces[1], rtol=1e-5, atol=1e-7)  # the same draws, the same chains


@pytest.mark.parametrize("exact", [False, True])
def test_vectorized_gradients_are_reverse_mode_through_the_chains_and_contiguous(exact):
    """``ModuleObjective.gradients`` (``vmap(grad_and_value(...))``) against the base class's reverse
    mode through the ``vmap``-ed losses, at w and at w* on the same minibatches, for a network
    whose weight gradients reverse mode leaves transposed."""
    torch.manual_seed(3)
    net = torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 2))
    x, y = torch.randn(64, 5), torch.randn(64, 2)
    loader = DataLoader(TensorDataset(x, y), batch_size=64 if exact else 16)
    objective = ModuleObjective(net, Minibatches.from_loader(loader), loss_fn=torch.nn.functional.mse_loss,
                                evaluate=None, reduction=None, params=None, mask=None, num_chains=3, vectorize=True)
    assert objective.vectorized and objective.exact == exact
    with torch.no_grad():
        for p in objective.params:
            p.add_(0.1 * torch.randn_like(p))  # the chains apart from w* and from each other
    batch = objective.draw()
    for anchored in (False, True):
        ours = objective.gradients(batch, anchored)
        reverse = ChainObjective.gradients(objective, batch, anchored)
        torch.testing.assert_close(ours.losses, reverse.losses)
        for a, b in zip(ours.grads, reverse.grads):
            assert a.is_contiguous()
            torch.testing.assert_close(a, b)
        if anchored:
            torch.testing.assert_close(ours.anchor_losses, reverse.anchor_losses)
            for a, b in zip(ours.anchor_grads, reverse.anchor_grads):
                torch.testing.assert_close(a, b)


@pytest.mark.filterwarnings("ignore::pyro_sgmcmc.slt.LLCWarning")  # a short run, on purpose
def test_a_module_without_functional_gradients_keeps_vectorized_chains_by_reverse_mode(monkeypatch):
    """Where ``vmap(grad_and_value(...))`` fails at construction (an operation without functorch's
    rule for ``grad``) while the batched forward works, the chains stay vectorized and their
    gradients come by reverse mode through the ``vmap``-ed losses: the same chains, draw for draw."""
    loader = quadratic_data(500, 4, 50)
    traces = []
    for functional in (True, False):
        if not functional:
            def fail(self, values, batch):
                raise RuntimeError("no functorch rule")

            monkeypatch.setattr(ModuleObjective, "_vmapped_gradients", fail)
        torch.manual_seed(8)
        result = estimate_llc(Quadratic(H), loader, mean_output, localization=50.0, num_chains=3, num_draws=30,
                              step_size=2e-4, progress_bar=False)
        assert result.diagnostics.vectorized
        traces.append(result.loss_trace)
    torch.testing.assert_close(traces[0], traces[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("size", [10, 70_000])  # below and above the size for one torch.dot a chain
def test_the_virial_is_its_formula(size):
    torch.manual_seed(4)
    chains, nbeta, localization = 3, 20.0, 2.0
    objective = types.SimpleNamespace(num_chains=chains, params=[torch.randn(chains, size), torch.randn(chains, 2)],
                                      anchor_stack=[torch.randn(1, size).expand(chains, size),
                                                    torch.randn(1, 2).expand(chains, 2)])
    grads = [torch.randn(chains, size), torch.randn(chains, 2)]
    expected = sum(((p - a).double() * (nbeta * g + localization * (p - a)).double()).sum(1)
                   for p, a, g in zip(objective.params, objective.anchor_stack, grads))
    torch.testing.assert_close(virial(objective, grads, nbeta, localization), expected, rtol=1e-5, atol=0)


@pytest.mark.filterwarnings("ignore::pyro_sgmcmc.slt.LLCWarning")  # a short run, on purpose
def test_a_module_that_vmap_cannot_batch_runs_its_chains_one_by_one():
    torch.manual_seed(8)
    result = estimate_llc(Looping(H), quadratic_data(500, 4, 50), mean_output, localization=50.0, num_chains=2,
                          num_draws=20, step_size=2e-4, progress_bar=False)
    assert not result.diagnostics.vectorized and bool(result.loss_trace.isfinite().all())
    with pytest.raises(RuntimeError):
        estimate_llc(Looping(H), quadratic_data(500, 4, 50), mean_output, vectorize=True, progress_bar=False)


@pytest.mark.filterwarnings("ignore::pyro_sgmcmc.slt.LLCWarning")  # a short run, on purpose
def test_diagnostics_warn_about_a_chain_far_from_equilibrium_and_a_biasing_step():
    torch.manual_seed(9)
    loader = quadratic_data(1000, 4, 1000)  # full batches: the loss trace is exact, the drift plain
    with pytest.warns(LLCWarning, match="did not equilibrate"):
        cold = estimate_llc(Quadratic(H), loader, mean_output, localization=1.0, step_size=2e-5, num_burnin=0,
                            num_chains=4, num_draws=400, progress_bar=False)
    assert cold.diagnostics.r_hat > 1.05 and cold.diagnostics.warnings
    with pytest.warns(LLCWarning, match="step size biases the estimate"):
        hot = estimate_llc(Quadratic(H), loader, mean_output, localization=1.0, step_size=4e-3, num_chains=4,
                           num_draws=200, progress_bar=False)
    assert hot.diagnostics.step_bias > 0.2
    with warnings.catch_warnings():
        warnings.simplefilter("error", LLCWarning)  # a healthy run says nothing
        estimate_llc(Quadratic(H), loader, mean_output, localization=50.0, num_chains=8, num_draws=400,
                     progress_bar=False)


def test_a_default_burn_in_capped_far_short_of_the_flat_directions_relaxation_is_warned_about():
    """The default burn-in is at most num_draws // 2; where 3/(step·γ) is far longer, a direction
    held only by the localization would still lack most of its variance, which no check of the
    draws sees if its drift starts later (CHANGELOG: a network's estimate that moved by 20% with a
    longer burn-in). A burn-in the user gives is the user's choice."""
    torch.manual_seed(10)
    loader = quadratic_data(1000, 4, 1000)
    with pytest.warns(LLCWarning, match="burn-in was capped at num_draws // 2 = 20 steps"):
        capped = estimate_llc(Quadratic(H), loader, mean_output, localization=1.0, num_chains=2, num_draws=40,
                              progress_bar=False)
    assert math.exp(-capped.step_size * 1.0 * capped.diagnostics.burn_in) > 0.25
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        estimate_llc(Quadratic(H), loader, mean_output, localization=1.0, num_chains=2, num_draws=40, num_burnin=20,
                     progress_bar=False)
    assert not [w for w in caught if "burn-in was capped" in str(w.message)]


def test_one_chain_shorter_than_its_slowest_direction_is_warned_about():
    """With one chain there is no spread of chain means to see a direction slower than the draws:
    where 3/(step·γ) exceeds them, a warning asks for more chains; with two, it does not."""
    torch.manual_seed(10)
    loader = quadratic_data(1000, 4, 1000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        one = estimate_llc(Quadratic(H), loader, mean_output, localization=1.0, num_chains=1, num_draws=40,
                           num_burnin=20, progress_bar=False)
        two = estimate_llc(Quadratic(H), loader, mean_output, localization=1.0, num_chains=2, num_draws=40,
                           num_burnin=20, progress_bar=False)
    assert relaxation_steps(ChainStep(one.step_size, one.friction), 1.0) > 40
    assert relaxation_steps(ChainStep(two.step_size, two.friction), 1.0) > 40
    assert len([w for w in caught if "one chain cannot show" in str(w.message)]) == 1
    assert "num_chains=4" in next(str(w.message) for w in caught if "one chain cannot show" in str(w.message))


def test_a_step_unstable_where_the_chains_ended_is_called_unstable_not_an_infinite_bias():
    from pyro_sgmcmc.slt.llc import _warnings

    (message,) = _warnings(5.0, 0.1, 1.0, 1000.0, math.inf, 0.02, given=True)
    assert "unstable where the chains ended" in message and "given step_size" in message and "inf" not in message
    (message,) = _warnings(5.0, 0.1, 1.0, 1000.0, 0.1, 0.02, given=False)
    assert "biases the estimate by about 10%" in message


@pytest.mark.filterwarnings("ignore::pyro_sgmcmc.slt.LLCWarning")  # R-hat's own noise, not the subject here
def test_diagnostics_see_flat_directions_that_have_not_relaxed():
    """Ten directions nearly as flat as the localization (n beta h = 0.29 against gamma = 1) relax
    over thousands of steps and carry little of the loss's variance: the default burn-in (capped at
    half the draws) leaves them short, and split R-hat hardly moves; the virial's deficit counts
    them, and matches its exact value for SGLD on a Gaussian started at w*."""
    h = torch.cat([torch.full((20,), 3.0), torch.full((10,), 0.002)])
    loader = quadratic_data(1000, 30, 1000)  # one batch: the gradient is exact
    step = 1.7e-4  # near the automatic choice; given, so that the exact value below holds
    torch.manual_seed(10)
    short = estimate_llc(Quadratic(h), loader, mean_output, localization=1.0, num_chains=8, num_draws=400,
                         step_size=step, progress_bar=False)
    d = short.diagnostics
    # along a direction of precision a, x' = (1 - step a/2) x + sqrt(step) z from x = 0 has variance
    # (1 - r^(2t)) / (a (1 - step a/4)) after t steps, r = 1 - step a/2, so a virial a x^2 of mean
    # (1 - r^(2t)) / (1 - step a/4); expected_virial counts 1 + step a/4 for each direction
    nbeta = 1000 / math.log(1000)
    a = nbeta * h.double() + 1.0
    t = torch.arange(d.burn_in, d.burn_in + 400, dtype=torch.float64)
    relaxed = 1 - ((1 - step * a / 2).unsqueeze(1) ** (2 * t)).mean(1)
    deficit = float((1 + step * a / 4 - relaxed / (1 - step * a / 4)).sum())
    assert 9.0 < deficit < 9.3  # the ten flat directions, short by 0.92 each; the stiff ones relaxed
    # 4 standard errors (12 seeds of this run: z-scores of mean -0.18, sd 0.92)
    assert abs(d.unrelaxed - deficit) < 4 * d.unrelaxed_std_error
    assert any("had not relaxed" in message for message in d.warnings)
    # the virial is computed over the draws only
    excluded = short.num_excluded
    assert excluded > 0 and bool(short.virial_trace[:, :excluded].isnan().all())
    assert bool(short.virial_trace[:, excluded:].isfinite().all())
    # (equilibrated chains show no deficit: the virial's test in the independent groups above)


@pytest.mark.filterwarnings("ignore::pyro_sgmcmc.slt.LLCWarning")  # a short run, on purpose
def test_w_star_that_is_not_a_minimum_is_reported():
    torch.manual_seed(10)
    model = Quadratic(H)
    with torch.no_grad():
        model.w.fill_(0.5)  # far up the quadratic: the chain runs down
    with pytest.warns(LLCWarning, match="not a local minimum"):
        result = estimate_llc(model, quadratic_data(1000, 4, 100), mean_output, localization=1.0, num_chains=4,
                              num_draws=200, progress_bar=False)
    assert result.llc < 0


def test_bad_arguments_are_refused_with_clear_messages():
    loader = quadratic_data(100, 4, 10)
    model = Quadratic(H)
    cases = [
        (dict(num_chains=0), r"Invalid num_chains: 0 \(must be an integer >= 1\)"),
        (dict(num_draws=2), r"Invalid num_draws: 2 \(must be an integer >= 4\)"),
        (dict(localization=-1.0), r"Invalid localization: -1.0 \(must be a finite number >= 0\)"),
        (dict(nbeta=0.0), r"Invalid nbeta: 0.0 \(must be a finite number > 0 or None\)"),
        (dict(step_size=float("nan")), r"Invalid step_size: nan"),
        (dict(target_bias=2.0), r"Invalid target_bias: 2.0 \(must be a finite number > 0 and < 1\)"),
        (dict(n=50), r"Invalid n: 50 \(the data set has 100 rows; n is the size of the whole data set"),
        (dict(num_burnin=-1), r"Invalid num_burnin: -1 \(must be an integer >= 0 or None\)"),
        (dict(control_variates="yes"), r"Invalid control_variates: 'yes' \(must be True or False\)"),
        (dict(vectorize="no"), r"Invalid vectorize: 'no' \(must be True or False\)"),
        (dict(progress_bar=1), r"Invalid progress_bar: 1 \(must be True or False\)"),
        (dict(mp_context="threads"), r"Invalid mp_context: 'threads' \(must be one of 'spawn', 'forkserver', 'fork', None"),
        (dict(mp_context="spawn", vectorize=True, num_chains=2), r"Invalid vectorize: True with mp_context='spawn'"),
        (dict(sampler="hmc"), r"Invalid sampler: 'hmc' \(must be one of 'auto', 'sgld', 'baoab'\)"),
        (dict(friction=0.0, sampler="baoab"), r"Invalid friction: 0.0 \(must be a finite number > 0 or None\)"),
        (dict(friction=2.0), r"Invalid friction: 2.0 with sampler='auto' \(a friction is BAOAB's"),
        (dict(reduction="avg"), r"Invalid reduction: 'avg' \(must be one of 'mean', 'sum', 'none', None\)"),
        (dict(batch_size=0), r"Invalid batch_size: 0 \(must be an integer >= 1 or None\)"),
        (dict(params="w"), r"Invalid params: 'w' \(must be a list of names or tensors, or None for all\)"),
        (dict(mask=torch.ones(4)), r"Invalid mask: a Tensor of shape \(4,\) \(must be a dict \{parameter"),
        (dict(model_kwargs=[1]), r"Invalid model_kwargs: \[1\] \(must be a dict or None\)"),
        (dict(w_star={"w": torch.zeros(4)}), r"Invalid w_star: a dict \(must be None for a torch module: w\* is its"),
    ]
    for options, message in cases:
        with pytest.raises(ValueError, match=message):
            estimate_llc(model, loader, mean_output, **{"progress_bar": False, **options})
    with pytest.raises(ValueError, match="Invalid data: list"):
        estimate_llc(model, [1, 2], mean_output, progress_bar=False)
    with pytest.raises(ValueError, match="Give exactly one of loss_fn"):
        estimate_llc(model, loader, mean_output, evaluate=lambda m, b: m(b[0]).mean(), progress_bar=False)
    with pytest.raises(ValueError, match=r"Invalid loss_fn: 3 \(must be a callable or None\)"):
        estimate_llc(model, loader, 3, progress_bar=False)


def test_bad_arguments_of_the_pyro_functions_are_refused_with_clear_messages():
    x, y = torch.randn(20, 2), torch.randn(20)
    model = regression(x, y, 0.5, 1.0)
    for options, message in [
        (dict(num_samples=2), r"Invalid num_samples: 2 \(must be an integer >= 4\)"),
        (dict(warmup_steps=-1), r"Invalid warmup_steps: -1 \(must be an integer >= 0\)"),
        (dict(num_chains=0), r"Invalid num_chains: 0 \(must be an integer >= 1\)"),
        (dict(kernel="SGLD"), r"Invalid kernel: 'SGLD' \(must be a kernel class of pyro_sgmcmc.infer or a callable"),
        (dict(kernel_options=["full_mass"]), r"Invalid kernel_options: \['full_mass'\] \(must be a dict or None\)"),
        (dict(w_star=[0.0, 1.0]), r"Invalid w_star: \[0.0, 1.0\] \(must be a dict \{latent site: value\} or None\)"),
        (dict(progress_bar="no"), r"Invalid progress_bar: 'no' \(must be True or False\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            wbic(model, (x, y), **options)
    with pytest.raises(ValueError, match=r"Invalid data: list \(must be the tuple of the model's positional"):
        wbic(model, [x, y], progress_bar=False)
    with pytest.raises(ValueError, match=r"Invalid model: int"):
        wbic(3, (x, y), progress_bar=False)
    for options, message in [
        (dict(num_steps=1), r"Invalid num_steps: 1 \(must be an integer >= 2\)"),
        (dict(burn_in=-1), r"Invalid burn_in: -1 \(must be an integer >= 0\)"),
        (dict(step_size=-1e-3), r"Invalid step_size: -0.001 \(must be a finite number > 0 or None\)"),
        (dict(average=0.0), r"Invalid average: 0.0 \(must be a finite number > 0 and <= 1\)"),
        (dict(hyperparameters="prior_scale"), r"Invalid hyperparameters: 'prior_scale' \(must be a list of names"),
        (dict(hyper_optim=0.01), r"Invalid hyper_optim: 0.01 \(must be a Pyro optimizer"),
        (dict(init_loc_fn="sample"), r"Invalid init_loc_fn: 'sample' \(must be an init strategy"),
        (dict(map_lr=0.0), r"Invalid map_lr: 0.0 \(must be a finite number > 0\)"),
    ]:
        with pytest.raises(ValueError, match=message):
            marglik_hyperparameters(model, (x, y), **options)
    pyro.clear_param_store()
    with pytest.raises(ValueError, match=r"Invalid hyperparameters: \['noise'\] \(must name pyro.params of the model"):
        marglik_hyperparameters(regression(x, y, 0.5, None), (x, y), hyperparameters=["noise"], progress_bar=False)
    with pytest.raises(ValueError, match=r"Invalid reduction: 'mean' \(must be None for a Pyro model"):
        estimate_llc(model, (x, y), reduction="mean", progress_bar=False)
    with pytest.raises(ValueError, match=r"Invalid params: \['v'\] \(must name latent sites of the model"):
        estimate_llc(model, (x, y), params=["v"], w_star={"w": torch.zeros(2)}, progress_bar=False)


@pytest.mark.filterwarnings("ignore::pyro_sgmcmc.slt.LLCWarning")  # a short run, on purpose
def test_plot_shows_every_chain_and_the_estimate():
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    torch.manual_seed(11)
    result = estimate_llc(Quadratic(H), quadratic_data(200, 4, 50), mean_output, localization=50.0, num_chains=3,
                          num_draws=40, step_size=1e-4, progress_bar=False)
    ax = plot_llc(result)
    assert len(ax.lines) == 3 + 1  # the chains and the estimate
    assert ax.lines[-1].get_ydata()[0] == pytest.approx(result.llc)


# ---------------------------------------------------------------------------------------- Pyro


def _regression_model(x, y, *, sigma: float | None, prior_scale: float | None, batch: int | None):
    # the prior and the parameters where the data are (a model on a GPU keeps its latents there)
    scale = prior_scale if prior_scale is not None else pyro.param(
        "prior_scale", torch.tensor(0.3, device=x.device), constraint=constraints.positive)
    if sigma is None:
        sigma = pyro.param("noise", torch.tensor(1.0, device=x.device), constraint=constraints.positive)
    w = pyro.sample("w", dist.Normal(x.new_zeros(()), scale).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", len(y), subsample_size=batch) as i:
        pyro.sample("y", dist.Normal(x[i] @ w, sigma), obs=y[i])


def regression(x: torch.Tensor, y: torch.Tensor, sigma: float | None, prior_scale: float | None,
               batch: int | None = None):
    """Bayesian linear regression with known noise, a model of ``(x, y)``; ``prior_scale=None``
    (``sigma=None``) makes the prior scale (the noise) a ``pyro.param``. A partial of a module-level function: picklable, for chains in
    spawned processes."""
    return functools.partial(_regression_model, sigma=sigma, prior_scale=prior_scale, batch=batch)


class Looping(Quadratic):
    """A module ``vmap`` cannot batch (``.item()`` in its forward), at module level so that spawned
    worker processes can unpickle it."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        assert math.isfinite(self.w.sum().item())
        return super().forward(z)


class LoopingScaledRows(ScaledRows):
    """:class:`ScaledRows` that ``vmap`` cannot batch, for chains in worker processes."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        assert math.isfinite(self.w.sum().item())
        return super().forward(z)


@pytest.mark.slow
def test_chains_in_worker_processes_give_the_exact_answer():
    """``mp_context="spawn"``: the chains in worker processes (one a CPU at most; on two CPUs, four
    chains run two a worker), in lockstep. A Pyro model on minibatches (control variates) whose
    noise is a ``pyro.param`` set in this process (the workers get the param store) and a module
    ``vmap`` cannot batch, each against its exact answer; every chain its own minibatches; an
    unpicklable model refused with the remedy."""
    pyro.set_rng_seed(17)
    n, d, sigma, gamma = 400, 10, 0.5, 20.0
    x, y = linear_regression_data(n, d, sigma, seed=16, orthogonal=True)  # H = X^T X / (n sigma^2) = I / sigma^2
    w_star = torch.linalg.solve(x.T @ x, x.T @ y)
    pyro.clear_param_store()  # the noise a pyro.param, set here: the workers must see its value, not its init (1)
    pyro.param("noise", torch.tensor(sigma), constraint=constraints.positive)
    model = regression(x.float(), y.float(), None, 10.0, batch=40)
    result = estimate_llc(model, (x.float(), y.float()), w_star={"w": w_star.float()}, localization=gamma,
                          num_chains=4, num_draws=800, target_bias=0.1, mp_context="spawn", progress_bar=False)
    assert result.diagnostics.processes == worker_count(4) and result.diagnostics.control_variates
    assert result.loss_trace.shape[0] == 4 and len(set(result.loss_trace[:, -1].tolist())) == 4
    exact = chain_exact(torch.full((d,), sigma**-2), result, gamma)
    assert_exact(result.llc, result.std_error, exact, result.diagnostics.step_bias * exact, what="Pyro, processes")

    torch.manual_seed(18)
    n, gamma = 1000, 50.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", LLCWarning)
        looping = estimate_llc(Looping(H), quadratic_data(n, 4, 100), mean_output, localization=gamma, num_chains=2,
                               num_draws=5000, step_size=1e-3, num_burnin=100, mp_context="spawn", progress_bar=False)
    assert looping.diagnostics.processes == worker_count(2) and not looping.diagnostics.vectorized
    # with control variates the quadratic's gradient is exact: the discretised law of SGLD
    exact = quadratic_exact(H, looping.nbeta, gamma, looping.step_size)
    assert_exact(looping.llc, looping.std_error, exact, what="vmap-less module, processes")

    # control variates dropped in the workers after the pilots (as in one process: see
    # test_control_variates_are_dropped_where_they_do_not_pay_and_the_chain_stays_exact)
    torch.manual_seed(3)
    n, gamma, m = 1000, 50.0, 50
    loader = quadratic_data(n, 4, m)
    z = loader.dataset.tensors[0].mul_(8.0)
    dropped = estimate_llc(LoopingScaledRows(H), loader, mean_output, reduction="mean", localization=gamma,
                           num_chains=8, num_draws=12800, target_bias=0.05, sampler="sgld", mp_context="spawn",
                           progress_bar=False)
    assert dropped.diagnostics.processes == worker_count(8) and not dropped.diagnostics.control_variates
    exact = scaled_rows_exact(dropped, z, m, gamma)
    assert_exact(dropped.llc, dropped.std_error, exact, what="plain minibatches after the pilots, processes")

    class Local(Quadratic):  # defined in a function: spawned workers cannot unpickle it
        pass

    with pytest.raises(ValueError, match="Invalid mp_context.*picklable"):
        estimate_llc(Local(H), quadratic_data(n, 4, 100), mean_output, num_chains=2, mp_context="spawn",
                     progress_bar=False)


def test_the_divergence_check_does_not_overflow_in_half_precision():
    from pyro_sgmcmc.slt.llc import _module_objective

    objective = _module_objective(Quadratic(H), quadratic_data(100, 4, 10), None, None, mean_output, None, "mean",
                                  None, None, False, num_chains=2)
    engine = LocalEngine(objective, 1000.0, 1.0, None, 0.0)
    engine.set_limit(1e6)
    # n beta (L - L*) = 1e5: beyond float16's largest value (65504), within the limit
    assert not engine._diverged(torch.tensor([100.0, 1.0], dtype=torch.float16))
    assert engine._diverged(torch.tensor([2000.0, 1.0], dtype=torch.float16))
    assert engine._diverged(torch.tensor([math.nan, 1.0], dtype=torch.bfloat16))


@pytest.mark.slow
def test_worker_processes_drop_their_control_variates_when_told():
    """The engine of worker processes switches every worker's gradient estimate: on
    :class:`Quadratic` the control-variate estimate is exact (no noise) and the plain one is not,
    so the measured noise tells which one the workers use."""
    from pyro_sgmcmc.slt.llc import _module_objective

    torch.manual_seed(5)
    build = functools.partial(_module_objective, Quadratic(H), quadratic_data(1000, 4, 100), None, None, mean_output,
                              None, "mean", None, None, False)
    objective = build(num_chains=1)
    init_loss, full_gradient = objective.full_loss(gradient=True)
    setup = WorkerSetup(build, 1, 100.0, 50.0, init_loss, full_gradient, seed=0, threads=1)
    engine = ProcessEngine(setup, 2, objective.num_sampled, objective.exact, "spawn", num_workers=2)
    try:  # each worker's own measurement
        controlled, plain = engine._call("measure", False), engine._call("measure", True)
        engine.drop_control_variates()
        dropped = engine._call("measure", False)
    finally:
        engine.close()
    for with_them, without, after in zip(controlled, plain, dropped):
        assert without.noise_trace > 0 and with_them.noise_trace < 1e-9 * without.noise_trace, (with_them, without)
        # the plain estimate's noise again (each from 8 minibatches: 7 degrees of freedom a
        # coordinate, so never 100 times smaller), not the control variates' 0
        assert after.noise_trace > 0.01 * without.noise_trace, (after, without)


def test_tempered_likelihood_scales_the_observed_sites_only():
    torch.manual_seed(12)
    x, y = torch.randn(20, 2), torch.randn(20)
    model = regression(x, y, 0.5, 1.0)
    trace = pyro.poutine.trace(tempered_likelihood(model, 0.25)).get_trace(x, y)
    plain = pyro.poutine.trace(pyro.poutine.replay(model, trace=trace)).get_trace(x, y)
    trace.compute_log_prob(), plain.compute_log_prob()
    assert trace.nodes["w"]["log_prob_sum"] == pytest.approx(float(plain.nodes["w"]["log_prob_sum"]))
    assert trace.nodes["y"]["log_prob_sum"] == pytest.approx(0.25 * float(plain.nodes["y"]["log_prob_sum"]))
    with pytest.raises(ValueError, match=r"Invalid beta: -1 \(must be a finite number > 0\)"):
        tempered_likelihood(model, -1)


@pytest.mark.parametrize("device", DEVICES)
def test_pyro_model_init_loss_is_exact_and_n_is_the_plate_size(device):
    """On a GPU too: the walk's weights live with Pyro's plate indices (on the CPU), the log
    densities with the data; a ``w_star`` given in host memory goes to its site's device."""
    from pyro_sgmcmc.slt._pyro import ModelLikelihood

    torch.manual_seed(13)
    n, sigma = 300, 0.5
    x, y = torch.randn(n, 2), torch.randn(n)
    likelihood = ModelLikelihood(regression(x.to(device), y.to(device), sigma, 1.0, batch=32),
                                 (x.to(device), y.to(device)), {})
    assert likelihood.n == n and likelihood.plate.subsample_size == 32
    w = torch.tensor([0.3, -0.7])
    exact = float(dist.Normal(x @ w, sigma).log_prob(y).sum())
    assert float(likelihood.full_log_density(likelihood.on_site_devices({"w": w}))) == pytest.approx(exact, rel=1e-5)
    assert likelihood.unconstrained({"w": w})["w"].device.type == device
    with pytest.raises(ValueError, match="Invalid n: 32 .*never the batch size"):
        ModelLikelihood(regression(x, y, sigma, 1.0, batch=32), (x, y), {}, n=32)


def test_the_pyro_full_data_walk_and_a_given_w_star_follow_the_data_device():
    """A meta device stands in for a GPU here (its tensors have shapes and a device, no values, and
    an op mixing them with host tensors raises as on CUDA): the walk's row weights, made with
    Pyro's plate indices in host memory, and a ``w_star`` given in host memory follow the data."""
    from pyro_sgmcmc.slt._pyro import ModelLikelihood

    x, y = torch.randn(200, 3, device="meta"), torch.randn(200, device="meta")
    with pyro.validation_enabled(False):
        likelihood = ModelLikelihood(regression(x, y, 0.5, 1.0, batch=20), (x, y), {})
        assert likelihood.plate.device.type == "cpu"
        w_star = likelihood.on_site_devices({"w": torch.zeros(3)})
        assert w_star["w"].is_meta and likelihood.full_log_density(w_star).is_meta


def linear_regression_data(n: int, d: int, sigma: float, seed: int, orthogonal: bool = False):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    if orthogonal:
        x = torch.linalg.qr(x)[0] * math.sqrt(n)  # X^T X = n I
    w = torch.randn(d, generator=generator, dtype=torch.float64)
    y = x @ w + sigma * torch.randn(n, generator=generator, dtype=torch.float64)
    return x, y


def linear_regression_wbic(x: torch.Tensor, y: torch.Tensor, sigma: float, alpha: float) -> float:
    """WBIC of the regression with known noise ``sigma`` and prior precision ``alpha``, exactly: the
    tempered posterior is Gaussian, and the expected residual sum of squares has a closed form."""
    n, d = x.shape
    beta = 1 / math.log(n)
    precision = alpha * torch.eye(d, dtype=torch.float64) + beta * x.T @ x / sigma**2
    mean = torch.linalg.solve(precision, beta * x.T @ y / sigma**2)
    residual = ((y - x @ mean) ** 2).sum() + torch.trace(x.T @ x @ torch.linalg.inv(precision))
    return n / 2 * math.log(2 * math.pi * sigma**2) + float(residual) / (2 * sigma**2)


@pytest.mark.parametrize("device", DEVICES)
def test_wbic_of_a_bayesian_linear_regression_is_its_closed_form(device):
    pyro.set_rng_seed(14)
    n, d, sigma, alpha = 400, 3, 0.5, 1.0
    x, y = linear_regression_data(n, d, sigma, seed=14)
    beta = 1 / math.log(n)
    exact = linear_regression_wbic(x, y, sigma, alpha)
    x, y = x.float().to(device), y.float().to(device)
    result = wbic(regression(x, y, sigma, alpha**-0.5), (x, y), num_samples=500,
                  warmup_steps=200, num_chains=2, kernel_options={"full_mass": True, "exact_gaussian": True},
                  progress_bar=False)
    assert result.n == n and result.beta == pytest.approx(beta)
    assert 4 * result.std_error < 1.0  # a tenth of d / (2 beta) = 9, the part of WBIC the chain estimates
    assert abs(result.wbic - exact) <= 4 * result.std_error + result.bias_bound, (result, exact)
    assert abs(result.drift) <= 4 * result.drift_std_error and not any("drifted" in m for m in result.warnings)
    # the LLC from the same chain: d/2 for a regular model, up to the prior's O(1/n) pull
    assert abs(result.llc - d / 2) <= 4 * result.llc_std_error + 0.1


@pytest.mark.slow
def test_wbic_chains_in_spawned_processes_give_the_closed_form(monkeypatch):
    """``mp_context``: one ``pyro.infer.MCMC`` with parallel chains; each chain's kernel diagnostics
    come back, and the estimate is the closed form as with chains one after another (Pyro runs
    chains in sequence below ``num_chains + 1`` CPUs: the test says there are more)."""
    import torch.multiprocessing

    monkeypatch.setattr(torch.multiprocessing, "cpu_count", lambda: 4)
    pyro.set_rng_seed(15)
    x, y = linear_regression_data(400, 3, 0.5, seed=14)
    exact = linear_regression_wbic(x, y, 0.5, 1.0)
    model = regression(x.float(), y.float(), 0.5, 1.0)
    result = wbic(model, (x.float(), y.float()), num_samples=500, warmup_steps=200, num_chains=2,
                  kernel_options={"full_mass": True, "exact_gaussian": True}, mp_context="spawn", progress_bar=False)
    assert result.nll_draws.shape == (2, 500) and not torch.equal(result.nll_draws[0], result.nll_draws[1])
    assert len(result.kernel_diagnostics) == 2 and all("step size" in chain for chain in result.kernel_diagnostics)
    assert 4 * result.std_error < 1.0
    assert abs(result.wbic - exact) <= 4 * result.std_error + result.bias_bound, (result, exact)
    with pytest.raises(ValueError, match="Invalid mp_context"):
        wbic(model, (x.float(), y.float()), mp_context="threads")


def test_wbic_reports_the_mixing_problems_its_kernels_found():
    x, y = linear_regression_data(50, 2, 0.5, seed=3)
    with pytest.warns(UserWarning):  # the kernel's MixingWarning: the chain did not move
        result = wbic(regression(x.float(), y.float(), 0.5, 1.0), (x.float(), y.float()), num_samples=30,
                      warmup_steps=0, num_chains=1, kernel_options={"step_size": 1e-30, "adapt_step_size": False},
                      progress_bar=False)
    assert any(message.startswith("chain 0:") and "did not move" in message for message in result.warnings), result


def product_model(y, batch=None):
    """A singular model: y_i ~ N(a b, 1), a, b ~ N(0, 1); at a b = 0 the set of true parameters
    is the cross a = 0 or b = 0 (learning coefficient 1/2, below the regular d/2 = 1)."""
    a = pyro.sample("a", dist.Normal(0.0, 1.0))
    b = pyro.sample("b", dist.Normal(0.0, 1.0))
    with pyro.plate("data", len(y), subsample_size=batch) as i:
        pyro.sample("y", dist.Normal(a * b, 1.0), obs=y[i])


def product_model_wbic(y: torch.Tensor) -> tuple[float, float]:
    """WBIC of :func:`product_model` and the part of it the chain estimates,
    :math:`\frac n2 E_\beta[(ab - \bar y)^2]`, by quadrature on a 3001 x 3001 grid over
    :math:`[-6, 6]^2` (prior mass outside it < 1e-8)."""
    n, y = len(y), y.double()
    beta = 1 / math.log(n)
    grid = torch.linspace(-6, 6, 3001, dtype=torch.float64)
    a, b = torch.meshgrid(grid, grid, indexing="ij")
    squared = (a * b - y.mean()) ** 2
    weights = torch.softmax((-0.5 * (a**2 + b**2) - beta * n / 2 * squared).flatten(), 0)
    part = n / 2 * float((weights * squared.flatten()).sum())
    return n / 2 * math.log(2 * math.pi) + 0.5 * float(((y - y.mean()) ** 2).sum()) + part, part


@pytest.mark.slow
def test_wbic_of_a_singular_model_is_its_exact_finite_n_value():
    """The tempered posterior of :func:`product_model` is a cross, not a Gaussian; WBIC only sees
    the law of a b, which SGNHT mixes well (its coordinates, which hop between the arms, do not:
    the kernels say so, and the result lists it)."""
    pyro.set_rng_seed(16)
    n = 1000
    y = torch.randn(n, generator=torch.Generator().manual_seed(16))
    exact, part = product_model_wbic(y)
    from pyro_sgmcmc.infer import SGNHT

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the coordinates' small ESS, reported in result.warnings
        result = wbic(product_model, (y,), num_samples=16000, warmup_steps=1000, num_chains=2, kernel=SGNHT,
                      kernel_options={"num_steps": 5}, progress_bar=False)
    # the chain estimates `part` (WBIC minus terms exact in the data): a 10% error of it must show
    assert_exact(result.wbic - (exact - part), result.std_error, part, result.bias_bound, what="WBIC of a b")


def test_marglik_finds_the_evidence_maximising_prior_scale():
    pyro.set_rng_seed(15)
    pyro.clear_param_store()
    n, d, sigma = 200, 5, 1.0
    x, y = linear_regression_data(n, d, sigma, seed=15, orthogonal=True)
    fitted = x.T @ y / n
    exact = math.sqrt(float((fitted**2).mean()) - sigma**2 / n)
    # a fast-mixing chain (10% bias on posterior variances, stated below): the averaged window then
    # holds many autocorrelation times of the iterates, and their standard error is honest (ten
    # runs: spread of the estimates 0.0040, root mean square of their standard errors 0.0049; at
    # the default 2% the chain mixes 5x slower and the standard errors came out too small)
    result = marglik_hyperparameters(regression(x.float(), y.float(), sigma, None), (x.float(), y.float()),
                                     num_steps=1200, burn_in=200, target_bias=0.1, progress_bar=False)
    estimate, error = float(result.hyperparameters["prior_scale"]), float(result.std_error["prior_scale"])
    # the step's bias moves tau^2 by at most target_bias times the posterior variance sigma^2 / n
    bias = 0.1 * sigma**2 / n / (2 * exact)
    assert_exact(estimate, error, exact, bias, what="prior scale")
    assert result.trace["prior_scale"][0] < 0.5 < exact - 0.2  # it moved from its start (0.3)


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_llc_of_a_pyro_regression_on_minibatches_is_the_exact_discretised_chain(device):
    """On a GPU too, with ``w_star`` given in host memory."""
    pyro.set_rng_seed(16)
    n, d, sigma, gamma = 400, 10, 1.0, 20.0
    x, y = linear_regression_data(n, d, sigma, seed=16, orthogonal=True)  # H = X^T X / (n sigma^2) = I
    w_star = torch.linalg.solve(x.T @ x, x.T @ y)  # the minimum of L_n
    x, y = x.float().to(device), y.float().to(device)
    model = regression(x, y, sigma, 10.0, batch=40)
    result = estimate_llc(model, (x, y), w_star={"w": w_star.float()}, localization=gamma,
                          num_chains=4, num_draws=800, target_bias=0.1, progress_bar=False)
    assert result.n == n and result.diagnostics.control_variates and not result.diagnostics.vectorized
    # the Gaussian log likelihood is quadratic: the exact law of the chain, as for the torch module,
    # up to the control-variate gradient's noise, which the stated bias bounds
    exact = chain_exact(torch.ones(d), result, gamma)
    assert_exact(result.llc, result.std_error, exact, result.diagnostics.step_bias * exact, what="Pyro regression")
