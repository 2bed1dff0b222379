"""The Monte Carlo error of a mean over several chains, from Pyro's diagnostics and the spread of
the chains' own means."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch import Tensor

#: The chains' spread is said to exceed what their autocorrelation accounts for below this p-value
#: (:attr:`ChainMean.spread_p`; with 4 chains, a spread twice the autocorrelation's standard error).
SPREAD_P_LIMIT = 0.01
#: Standard errors by which the draws' second half must differ from their first (each chain
#: against itself, :func:`paired_drift`) before they are said to drift.
DRIFT_LIMIT = 4.0


@dataclass(frozen=True)
class ChainMean:
    r"""The mean of draws ``[chains, draws]`` and its Monte Carlo standard error.

    Two estimates of the error of the mean, of the same quantity where the chains are independent:

    * from the autocorrelation, :math:`\mathrm{sd}/\sqrt{\mathrm{ESS}}`, the effective sample size
      from :func:`pyro.ops.stats.effective_sample_size` (Stan's estimator: autocorrelation within
      chains and disagreement between them both lower it), capped at the number of draws. Geyer's
      truncation of the autocorrelation sum stops at the first lag where the estimated pairs turn
      negative, so a slow component that is small against the per-draw noise (a network's flat
      directions under minibatch noise: it shifts each chain's mean, but its autocorrelation is
      lost in the noise at the lags where the sum is cut) is not counted;
    * from the spread of the chains' means, :math:`s_{\bar x}/\sqrt{C}`: unbiased (in its square)
      whatever the autocorrelation, since the chains start alike and run independently, but with
      :math:`C - 1` degrees of freedom.

    :param mean: the mean over every draw of every chain.
    :param std_error: the larger of the two: the first alone can understate the error twofold
        (4 chains of 500 draws, a component 10% of the per-draw noise with a correlation time of
        500-4500 draws: a quarter of the variance), the second alone is noisy; where the first is
        right the larger averages 1.13 times the true error with 4 chains (1.3 in the square),
        1.17 with 2 (1.5; a single degree of freedom: a noisy error bar), 1.09 with 8.
    :param ess: the effective sample size of the first.
    :param r_hat: the split :math:`\hat R` (:func:`pyro.ops.stats.split_gelman_rubin`): above 1 when
        the halves of the chains disagree (a drift, chains that have not forgotten their start).
    :param autocorrelation_std_error: the first estimate.
    :param spread_std_error: the second (``nan`` for one chain).
    :param spread_p: the probability of a spread at least this large were the first estimate right
        (:math:`(C - 1)\,s_{\bar x}^2 / (C\,\mathrm{se}^2) \sim \chi^2_{C-1}`; ``nan`` for one chain
        or draws that do not vary): below :data:`SPREAD_P_LIMIT`, the chains disagree beyond their
        autocorrelation.
    """

    mean: float
    std_error: float
    ess: float
    r_hat: float
    autocorrelation_std_error: float = math.nan
    spread_std_error: float = math.nan
    spread_p: float = math.nan


def error_source(autocorrelation_std_error: float, spread_std_error: float) -> str:
    """Which of :class:`ChainMean`'s two estimates is the standard error given, in words."""
    return "the chains' spread" if spread_std_error > autocorrelation_std_error else "the autocorrelation"


def chain_mean(draws: Tensor) -> ChainMean:
    """:class:`ChainMean` of ``draws`` (``[chains, draws]``; with fewer than 4 draws a chain, or
    none varying, the draws are taken as independent for the first estimate)."""
    x = draws.detach().to(torch.float64)
    chains, count = x.shape
    if not x.numel():
        return ChainMean(math.nan, math.nan, 0.0, math.nan, math.nan)
    mean = float(x.mean())
    variance = float(x.var()) if x.numel() > 1 else 0.0
    ess, r_hat = float(x.numel()), math.nan
    if count >= 4 and variance > 0.0:
        ess = float(effective_sample_size(x, chain_dim=0, sample_dim=1))
        ess = min(ess, float(x.numel())) if math.isfinite(ess) and ess > 0 else 1.0
        r_hat = float(split_gelman_rubin(x, chain_dim=0, sample_dim=1))
    autocorrelation = math.sqrt(variance / ess)
    if chains < 2:
        return ChainMean(mean, autocorrelation, ess, r_hat, autocorrelation)
    spread = math.sqrt(float(x.mean(1).var()) / chains)
    p = math.nan
    if autocorrelation > 0:
        statistic = (chains - 1) * (spread / autocorrelation) ** 2
        p = float(torch.special.gammaincc(torch.tensor((chains - 1) / 2, dtype=torch.float64),
                                          torch.tensor(statistic / 2, dtype=torch.float64)))
    return ChainMean(mean, max(autocorrelation, spread), ess, r_hat, autocorrelation, spread, p)


def spread_warning(summary: ChainMean, scale: float, unit: str, draws: str) -> str | None:
    """The warning when the chains' means spread beyond what their autocorrelation accounts for
    (:attr:`ChainMean.spread_p` below :data:`SPREAD_P_LIMIT`), the errors shown times ``scale``, of
    the quantity ``unit``, ``draws`` the caller's argument for draws per chain; ``None`` otherwise."""
    if not summary.spread_p < SPREAD_P_LIMIT:
        return None
    return (f"the chains' values of the {unit} spread more than their autocorrelation accounts for (standard error "
            f"{scale * summary.spread_std_error:.2g} from their spread, {scale * summary.autocorrelation_std_error:.2g} "
            f"from the autocorrelation; p = {summary.spread_p:.2g}): a direction slower than the draws resolve, "
            "or chains that have not forgotten their start or sit in different modes; the standard error given is "
            f"the spread's, with one degree of freedom fewer than the chains: give more num_chains for a firmer "
            f"error bar, more {draws} for a smaller one")


@dataclass(frozen=True)
class Drift:
    """How the chains' mean moved from one stretch of their draws to the next, and the standard
    error of that change (see :func:`paired_drift`)."""

    change: float
    std_error: float

    def settled(self, tolerance: float = 0.0, z: float = 2.0) -> bool:
        """Whether the change is within ``z`` standard errors of 0, or within ``tolerance``."""
        return abs(self.change) <= max(z * self.std_error, tolerance)


def paired_drift(before: Tensor, after: Tensor) -> Drift:
    r"""The change of the mean from ``before`` to ``after`` (``[chains, draws]`` each, the same
    chains, ``after`` following ``before``), each chain compared with itself: the mean over chains
    of :math:`\bar x_c^{after} - \bar x_c^{before}`. Pairing cancels what keeps a chain's level apart
    from the others' for longer than the two stretches (a network's slow flat directions), which
    the spread of unpaired means would count as noise. Its standard error is the larger of the
    spread of the chains' changes over :math:`\sqrt C` (:math:`C \ge 2`) and the two stretches'
    autocorrelation errors (:func:`chain_mean`, each chain centred on its own mean over both, so
    that the lasting offsets stay out of it too) added in quadrature: the first alone has
    :math:`C - 1` degrees of freedom, the second alone misses what the pairing leaves correlated."""
    x, y = before.detach().to(torch.float64), after.detach().to(torch.float64)
    changes = y.mean(1) - x.mean(1)
    centre = torch.cat([x, y], 1).mean(1, keepdim=True)
    first, second = chain_mean(x - centre), chain_mean(y - centre)
    error = math.hypot(first.autocorrelation_std_error, second.autocorrelation_std_error)
    if changes.numel() > 1:
        error = max(error, float(changes.std()) / math.sqrt(changes.numel()))
    return Drift(float(changes.mean()), error)


def halves_drift(draws: Tensor) -> Drift:
    """:func:`paired_drift` from the first half of ``draws`` (``[chains, draws]``) to the second (an
    odd middle draw left out)."""
    half = draws.shape[1] // 2
    return paired_drift(draws[:, :half], draws[:, draws.shape[1] - half:])


def drift_warning(drift: Drift, unit: str, remedy: str) -> str | None:
    """The warning when the draws still drift (:func:`halves_drift` beyond :data:`DRIFT_LIMIT`
    standard errors), of the quantity ``unit`` whose rise makes the estimate too low; ``None``
    otherwise."""
    if drift.settled(z=DRIFT_LIMIT):
        return None
    return (f"the chains still drifted during the draws: the {unit} moved by {drift.change:.3g} ± "
            f"{drift.std_error:.2g} from their first half to their second (each chain against itself), so the "
            f"burn-in ended before equilibrium and the estimate is likely too {'low' if drift.change > 0 else 'high'}; "
            f"{remedy}")
