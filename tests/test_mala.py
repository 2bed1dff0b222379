"""The MALA acceptance diagnostic: hand-computed cases, a direct computation on a quadratic,
the running mean, and the kernels' report."""

from __future__ import annotations

import math
import warnings

import pyro
import pytest
import torch
from torch.distributions import Normal

from pyro_sgmcmc.functional import mala_log_acceptance
from pyro_sgmcmc.samplers import PSGLD
from pyro_sgmcmc.samplers import SGLD
from pyro_sgmcmc.samplers import SGNHT


def test_hand_computed_cases():
    # U = theta^2: theta 0.5 -> 0.3, U 0.25 -> 0.09, grad 1.0 -> 0.6, eps 0.1
    # forward residual 0.3 - 0.5 + 0.05 * 1.0 = -0.15, backward 0.5 - 0.3 + 0.05 * 0.6 = 0.23
    # a = 0.16 + (0.0225 - 0.0529) / 0.2 = 0.008
    t = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    a = mala_log_acceptance([t(0.5)], [t(0.3)], [t(1.0)], [t(0.6)], 0.25, 0.09, [0.1])
    assert float(a) == pytest.approx(0.008, abs=1e-12)
    # preconditioned, G = 2: residuals -0.1 and 0.26; a = 0.16 + (0.01 - 0.0676) / 2 / 0.2 = 0.016
    a = mala_log_acceptance([t(0.5)], [t(0.3)], [t(1.0)], [t(0.6)], 0.25, 0.09, [0.1], [t(2.0)])
    assert float(a) == pytest.approx(0.016, abs=1e-12)
    # two tensors with their own step sizes add their proposal terms (the energies once):
    # second: theta 1 -> 0, U part folded into the energies, grads 2 -> 0, eps 0.5
    # forward 0 - 1 + 0.25 * 2 = -0.5 (0.25), backward 1 - 0 + 0 = 1 (1): (0.25 - 1) / 1 = -0.75
    a = mala_log_acceptance([t(0.5), t(1.0)], [t(0.3), t(0.0)], [t(1.0), t(2.0)], [t(0.6), t(0.0)],
                            0.25 + 1.0, 0.09, [0.1, 0.5])
    assert float(a) == pytest.approx(0.008 + 1.0 - 0.75, abs=1e-12)


def direct_log_ratio(u, grad_u, theta, new_theta, lr, g, noise_variance=1.0):
    """MALA's log acceptance ratio from the densities themselves (torch.distributions)."""
    sd = (lr * noise_variance * g).sqrt()
    forward = Normal(theta - lr / 2 * g * grad_u(theta), sd).log_prob(new_theta).sum()
    backward = Normal(new_theta - lr / 2 * g * grad_u(new_theta), sd).log_prob(theta).sum()
    return float(u(theta) - u(new_theta) + backward - forward)


@pytest.mark.parametrize("name", ["SGLD", "PSGLD", "SGLD reference curvature", "SGLD noise_level"])
def test_matches_a_direct_computation_on_a_quadratic(name):
    """Tempered, localized, with weight decay: every step's reported acceptance is MALA's, computed
    from the Gaussian proposal densities, to 1e-6; the mean is over the steps scored. With a
    reference curvature (or a noise level) the proposal's variance is ``lr * sigma^2``."""
    torch.manual_seed(0)
    precision = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.2], [0.0, 0.2, 4.0]], dtype=torch.float64)
    temperature, gamma, lam, lr = 2.0, 0.3, 0.1, 0.4
    theta = torch.nn.Parameter(torch.tensor([1.0, -1.0, 0.5], dtype=torch.float64))
    anchor = theta.detach().clone()

    def u(x):  # the potential in p.grad
        return 0.5 * x @ precision @ x

    def u_tilde(x):  # what the sampler targets
        return u(x) / temperature + gamma / 2 * (x - anchor).square().sum() + lam / 2 * x.square().sum()

    def grad_tilde(x):
        return precision @ x / temperature + gamma * (x - anchor) + lam * x

    cls = PSGLD if name == "PSGLD" else SGLD
    options, noise_variance = {}, 1.0
    if name == "SGLD reference curvature":
        options, noise_variance = dict(reference_curvature=2.0, gradient_noise_variance=0.4), 1 - lr * (2.0 + 0.1) / 4
    elif name == "SGLD noise_level":
        options, noise_variance = dict(noise_level=0.5), 0.25
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_level != 1 warns
        sampler = cls([theta], lr=lr, temperature=temperature, localization=gamma, weight_decay=lam, diagnostics=True,
                      **options)
    reported, direct, g_prev, theta_prev = [], [], None, None
    for _ in range(30):
        loss = u(theta)
        theta.grad = torch.autograd.grad(loss, theta)[0]
        x = theta.detach().clone()
        sampler.step(loss=loss.detach())
        if theta_prev is not None:
            reported.append(float(sampler.step_diagnostics["mala_acceptance"]))
            direct.append(min(1.0, math.exp(direct_log_ratio(u_tilde, grad_tilde, theta_prev, x, lr, g_prev,
                                                                       noise_variance))))
        theta_prev = x
        g_prev = sampler.proposal_preconditioner(theta) if name == "PSGLD" else torch.ones(3, dtype=torch.float64)
    assert reported == pytest.approx(direct, abs=1e-6)
    assert min(direct) < 0.99  # the step is large enough for the check to matter
    assert sampler.mala_acceptance_mean == pytest.approx(sum(direct) / len(direct), abs=1e-9)


def test_steps_without_a_potential_are_not_scored_nor_averaged():
    theta = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    sampler = SGLD([theta], lr=0.1, diagnostics=True)
    for k in range(6):
        theta.grad = theta.detach().clone()
        known = k not in (2, 3)  # steps 2 and 3 get no loss: steps 1->2, 2->3 and 3->4 cannot be scored
        sampler.step(loss=0.5 * float(theta.detach().square().sum()) if known else None)
        assert ("mala_acceptance" in sampler.step_diagnostics) == (k in (1, 5))
    assert sampler._mala.count == 2


def test_momentum_samplers_report_no_mala_score():
    theta = torch.nn.Parameter(torch.zeros(2))
    sampler = SGNHT([theta], lr=0.1, diagnostics=True)
    for _ in range(3):
        theta.grad = theta.detach().clone()
        sampler.step(loss=0.0)
    assert "mala_acceptance" not in sampler.step_diagnostics
    assert math.isnan(sampler.mala_acceptance_mean)


def test_kernel_reports_the_mean_acceptance_after_warmup():
    """On a full-data Gaussian, the acceptance falls as the step size grows, and the kernel's
    number is the mean over the sampling steps."""
    from pyro.infer import MCMC

    from pyro_sgmcmc.infer import SGLD as SGLDKernel
    from pyro_sgmcmc.infer import SGNHT as SGNHTKernel

    def potential(params):
        return 0.5 * (params["x"] ** 2).sum() * 4.0

    means = []
    for step_size in (0.01, 0.3):
        kernel = SGLDKernel(potential_fn=potential, step_size=step_size, adapt_step_size=False, adapt_mass_matrix=False)
        pyro.set_rng_seed(0)
        mcmc = MCMC(kernel, num_samples=300, warmup_steps=50, disable_progbar=True,
                    initial_params={"x": torch.zeros(5)})
        mcmc.run()
        means.append(mcmc.diagnostics()["mala acceptance"]["chain 0"])
    assert 0.95 < means[0] <= 1.0 and means[1] < 0.9
    kernel = SGNHTKernel(potential_fn=potential, step_size=0.1, adapt_step_size=False, adapt_mass_matrix=False)
    mcmc = MCMC(kernel, num_samples=5, warmup_steps=0, disable_progbar=True, initial_params={"x": torch.zeros(5)})
    mcmc.run()
    assert mcmc.diagnostics()["mala acceptance"]["chain 0"] is None
