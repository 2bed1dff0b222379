"""The Monte Carlo error of a mean over several chains, from Pyro's diagnostics."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch import Tensor


@dataclass(frozen=True)
class ChainMean:
    """The mean of draws ``[chains, draws]`` and its Monte Carlo standard error.

    :param mean: the mean over every draw of every chain.
    :param std_error: :math:`\\mathrm{sd}/\\sqrt{\\mathrm{ESS}}`, the effective sample size from
        :func:`pyro.ops.stats.effective_sample_size` (Stan's estimator: autocorrelation within
        chains and disagreement between them both lower it), capped at the number of draws.
    :param ess: that effective sample size.
    :param r_hat: the split :math:`\\hat R` (:func:`pyro.ops.stats.split_gelman_rubin`): above 1 when
        the halves of the chains disagree (a drift, chains that have not forgotten their start).
    """

    mean: float
    std_error: float
    ess: float
    r_hat: float


def chain_mean(draws: Tensor) -> ChainMean:
    """:class:`ChainMean` of ``draws`` (``[chains, draws]``)."""
    x = draws.detach().to(torch.float64)
    chains, count = x.shape
    mean = float(x.mean())
    variance = float(x.var()) if x.numel() > 1 else 0.0
    if count < 4 or variance == 0.0:
        return ChainMean(mean, math.sqrt(variance / x.numel()) if x.numel() else math.nan, float(x.numel()), math.nan)
    ess = float(effective_sample_size(x, chain_dim=0, sample_dim=1))
    ess = min(ess, float(x.numel())) if math.isfinite(ess) and ess > 0 else 1.0
    r_hat = float(split_gelman_rubin(x, chain_dim=0, sample_dim=1))
    return ChainMean(mean, math.sqrt(variance / ess), ess, r_hat)
