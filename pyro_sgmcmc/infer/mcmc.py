""":class:`MCMC`: Pyro's MCMC driver, keeping the draws made before an interruption."""

from __future__ import annotations

import math
import warnings
from typing import Any

import pyro.infer
import torch
from pyro.infer.mcmc.util import diagnostics as pyro_diagnostics

from .kernel import MixingWarning, SGMCMCKernel

__all__ = ["MCMC"]


class MCMC(pyro.infer.MCMC):
    """:class:`pyro.infer.MCMC` (same arguments, same results) that loses nothing on an error.

    Pyro's driver gathers the draws of a run in local variables and builds ``get_samples()`` only
    when every chain has finished, so a Ctrl-C or an exception discards everything drawn so far.
    This subclass records each draw as it arrives; if the run is interrupted (``KeyboardInterrupt``
    or any exception), ``get_samples()``, ``summary()`` and ``diagnostics()`` hold the draws made
    before it (with several chains, as many per chain as the shortest has; :attr:`interrupted`
    says what stopped the run and :attr:`num_samples_drawn` how far it got), and the exception is
    raised again. Warmup draws are not samples and are not kept.

    After a run of several chains of our kernels it also compares the chains: a split R-hat above
    1.1 for any site warns (:class:`~pyro_sgmcmc.infer.MixingWarning`), as the kernel itself does
    for one chain's effective sample size and drift.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        if self.num_chains > 1 and getattr(self.kernel, "distributed", None) == "replicated":
            raise ValueError(f"Invalid num_chains: {self.num_chains} with a kernel of distributed='replicated' (one "
                             "chain spans the ranks; parallel chains would run in child processes sharing their "
                             "parent's process group): use num_chains=1, or a run per chain")
        self.interrupted: BaseException | None = None
        self.num_samples_drawn = 0

    def run(self, *args: Any, **kwargs: Any) -> None:
        """Run the chains (as :meth:`pyro.infer.MCMC.run`)."""
        self.interrupted = None
        record = _Recorder(self.num_chains, self.num_samples)
        sampler = self.sampler
        original = sampler.run

        def recording(*run_args: Any, **run_kwargs: Any):
            for draw, chain_id in original(*run_args, **run_kwargs):
                record.add(draw, chain_id)
                yield draw, chain_id

        sampler.run = recording
        try:
            super().run(*args, **kwargs)
        except BaseException as error:
            self.interrupted = error
            self._keep(record, args, kwargs)
            raise
        finally:
            del sampler.run  # back to the class's method
        self.num_samples_drawn = self.num_samples
        self._compare_chains()

    def _keep(self, record: "_Recorder", args: tuple, kwargs: dict) -> None:
        """``get_samples()`` from the draws recorded before the interruption."""
        if record.structure is None:
            return
        kept = min(len(draws) for draws in record.draws)
        self.num_samples_drawn = kept
        flat = torch.stack([torch.stack(draws[:kept]) if kept else torch.empty(0, record.width)
                            for draws in record.draws])
        samples, position = {}, 0
        for name in sorted(record.structure):
            shape = record.structure[name]
            size = math.prod(shape)
            samples[name] = flat[:, :, position: position + size].reshape((self.num_chains, kept) + tuple(shape))
            position += size
        if self.transforms is None:
            try:
                self._set_transforms(*args, **kwargs)
            except Exception:  # the model itself may be what failed: keep unconstrained values then
                self.transforms = {}
        for name, value in samples.items():
            if name in self.transforms:
                samples[name] = self.transforms[name].inv(value)
        self._samples = samples
        kernel_diagnostics = self.kernel.diagnostics() if isinstance(self.kernel, SGMCMCKernel) else {}
        self._diagnostics = [d if d is not None else kernel_diagnostics for d in record.diagnostics]

    def _compare_chains(self) -> None:
        if self.num_chains < 2 or not isinstance(self.kernel, SGMCMCKernel) or self.num_samples < 50:
            return
        worst = {}
        for name, stats in pyro_diagnostics(self._samples).items():
            if isinstance(stats, dict) and "r_hat" in stats:
                rhat = torch.as_tensor(stats["r_hat"]).nan_to_num(1.0)
                worst[name] = float(rhat.max())
        drifting = {name: r for name, r in worst.items() if r > 1.1}
        if drifting:
            listed = ", ".join(f"{name!r} ({r:.2f})" for name, r in sorted(drifting.items()))
            warnings.warn(f"the {self.num_chains} chains disagree: split R-hat above 1.1 for {listed}; remedies: "
                          "more warmup_steps and num_samples, a larger num_steps, or control_variates=True on "
                          "minibatches", MixingWarning, stacklevel=3)


class _Recorder:
    """The draws of a run as Pyro's driver receives them: per chain, a structure, the samples,
    then the kernel's diagnostics."""

    def __init__(self, num_chains: int, num_samples: int):
        self.num_samples = num_samples
        self.structure: dict[str, torch.Size] | None = None
        self.width = 0
        self.counts = [0] * num_chains
        self.draws: list[list[torch.Tensor]] = [[] for _ in range(num_chains)]
        self.diagnostics: list[dict | None] = [None] * num_chains

    def add(self, draw: Any, chain_id: int) -> None:
        count = self.counts[chain_id]
        self.counts[chain_id] += 1
        if count == 0:
            self.structure = draw
            self.width = sum(math.prod(shape) for shape in draw.values())
        elif count <= self.num_samples:
            # one chain: the driver keeps this very tensor too (no copy); several: it clones what
            # arrives through the inter-process queue, and so does this
            self.draws[chain_id].append(draw.clone() if len(self.draws) > 1 else draw)
        else:
            self.diagnostics[chain_id] = draw
