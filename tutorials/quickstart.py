"""Quickstart: a Pyro model's posterior sampled by MCMC on minibatches, summarised, and checked.

    python tutorials/quickstart.py

A Bayesian linear regression whose likelihood sits in ``pyro.plate(..., subsample_size=100)``:
every evaluation of the model sees a fresh minibatch of 100 of its 20,000 rows (HMC and NUTS
refuse such a model). ``pyro_sgmcmc.infer.SGLD`` goes into Pyro's own ``MCMC``; with
``control_variates=True`` it finds the posterior mode on the full data first and removes most of
the minibatch noise near it, and ``exact_gaussian=True`` makes each step exact on the Gaussian at
the mode. Two chains are summarised with Pyro's diagnostics (n_eff, r_hat) and checked against
the exact (conjugate) posterior.
"""

from __future__ import annotations

import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC

import pyro_sgmcmc.infer

N, D, BATCH = 20_000, 4, 100
NOISE_SD, PRIOR_SD = 1.0, 10.0


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    true_w = torch.tensor([1.0, -2.0, 0.5, 0.0])
    y = x @ true_w + NOISE_SD * torch.randn(N, generator=gen)
    return x, y, true_w


def model(x: torch.Tensor, y: torch.Tensor | None = None, batch_size: int | None = None) -> torch.Tensor:
    w = pyro.sample("w", dist.Normal(0.0, PRIOR_SD).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", x.shape[0], subsample_size=batch_size) as idx:
        return pyro.sample("y", dist.Normal(x[idx] @ w, NOISE_SD), obs=None if y is None else y[idx])


def exact_posterior(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal prior, normal likelihood: the posterior is normal with these moments."""
    precision = x.T @ x / NOISE_SD**2 + torch.eye(D) / PRIOR_SD**2
    cov = torch.linalg.inv(precision)
    return cov @ (x.T @ y) / NOISE_SD**2, cov.diagonal().sqrt()


def main() -> None:
    torch.set_num_threads(2)
    x, y, true_w = make_data()
    pyro.set_rng_seed(0)
    kernel = pyro_sgmcmc.infer.SGLD(model, control_variates=True, exact_gaussian=True)
    mcmc = MCMC(kernel, num_samples=1000, warmup_steps=100, num_chains=2, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run(x, y, BATCH)
    seconds = time.perf_counter() - start
    print(f"SGLD with control variates, 2 chains x 1100 steps on minibatches of {BATCH}/{N}: {seconds:.1f} s "
          f"(mode search and warmup included)\n")
    mcmc.summary()

    mean, sd = exact_posterior(x, y)
    draws = mcmc.get_samples()["w"]
    print("exact posterior vs SGLD:")
    print(f"{'':>6}{'exact mean':>12}{'SGLD mean':>12}{'exact sd':>12}{'SGLD sd':>12}{'true w':>10}")
    for i in range(D):
        print(f"{f'w[{i}]':>6}{mean[i]:12.4f}{draws[:, i].mean():12.4f}{sd[i]:12.4f}{draws[:, i].std():12.4f}"
              f"{true_w[i]:10.2f}")
    diagnostics = kernel.diagnostics()
    print(f"\nwarmup chose: {diagnostics['preconditioner']} preconditioner, step size {diagnostics['step size']:.2f}")
    error = ((draws.mean(0) - mean) / sd).abs().max()
    print(f"largest error of a posterior mean: {error:.2f} posterior sd")


if __name__ == "__main__":
    main()
