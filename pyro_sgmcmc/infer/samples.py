"""Collecting the states an SVI-driven sampler visits as posterior samples."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Mapping

import torch
from pyro.ops.streaming import CountMeanVarianceStats, StatsOfDict
from torch import Tensor

from .._validation import check_choice

__all__ = ["SampleCollector", "run_svi"]

_ARVIZ_MISSING = (
    "{what} needs ArviZ, an optional dependency of pyro_sgmcmc: pip install 'pyro_sgmcmc[arviz]' "
    "(or pip install arviz)"
)


def _import_arviz(what: str) -> Any:
    """``arviz``, or an ``ImportError`` that names the extra to install."""
    try:
        import arviz
    except ImportError as error:
        raise ImportError(_ARVIZ_MISSING.format(what=what)) from error
    return arviz


def _site_names(sites: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """``sites`` as a tuple of names (one name, or several), or ``None`` for all."""
    if sites is None:
        return None
    accepted = "a site name, a list of site names, or None"
    if isinstance(sites, str):
        return (sites,)
    if isinstance(sites, Mapping) or not isinstance(sites, Iterable):
        raise ValueError(f"Invalid sites: {sites!r} (must be {accepted})")
    names = tuple(sites)
    if not names or not all(isinstance(name, str) for name in names):
        raise ValueError(f"Invalid sites: {sites!r} (must be {accepted}; a list must hold at least one name, "
                         "and only strings)")
    return names


class SampleCollector:
    """Keeps the chain's states, after burn-in and thinning, as posterior samples.

    Call it once per sampler step (``collector(guide.current_sample())``, or let :func:`run_svi`
    do it). In ``keep="all"`` mode, :attr:`samples` is ``{site: tensor[num_samples, ...]}`` in
    constrained space, the form ``pyro.infer.Predictive(model, posterior_samples=...)`` takes; in
    ``keep="moments"`` mode only running means and variances are kept (in float64, by Pyro's
    streaming Welford estimator, :class:`pyro.ops.streaming.CountMeanVarianceStats`), for models
    too big to store. Samples are stored as they come, so everything collected before an
    exception or a Ctrl-C stays available.

    :param burn_in: steps to discard first.
    :param thin: keep every ``thin``-th step after burn-in.
    :param keep: ``"all"`` or ``"moments"``.
    :param sites: the name of the one site to keep, or a list of names (default: all). The names
        are checked against the sites of the first state handed over (the guide's latent sites),
        before any burn-in: an unknown one is refused, with the closest valid name.
    :param keep_if: a predicate of the (0-based) index of the step just taken; steps for which
        it is false are not kept (e.g. ``CyclicalSchedule.in_sampling_phase``: samples from the
        sampling phase of each cycle only). Thinning counts the steps it lets through.
    """

    def __init__(self, burn_in: int = 0, thin: int = 1, keep: str = "all", sites: str | Iterable[str] | None = None,
                 keep_if: Callable[[int], bool] | None = None):
        if not isinstance(burn_in, int) or burn_in < 0:
            raise ValueError(f"Invalid burn_in: {burn_in!r} (must be an integer >= 0)")
        if not isinstance(thin, int) or thin < 1:
            raise ValueError(f"Invalid thin: {thin!r} (must be an integer >= 1)")
        if keep not in ("all", "moments"):
            raise ValueError(f"Invalid keep: {keep!r} (must be 'all' or 'moments')")
        if keep_if is not None and not callable(keep_if):
            raise ValueError(f"Invalid keep_if: {keep_if!r} (must be a callable of the step index, or None)")
        self.burn_in, self.thin, self.keep, self.keep_if = burn_in, thin, keep, keep_if
        self.sites = _site_names(sites)
        self.steps = 0
        self._eligible = 0
        self.num_samples = 0
        self._draws: dict[str, list[Tensor]] = {}
        self._stats = StatsOfDict(default=CountMeanVarianceStats)
        self._sites_checked = False

    def _check_sites(self, values: Mapping[str, Tensor]) -> None:
        if self.sites is not None:
            for name in self.sites:
                check_choice("sites", name, list(values))
        self._sites_checked = True

    def __call__(self, values: dict[str, Tensor]) -> bool:
        """Count one step and keep ``values`` if it is due; return whether it was kept."""
        if not self._sites_checked:
            self._check_sites(values)
        self.steps += 1
        if self.steps <= self.burn_in or (self.keep_if is not None and not self.keep_if(self.steps - 1)):
            return False
        self._eligible += 1
        if (self._eligible - 1) % self.thin:
            return False
        self.num_samples += 1
        kept = {name: value.detach() for name, value in values.items() if self.sites is None or name in self.sites}
        if self.keep == "all":
            for name, value in kept.items():
                self._draws.setdefault(name, []).append(value.clone())
        else:
            self._stats.update({name: value.to(torch.float64) for name, value in kept.items()})
        return True

    @property
    def samples(self) -> dict[str, Tensor]:
        """``{site: tensor[num_samples, ...]}`` (``keep="all"`` only)."""
        if self.keep != "all":
            raise RuntimeError("samples are not kept with keep='moments'; use .mean and .variance")
        return {name: torch.stack(draws) for name, draws in self._draws.items()}

    def _moments(self) -> dict[str, tuple[Tensor, Tensor]]:
        """``{site: (mean, unbiased variance)}`` of the streaming estimator (variance NaN below
        two samples, as ``torch.var`` gives in ``keep="all"`` mode)."""
        out = {}
        for name, stats in self._stats.stats.items():
            if stats.welford.n_samples >= 2:
                got = stats.get()
                out[name] = got["mean"].clone(), got["variance"].clone()
            else:  # Pyro's get() refuses the variance of one sample, and with it the mean
                mean = torch.as_tensor(stats.welford._mean, dtype=torch.float64).reshape(stats.shape).clone()
                out[name] = mean, torch.full_like(mean, math.nan)
        return out

    @property
    def mean(self) -> dict[str, Tensor]:
        """Posterior mean of each site."""
        if self.keep == "all":
            return {name: s.to(torch.float64).mean(0) for name, s in self.samples.items()}
        return {name: mean for name, (mean, _) in self._moments().items()}

    @property
    def variance(self) -> dict[str, Tensor]:
        """Posterior variance of each site (unbiased)."""
        if self.keep == "all":
            return {name: s.to(torch.float64).var(0) for name, s in self.samples.items()}
        return {name: variance for name, (_, variance) in self._moments().items()}

    def to_arviz(self, **kwargs: Any) -> Any:
        """The samples as an ``arviz.InferenceData`` (one chain), for ArviZ's summaries and plots.

        :param kwargs: arguments of ``arviz.from_dict`` (``coords``, ``dims``, ...).
        :raises ImportError: without ArviZ (``pip install 'pyro_sgmcmc[arviz]'``).
        """
        arviz = _import_arviz("SampleCollector.to_arviz")
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
