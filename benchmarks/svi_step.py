"""``SVI.step`` time with our SGLD against ``pyro.optim.Adam``, on a Bayesian MLP.

    python benchmarks/svi_step.py [--quick]

Model: a Bayesian MLP 100 -> 256 -> 256 -> 1 with ``PyroSample`` normal priors (about 92k
weights), a normal likelihood in ``pyro.plate("data", 10000, subsample_size=128)``. Each variant
uses its own param store and is timed in rounds, in a shuffled order each round; the figure is the
median per step, and the ratio the median of the within-round ratios. Target (issue 3): SGLD at
most 1.1x Adam's step.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import pyro
import pyro.distributions as dist
import pyro.optim
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta
from pyro.nn import PyroModule, PyroSample

import pyro_sgmcmc.optim as optim
from pyro_sgmcmc.infer import AutoUnconstrainedDelta

N, BATCH, IN, HIDDEN = 10_000, 128, 100, 256


class BayesianMLP(PyroModule):
    def __init__(self):
        super().__init__()
        sizes = [(IN, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, 1)]
        self.layers = PyroModule[torch.nn.ModuleList]([PyroModule[torch.nn.Linear](a, b) for a, b in sizes])
        for layer, (a, b) in zip(self.layers, sizes):
            layer.weight = PyroSample(dist.Normal(0.0, a**-0.5).expand([b, a]).to_event(2))
            layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand([b]).to_event(1))

    def forward(self, x, y):
        for layer in self.layers:  # global latents: sampled outside the data plate
            layer.weight, layer.bias
        with pyro.plate("data", x.shape[0], subsample_size=BATCH) as idx:
            h = x[idx]
            for layer in self.layers[:-1]:
                h = torch.tanh(layer(h))
            mean = self.layers[-1](h).squeeze(-1)
            pyro.sample("y", dist.Normal(mean, 0.1), obs=y[idx])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pyro.set_rng_seed(0)
    x, y = torch.randn(N, IN), torch.randn(N)
    variants = {
        "Adam + AutoUnconstrainedDelta": (AutoUnconstrainedDelta, lambda: pyro.optim.Adam({"lr": 1e-3})),
        "SGLD + AutoUnconstrainedDelta": (AutoUnconstrainedDelta, lambda: optim.SGLD({"lr": 1e-8})),
        "SGNHT + AutoUnconstrainedDelta": (AutoUnconstrainedDelta, lambda: optim.SGNHT({"lr": 1e-5})),
        "Adam + AutoDelta (MAP)": (AutoDelta, lambda: pyro.optim.Adam({"lr": 1e-3})),
    }
    # one param store per variant: the param store is global, so swap it in and out
    stores, svis = {}, {}
    for name, (guide_cls, make_optim) in variants.items():
        pyro.clear_param_store()  # (set_state below adds to the store; names do not clash in effect)
        model = BayesianMLP()
        svis[name] = SVI(model, guide_cls(model), make_optim(), Trace_ELBO())
        for _ in range(3):
            svis[name].step(x, y)
        stores[name] = pyro.get_param_store().get_state()

    rounds, steps = (5, 10) if args.quick else (15, 40)
    times = {name: [] for name in variants}
    order = random.Random(0)
    names = list(variants)
    for _ in range(rounds):
        order.shuffle(names)
        for name in names:
            pyro.get_param_store().set_state(stores[name])
            start = time.perf_counter()
            for _ in range(steps):
                svis[name].step(x, y)
            times[name].append((time.perf_counter() - start) / steps)
            stores[name] = pyro.get_param_store().get_state()

    sampler = svis["SGLD + AutoUnconstrainedDelta"].optim.sampler
    num_weights = sum(p.numel() for group in sampler.param_groups for p in group["params"])
    print(f"Bayesian MLP, {num_weights} weights, batch {BATCH} of {N}; torch {torch.__version__}, "
          f"{args.threads} threads; median time per SVI.step\n")
    print("| variant | time per step | / Adam (same guide) |")
    print("|---|---|---|")
    base = "Adam + AutoUnconstrainedDelta"
    for name in variants:
        ratio = statistics.median(a / b for a, b in zip(times[name], times[base]))
        print(f"| {name} | {statistics.median(times[name]) * 1e3:.2f} ms | {ratio:.3f} |")
    ratio = statistics.median(a / b for a, b in zip(times["SGLD + AutoUnconstrainedDelta"], times[base]))
    print(f"\nTarget: SGLD / Adam = {ratio:.3f} (target <= 1.1)")


if __name__ == "__main__":
    main()
