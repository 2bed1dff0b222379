"""Time per sampler step with pre-filled gradients, against the peers, in one interleaved run.

    python benchmarks/step_cost.py            # float32, 2 threads, CPU
    python benchmarks/step_cost.py --quick    # fewer rounds, for a smoke run

Cases: (a) one 10M-element tensor, (b) 500 tensors of 20k, (c) 20 tensors of 100.
Methods, each timed on its own copy of the parameters, in rounds (in a shuffled order each round)
so that drifts in machine load hit all of them alike; the figure is the median over rounds:

* floor            -- one in-place ``normal_`` into a preallocated buffer + one foreach axpy
                      (the least any SGLD step can do: draw the noise, touch every parameter once)
* floor (sampler step, inline) -- what a correct SGLD step must do at least, inline: the noise,
                      the gradient added into it, a finiteness check, one pass over the parameters
* torch SGD        -- ``torch.optim.SGD(foreach=True)``, no noise at all
* ours SGLD        -- ``pyro_sgmcmc.samplers.SGLD`` (multi-tensor path), and ``foreach=False``
* ours SGNHT, SGHMC, PSGLD -- ``pyro_sgmcmc.samplers.SGNHT`` etc., for reference
* devinterp SGLD   -- ``devinterp.optim.sgld.SGLD`` and ``devinterp.optim.SGMCMC.sgld``
* posteriors sgld  -- ``posteriors.sgmcmc.sgld`` (``inplace=True``). posteriors computes the
                      gradient itself, so it gets a linear log posterior whose gradient is the
                      pre-filled one; that costs it one multiply-sum forward and one backward.

Ratios are printed against the floor and against torch SGD, with the issue's targets.
"""

from __future__ import annotations

import math
import statistics

import torch

from _rounds import interleaved, prepare, timing_parser
from pyro_sgmcmc.functional._noise import _gathers as gathers
from pyro_sgmcmc.samplers import SGLD
from pyro_sgmcmc.samplers import PSGLD
from pyro_sgmcmc.samplers import SGHMC
from pyro_sgmcmc.samplers import SGNHT

CASES = {
    "a": ("(a) 1 x 10M", [10_000_000]),
    "b": ("(b) 500 x 20k", [20_000] * 500),
    "c": ("(c) 20 x 100", [100] * 20),
}
LR = 1e-6


def make_params(sizes, seed=0):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in sizes]
    for p in params:
        p.grad = torch.randn(p.numel(), generator=gen).view_as(p) * 1e-3
    return params


class Floor:
    def __init__(self, params):
        self.params = params
        total = sum(p.numel() for p in params)
        self.buffer = torch.empty(total)
        self.views = [v.view_as(p) for v, p in zip(self.buffer.split([p.numel() for p in params]), params)]

    @torch.no_grad()
    def step(self):
        self.buffer.normal_()
        torch._foreach_add_(self.params, self.views, alpha=LR**0.5)


class SamplerFloor:
    """The least a correct SGLD step does, written inline with no optimizer around it: noise into a
    flat buffer, the gradient added into it (gathered with one ``torch.cat`` when every tensor is
    small and 1-d, as ours does), a finiteness check, one pass over the parameters."""

    def __init__(self, params):
        self.params = params
        self.buffer = torch.empty(sum(p.numel() for p in params))
        self.views = [v.view_as(p) for v, p in zip(self.buffer.split([p.numel() for p in params]), params)]
        self.gather = torch.empty_like(self.buffer) if gathers(params) else None  # ours' rule

    @torch.no_grad()
    def step(self):
        grads = [p.grad for p in self.params]
        self.buffer.normal_(0.0, 2 / LR**0.5)
        if self.gather is not None:
            self.buffer.add_(torch.cat(grads, out=self.gather))
        else:
            torch._foreach_add_(self.views, grads)
        if not math.isfinite(self.buffer.sum()):
            raise FloatingPointError
        torch._foreach_add_(self.params, self.views, alpha=-LR / 2)


class Posteriors:
    def __init__(self, params):
        import posteriors

        grads = [p.grad.detach().clone() for p in params]
        self.params = [p.detach().clone() for p in params]

        def log_posterior(ps, batch):
            value = sum((p * g).sum() for p, g in zip(ps, grads))
            return value, torch.tensor([])

        self.transform = posteriors.sgmcmc.sgld.build(log_posterior, lr=LR / 2)
        self.state = self.transform.init(self.params)

    def step(self):
        self.state, _ = self.transform.update(self.state, None, inplace=True)


def builders():
    out = {
        "floor": Floor,
        "floor (sampler step, inline)": SamplerFloor,
        "torch SGD": lambda ps: torch.optim.SGD(ps, lr=LR, foreach=True),
        "ours SGLD": lambda ps: SGLD(ps, lr=LR),
        "ours SGLD per-tensor": lambda ps: SGLD(ps, lr=LR, foreach=False),
        "ours SGNHT": lambda ps: SGNHT(ps, lr=LR**0.5),
        "ours SGHMC": lambda ps: SGHMC(ps, lr=LR**0.5),
        "ours PSGLD": lambda ps: PSGLD(ps, lr=LR),
    }
    try:
        from devinterp.optim import SGMCMC
        from devinterp.optim.sgld import SGLD as DevinterpSGLD

        out["devinterp SGLD"] = lambda ps: DevinterpSGLD(ps, lr=LR, nbeta=1.0)
        out["devinterp SGMCMC.sgld"] = lambda ps: SGMCMC.sgld(ps, lr=LR, nbeta=1.0)
    except ImportError:
        print("devinterp not installed: pip install -e .[bench]")
    try:
        import posteriors  # noqa: F401

        out["posteriors sgld"] = Posteriors
    except ImportError:
        print("posteriors not installed: pip install -e .[bench]")
    return out


def time_case(sizes, rounds, reps):
    methods = {name: build(make_params(sizes)) for name, build in builders().items()}
    for m in methods.values():  # warm up (plans, lazy state)
        for _ in range(2):
            m.step()
    return interleaved({name: m.step for name, m in methods.items()}, rounds, reps)


def fmt(seconds):
    return f"{seconds * 1e3:.2f} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.1f} us"


def main():
    parser = timing_parser(__doc__)
    parser.add_argument("--cases", default="abc")
    args = parser.parse_args()
    prepare(args)
    results, rounds_of = {}, {}
    for key in args.cases:
        label, sizes = CASES[key]
        rounds = 5 if args.quick else (21 if key != "c" else 30)
        reps = 1 if key != "c" else (50 if args.quick else 300)
        rounds_of[key] = time_case(sizes, rounds, reps)
        results[key] = {name: statistics.median(ts) for name, ts in rounds_of[key].items()}
        print(f"{label}: done", flush=True)

    names = list(next(iter(results.values())))
    print(f"\ntorch {torch.__version__}, {args.threads} threads, float32, median time per step()\n")
    header = "| method | " + " | ".join(CASES[k][0] for k in results) + " |"
    print(header)
    print("|" + "---|" * (len(results) + 1))
    for name in names:
        row = []
        for k in results:
            t, floor, sgd = results[k][name], results[k]["floor"], results[k]["torch SGD"]
            row.append(f"{fmt(t)} ({t / floor:.2f}x floor, {t / sgd:.2f}x SGD)")
        print(f"| {name} | " + " | ".join(row) + " |")

    def paired(k, a, b):
        """Median over rounds of time(a) / time(b) within the same round (robust to drift)."""
        return statistics.median(x / y for x, y in zip(rounds_of[k][a], rounds_of[k][b]))

    print("\nTargets (median over rounds of the ratio within a round):")
    for k in results:
        if k in "ab":
            print(f"  {CASES[k][0]}: ours / floor = {paired(k, 'ours SGLD', 'floor'):.3f} (target <= 1.15)", end="")
            if "devinterp SGLD" in results[k]:
                print(f"; devinterp SGLD / ours = {paired(k, 'devinterp SGLD', 'ours SGLD'):.2f} (target >= 2)", end="")
            print()
        else:
            print(f"  {CASES[k][0]}: ours / torch SGD = {paired(k, 'ours SGLD', 'torch SGD'):.3f} (target <= 1.0)")


if __name__ == "__main__":
    main()
