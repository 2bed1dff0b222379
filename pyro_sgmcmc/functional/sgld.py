r"""Stochastic gradient Langevin dynamics: the update rule, written once.

.. math::

    \theta \leftarrow \theta - \frac{\epsilon}{2}\Big(\frac{1}{T}\nabla U(\theta)
        + \gamma(\theta - \theta_0) + \lambda\theta\Big) + \sigma\sqrt{\epsilon}\,\xi,
    \qquad \xi \sim \mathcal N(0, I),

which for small :math:`\epsilon` samples
:math:`\pi(\theta) \propto \exp(-U(\theta)/T - \tfrac{\gamma}{2}\|\theta-\theta_0\|^2 - \tfrac{\lambda}{2}\|\theta\|^2)`
when the noise level :math:`\sigma` is 1 (Welling & Teh 2011; the localized form of Lau et al. 2023).

How it is computed: the noise is drawn in chunks (:mod:`._noise`) into small buffers already
scaled by :math:`2\sigma/\sqrt{\epsilon}`, the gradient of the tempered, localized potential is
added to it, and the buffer is applied as :math:`\theta \leftarrow \theta - \frac{\epsilon}{2} b`.
That is two passes over memory besides the unavoidable ``normal_``, and with :math:`\sigma = 0`,
:math:`T = 1` it is bit for bit ``torch.optim.SGD`` with learning rate :math:`\epsilon/2`.

References:
    M. Welling and Y. W. Teh, "Bayesian learning via stochastic gradient Langevin dynamics", ICML 2011.
    E. Lau, Z. Furman, G. Wang, D. Murfet and S. Wei, "The local learning coefficient: a
    singularity-aware complexity measure", 2023.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ._common import Diagnostics, check_buffer, clamp_to_box, fill_drift, plan_buckets, take
from ._noise import Chunk, NoisePlan, NoisePlanCache, NoiseSource


def sgld(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    lr: float,
    grad_scale: float = 1.0,
    localization: float = 0.0,
    weight_decay: float = 0.0,
    noise_level: float = 1.0,
    anchors: Sequence[Tensor] | None = None,
    masks: Sequence[Tensor | None] | None = None,
    bounding_box_size: float | None = None,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    foreach: bool | None = None,
    noise_plans: NoisePlanCache | None = None,
    check_finite: bool = True,
    diagnostics: Diagnostics | None = None,
) -> None:
    r"""Apply one SGLD step to ``params`` in place.

    :param params: the parameters :math:`\theta` (updated in place).
    :param grads: :math:`\nabla U(\theta)`, one per parameter (not modified).
    :param lr: the step size :math:`\epsilon \ge 0`; 0 leaves the parameters untouched.
    :param grad_scale: :math:`1/T`, or ``nbeta`` for a mean-reduced loss.
    :param localization: :math:`\gamma`, strength of the pull toward ``anchors``.
    :param weight_decay: :math:`\lambda`, strength of the pull toward 0.
    :param noise_level: :math:`\sigma`, the scale of the injected noise (1 samples the target).
    :param anchors: :math:`\theta_0`, needed for ``localization`` and ``bounding_box_size``.
    :param masks: 0/1 tensors (or ``None``) shaped like each parameter; 0 freezes an entry.
    :param bounding_box_size: clamp :math:`\theta` into :math:`\theta_0 \pm b` after the step.
    :param generator: root of the noise (torch's global generator if ``None``).
    :param noise: a persistent :class:`~pyro_sgmcmc.functional.NoiseSource` (built from
        ``generator`` if not given); keep one across steps for a long chain.
    :param foreach: multi-tensor path (default where supported) or per-tensor loop; same numbers.
    :param noise_plans: a cache of noise layouts to reuse between steps.
    :param check_finite: raise :class:`~pyro_sgmcmc.functional.NonFiniteError` before changing
        anything if a gradient holds NaN or Inf.
    :param diagnostics: accumulates norms of the parts of this update when given.
    """
    if lr == 0.0 or not params:
        return
    step_size = lr / 2
    noise_std = 2.0 * noise_level / math.sqrt(lr)  # the buffer is applied with factor lr / 2
    noise = noise or NoiseSource(generator)
    ops, work = plan_buckets(params, grads, noise_plans, check_finite, foreach)
    for indices, plan, check_in_buffer, gates in work:
        _sgld_bucket(
            ops, plan, take(indices, params), take(indices, grads), take(indices, anchors), take(indices, masks),
            step_size, noise_std, grad_scale, localization, weight_decay, bounding_box_size, noise,
            check_in_buffer, gates, diagnostics,
        )


def _sgld_bucket(
    ops, plan: NoisePlan, params, grads, anchors, masks, step_size, noise_std, grad_scale,
    localization, weight_decay, bounding_box_size, noise: NoiseSource, check_in_buffer, gates, diagnostics,
) -> None:
    def update(chunk: Chunk) -> dict | None:
        thetas = chunk.pieces(params)
        gs = chunk.pieces(grads, readonly=True)
        theta0 = chunk.pieces(anchors, readonly=True) if anchors is not None else None
        ms = chunk.pieces(masks, readonly=True) if masks is not None else None
        parts = None
        if diagnostics is not None:
            parts = Diagnostics.before_update(chunk, gs, thetas, theta0, ms, step_size, grad_scale,
                                              localization, weight_decay)
        fill_drift(ops, chunk, gs, thetas, theta0, grad_scale, localization, weight_decay)
        if check_in_buffer:
            check_buffer(chunk)
        if ms is None:
            ops.add_(thetas, chunk.noise, alpha=-step_size)
        else:
            ops.addcmul_(thetas, chunk.noise, ms, value=-step_size)
        if bounding_box_size is not None:
            clamp_to_box(ops, thetas, theta0, bounding_box_size, chunk.noise)
        return parts if parts is None else Diagnostics.after_update(parts, thetas, theta0)

    for parts in noise.run(plan, noise_std, update, gates):
        if parts is not None:
            diagnostics.add(parts)
