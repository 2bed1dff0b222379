"""Latent sites local to a subsampled plate (pyro_sgmcmc.infer.local): references and timings.

    python benchmarks/local_latents.py --reference     # remake tests/data/hierarchical_logistic_nuts.json
    python benchmarks/local_latents.py --reference pmf # remake tests/data/pmf_nuts.json
    python benchmarks/local_latents.py --groups 100000  # time to accurate globals, random effects
    python benchmarks/local_latents.py --groups 100000 --batch 5000 --control-variates --exact-gaussian \
        --local-exact-gaussian                          # the README's configuration
    python benchmarks/local_latents.py --groups 10000 --sampler nuts-jit --max-samples 1000  # NUTS on the full data

``--reference``: NUTS on the full data of the hierarchical logistic regression of
``tests/mcmc_models.py`` (20 groups of 20 rows, a random intercept per group), 2000 samples after
500 warmup steps, the posterior moments of every coordinate with their effective sample sizes.
``--reference pmf``: NUTS on the full data of the probabilistic matrix factorisation of
``tests/mcmc_models.py`` (40 users x 10 items, rank 2), 2 chains of 1000 samples after 300 warmup
steps (trees of depth 6 at most), the moments of the rotation-invariant predicted ratings of ``PMF_PAIRS`` and of the noise sd.

Default: the conjugate random-effects model of ``tests/mcmc_models.py`` (``hierarchical_normal``:
mu global, theta_i local, tau and sigma known) with ``--groups`` groups of 5 rows, minibatches of
``--batch`` groups, sampled by the default SGLD kernel (``--local-exact-gaussian``: with ``local_exact_gaussian=True``),
or with ``--sampler nuts`` / ``nuts-jit`` by Pyro's NUTS on the full data (without / with ``jit_compile``);
the exact posterior of mu is Gaussian
(precision ``1/s^2 + sum_i 1/(tau^2 + sigma^2/n)``), so the benchmark reports the wall time (warmup
included) until the running mean of mu is within 0.1 posterior sd and its running sd within 10%,
checked every 100 samples (the first time, and from when they stay within to the end of the
run), and where the run ended.
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
    summary = summarise(models.hierarchical_logistic_draws(mcmc.get_samples())[None])
    out = {"what": f"Posterior of tests/mcmc_models.py: hierarchical_logistic on hierarchical_logistic_data() by "
                   f"NUTS on the full data: {num_samples} samples after {warmup} warmup steps, pyro.set_rng_seed(0); "
                   "coordinates are [beta_0, beta_1, sigma, eta_0, ..., eta_19]",
           "command": "python benchmarks/local_latents.py --reference", **summary}
    (DATA / "hierarchical_logistic_nuts.json").write_text(json.dumps(out, indent=1))
    print(f"NUTS reference: {time.perf_counter() - start:.0f} s")


def make_pmf_reference(num_samples: int = 1000, warmup: int = 300, chains: int = 2, max_tree_depth: int = 6) -> None:
    """NUTS (jit) on the full data of the matrix factorisation, ``chains`` chains one after the
    other (each from its own start: a chain stuck in one mode would show as a disagreement between
    chains), saved with its Monte Carlo errors and each chain's means. The trees are capped at
    depth ``max_tree_depth`` (NUTS stays exact; only its ESS per iteration can fall): the
    factors' posterior is a ridge (a rotation, and a scale traded between u and v), along which
    uncapped trees grew long and 3800 iterations did not end in 25 minutes on 2 shared cores."""
    ratings = models.pmf_data()
    start = time.perf_counter()
    per_chain = []
    for chain in range(chains):
        pyro.set_rng_seed(chain)
        mcmc = MCMC(NUTS(models.pmf, jit_compile=True, ignore_jit_warnings=True, max_tree_depth=max_tree_depth),
                    num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
        mcmc.run(ratings)
        print(f"chain {chain}: {time.perf_counter() - start:.0f} s", flush=True)
        samples = mcmc.get_samples()
        per_chain.append(models.pmf_draws(samples["v"], samples["sigma"], samples["u"]))
    draws = torch.stack(per_chain)
    summary = summarise(draws)
    out = {"what": f"Posterior of tests/mcmc_models.py: pmf on pmf_data() by NUTS (jit_compile=True) on the full data: "
                   f"{chains} chains of {num_samples} samples after {warmup} warmup steps, max_tree_depth={max_tree_depth}, "
                   "pyro.set_rng_seed(chain); "
                   "coordinates are the predicted ratings u_i . v_j of PMF_PAIRS, then sigma",
           "command": "python benchmarks/local_latents.py --reference pmf", **summary,
           "chain_means": draws.mean(1).tolist()}
    (DATA / "pmf_nuts.json").write_text(json.dumps(out, indent=1))
    print(f"NUTS reference: {time.perf_counter() - start:.0f} s; chain means:\n{draws.mean(1)}\nsd {draws.std((0, 1))}\n"
          f"ESS {summary['ess_mean']}")


def summarise(draws: torch.Tensor) -> dict:
    """Means, sds and effective sample sizes (of the draws and of their squared deviations) of
    ``draws [chains, samples, k]``."""
    squared = (draws - draws.mean((0, 1))) ** 2
    return {"mean": draws.mean((0, 1)).tolist(), "sd": draws.std((0, 1)).tolist(),
            "ess_mean": effective_sample_size(draws, chain_dim=0, sample_dim=1).tolist(),
            "ess_variance": effective_sample_size(squared, chain_dim=0, sample_dim=1).tolist(),
            "variance_sd": squared.std((0, 1)).tolist()}


def time_to_accuracy(groups: int, batch: int, max_samples: int, sampler: str, local_exact_gaussian: bool,
                     control_variates: bool = False, exact_gaussian: bool = False, rows: int = 5,
                     warmup: int = 500) -> None:
    """``sampler``: ``"sgld"`` (minibatches of ``batch`` groups, the local table), ``"nuts"`` or
    ``"nuts-jit"`` (Pyro's NUTS on the full data, ``jit_compile=False`` / ``True``)."""
    gen = torch.Generator().manual_seed(0)
    y = 1.0 + torch.randn(groups, generator=gen) + torch.randn(rows, groups, generator=gen)
    sigma, tau, prior = 1.0, 1.0, 3.0
    precision = 1 / prior**2 + groups / (tau**2 + sigma**2 / rows)
    mean = (y.double().mean(0) / (tau**2 + sigma**2 / rows)).sum() / precision
    sd = precision**-0.5
    if sampler == "sgld":
        kernel = infer.SGLD(models.hierarchical_normal, local_exact_gaussian=local_exact_gaussian,
                            control_variates=control_variates, exact_gaussian=exact_gaussian)
        label = (f"SGLD (local_exact_gaussian={local_exact_gaussian}, control_variates={control_variates}, "
                 f"exact_gaussian={exact_gaussian}), minibatches of {batch}")
    else:
        jit = sampler == "nuts-jit"
        kernel = NUTS(models.hierarchical_normal, jit_compile=jit, ignore_jit_warnings=True)
        label, batch = f"NUTS (jit_compile={jit}), full data", None
    draws: list[float] = []
    start = time.perf_counter()
    checks: list[tuple[float, int, bool]] = []  # (seconds, samples, within) every 100 samples

    def hook(kernel_, samples, stage, i):
        if stage != "Sample":
            return
        draws.append(float(samples["mu"]))
        if len(draws) % 100 == 0:
            x = torch.tensor(draws, dtype=torch.float64)
            within = abs(float(x.mean()) - float(mean)) <= 0.1 * sd and abs(float(x.std()) / sd - 1) <= 0.1
            checks.append((time.perf_counter() - start, len(draws), within))

    pyro.set_rng_seed(0)
    mcmc = MCMC(kernel, num_samples=max_samples, warmup_steps=warmup, hook_fn=hook, disable_progbar=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", infer.MixingWarning)
        mcmc.run(y, 1, batch)
    x = torch.tensor(draws, dtype=torch.float64)
    total = time.perf_counter() - start
    steps = ""
    if sampler == "sgld":
        steps = (f"; step sizes: global {kernel.diagnostics()['step size']:.3g}, local "
                 f"{kernel.diagnostics()['local step sizes']['theta']:.3g}")
    ess = float(effective_sample_size(x[None, :, None], chain_dim=0, sample_dim=1))
    print(f"{label}, {groups} groups, {warmup} warmup steps: exact mu {float(mean):.4f} +- {sd:.4f}; after {len(draws)} "
          f"samples ({total:.0f} s; ESS {ess:.0f}): {float(x.mean()):.4f} +- {float(x.std()):.4f} "
          f"(mean off by {abs(float(x.mean()) - float(mean)) / sd:.2f} sd, sd ratio {float(x.std()) / sd:.3f}); "
          + _reached(checks) + steps)


def _reached(checks: list[tuple[float, int, bool]]) -> str:
    """When the running estimates were first within 0.1 sd / 10%, and from when they stayed within
    to the end of the run (a first hit on few effective samples can be luck)."""
    first = next((c for c in checks if c[2]), None)
    if first is None:
        return "never within 0.1 sd / 10%"
    stayed = None
    for check in reversed(checks):
        if not check[2]:
            break
        stayed = check
    out = f"within 0.1 sd and 10% after {first[0]:.0f} s ({first[1]} samples)"
    if stayed is None:
        return out + ", not at the end"
    return out + f", and from {stayed[0]:.0f} s ({stayed[1]} samples) to the end"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference", nargs="?", const="hierarchical_logistic", choices=["hierarchical_logistic", "pmf"],
                        help="remake a NUTS reference of the tests (default: hierarchical_logistic)")
    parser.add_argument("--groups", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--max-samples", type=int, default=5000)
    parser.add_argument("--local-exact-gaussian", action="store_true", help="rows' steps exact on their Gaussian")
    parser.add_argument("--control-variates", action="store_true",
                        help="SGLD: the globals' gradient corrected at an anchor (LocalControlVariates)")
    parser.add_argument("--exact-gaussian", action="store_true",
                        help="SGLD: the globals' steps exact on the Gaussian of the warmup's curvature (exact_gaussian=True)")
    parser.add_argument("--warmup", type=int, default=500, help="warmup steps (default 500)")
    parser.add_argument("--sampler", choices=["sgld", "nuts", "nuts-jit"], default="sgld",
                        help="our SGLD on minibatches, or Pyro's NUTS on the full data (without / with jit_compile)")
    args = parser.parse_args()
    if args.reference == "pmf":
        make_pmf_reference()
    elif args.reference:
        make_reference()
    else:
        time_to_accuracy(args.groups, args.batch, args.max_samples, args.sampler, args.local_exact_gaussian,
                         args.control_variates, args.exact_gaussian, warmup=args.warmup)


if __name__ == "__main__":
    main()
