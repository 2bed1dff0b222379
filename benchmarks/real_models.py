"""Kernels on a real, correlated model against a long NUTS run: which options get it right.

    python benchmarks/real_models.py                       # every configuration below
    python benchmarks/real_models.py --configs "SGLD()" "SGLD(full_mass=False)"
    python benchmarks/real_models.py --reference breast_cancer   # remake tests/data/breast_cancer_nuts.json

scikit-learn's breast-cancer logistic regression (569 rows, 31 coefficients, features correlated up
to 0.99; tests/real_models.py) on minibatches of 64, each configuration with the same budget
(2000 warmup steps, 30,000 samples by default), against NUTS on the full data (4000 samples). For
each: wall time, the largest and mean error of a posterior mean (in NUTS sds), the range of sd
ratios, the smallest and median effective sample size over the coefficients, and what warmup chose.
"""

from __future__ import annotations

import argparse
import json
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

import pyro_sgmcmc.infer as infer  # noqa: E402
from real_models import DATA, breast_cancer, breast_cancer_model, flat_draws, reference  # noqa: E402

CONFIGS = [
    "SGLD(full_mass=False)",
    "SGLD()",
    "SGLD(exact_gaussian=True)",
    "SGLD(control_variates=True)",
    "SGLD(control_variates=True, exact_gaussian=True)",
    "SGNHT()",
]


def make_reference(num_samples: int = 4000, warmup: int = 1000) -> None:
    """A long NUTS run on the full data, saved with its Monte Carlo errors."""
    x, y = breast_cancer()
    pyro.set_rng_seed(0)
    start = time.perf_counter()
    mcmc = MCMC(NUTS(breast_cancer_model), num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
    mcmc.run(x, y)
    draws = flat_draws(mcmc.get_samples())
    squared = (draws - draws.mean(0)) ** 2
    out = {
        "what": f"Posterior of the breast-cancer logistic regression (tests/real_models.py: breast_cancer_model) by "
                f"NUTS on the full data: {num_samples} samples after {warmup} warmup steps, pyro.set_rng_seed(0); "
                "coordinates are [bias, w_0, ..., w_29]",
        "command": "python benchmarks/real_models.py --reference breast_cancer",
        "mean": draws.mean(0).tolist(), "sd": draws.std(0).tolist(),
        "ess_mean": effective_sample_size(draws[None], chain_dim=0, sample_dim=1).tolist(),
        "ess_variance": effective_sample_size(squared[None], chain_dim=0, sample_dim=1).tolist(),
        "variance_sd": squared.std(0).tolist(),
    }
    (DATA / "breast_cancer_nuts.json").write_text(json.dumps(out, indent=1))
    print(f"NUTS reference: {time.perf_counter() - start:.0f} s")


def evaluate(config: str, warmup: int, num_samples: int, batch: int) -> None:
    name, _, options = config.partition("(")
    kernel = getattr(infer, name)(breast_cancer_model, **eval(f"dict({options}"))  # noqa: S307 (our own list)
    x, y = breast_cancer()
    ref = reference("breast_cancer")
    mean, sd = torch.tensor(ref["mean"]), torch.tensor(ref["sd"])
    pyro.set_rng_seed(0)
    start = time.perf_counter()
    mcmc = MCMC(kernel, num_samples=num_samples, warmup_steps=warmup, disable_progbar=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", infer.MixingWarning)
        mcmc.run(x, y, batch)
    seconds = time.perf_counter() - start
    draws = flat_draws(mcmc.get_samples())
    error = ((draws.mean(0) - mean) / sd).abs()
    ratio = draws.std(0) / sd
    stride = max(1, len(draws) // 5000)
    ess = effective_sample_size(draws[None, ::stride], chain_dim=0, sample_dim=1)
    d = kernel.diagnostics()
    warned = "warned" if any(issubclass(w.category, infer.MixingWarning) for w in caught) else "-"
    print(f"| {config} | {seconds:.0f} s | {error.max():.2f} / {error.mean():.2f} | {ratio.min():.2f}-{ratio.max():.2f} "
          f"| {ess.min():.0f} / {ess.median():.0f} | {d['preconditioner']}, step {d['step size']:.3g} | {warned} |",
          flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=CONFIGS)
    parser.add_argument("--warmup", type=int, default=2000)
    parser.add_argument("--samples", type=int, default=30_000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--reference", choices=["breast_cancer"])
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.reference:
        make_reference()
        return
    print(f"breast cancer, minibatches of {args.batch}, {args.warmup} warmup steps, {args.samples} samples")
    print("| kernel | time | mean error, max / mean (sd) | sd ratio | ESS min / median | warmup chose | MixingWarning |")
    print("|---|---|---|---|---|---|---|")
    for config in args.configs:
        evaluate(config, args.warmup, args.samples, args.batch)


if __name__ == "__main__":
    main()
