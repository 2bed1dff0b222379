"""Time of a whole training step (forward, backward, sampler step) against torch SGD and the peers,
in one interleaved run.

    python benchmarks/e2e_step.py            # 2 threads, CPU, float32
    python benchmarks/e2e_step.py --quick    # fewer rounds, for a smoke run

Models, batch 128, random data (no loading), cross-entropy averaged over the batch:

* MLP 784-1024-1024-10 (ReLU), 1.86M parameters;
* a small conv net on 3x32x32 images: two 3x3 convolutions (16, 32 channels, ReLU, 2x2 max-pool)
  and two linear layers (2048-256-10), 0.53M parameters.

Methods, each on its own copy of the model, in rounds (a shuffled order each round, so that
drifts in machine load hit all alike); the figure is the median over rounds of the time per step:

* torch SGD               -- ``torch.optim.SGD(foreach=True)``: no noise, the floor of a step;
* ours SGLD               -- ``pyro_sgmcmc.samplers.SGLD`` (noise drawn in ``step()``);
* ours SGLD, noise ahead  -- ``SGLD(..., noise_ahead=True)``: the next step's noise drawn in the
                             noise threads while forward and backward run;
* devinterp SGLD          -- ``devinterp.optim.sgld.SGLD``;
* posteriors sgld         -- ``posteriors.sgmcmc.sgld`` (its ``update`` runs forward and
                             backward itself, through ``torch.func``; ``inplace=True``).

Ratios are medians over rounds of the ratio to torch SGD within the round (robust to drift).
The machine's load is printed with the figures: on a shared machine they move with it.
"""

from __future__ import annotations

import os
import statistics
from typing import Any, Callable

import torch
import torch.nn.functional as F

from _rounds import interleaved, prepare, timing_parser
from pyro_sgmcmc.samplers import SGLD

BATCH, LR = 128, 1e-6


def mlp() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(784, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 1024),
                               torch.nn.ReLU(), torch.nn.Linear(1024, 10))


def convnet() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(32 * 8 * 8, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10))


MODELS = {"mlp": ("MLP 784-1024-1024-10", mlp, (784,)), "conv": ("conv net 3x32x32", convnet, (3, 32, 32))}


class TorchLoop:
    """forward, backward, ``optimizer.step()``."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor):
        self.model, self.optimizer, self.x, self.y = model, optimizer, x, y

    def step(self) -> None:
        self.optimizer.zero_grad(set_to_none=False)
        F.cross_entropy(self.model(self.x), self.y).backward()
        self.optimizer.step()


class PosteriorsLoop:
    """posteriors' own step: ``update`` evaluates the log posterior and its gradient (torch.func)."""

    def __init__(self, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor):
        import posteriors

        def log_posterior(params: dict, batch: tuple) -> tuple[torch.Tensor, torch.Tensor]:
            inputs, labels = batch
            logits = torch.func.functional_call(model, params, (inputs,))
            return -F.cross_entropy(logits, labels), logits

        params = {name: p.detach().clone() for name, p in model.named_parameters()}
        self.transform = posteriors.sgmcmc.sgld.build(log_posterior, lr=LR / 2)
        self.state = self.transform.init(params)
        self.batch = (x, y)

    def step(self) -> None:
        self.state, _ = self.transform.update(self.state, self.batch, inplace=True)


def methods() -> dict[str, Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], Any]]:
    out: dict[str, Callable] = {
        "torch SGD": lambda m, x, y: TorchLoop(m, torch.optim.SGD(m.parameters(), lr=LR, foreach=True), x, y),
        "ours SGLD": lambda m, x, y: TorchLoop(m, SGLD(m.parameters(), lr=LR), x, y),
    }
    if "noise_ahead" in SGLD.__init__.__code__.co_varnames:
        out["ours SGLD, noise ahead"] = lambda m, x, y: TorchLoop(m, SGLD(m.parameters(), lr=LR, noise_ahead=True),
                                                                  x, y)
    try:
        from devinterp.optim.sgld import SGLD as DevinterpSGLD

        out["devinterp SGLD"] = lambda m, x, y: TorchLoop(m, DevinterpSGLD(m.parameters(), lr=LR, nbeta=1.0), x, y)
    except ImportError:
        print("devinterp not installed: pip install -e .[bench]")
    try:
        import posteriors  # noqa: F401

        out["posteriors sgld"] = PosteriorsLoop
    except ImportError:
        print("posteriors not installed: pip install -e .[bench]")
    return out


def time_model(key: str, rounds: int, reps: int) -> dict[str, list[float]]:
    _, make, shape = MODELS[key]
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(BATCH, *shape, generator=gen), torch.randint(0, 10, (BATCH,), generator=gen)
    loops = {}
    for name, build in methods().items():
        torch.manual_seed(0)
        loops[name] = build(make(), x, y)
    for loop in loops.values():  # warm up (plans, lazy state, allocator)
        for _ in range(3):
            loop.step()
    return interleaved({name: loop.step for name, loop in loops.items()}, rounds, reps)


def main() -> None:
    parser = timing_parser(__doc__)
    parser.add_argument("--models", default="mlp,conv")
    args = parser.parse_args()
    prepare(args)
    rounds, reps = (4, 3) if args.quick else (12, 5)
    load_before = os.getloadavg()[0]
    results = {key: time_model(key, rounds, reps) for key in args.models.split(",")}
    load_after = os.getloadavg()[0]
    print(f"\ntorch {torch.__version__}, {args.threads} threads, float32, batch {BATCH}, {rounds} rounds of {reps} "
          f"steps; load average {load_before:.1f} before, {load_after:.1f} after ({os.cpu_count()} cores)\n")
    print("| method | " + " | ".join(MODELS[key][0] for key in results) + " |")
    print("|" + "---|" * (len(results) + 1))
    for name in next(iter(results.values())):
        row = []
        for times in results.values():
            median = statistics.median(times[name])
            ratio = statistics.median(t / s for t, s in zip(times[name], times["torch SGD"]))
            row.append(f"{median * 1e3:.1f} ms ({ratio:.2f}x SGD)")
        print(f"| {name} | " + " | ".join(row) + " |")
    print("\nGoal: ours SGLD <= 1.2x torch SGD end to end.")


if __name__ == "__main__":
    main()
