"""WBIC of a Pyro model: :func:`wbic` (its docstring states the estimator), the handler that
tempers a model's likelihood, and the result."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import pyro
import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor

from .._validation import check_callable, check_choice, check_flag, check_integer, check_mapping, check_number
from ..infer.subsample import SubsampleControl
from ._pyro import ModelLikelihood
from ._stats import chain_mean, drift_warning, error_source, halves_drift, spread_warning
from .llc import R_HAT_LIMIT, LLCWarning

__all__ = ["TemperedLikelihood", "WBICResult", "tempered_likelihood", "wbic"]


class TemperedLikelihood(Messenger):
    """Multiplies the log density of every observed site (not the latent ones, so not the prior)
    by ``beta``, on top of any scale a plate sets."""

    def __init__(self, beta: float):
        super().__init__()
        self.beta = check_number("beta", beta)

    def _process_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["is_observed"] and not site_is_subsample(msg):
            msg["scale"] = msg["scale"] * self.beta


def tempered_likelihood(model: Callable, beta: float) -> Callable:
    """``model`` with its likelihood tempered by ``beta`` (:class:`TemperedLikelihood`); the
    result is a model (picklable for parallel chains only if ``model`` is)."""
    check_callable("model", model)
    return TemperedLikelihood(beta)(model)


@dataclass(frozen=True)
class WBICResult:
    """A WBIC estimate.

    :param wbic: :math:`\\mathrm{WBIC}`, the mean over every draw of every chain.
    :param std_error: its Monte Carlo standard error (from the autocorrelation, or the chains'
        spread where larger: :class:`~pyro_sgmcmc.slt._stats.ChainMean`).
    :param llc: :math:`\\hat\\lambda = \\beta(\\mathrm{WBIC} - nL_n(w_0))`, from the same draws.
    :param llc_std_error: its standard error (:math:`\\beta` times ``std_error``).
    :param beta: the inverse temperature :math:`1/\\log n`.
    :param n: the data set's size.
    :param reference_nll: :math:`nL_n(w_0)`, exact.
    :param nll_draws: the negative log likelihood estimate of each draw (``[chains, draws]``).
    :param per_chain: WBIC of each chain.
    :param ess: effective sample size.
    :param r_hat: split :math:`\\hat R` of ``nll_draws``.
    :param autocorrelation_std_error: the standard error of ``wbic`` from ``ess``.
    :param spread_std_error: the standard error of ``wbic`` from the spread of the chains' values
        (``nan`` for one chain); ``std_error`` is the larger.
    :param spread_p: the probability of a spread that large were the autocorrelation's error right
        (below 0.01: warned about; see :class:`~pyro_sgmcmc.slt._stats.ChainMean`).
    :param drift: how far the negative log likelihood moved from the first half of the draws to
        the second, each chain against itself (:func:`~pyro_sgmcmc.slt._stats.paired_drift`):
        near 0 at equilibrium; beyond 4 standard errors, warned about.
    :param drift_std_error: its standard error.
    :param bias_bound: a bound on the discretisation bias of ``wbic`` where the kernel states
        its ``target_bias`` (a relative bias of posterior variances, which move
        :math:`\\mathrm{WBIC} - nL_n(w_0)`), else ``None``.
    :param kernel_diagnostics: each chain's kernel ``diagnostics()``.
    :param warnings: what was warned about: by :func:`wbic` (:class:`LLCWarning`), and each
        chain's mixing problems that its kernel found (warned as
        :class:`~pyro_sgmcmc.infer.MixingWarning`).
    """

    wbic: float
    std_error: float
    llc: float
    llc_std_error: float
    beta: float
    n: int
    reference_nll: float
    nll_draws: Tensor
    per_chain: Tensor
    ess: float
    r_hat: float
    autocorrelation_std_error: float
    spread_std_error: float
    spread_p: float
    drift: float
    drift_std_error: float
    bias_bound: float | None
    kernel_diagnostics: tuple[dict[str, Any], ...]
    warnings: tuple[str, ...]

    def __str__(self) -> str:
        source = error_source(self.autocorrelation_std_error, self.spread_std_error)
        return (f"WBIC {self.wbic:.6g} ± {self.std_error:.2g} (Monte Carlo standard error, from {source}; "
                f"{self.per_chain.numel()} "
                f"chains, ESS {self.ess:.0f}, R-hat {self.r_hat:.3f}); LLC {self.llc:.4g} ± {self.llc_std_error:.2g}; "
                f"n = {self.n}, beta = 1/log n = {self.beta:.4g}")


def wbic(
    model: Callable,
    data: tuple = (),
    *,
    model_kwargs: dict[str, Any] | None = None,
    num_samples: int = 1000,
    warmup_steps: int = 500,
    num_chains: int = 4,
    kernel: Callable[..., Any] | None = None,
    kernel_options: dict[str, Any] | None = None,
    w_star: dict[str, Tensor] | None = None,
    n: int | None = None,
    mp_context: str | None = None,
    progress_bar: bool = True,
) -> WBICResult:
    r"""The WBIC (widely applicable Bayesian information criterion, Watanabe 2013) of a Pyro model,
    with its Monte Carlo standard error and the LLC from the same chain.

    .. math:: \mathrm{WBIC} = E^{\beta}_w\Big[-\sum_{i=1}^n \log p(y_i \mid x_i, w)\Big], \qquad \beta = \frac{1}{\log n},

    the expectation under the posterior whose likelihood (not its prior) is tempered by :math:`\beta`,
    :math:`p_\beta(w \mid D) \propto \varphi(w)\prod_i p(y_i \mid x_i, w)^\beta`, with :math:`n` the
    size of the whole data set (the plate's size, never its ``subsample_size``). It estimates the
    Bayes free energy :math:`-\log p(D)` to :math:`O_p(\sqrt{\log n})`, singular models included:
    lower is better, and two models are compared by their WBIC as by their log evidence. From the
    same chain, :math:`\hat\lambda = \beta\,(\mathrm{WBIC} - n L_n(w_0))` estimates the learning
    coefficient, with :math:`w_0` the MAP (or ``w_star``).

    The tempered posterior (the model under :func:`tempered_likelihood`) is sampled by an SG-MCMC
    kernel of :mod:`pyro_sgmcmc.infer` through :class:`pyro.infer.MCMC` (minibatches, step size and
    preconditioner adapted in warmup, warmup draws left out). The negative log likelihood of each
    draw is then estimated on a minibatch, by its difference from :math:`w_0` on the same minibatch
    plus the exact full-data value at :math:`w_0` (unbiased, and nearly free of minibatch noise);
    without subsampling it is exact.

    Example::

        result = wbic(model, (x, y))
        print(result)          # WBIC 1423.7 ± 0.4 (...); LLC 2.06 ± 0.07; n = 1000, beta = 1/log n = 0.1448

    Reference: S. Watanabe, *A widely applicable Bayesian information criterion*, JMLR 14, 2013.

    :param model: the Pyro model; its observed sites are the likelihood.
    :param data: the model's positional arguments.
    :param model_kwargs: its keyword arguments.
    :param num_samples: draws per chain after warmup, as for :class:`pyro.infer.MCMC`.
    :param warmup_steps: warmup steps per chain (adaptation; left out).
    :param num_chains: chains: one after another (each a ``pyro.infer.MCMC`` run), or, with
        ``mp_context``, side by side in worker processes. The standard error is the larger of the
        autocorrelation's and the chains' spread's (:class:`~pyro_sgmcmc.slt._stats.ChainMean`),
        which needs 2 chains and 4 or more to be firm: with 2 its single degree of freedom makes
        the error bar itself uncertain by about 70%.
    :param kernel: a kernel class of :mod:`pyro_sgmcmc.infer` (default ``pyro_sgmcmc.infer.SGLD``) or
        any callable ``model -> MCMCKernel``, given the tempered model.
    :param kernel_options: its keyword arguments (e.g. ``{"full_mass": True}``).
    :param w_star: the point :math:`w_0` of :math:`\hat\lambda` (constrained values; default: the MAP).
    :param n: the data set's size, if the plates do not tell it.
    :param mp_context: run the chains in parallel processes: one :class:`pyro.infer.MCMC` with
        ``num_chains`` chains and this multiprocessing context (``"spawn"``: Linux's default
        ``"fork"`` can deadlock a parent that already ran torch in OpenMP; the model, its data and
        the kernel must then be picklable, e.g. a model defined at module level). Pyro runs the
        chains one after another when the machine has fewer than ``num_chains + 1`` CPUs.
    :param progress_bar: show Pyro's progress bar.
    :returns: a :class:`WBICResult`; an :class:`LLCWarning` when the chains did not equilibrate
        (split :math:`\hat R`, or a drift from the first half of the draws to the second), or the
        draws fit better than :math:`w_0`.
    """
    num_samples = check_integer("num_samples", num_samples, low=4)
    warmup_steps = check_integer("warmup_steps", warmup_steps, low=0)
    num_chains = check_integer("num_chains", num_chains, low=1)
    check_mapping("model_kwargs", model_kwargs, none_ok=True)
    check_mapping("kernel_options", kernel_options, none_ok=True)
    check_callable("kernel", kernel, what="a kernel class of pyro_sgmcmc.infer or a callable model -> kernel",
                   none_ok=True)
    check_mapping("w_star", w_star, what="a dict {latent site: value}", none_ok=True)
    check_choice("mp_context", mp_context, ("spawn", "forkserver", "fork", None))
    check_flag("progress_bar", progress_bar)
    if not isinstance(data, tuple):
        raise ValueError(f"Invalid data: {type(data).__name__} (must be the tuple of the model's positional arguments)")
    model_kwargs = model_kwargs or {}
    likelihood = ModelLikelihood(model, data, model_kwargs, n)
    n = likelihood.n
    if n < 2:
        raise ValueError(f"Invalid n: {n} (WBIC's beta = 1/log n needs n >= 2)")
    beta = 1.0 / math.log(n)
    if kernel is None:
        from ..infer import SGLD as kernel
    reference = likelihood.find_map() if w_star is None else likelihood.on_site_devices(w_star)
    likelihood.unconstrained(reference)  # every latent site given
    with torch.no_grad():
        reference_nll = -float(likelihood.full_log_density(reference))
    tempered = tempered_likelihood(model, beta)
    chains: list[tuple[dict[str, Tensor], dict[str, Any]]] = []  # each chain's samples and kernel diagnostics
    if mp_context is not None and num_chains > 1:
        mcmc_kernel = kernel(tempered, **(kernel_options or {}))
        mcmc = pyro.infer.MCMC(mcmc_kernel, num_samples=num_samples, warmup_steps=warmup_steps, num_chains=num_chains,
                               mp_context=mp_context, disable_progbar=not progress_bar)
        mcmc.run(*data, **model_kwargs)
        grouped = mcmc.get_samples(group_by_chain=True)
        report = mcmc.diagnostics()  # the sites' n_eff and r_hat, and each kernel entry per chain
        for c in range(num_chains):
            own = {key: value[f"chain {c}"] for key, value in report.items()
                   if key not in grouped and isinstance(value, dict) and f"chain {c}" in value}
            chains.append(({name: value[c] for name, value in grouped.items()}, own))
    else:
        for _ in range(num_chains):
            mcmc_kernel = kernel(tempered, **(kernel_options or {}))
            mcmc = pyro.infer.MCMC(mcmc_kernel, num_samples=num_samples, warmup_steps=warmup_steps,
                                   disable_progbar=not progress_bar)
            mcmc.run(*data, **model_kwargs)
            chains.append((mcmc.get_samples(),
                           mcmc_kernel.diagnostics() if hasattr(mcmc_kernel, "diagnostics") else {}))
    target = getattr(mcmc_kernel, "target_bias", None)
    diagnostics = [own for _, own in chains]
    draws = torch.stack([_draw_nll(likelihood, samples, reference, reference_nll, num_samples) for samples, _ in chains])
    summary = chain_mean(draws)
    llc = beta * (summary.mean - reference_nll)
    bias_bound = None if target is None else target * max(summary.mean - reference_nll, 0.0)
    messages = []
    if not summary.r_hat <= R_HAT_LIMIT:
        messages.append(f"the chains did not equilibrate (split R-hat of the log likelihood {summary.r_hat:.3f} > "
                        f"{R_HAT_LIMIT}): give more warmup_steps and num_samples")
    if spread := spread_warning(summary, 1.0, "negative log likelihood", "num_samples"):
        messages.append(spread)
    drift = halves_drift(draws)
    if moving := drift_warning(drift, "negative log likelihood", "give more warmup_steps"):
        messages.append(moving)
    if llc < -2 * beta * summary.std_error:
        messages.append("the draws fit the data better than w_star, which is not the MAP (or the chains are too cold)")
    for message in messages:
        warnings.warn(message, LLCWarning, stacklevel=2)
    # the kernels' own mixing checks (already warned, as MixingWarning, by the kernels)
    messages += [f"chain {k}: {problem}" for k, chain in enumerate(diagnostics)
                 for problem in chain.get("mixing problems", ())]
    return WBICResult(
        wbic=summary.mean, std_error=summary.std_error, llc=llc, llc_std_error=beta * summary.std_error, beta=beta,
        n=n, reference_nll=reference_nll, nll_draws=draws, per_chain=draws.mean(1), ess=summary.ess,
        r_hat=summary.r_hat, autocorrelation_std_error=summary.autocorrelation_std_error,
        spread_std_error=summary.spread_std_error, spread_p=summary.spread_p,
        drift=drift.change, drift_std_error=drift.std_error, bias_bound=bias_bound, kernel_diagnostics=tuple(diagnostics), warnings=tuple(messages))


@torch.no_grad()
def _draw_nll(likelihood: ModelLikelihood, samples: dict[str, Tensor], reference: dict[str, Tensor],
              reference_nll: float, count: int) -> Tensor:
    """The full-data negative log likelihood of each draw: exact without subsampling, else its
    minibatch difference from ``reference`` plus ``reference_nll``."""
    out = torch.empty(count, dtype=torch.float64)
    for k in range(count):
        values = {name: samples[name][k] for name in likelihood.transforms}
        if likelihood.plate is None:
            out[k] = -float(likelihood.log_density(values))
            continue
        control = SubsampleControl()
        own = likelihood.log_density(values, control)
        at_reference = likelihood.log_density(reference, SubsampleControl(indices=control.recorded))
        out[k] = reference_nll - float(own - at_reference)
    return out
