"""Latent sites local to a subsampled plate (pyro_sgmcmc.infer.local): references and timings.

    python benchmarks/local_latents.py --reference     # remake tests/data/hierarchical_logistic_nuts.json
    python benchmarks/local_latents.py --groups 100000  # time to accurate globals, random effects

``--reference``: NUTS on the full data of the hierarchical logistic regression of
``tests/mcmc_models.py`` (20 groups of 20 rows, a random intercept per group), 2000 samples after
500 warmup steps, the posterior moments of every coordinate with their effective sample sizes.

Default: the conjugate random-effects model of ``tests/mcmc_models.py`` (``hierarchical_normal``:
mu global, theta_i local, tau and sigma known) with ``--groups`` groups of 5 rows, minibatches of
``--batch`` groups, sampled by the default SGLD kernel (``--local-exact-gaussian``: with ``local_exact_gaussian=True``); the exact posterior of mu is Gaussian
(precision ``1/s^2 + sum_i 1/(tau^2 + sigma^2/n)``), so the benchmark reports the wall time (warmup
included) until the running mean of mu is within 0.1 posterior sd and its running sd within 10%,
checked every 100 samples, and where the run ended.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import sys
import time
import warnings

import pyro
import torch
from pyro.infer import MCMC, NUTS
from pyro.ops.stats import effective_sample_size

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import mcmc_models as models  # noqa: E402
import pyro_sgmcmc.infer as infer  # noqa: E402

DATA = ROOT / "tests" / "data"


def make_reference(num_samples: int = 2000, warmup: int = 500) -> None:
    """NUTS on the full data of the hierarchical logistic regression, saved with its Monte Carlo errors."""
    x, y = models.hierarchical_logistic_data()
    pyro.set_rng_seed(0)
    start = time.perf_counter()
    mcmc = MCMC(NUTS(models.hierarchical_logistic), num_samples=num_samples, warmup_steps=warmup,
                disable_progbar=True)
    mcmc.run(x, y, x.shape[0], None)
    summary = summarise(models.hierarchical_logistic_draws(mcmc.get_samples()))
    out = {"what": f"Posterior of tests/mcmc_models.py: hierarchical_logistic on hierarchical_logistic_data() by "
                   f"NUTS on the full data: {num_samples} samples after {warmup} warmup steps, pyro.set_rng_seed(0); "
                   "coordinates are [beta_0, beta_1, sigma, eta_0, ..., eta_19]",
           "command": "python benchmarks/local_latents.py --reference", **summary}
    (DATA / "hierarchical_logistic_nuts.json").write_text(json.dumps(out, indent=1))
    print(f"NUTS reference: {time.perf_counter() - start:.0f} s")


def summarise(draws: torch.Tensor) -> dict:
    """Means, sds and effective sample sizes (of the draws and of their squared deviations)."""
    squared = (draws - draws.mean(0)) ** 2
    return {"mean": draws.mean(0).tolist(), "sd": draws.std(0).tolist(),
            "ess_mean": effective_sample_size(draws[None], chain_dim=0, sample_dim=1).tolist(),
            "ess_variance": effective_sample_size(squared[None], chain_dim=0, sample_dim=1).tolist(),
            "variance_sd": squared.std(0).tolist()}


def time_to_accuracy(groups: int, batch: int, max_samples: int, local_exact_gaussian: bool, rows: int = 5) -> None:
    gen = torch.Generator().manual_seed(0)
    y = 1.0 + torch.randn(groups, generator=gen) + torch.randn(rows, groups, generator=gen)
    sigma, tau, prior = 1.0, 1.0, 3.0
    precision = 1 / prior**2 + groups / (tau**2 + sigma**2 / rows)
    mean = (y.double().mean(0) / (tau**2 + sigma**2 / rows)).sum() / precision
    sd = precision**-0.5
    kernel = infer.SGLD(models.hierarchical_normal, local_exact_gaussian=local_exact_gaussian)
    draws: list[float] = []
    start = time.perf_counter()
    reached = None

    def hook(kernel_, samples, stage, i):
        nonlocal reached
        if stage != "Sample":
            return
        draws.append(float(samples["mu"]))
        if reached is None and len(draws) % 100 == 0:
            x = torch.tensor(draws, dtype=torch.float64)
            if abs(float(x.mean()) - float(mean)) <= 0.1 * sd and abs(float(x.std()) / sd - 1) <= 0.1:
                reached = (time.perf_counter() - start, len(draws))

    pyro.set_rng_seed(0)
    mcmc = MCMC(kernel, num_samples=max_samples, warmup_steps=500, hook_fn=hook, disable_progbar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", infer.MixingWarning)
        mcmc.run(y, 1, batch)
    x = torch.tensor(draws, dtype=torch.float64)
    total = time.perf_counter() - start
    print(f"local_exact_gaussian={local_exact_gaussian}, {groups} groups, minibatches of {batch}: exact mu {float(mean):.4f} +- {sd:.4f}; after {len(draws)} "
          f"samples ({total:.0f} s): {float(x.mean()):.4f} +- {float(x.std()):.4f} "
          f"(mean off by {abs(float(x.mean()) - float(mean)) / sd:.2f} sd, sd ratio {float(x.std()) / sd:.3f}); "
          + ("never within 0.1 sd / 10%" if reached is None else
             f"within 0.1 sd and 10% after {reached[0]:.0f} s ({reached[1]} samples)")
          + f"; step sizes: global {kernel.diagnostics()['step size']:.3g}, local "
          f"{kernel.diagnostics()['local step sizes']['theta']:.3g}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", action="store_true", help="remake the NUTS reference of the tests")
    parser.add_argument("--groups", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--max-samples", type=int, default=5000)
    parser.add_argument("--local-exact-gaussian", action="store_true", help="rows' steps exact on their Gaussian")
    args = parser.parse_args()
    if args.reference:
        make_reference()
    else:
        time_to_accuracy(args.groups, args.batch, args.max_samples, args.local_exact_gaussian)


if __name__ == "__main__":
    main()
