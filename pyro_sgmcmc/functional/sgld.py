r"""Stochastic gradient Langevin dynamics: the update rule, written once.

.. math::

    \theta \leftarrow \theta - \frac{\epsilon}{2}\Big(\frac{1}{T}\nabla U(\theta)
        + \gamma(\theta - \theta_0) + \lambda\theta\Big) + \sigma\sqrt{\epsilon}\,\xi,
    \qquad \xi \sim \mathcal N(0, I),

which for small :math:`\epsilon` samples
:math:`\pi(\theta) \propto \exp(-U(\theta)/T - \tfrac{\gamma}{2}\|\theta-\theta_0\|^2 - \tfrac{\lambda}{2}\|\theta\|^2)`
when the noise level :math:`\sigma` is 1 (Welling & Teh 2011; the localized form of Lau et al. 2023).

How it is computed: the noise is drawn in chunks (:class:`~pyro_sgmcmc.functional.NoiseSource`)
into small buffers already scaled by :math:`2\sigma/\sqrt{\epsilon}`, the gradient of the
tempered, localized potential is added to it, and the buffer is applied as
:math:`\theta \leftarrow \theta - \frac{\epsilon}{2} b`. That is two passes over memory besides
the unavoidable ``normal_``, and with :math:`\sigma = 0`, :math:`T = 1` it is bit for bit
``torch.optim.SGD`` with learning rate :math:`\epsilon/2`.

References:
    * M. Welling and Y. W. Teh, "Bayesian learning via stochastic gradient Langevin dynamics", ICML 2011.
    * E. Lau, Z. Furman, G. Wang, D. Murfet and S. Wei, "The local learning coefficient: a
      singularity-aware complexity measure", 2023.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ._common import Diagnostics, apply_buffer, check_buffer, fill_drift, plan_buckets, take
from ._noise import Chunk, NoisePlanCache, NoiseSource


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
    grads_checked: bool = False,
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
    :param grads_checked: the caller vouches that each gradient has its parameter's shape,
        dtype and device (as torch guarantees of ``p.grad``; the optimizers pass ``True``). Then,
        outside autograd, the gradients of small 1-d tensors are gathered with one ``torch.cat``
        instead of one op each; unchecked, a mismatch raises in the per-tensor ops.
    """
    if lr == 0.0 or not params:
        return
    step_size = lr / 2
    noise_std = 2.0 * noise_level / math.sqrt(lr)  # the buffer is applied with factor lr / 2
    if noise is None:
        noise = NoiseSource(generator)
    ops, work = plan_buckets(params, grads, noise_plans, check_finite, foreach, grads_checked)
    for indices, plan, check_in_buffer, gates in work:
        bucket_params, bucket_grads = take(indices, params), take(indices, grads)
        bucket_anchors, bucket_masks = take(indices, anchors), take(indices, masks)

        def update(chunk: Chunk) -> dict | None:
            thetas = chunk.pieces(bucket_params)
            gs = chunk.pieces(bucket_grads, readonly=True)
            theta0 = None if bucket_anchors is None else chunk.pieces(bucket_anchors, readonly=True)
            ms = None if bucket_masks is None else chunk.pieces(bucket_masks, readonly=True)
            parts = None
            if diagnostics is not None:
                parts = Diagnostics.before_update(chunk, gs, thetas, theta0, ms, step_size, grad_scale,
                                                  localization, weight_decay)
            fill_drift(ops, chunk, gs, thetas, theta0, grad_scale, localization, weight_decay)
            if check_in_buffer:
                check_buffer(chunk)
            apply_buffer(ops, chunk, thetas, theta0, ms, step_size, bounding_box_size)
            return parts if parts is None else Diagnostics.after_update(parts, thetas, theta0)

        for parts in noise.run(plan, noise_std, update, gates):
            if parts is not None:
                diagnostics.add(parts)
