r"""Preconditioned SGLD (RMSprop preconditioner): the update rule, written once.

Li, Chen, Carlson & Carin (2016), Algorithm 1, with step size :math:`\epsilon`, decay
:math:`\alpha`, regulariser :math:`\lambda_G` and :math:`g = \nabla U / T` (the tempered
stochastic gradient):

.. math::

    V &\leftarrow \alpha V + (1 - \alpha)\, g \odot g \\
    G &= 1 / (\lambda_G + \sqrt V) \\
    \theta &\leftarrow \theta - \frac{\epsilon}{2}\, G \odot \nabla\tilde U(\theta)
        + \sigma\sqrt{\epsilon\, G} \odot \mathcal N(0, I)

with :math:`\nabla\tilde U = \nabla U/T + \gamma(\theta - \theta_0) + \lambda\theta`. The paper's
correction term :math:`\frac{\epsilon}{2}\Gamma`, :math:`\Gamma_i = \sum_j \partial G_{ij}/\partial\theta_j`,
is left out, as in the paper's experiments: :math:`V` is a running average of past gradients, not
a function of the current :math:`\theta`, and the term is small when :math:`V` changes slowly
(:math:`\alpha` near 1). With ``update_preconditioner=False`` :math:`V` is frozen and this is
exactly SGLD with the fixed preconditioner :math:`M = \mathrm{diag}(G)`, which keeps its target;
while :math:`V` adapts, the bias measured on Gaussian targets is given in
:class:`pyro_sgmcmc.samplers.PSGLD`.

How it is computed: per noise chunk, the new :math:`V`, :math:`D = \lambda_G + \sqrt V` and
:math:`\sqrt D` (chunk-sized temporaries, never full-size; :math:`V` is written back after the
finiteness check), the noise buffer (scaled by :math:`2\sigma/\sqrt\epsilon`)
times :math:`\sqrt D`, plus the drift, over :math:`D`, applied as
:math:`\theta \leftarrow \theta - \frac{\epsilon}{2} b`.

Reference:
    C. Li, C. Chen, D. Carlson and L. Carin, "Preconditioned stochastic gradient Langevin dynamics
    for deep neural networks", AAAI 2016.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from ._common import Diagnostics, apply_buffer, check_buffer, fill_drift, plan_buckets, take
from ._noise import Chunk, NoisePlanCache, NoiseSource


def psgld(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    *,
    lr: float,
    alpha: float = 0.99,
    eps: float = 1e-5,
    update_preconditioner: bool = True,
    grad_scale: float = 1.0,
    localization: float = 0.0,
    weight_decay: float = 0.0,
    noise_level: float = 1.0,
    anchors: Sequence[Tensor] | None = None,
    masks: Sequence[Tensor] | None = None,
    bounding_box_size: float | None = None,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    foreach: bool | None = None,
    noise_plans: NoisePlanCache | None = None,
    check_finite: bool = True,
    diagnostics: Diagnostics | None = None,
    grads_checked: bool = False,
) -> None:
    r"""Apply one preconditioned SGLD step to ``params`` (and ``square_avgs``) in place.

    ``anchors``, ``masks``, ``bounding_box_size``, ``generator``, ``noise``, ``foreach``,
    ``noise_plans``, ``check_finite``, ``diagnostics`` and ``grads_checked`` are as for
    :func:`~pyro_sgmcmc.functional.sgld`.

    :param params: the parameters :math:`\theta`.
    :param grads: :math:`\nabla U(\theta)` (not modified).
    :param square_avgs: :math:`V`, shaped like ``params``.
    :param lr: the step size :math:`\epsilon \ge 0`; 0 leaves everything untouched.
    :param alpha: :math:`\alpha \in [0, 1)`, the decay of :math:`V` (0 replaces :math:`V` by
        :math:`g \odot g`: how a sampler starts :math:`V` at its first step).
    :param eps: :math:`\lambda_G > 0`, keeps :math:`G` bounded where :math:`V` is tiny.
    :param update_preconditioner: update :math:`V` with this gradient (else it is frozen).
    :param grad_scale: :math:`1/T`, or ``nbeta`` for a mean-reduced loss.
    :param localization: :math:`\gamma`, strength of the pull toward ``anchors``.
    :param weight_decay: :math:`\lambda`, strength of the pull toward 0.
    :param noise_level: :math:`\sigma` (1 samples the target).
    """
    if lr == 0.0 or not params:
        return
    step_size = lr / 2
    noise_std = 2.0 * noise_level / math.sqrt(lr)  # the buffer is applied with factor lr / 2
    noise = noise or NoiseSource(generator)
    ops, work = plan_buckets(params, grads, noise_plans, check_finite, foreach, grads_checked)
    for indices, plan, check_in_buffer, gates in work:
        ps, gs_all, vs_all = take(indices, params), take(indices, grads), take(indices, square_avgs)
        theta0_all, masks_all = take(indices, anchors), take(indices, masks)

        def update(chunk: Chunk) -> dict | None:
            thetas, gs, vs = chunk.pieces(ps), chunk.pieces(gs_all, readonly=True), chunk.pieces(vs_all)
            theta0 = chunk.pieces(theta0_all, readonly=True) if theta0_all is not None else None
            ms = chunk.pieces(masks_all, readonly=True) if masks_all is not None else None
            parts = None
            if diagnostics is not None:
                parts = Diagnostics.before_update(chunk, gs, thetas, theta0, ms, step_size, grad_scale,
                                                  localization, weight_decay)
            # the new V goes into temporaries and is written back only once the assembled update
            # has passed the finiteness check: a refused step changes nothing
            new_vs = vs
            if update_preconditioner:
                new_vs = ops.scaled(vs, alpha)
                ops.addcmul_(new_vs, gs, gs, value=(1.0 - alpha) * grad_scale * grad_scale)
            # square roots through rsqrt: torch's sqrt called from the noise threads leaves the
            # process's later small sqrt/exp calls ~20x slower (measured on this CPU build), rsqrt not
            denominators = ops.rsqrt(new_vs)
            ops.reciprocal_(denominators)  # sqrt(V), 0 where V is 0
            ops.add_scalar_(denominators, eps)  # D = eps + sqrt(V) = 1 / G
            roots = ops.rsqrt(denominators)
            ops.mul_each_(roots, denominators)  # sqrt(D)
            ops.mul_each_(chunk.noise, roots)  # the noise becomes sqrt(D) xi
            fill_drift(ops, chunk, gs, thetas, theta0, grad_scale, localization, weight_decay)
            ops.div_each_(chunk.noise, denominators)  # G (drift + sqrt(D) xi)
            if check_in_buffer:
                check_buffer(chunk)
            if update_preconditioner:
                ops.copy_(vs, new_vs)
            apply_buffer(ops, chunk, thetas, theta0, ms, step_size, bounding_box_size)
            return parts if parts is None else Diagnostics.after_update(parts, thetas, theta0)

        for parts in noise.run(plan, noise_std, update, gates):
            if parts is not None:
                diagnostics.add(parts)
