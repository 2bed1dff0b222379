"""Control variates against plain minibatch gradients, at equal wall time.

    python benchmarks/control_variates.py [--n 100000] [--budgets 5 10 20 40]

Bayesian logistic regression (d = 20, N synthetic rows, minibatches of 1000; the model of
``benchmarks/vs_nuts.py``). The reference posterior is a NUTS run on the full data. Each method is
a kernel of ours with nothing tuned (warmup adaptation on), run for a fixed wall-time budget
(warmup included; for "+ CV" the L-BFGS search for the anchor too) through the kernel's own
``setup``/``sample`` loop; the figures are the largest error of a posterior mean (in posterior sds)
and of a posterior sd (relative) over the 20 coefficients. 2 threads, CPU.
"""

from __future__ import annotations

import argparse
import time

import pyro
import torch
from pyro.infer import MCMC, NUTS

from pyro_sgmcmc.infer import SGLD, SGNHT
from vs_nuts import accuracy, data, model

METHODS = {
    "SGLD": lambda: SGLD(model, num_steps=5),
    "SGLD + CV": lambda: SGLD(model, control_variates=True),
    "SGNHT": lambda: SGNHT(model, num_steps=5),
    "SGNHT + CV": lambda: SGNHT(model, control_variates=True),
}


def timed_chain(kernel, x, y, batch, warmup, seconds, seed=1):
    """Draws of ``w`` after ``warmup`` iterations, until ``seconds`` of wall time have passed."""
    pyro.set_rng_seed(seed)
    start = time.perf_counter()
    kernel.setup(warmup, x, y, batch)
    params = kernel.initial_params
    draws, i = [], 0
    while True:
        params = kernel.sample(params)
        i += 1
        if i > warmup:
            draws.append(params["w"].detach().clone())
        if time.perf_counter() - start > seconds and len(draws) >= 10:
            break
    kernel.cleanup()
    return torch.stack(draws), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--budgets", type=float, nargs="+", default=[5.0, 10.0, 20.0, 40.0])
    parser.add_argument("--warmup", type=int, default=300)
    parser.add_argument("--reference-samples", type=int, default=1000)
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    x, y = data(args.n)
    print(f"N = {args.n}: reference NUTS run ({args.reference_samples} samples)...", flush=True)
    pyro.set_rng_seed(123)
    reference = MCMC(NUTS(model), num_samples=args.reference_samples, warmup_steps=300, disable_progbar=True)
    start = time.perf_counter()
    reference.run(x, y, None)
    ref = reference.get_samples()["w"]
    print(f"  reference took {time.perf_counter() - start:.1f} s", flush=True)
    ref_mean, ref_sd = ref.mean(0), ref.std(0)
    rows = {}
    for name in args.methods:
        for budget in args.budgets:
            draws, seconds = timed_chain(METHODS[name](), x, y, args.batch, args.warmup, budget)
            mean_error, sd_error = accuracy(draws, ref_mean, ref_sd)
            rows[name, budget] = (mean_error, sd_error)
            print(f"  {name:<12} budget {budget:5.1f} s ({seconds:5.1f} s, {len(draws):>6} samples): "
                  f"mean error {mean_error:.3f} sd, sd error {sd_error:.3f}", flush=True)
    print("\n| wall time | " + " | ".join(args.methods) + " |")
    print("|---" * (len(args.methods) + 1) + "|")
    for budget in args.budgets:
        cells = [f"{rows[name, budget][0]:.2f} sd / {100 * rows[name, budget][1]:.0f}%" for name in args.methods]
        print(f"| {budget:g} s | " + " | ".join(cells) + " |")
    print("\n(largest posterior-mean error in posterior sds / largest relative sd error, over 20 coefficients)")


if __name__ == "__main__":
    main()
