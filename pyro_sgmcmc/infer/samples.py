"""Collecting the states an SVI-driven sampler visits as posterior samples."""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
from torch import Tensor

__all__ = ["SampleCollector", "run_svi"]


class SampleCollector:
    """Keeps the chain's states, after burn-in and thinning, as posterior samples.

    Call it once per sampler step (``collector(guide.current_sample())``, or let :func:`run_svi`
    do it). In ``keep="all"`` mode, :attr:`samples` is ``{site: tensor[num_samples, ...]}`` in
    constrained space, the form ``pyro.infer.Predictive(model, posterior_samples=...)`` takes; in
    ``keep="moments"`` mode only running means and variances are kept (Welford's algorithm, in
    float64), for models too big to store. Samples are stored as they come, so everything
    collected before an exception or a Ctrl-C stays available.

    :param burn_in: steps to discard first.
    :param thin: keep every ``thin``-th step after burn-in.
    :param keep: ``"all"`` or ``"moments"``.
    :param sites: names of the sites to keep (default: all).
    :param keep_if: a predicate of the (0-based) index of the step just taken; steps for which
        it is false are not kept (e.g. ``CyclicalSchedule.in_sampling_phase``: samples from the
        sampling phase of each cycle only). Thinning counts the steps it lets through.
    """

    def __init__(self, burn_in: int = 0, thin: int = 1, keep: str = "all", sites: list[str] | None = None,
                 keep_if: Callable[[int], bool] | None = None):
        if not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"Invalid burn_in: {burn_in!r} (must be an integer >= 0)")
        if not isinstance(thin, int) or thin < 1:
            raise ValueError(f"Invalid thin: {thin!r} (must be an integer >= 1)")
        if keep not in ("all", "moments"):
            raise ValueError(f"Invalid keep: {keep!r} (must be 'all' or 'moments')")
        if keep_if is not None and not callable(keep_if):
            raise ValueError(f"Invalid keep_if: {keep_if!r} (must be a callable of the step index, or None)")
        self.burn_in, self.thin, self.keep, self.sites, self.keep_if = burn_in, thin, keep, sites, keep_if
        self.steps = 0
        self._eligible = 0
        self.num_samples = 0
        self._draws: dict[str, list[Tensor]] = {}
        self._mean: dict[str, Tensor] = {}
        self._m2: dict[str, Tensor] = {}

    def __call__(self, values: dict[str, Tensor]) -> bool:
        """Count one step and keep ``values`` if it is due; return whether it was kept."""
        self.steps += 1
        if self.steps <= self.burn_in or (self.keep_if is not None and not self.keep_if(self.steps - 1)):
            return False
        self._eligible += 1
        if (self._eligible - 1) % self.thin:
            return False
        self.num_samples += 1
        for name, value in values.items():
            if self.sites is not None and name not in self.sites:
                continue
            value = value.detach()
            if self.keep == "all":
                self._draws.setdefault(name, []).append(value.clone())
                continue
            x = value.to(torch.float64)
            if name not in self._mean:
                self._mean[name], self._m2[name] = x.clone(), torch.zeros_like(x)
            else:
                delta = x - self._mean[name]
                self._mean[name] += delta / self.num_samples
                self._m2[name] += delta * (x - self._mean[name])
        return True

    @property
    def samples(self) -> dict[str, Tensor]:
        """``{site: tensor[num_samples, ...]}`` (``keep="all"`` only)."""
        if self.keep != "all":
            raise RuntimeError("samples are not kept with keep='moments'; use .mean and .variance")
        return {name: torch.stack(draws) for name, draws in self._draws.items()}

    @property
    def mean(self) -> dict[str, Tensor]:
        """Posterior mean of each site."""
        if self.keep == "all":
            return {name: s.to(torch.float64).mean(0) for name, s in self.samples.items()}
        return {name: m.clone() for name, m in self._mean.items()}

    @property
    def variance(self) -> dict[str, Tensor]:
        """Posterior variance of each site (unbiased)."""
        if self.keep == "all":
            return {name: s.to(torch.float64).var(0) for name, s in self.samples.items()}
        n = max(self.num_samples - 1, 1)
        return {name: m2 / n for name, m2 in self._m2.items()}

    def to_arviz(self, **kwargs: Any):
        """The samples as an ``arviz.InferenceData`` (one chain), for ArviZ's summaries and plots."""
        import arviz

        posterior = {name: s.unsqueeze(0).cpu().numpy() for name, s in self.samples.items()}
        return arviz.from_dict(posterior=posterior, **kwargs)


def run_svi(
    svi: Any,
    num_steps: int,
    collector: SampleCollector,
    *args: Any,
    state: Callable[..., dict[str, Tensor]] | None = None,
    progress_bar: bool = True,
    freeze_after_burn_in: bool = True,
    **kwargs: Any,
) -> SampleCollector:
    """Run ``svi.step(*args, **kwargs)`` ``num_steps`` times, handing each state to ``collector``.

    :param state: returns the current constrained values (default: ``svi.guide.current_sample``).
    :param progress_bar: show a tqdm progress bar with the loss.
    :param freeze_after_burn_in: at the end of the collector's burn-in, stop the sampler's own
        adaptation (``svi.optim.freeze_adaptation()``, e.g. PSGLD's preconditioner), so that the
        samples come from a fixed-parameter chain (see :class:`~pyro_sgmcmc.samplers.PSGLD`).
    :return: ``collector``. A Ctrl-C stops the run early with a warning, keeping what was
        collected; any other exception propagates, and the collector still holds the samples.
    """
    state = state or svi.guide.current_sample
    steps = range(num_steps)
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        steps = bar = tqdm(steps, desc="sampling")
    try:
        for _ in steps:
            loss = svi.step(*args, **kwargs)
            collector(state(*args, **kwargs))
            if freeze_after_burn_in and collector.steps == collector.burn_in and hasattr(svi.optim, "freeze_adaptation"):
                svi.optim.freeze_adaptation()
            if bar is not None:
                bar.set_postfix(loss=f"{loss:.4g}", refresh=False)
    except KeyboardInterrupt:
        warnings.warn(f"interrupted after {collector.steps} steps; keeping the {collector.num_samples} samples collected")
    finally:
        if bar is not None:
            bar.close()
    return collector
