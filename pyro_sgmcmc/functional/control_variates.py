r"""Control variates for the stochastic gradient (Baker, Fearnhead, Fox & Nemeth 2019).

With an anchor :math:`\hat\theta` (e.g. the posterior mode) and the full-data gradient there,
the minibatch gradient :math:`\nabla\hat U(\theta)` is replaced by

.. math:: \nabla\tilde U_{cv}(\theta) = \nabla U(\hat\theta) + \nabla\hat U(\theta) - \nabla\hat U(\hat\theta),

with the same minibatch in both :math:`\nabla\hat U` terms. It is unbiased, and its variance
shrinks with :math:`\|\theta - \hat\theta\|^2` instead of staying at the minibatch noise of the
gradient itself: near the mode, where a posterior of :math:`N` data points lives (within
:math:`O(N^{-1/2})`), the noise falls by a factor of order :math:`N`, which is what lets SGLD use
a step size set by the curvature rather than by the noise.

Reference:
    J. Baker, P. Fearnhead, E. B. Fox and C. Nemeth, "Control variates for stochastic gradient
    MCMC", Statistics and Computing 29, 2019.
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from ._ops import select_ops, supports_foreach


def control_variate_gradient_(
    grads: Sequence[Tensor],
    anchor_grads: Sequence[Tensor],
    full_anchor_grads: Sequence[Tensor],
    foreach: bool | None = None,
) -> None:
    r"""``grads <- grads - anchor_grads + full_anchor_grads`` in place: the control-variate
    estimator above, from :math:`\nabla\hat U(\theta)` (``grads``), :math:`\nabla\hat U(\hat\theta)`
    on the same minibatch (``anchor_grads``) and :math:`\nabla U(\hat\theta)` (``full_anchor_grads``).
    """
    grads = list(grads)
    if not grads:
        return
    ops = select_ops(supports_foreach(grads) if foreach is None else foreach)
    ops.add_(grads, list(anchor_grads), alpha=-1.0)
    ops.add_(grads, list(full_anchor_grads))
