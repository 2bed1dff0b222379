"""Collecting the states an SVI-driven sampler visits as posterior samples, and the pointwise
full-data log-likelihood of posterior samples (for ArviZ's LOO and WAIC)."""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from pyro import poutine
from pyro.ops.streaming import CountMeanVarianceStats, StatsOfDict
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .._validation import check_callable, check_choice, check_integer
from .subsample import SubsampledPlate, SubsampleControl, subsampled_plates

__all__ = ["SampleCollector", "log_likelihood", "run_svi"]

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
    if isinstance(sites, (Mapping, torch.Tensor)) or not isinstance(sites, Iterable):
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

    :func:`run_svi` also records the model and its arguments, so that :meth:`to_arviz` adds the
    pointwise full-data log-likelihood for ``arviz.loo`` / ``arviz.waic`` without more arguments.
    """

    def __init__(self, burn_in: int = 0, thin: int = 1, keep: str = "all", sites: str | Iterable[str] | None = None,
                 keep_if: Callable[[int], bool] | None = None):
        burn_in = check_integer("burn_in", burn_in)
        thin = check_integer("thin", thin, low=1)
        keep = check_choice("keep", keep, ("all", "moments"))
        keep_if = check_callable("keep_if", keep_if, what="a callable of the step index", none_ok=True)
        self.burn_in, self.thin, self.keep, self.keep_if = burn_in, thin, keep, keep_if
        self.sites = _site_names(sites)
        self.steps = 0
        self._eligible = 0
        self.num_samples = 0
        self._draws: dict[str, list[Tensor]] = {}
        self._stats = StatsOfDict(default=CountMeanVarianceStats)
        self._sites_checked = False
        #: ``(model, args, kwargs)`` of the run that filled the collector (set by :func:`run_svi`).
        self.model_call: tuple[Callable, tuple, dict] | None = None

    def _check_sites(self, values: Mapping[str, Tensor]) -> None:
        if self.sites is not None:
            for name in self.sites:
                check_choice("sites", name, list(values))
        self._sites_checked = True

    def _keeps(self, step: int) -> bool:
        """``keep_if(step)``, which must answer True or False."""
        answer = self.keep_if(step)
        if isinstance(answer, torch.Tensor) and answer.dtype == torch.bool and answer.numel() == 1:
            answer = bool(answer)
        return check_choice("keep_if's answer", answer, (True, False))

    def __call__(self, values: dict[str, Tensor]) -> bool:
        """Count one step and keep ``values`` if it is due; return whether it was kept."""
        if not self._sites_checked:
            self._check_sites(values)
        self.steps += 1
        if self.steps <= self.burn_in or (self.keep_if is not None and not self._keeps(self.steps - 1)):
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

    def to_arviz(self, model: Callable | None = None, model_args: tuple = (), model_kwargs: dict | None = None, *,
                 log_likelihood: bool = True, **kwargs: Any) -> Any:
        """The samples as an ``arviz.InferenceData`` (one chain), for ArviZ's summaries and plots,
        with the pointwise full-data log-likelihood (:func:`log_likelihood`, the
        ``log_likelihood`` group that ``arviz.loo`` and ``arviz.waic`` read) when a model is known.

        :param model, model_args, model_kwargs: the model and its arguments (default: those of the
            :func:`run_svi` run that filled the collector, if any).
        :param log_likelihood: add the log-likelihood group (needs every latent site kept).
        :param kwargs: further arguments of ``arviz.from_dict`` (``coords``, ``dims``, ...).
        :raises ImportError: without ArviZ (``pip install 'pyro_sgmcmc[arviz]'``).
        """
        arviz = _import_arviz("SampleCollector.to_arviz")
        samples = self.samples
        posterior = {name: s.unsqueeze(0).cpu().numpy() for name, s in samples.items()}
        if model is None and self.model_call is not None:
            model, model_args, model_kwargs = self.model_call
        if log_likelihood and model is not None and "log_likelihood" not in kwargs:
            pointwise = _log_likelihood(model, samples, *model_args, **(model_kwargs or {}))
            kwargs["log_likelihood"] = {name: v.unsqueeze(0).cpu().numpy() for name, v in pointwise.items()}
        return arviz.from_dict(posterior=posterior, **kwargs)


def _observed_sites(trace: Any, samples: Mapping[str, Tensor]) -> list[str]:
    """The observed sites of a trace of the model conditioned on ``samples``; refuses latent
    sites that ``samples`` lacks (they would be drawn from the prior)."""
    observed, missing = [], []
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        if name in samples:
            continue
        if not site["is_observed"]:
            missing.append(name)
        elif not site["infer"].get("_deterministic", False):
            observed.append(name)
    if missing:
        raise ValueError(f"Invalid samples: no draws of the latent sites {missing} (every latent site is needed to "
                         "evaluate the likelihood; e.g. keep all sites in SampleCollector)")
    if not observed:
        raise ValueError("Invalid model: it has no observed sites, so no log-likelihood")
    return observed


def _pointwise(site: dict) -> Tensor:
    """A site's log density per entry of its batch shape, without the plates' ``N/m`` scale."""
    log_p = site["fn"].log_prob(site["value"])
    mask = site["mask"]
    if mask is not None and mask is not True:
        log_p = torch.where(torch.as_tensor(mask, device=log_p.device), log_p, torch.zeros_like(log_p))
    return log_p


def _walk(model: Callable, plate: SubsampledPlate | None, args: tuple, kwargs: dict) -> Iterator[tuple[int, int, Any]]:
    """Traces of ``model`` that walk ``plate`` through the whole data set in consecutive
    minibatch-sized pieces, the last one padded with rows from the start: ``(first row, number of
    rows of the piece, trace)``; without a plate, one trace."""
    if plate is None:
        yield 0, 0, poutine.trace(model).get_trace(*args, **kwargs)
        return
    m = plate.subsample_size
    for start in range(0, plate.size, m):
        rows = (torch.arange(m, device=plate.device) + start) % plate.size
        control = SubsampleControl(indices={plate.name: rows})
        yield start, min(m, plate.size - start), poutine.trace(control(model)).get_trace(*args, **kwargs)


def log_likelihood(model: Callable, samples: Mapping[str, Tensor], *args: Any, **kwargs: Any) -> dict[str, Tensor]:
    r"""The pointwise log-likelihood of posterior ``samples`` on the *full* data:
    ``{observed site: tensor[num_samples, *batch_shape]}``, the batch shape of each observed site's
    log density with a subsampled plate's dimension at its full size ``N``, not the minibatch size.

    Each draw conditions ``model(*args, **kwargs)``; a subsampled plate
    (``pyro.plate(name, N, subsample_size=m)``) is walked through the whole data set in
    consecutive minibatch-sized pieces (the plate only takes minibatches of its own size), and the
    log densities are unscaled (each row counted once, not ``N/m`` times). Sites outside the plate
    are evaluated once per draw. This is what ArviZ's LOO and WAIC need; ``arviz.from_pyro`` would
    replay the model as it was run, on one minibatch. Cost: ``num_samples * N / m`` model
    evaluations.

    The SVI path: :meth:`SampleCollector.to_arviz` calls this. An MCMC run
    (``MCMC(pyro_sgmcmc.infer.SGLD(model))``, or any Pyro kernel)::

        pointwise = log_likelihood(model, mcmc.get_samples(), *model_args)
        by_chain = {k: v.reshape(mcmc.num_chains, -1, *v.shape[1:]).numpy() for k, v in pointwise.items()}
        idata = arviz.from_pyro(mcmc, log_likelihood=False)
        idata.add_groups(log_likelihood=by_chain)
        arviz.loo(idata), arviz.waic(idata)

    (or ``arviz.from_dict(posterior=..., log_likelihood=by_chain)``).

    :param model: the Pyro model; at most one subsampled plate.
    :param samples: ``{site: tensor[num_samples, ...]}`` in constrained space, every latent site
        (``mcmc.get_samples()``, ``SampleCollector.samples``).
    :param args, kwargs: the model's arguments.
    """
    samples = {name: torch.as_tensor(value) for name, value in samples.items()}
    if not samples:
        raise ValueError("Invalid samples: empty (must map every latent site to its draws)")
    counts = {value.shape[0] if value.dim() else None for value in samples.values()}
    if len(counts) != 1 or None in counts:
        raise ValueError("Invalid samples: every site needs the same leading dimension, the number of draws "
                         f"(got shapes { {name: tuple(v.shape) for name, v in samples.items()} })")
    (num_samples,) = counts

    def draw(s: int) -> dict[str, Tensor]:
        return {name: value[s] for name, value in samples.items()}

    with torch.no_grad():
        probe = poutine.trace(poutine.condition(model, draw(0))).get_trace(*args, **kwargs)
        observed = _observed_sites(probe, samples)
        plates = subsampled_plates(probe)
        if len(plates) > 1:
            raise NotImplementedError(f"log_likelihood with more than one subsampled plate "
                                      f"({[p.name for p in plates]}) is not supported")
        plate = plates[0] if plates else None
        axis: dict[str, int | None] = {}  # the plate's axis in each site's log density
        out: dict[str, Tensor] = {}
        for name in observed:
            site = probe.nodes[name]
            log_p = _pointwise(site)
            shape = list(log_p.shape)
            axis[name] = None
            for frame in site["cond_indep_stack"]:
                if plate is not None and frame.name == plate.name:
                    if len(shape) < -frame.dim:
                        raise ValueError(f"The log density of '{name}' has shape {tuple(shape)}, without the "
                                         f"dimension {frame.dim} of its plate '{plate.name}'")
                    axis[name] = len(shape) + frame.dim
                    shape[axis[name]] = plate.size
            out[name] = torch.empty([num_samples, *shape], dtype=log_p.dtype, device=log_p.device)
        for s in range(num_samples):
            for start, count, trace in _walk(poutine.condition(model, draw(s)), plate, args, kwargs):
                for name in observed:
                    if axis[name] is None:
                        if start == 0:
                            out[name][s] = _pointwise(trace.nodes[name])
                        continue
                    log_p = _pointwise(trace.nodes[name]).narrow(axis[name], 0, count)
                    out[name][s].narrow(axis[name], start, count).copy_(log_p)
    return out


_log_likelihood = log_likelihood  # for SampleCollector.to_arviz, whose flag has the same name


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
    :return: ``collector``, which also records ``svi.model`` and the arguments (its
        ``model_call``, for :meth:`SampleCollector.to_arviz`'s log-likelihood). A Ctrl-C stops the
        run early with a warning, keeping what was collected; any other exception propagates, and
        the collector still holds the samples.
    """
    state = state or svi.guide.current_sample
    collector.model_call = (svi.model, args, kwargs)
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
