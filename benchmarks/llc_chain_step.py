"""The cost of one LLC chain-step on the benchmark MLP: ours' batched chains against devinterp's chain.

    python benchmarks/llc_chain_step.py --device cuda           # 300 steps of each setting
    python benchmarks/llc_chain_step.py --device cpu --steps 5  # a smoke run

The network, data and settings are ``benchmarks/llc.py``'s MLP (1.07M parameters, minibatches of
256, ``n beta = n / log n``, localization 100; trained for 3 epochs here, which does not change a
step's cost). Ours: the engine ``estimate_llc`` drives (``slt._engine.LocalEngine``: the chains'
weights stacked, one vmapped forward and backward, one sampler step for all of them) at step
1.58e-6, timed over ``--steps`` steps after 20, for 1 and 8 chains, SGLD and BAOAB, with the
virial (computed during the draws only), with 1M-element noise chunks (the CPU's size, the
device default before ``DEVICE_CHUNK_NUMEL``), and without the per-step divergence check. devinterp:
``sample_single_chain`` with its SGLD at the same step, its loader reading rows from host memory,
timed as the difference between runs of ``20 + steps`` and 20 draws. Milliseconds a step and a
chain-step (a step over the chains).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llc as bench  # noqa: E402  (the MLP and devinterp's row reader)

from pyro_sgmcmc.functional import DEFAULT_CHUNK_NUMEL, NoisePlanCache  # noqa: E402
from pyro_sgmcmc.slt._engine import LocalEngine  # noqa: E402
from pyro_sgmcmc.slt._scales import ChainStep  # noqa: E402
from pyro_sgmcmc.slt.llc import _module_objective  # noqa: E402

STEP = 1.58e-6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y, loss, nbeta, localization = bench.mlp_setup(argparse.Namespace(quick=True, device=args.device))
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    defaults = NoisePlanCache.__init__.__defaults__

    def ours(chains: int, baoab: bool, small_chunks: bool = False, check: bool = True, virials: bool = False) -> None:
        if small_chunks:  # the sampler's plan cache, made below, takes its chunk size from these defaults
            NoisePlanCache.__init__.__defaults__ = (DEFAULT_CHUNK_NUMEL,) + defaults[1:]
        try:
            objective = _module_objective(model, DataLoader(TensorDataset(x, y), batch_size=256), None, None, loss,
                                          None, "mean", None, None, None, num_chains=chains)
            engine = LocalEngine(objective, nbeta, localization, None, 0.0)
            engine.use(baoab)
            engine.set_step(ChainStep(STEP, 2000.0) if baoab else ChainStep(STEP))
        finally:
            NoisePlanCache.__init__.__defaults__ = defaults
        if not check:
            engine._diverged = lambda values: False
        engine.run(20, virials=virials)
        sync()
        start = time.perf_counter()
        engine.run(args.steps, virials=virials)
        sync()
        ms = (time.perf_counter() - start) / args.steps * 1e3
        setting = ", ".join(name for name, on in [("BAOAB" if baoab else "SGLD", True), ("virial", virials),
                                                   ("1M noise chunks", small_chunks),
                                                   ("no divergence check", not check)] if on)
        print(f"ours, {chains} chain(s), {setting}: {ms:.3f} ms a step, {ms / chains:.3f} a chain-step", flush=True)

    for chains in (1, 8):
        for baoab in (False, True):
            ours(chains, baoab)
    ours(8, False, virials=True)
    ours(8, False, small_chunks=True)
    ours(8, True, small_chunks=True)
    ours(8, False, check=False)

    from devinterp.optim import SGMCMC
    from devinterp.slt.sampler import sample_single_chain

    rows, evaluate = bench.devinterp_data(x, y, loss)

    times = []
    for draws in (20, 20 + args.steps):
        sync()
        start = time.perf_counter()
        sample_single_chain(model, rows, evaluate, {name: None for name, _ in model.named_parameters()},
                            num_draws=draws, sampling_method=SGMCMC.sgld,
                            sampling_method_kwargs=dict(lr=STEP, nbeta=nbeta, localization=localization), seed=1,
                            batch_size=256, device=args.device, micro_callback=lambda loss, **_: float(loss.mean()))
        sync()
        times.append(time.perf_counter() - start)
    print(f"devinterp, 1 chain: {(times[1] - times[0]) / args.steps * 1e3:.3f} ms a step", flush=True)


if __name__ == "__main__":
    main()
