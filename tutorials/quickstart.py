"""Quickstart: posterior samples of a Bayesian linear regression with SGLD on minibatches.

    python tutorials/quickstart.py

A plain PyTorch loop: the sampler is a ``torch.optim.Optimizer``; each step sees a fresh
minibatch, with the log likelihood scaled by N/m so that its gradient is an unbiased estimate of
the full-data one. Four chains are summarised with Pyro's diagnostics (n_eff, r_hat) and
checked against the exact (conjugate) posterior.
"""

from __future__ import annotations

import time

import torch
from pyro.infer.mcmc.util import print_summary

from pyro_sgmcmc.samplers import SGLD

N, D, BATCH = 2_000, 4, 200
NOISE_SD, PRIOR_SD = 1.0, 10.0
CHAINS, WARMUP, SAMPLES, THIN = 4, 1_000, 10_000, 10
LR = 5e-6  # lr * posterior precision ~ 0.01: discretisation bias ~ lr * lambda / 4 = 0.25%


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    true_w = torch.tensor([1.0, -2.0, 0.5, 0.0])
    y = x @ true_w + NOISE_SD * torch.randn(N, generator=gen)
    return x, y, true_w


def exact_posterior(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Normal prior, normal likelihood: the posterior is normal with these moments."""
    precision = x.T @ x / NOISE_SD**2 + torch.eye(D) / PRIOR_SD**2
    cov = torch.linalg.inv(precision)
    return cov @ (x.T @ y) / NOISE_SD**2, cov.diagonal().sqrt()


def potential(w: torch.Tensor, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
    """Minibatch estimate of -log p(w, data): likelihood scaled by N/m, plus the prior."""
    log_lik = -0.5 * ((yb - xb @ w) / NOISE_SD) ** 2
    return -(N / len(yb)) * log_lik.sum() + 0.5 * (w / PRIOR_SD).pow(2).sum()


def run_chain(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)
    w = torch.nn.Parameter(torch.zeros(D))
    sampler = SGLD([w], lr=LR)
    draws = []
    for step in range(WARMUP + SAMPLES):
        batch = torch.randint(0, N, (BATCH,))
        sampler.zero_grad()
        potential(w, x[batch], y[batch]).backward()
        sampler.step()
        if step >= WARMUP and (step - WARMUP) % THIN == 0:
            draws.append(w.detach().clone())
    return torch.stack(draws)


def main() -> None:
    x, y, true_w = make_data()
    start = time.perf_counter()
    chains = torch.stack([run_chain(x, y, seed) for seed in range(CHAINS)])  # [chains, draws, D]
    seconds = time.perf_counter() - start
    print(f"SGLD, {CHAINS} chains x {WARMUP + SAMPLES} steps on minibatches of {BATCH}/{N}: {seconds:.1f} s\n")
    print_summary({"w": chains}, prob=0.9, group_by_chain=True)

    mean, sd = exact_posterior(x, y)
    draws = chains.reshape(-1, D)
    print("exact posterior vs SGLD:")
    print(f"{'':>6}{'exact mean':>12}{'SGLD mean':>12}{'exact sd':>12}{'SGLD sd':>12}{'true w':>10}")
    for i in range(D):
        print(f"{f'w[{i}]':>6}{mean[i]:12.4f}{draws[:, i].mean():12.4f}{sd[i]:12.4f}{draws[:, i].std():12.4f}"
              f"{true_w[i]:10.2f}")
    error = ((draws.mean(0) - mean) / sd).abs().max()
    print(f"\nlargest error of a posterior mean: {error:.2f} posterior sd")


if __name__ == "__main__":
    main()
