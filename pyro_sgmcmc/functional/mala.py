r"""The Metropolis-adjusted Langevin (MALA) acceptance probability of a Langevin step, as a
diagnostic of the step size.

A (preconditioned) SGLD step from :math:`\theta` is a draw from the Langevin proposal
:math:`q(\theta'\mid\theta) = \mathcal N\big(\theta - \frac{\epsilon}{2}G\nabla\tilde U(\theta),\ \epsilon\sigma^2 G\big)`
(:math:`\sigma^2`: the variance factor of the injected noise, 1 for plain SGLD).
MALA would accept it with probability :math:`\min(1, e^{a})`,

.. math::

    a = \tilde U(\theta) - \tilde U(\theta') + \log q(\theta\mid\theta') - \log q(\theta'\mid\theta)
      = \tilde U(\theta) - \tilde U(\theta')
        + \frac{\|\theta' - \theta + \frac{\epsilon}{2}G\nabla\tilde U(\theta)\|^2_{G^{-1}}
              - \|\theta - \theta' + \frac{\epsilon}{2}G\nabla\tilde U(\theta')\|^2_{G^{-1}}}{2\epsilon\sigma^2},

where :math:`\tilde U` is the tempered, localized potential the sampler targets and :math:`G` the
(diagonal) preconditioner of the step, the same in both directions (the normalising constants
then cancel). SGLD never rejects; an average acceptance well below 1 says that its step size is
large enough to bias the samples (a rule of thumb from MALA: aim above ~0.5; SGLD's bias
shrinks as the acceptance approaches 1). With minibatch estimates of :math:`\tilde U` and its
gradient the estimate is noisy.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor


def mala_log_acceptance(
    thetas: Sequence[Tensor],
    new_thetas: Sequence[Tensor],
    drifts: Sequence[Tensor],
    new_drifts: Sequence[Tensor],
    energy: Tensor | float,
    new_energy: Tensor | float,
    lrs: Sequence[float],
    preconditioners: Sequence[Tensor | None] | None = None,
    noise_variances: Sequence[float] | None = None,
) -> Tensor:
    r"""The log acceptance ratio :math:`a` above for one step, summed over a list of tensors.

    :param thetas: :math:`\theta` before the step.
    :param new_thetas: :math:`\theta'` after it.
    :param drifts: :math:`\nabla\tilde U(\theta)` (zero on frozen entries).
    :param new_drifts: :math:`\nabla\tilde U(\theta')` (zero on frozen entries).
    :param energy: :math:`\tilde U(\theta)`.
    :param new_energy: :math:`\tilde U(\theta')`.
    :param lrs: the step size :math:`\epsilon` of each tensor.
    :param preconditioners: :math:`G` of each tensor (``None``: identity).
    :param noise_variances: :math:`\sigma^2` of each tensor (default 1).
    :return: a 0-dim float64 tensor; the acceptance probability is ``min(1, exp(a))``.
    """
    log_ratio = torch.as_tensor(energy, dtype=torch.float64) - torch.as_tensor(new_energy, dtype=torch.float64)
    if preconditioners is None:
        preconditioners = [None] * len(thetas)
    if noise_variances is None:
        noise_variances = [1.0] * len(thetas)
    for theta, new_theta, drift, new_drift, lr, g, s2 in zip(thetas, new_thetas, drifts, new_drifts, lrs,
                                                             preconditioners, noise_variances):
        theta, new_theta = theta.detach().double(), new_theta.detach().double()
        drift, new_drift = drift.detach().double(), new_drift.detach().double()
        g = torch.ones((), dtype=torch.float64) if g is None else g.detach().double()
        forward = new_theta - theta + lr / 2 * g * drift
        backward = theta - new_theta + lr / 2 * g * new_drift
        log_ratio = log_ratio + ((forward.square() - backward.square()) / g).sum() / (2 * lr * s2)
    return log_ratio
