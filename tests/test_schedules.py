"""Cyclical schedules (Zhang et al. 2020): values, phases, and their use by every adapter."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import MCMC, SVI, Trace_ELBO

import pyro_sgmcmc.optim as optim
from pyro_sgmcmc.infer import SGLD as SGLDKernel
from pyro_sgmcmc.infer import AutoUnconstrainedDelta, SampleCollector, run_svi
from pyro_sgmcmc.samplers import SAMPLERS
from pyro_sgmcmc.schedules import CyclicalSchedule


def test_values_and_phases_by_hand():
    schedule = CyclicalSchedule(initial=1.0, num_steps=10, num_cycles=2, exploration_fraction=0.5)
    assert schedule.cycle_length == 5
    expected = [(math.cos(math.pi * j / 5) + 1) / 2 for j in range(5)]
    assert [schedule(k) for k in range(10)] == pytest.approx(expected * 2, abs=1e-12)
    assert expected[:3] == pytest.approx([1.0, 0.9045084972, 0.6545084972], abs=1e-9)
    assert [schedule.in_sampling_phase(k) for k in range(10)] == [False, False, False, True, True] * 2
    assert schedule(10) == 1.0  # the cycles go on past num_steps


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(initial=0.0, num_steps=10, num_cycles=2), "Invalid initial"),
        (dict(initial=1.0, num_steps=0, num_cycles=1), "Invalid num_steps"),
        (dict(initial=1.0, num_steps=10, num_cycles=11), r"Invalid num_cycles: 11 \(must be an integer in \[1, num_steps=10\]\)"),
        (dict(initial=1.0, num_steps=10, num_cycles=2, exploration_fraction=1.0), "Invalid exploration_fraction"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CyclicalSchedule(**kwargs)


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_follows_a_cyclical_lr_and_temperature(name):
    lr = CyclicalSchedule(initial=0.01, num_steps=8, num_cycles=2)
    temperature = CyclicalSchedule(initial=2.0, num_steps=8, num_cycles=4)
    theta = torch.nn.Parameter(torch.zeros(5))
    sampler = SAMPLERS[name]([theta], lr=lr, temperature=temperature)
    seen = []
    for _ in range(8):
        theta.grad = theta.detach().clone()
        sampler.step()
        seen.append((sampler.param_groups[0]["lr"], sampler.param_groups[0]["temperature"]))
    assert seen == [(lr(k), temperature(k)) for k in range(8)]


def normal_model(data):
    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(mu, 1.0), obs=data)


def test_svi_collects_only_in_the_sampling_phase():
    data = torch.randn(20)
    schedule = CyclicalSchedule(initial=0.01, num_steps=100, num_cycles=4, exploration_fraction=0.6)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    guide = AutoUnconstrainedDelta(normal_model)
    svi = SVI(normal_model, guide, optim.SGLD({"lr": schedule}), Trace_ELBO())
    kept = []

    class Recording(SampleCollector):
        def __call__(self, values):
            taken = super().__call__(values)
            if taken:
                kept.append(self.steps - 1)
            return taken

    collector = Recording(burn_in=10, keep_if=schedule.in_sampling_phase)
    run_svi(svi, 100, collector, data, progress_bar=False)
    assert kept and all(k >= 10 and schedule.in_sampling_phase(k) for k in kept)
    assert len(kept) == sum(1 for k in range(10, 100) if schedule.in_sampling_phase(k)) == collector.num_samples


def test_kernel_returns_samples_from_the_sampling_phase_only():
    data = torch.randn(20)
    schedule = CyclicalSchedule(initial=1.0, num_steps=60, num_cycles=3, exploration_fraction=0.5)
    kernel = SGLDKernel(normal_model, step_size=1e-3, adapt_step_size=False, adapt_mass_matrix=False,
                        step_size_schedule=schedule)
    positions, sizes = [], []

    def hook(kernel, params, stage, i):
        if stage == "Sample":
            positions.append(kernel._sampling_steps - 1)
            sizes.append(kernel._sampler.param_groups[0]["lr"])

    pyro.set_rng_seed(0)
    MCMC(kernel, num_samples=30, warmup_steps=5, disable_progbar=True, hook_fn=hook).run(data)
    assert all(schedule.in_sampling_phase(k) for k in positions)
    assert sizes == pytest.approx([1e-3 * schedule(k) for k in positions])
    assert positions[-1] >= 59  # 30 samples in the sampling halves of cycles of 20 steps: 3 cycles


def bimodal_potential(params):
    """Two well separated modes at -3 and 3 (sd 0.5): U = -log(N(x; -3) + N(x; 3))."""
    modes = dist.Normal(torch.tensor([-3.0, 3.0]), 0.5)
    return -torch.logsumexp(modes.log_prob(params["x"].unsqueeze(-1)), -1).sum()


def test_cyclical_steps_visit_both_modes_where_a_constant_small_step_stays_in_one():
    """The point of Zhang et al.: large steps at the start of each cycle jump between modes.
    A constant step (the cycle's sampling-phase size) never leaves its mode in the same number
    of steps (the barrier is 18 units of potential high)."""
    def run(schedule):
        kernel = SGLDKernel(potential_fn=bimodal_potential, step_size=0.05, adapt_step_size=False,
                            adapt_mass_matrix=False, step_size_schedule=schedule)
        pyro.set_rng_seed(1)
        mcmc = MCMC(kernel, num_samples=400, warmup_steps=0, disable_progbar=True,
                    initial_params={"x": torch.tensor(3.0)})
        mcmc.run()
        return mcmc.get_samples()["x"]

    cyclical = run(CyclicalSchedule(initial=40.0, num_steps=2000, num_cycles=40, exploration_fraction=0.5))
    constant = run(None)
    assert float((constant < 0).float().mean()) == 0.0
    left = float((cyclical < 0).float().mean())
    assert 0.2 < left < 0.8, left
