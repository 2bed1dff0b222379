"""Time to an accurate posterior: our MCMC kernels on minibatches against Pyro's NUTS on full data.

    python benchmarks/vs_nuts.py [--sizes 10000 100000] [--reference-samples 10000]

Bayesian logistic regression, d = 20, synthetic data (N rows). The reference posterior (mean and
sd of every coefficient) is a long NUTS run. Each method then runs with growing budgets (NUTS:
more warmup and samples; ours: more samples, minibatches of ``--batch``), and the figure is the
wall time of the first run whose posterior means are all within 0.1 posterior sd of the reference
and whose sds are all within 10% of it (the accuracy of issue 4's target); with ``--seeds k``, the
median time of the first budget at which all k seeded runs do (one lucky run does not count). Our kernels run with
no tuning (warmup adaptation on, diagonal preconditioner); the "+ CV" rows add control variates
(``control_variates=True``: the anchor is the mode, found by L-BFGS on the full data, and the
chain starts there; its cost is inside the wall time). 2 threads, CPU.

    python benchmarks/vs_nuts.py --methods NUTS "SGLD + CV" "SGNHT + CV" --sizes 100000

The "exact Gaussian" rows add ``full_mass=True, exact_gaussian=True`` (a dense preconditioner
from the Hessian, and SGLD steps that are exact on the Laplace approximation it describes, so
the step size is limited by how far the posterior is from Gaussian: near-independent draws on
big data) and ``jit_compile=True`` (the potential traced, as for HMC); with them the chain needs
only a short warmup (it starts at the mode). "NUTS (jit)" is NUTS with ``jit_compile=True``.

    python benchmarks/vs_nuts.py --sizes 100000 --methods NUTS "NUTS (jit)" "SGLD + CV exact Gaussian" \
        "SGLD + CV exact Gaussian (target_bias 0.1)"
"""

from __future__ import annotations

import argparse
import time

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS

from pyro_sgmcmc.infer import SGHMC, SGLD, SGNHT

D = 20


def model(x, y, batch_size=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([D]).to_event(1))
    with pyro.plate("data", len(y), subsample_size=batch_size) as idx:
        pyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])


def data(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=gen)
    w = torch.randn(D, generator=gen) / D**0.5
    y = torch.bernoulli(torch.sigmoid(x @ w), generator=gen)
    return x, y


def run(kernel, x, y, warmup, samples, batch=None, seed=1):
    pyro.set_rng_seed(seed)
    mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=True)
    start = time.perf_counter()
    mcmc.run(x, y, batch)
    return time.perf_counter() - start, mcmc.get_samples()["w"]


def accuracy(draws, ref_mean, ref_sd):
    mean_error = float(((draws.mean(0) - ref_mean).abs() / ref_sd).max())
    sd_error = float((draws.std(0) / ref_sd - 1).abs().max())
    return mean_error, sd_error


def time_to_accuracy(name, make, budgets, x, y, ref_mean, ref_sd, batch=None, seeds=1):
    """The median wall time over ``seeds`` runs of the first budget at which every seed's run
    reaches the accuracy (one lucky run does not count)."""
    for warmup, samples in budgets:
        times, ok = [], True
        for seed in range(1, seeds + 1):
            seconds, draws = run(make(), x, y, warmup, samples, batch, seed=seed)
            mean_error, sd_error = accuracy(draws, ref_mean, ref_sd)
            passed = mean_error <= 0.1 and sd_error <= 0.1
            ok = ok and passed
            times.append(seconds)
            print(f"  {name:<28} warmup {warmup:>5} samples {samples:>6} seed {seed}: {seconds:7.1f} s  "
                  f"mean error {mean_error:.3f} sd, sd error {sd_error:.3f}  {'OK' if passed else ''}", flush=True)
        if ok:
            return sorted(times)[len(times) // 2]
    return float("nan")


def methods(batch: int) -> dict[str, tuple]:
    """name -> (kernel factory, budgets of (warmup, samples), minibatch size)."""
    ours = [(300, 500), (500, 1000), (500, 2000), (1000, 4000), (1000, 8000)]
    with_cv = [(100, 250), (100, 500), (200, 1000), (200, 2000), (400, 4000), (400, 8000)]
    exact = [(20, 250), (20, 500), (20, 1000), (50, 2000), (100, 4000), (100, 8000)]
    nuts = [(50, 100), (100, 200), (200, 400), (300, 800), (500, 1600)]

    def exact_gaussian(**options):
        return lambda: SGLD(model, control_variates=True, full_mass=True, exact_gaussian=True, jit_compile=True,
                            ignore_jit_warnings=True, **options)

    return {
        "NUTS": (lambda: NUTS(model), nuts, None),
        "NUTS (jit)": (lambda: NUTS(model, jit_compile=True, ignore_jit_warnings=True), nuts, None),
        "SGLD": (lambda: SGLD(model, num_steps=5), ours, batch),
        "SGNHT": (lambda: SGNHT(model, num_steps=5), ours, batch),
        "SGLD + CV": (lambda: SGLD(model, control_variates=True), with_cv, batch),
        "SGNHT + CV": (lambda: SGNHT(model, control_variates=True), with_cv, batch),
        "SGHMC + CV": (lambda: SGHMC(model, control_variates=True), with_cv, batch),
        "SGLD + CV (target_bias 0.1)": (lambda: SGLD(model, control_variates=True, target_bias=0.1), with_cv, batch),
        "SGLD + CV exact Gaussian": (exact_gaussian(), exact, batch),
        "SGLD + CV exact Gaussian (target_bias 0.1)": (exact_gaussian(target_bias=0.1), exact, batch),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--reference-samples", type=int, default=10000)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seeds", type=int, default=1,
                        help="runs per budget (seeds 1..k); a budget counts when every run reaches the accuracy")
    parser.add_argument("--methods", nargs="+", default=["NUTS", "SGLD", "SGNHT", "SGLD + CV", "SGNHT + CV"])
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    table = methods(args.batch)
    rows = []
    for n in args.sizes:
        x, y = data(n)
        print(f"N = {n}: reference NUTS run ({args.reference_samples} samples)...", flush=True)
        ref_seconds, ref = run(NUTS(model), x, y, 500, args.reference_samples, seed=123)
        ref_mean, ref_sd = ref.mean(0), ref.std(0)
        print(f"  reference took {ref_seconds:.1f} s", flush=True)
        times = {}
        for name in args.methods:
            make, budgets, batch = table[name]
            label = name if batch is None else f"{name} (batch {batch})"
            times[name] = time_to_accuracy(label, make, budgets, x, y, ref_mean, ref_sd, batch, args.seeds)
        rows.append((n, times))
    print("\n| N | " + " | ".join(args.methods) + " | NUTS / best of ours |")
    print("|---" * (len(args.methods) + 2) + "|")
    for n, times in rows:
        ours = [t for name, t in times.items() if not name.startswith("NUTS") and t == t]
        ratio = times.get("NUTS", float("nan")) / min(ours) if ours else float("nan")
        print(f"| {n} | " + " | ".join(f"{times[name]:.1f} s" for name in args.methods) + f" | {ratio:.2f}x |")
    print("\n(nan: no budget reached the accuracy)")


if __name__ == "__main__":
    main()
