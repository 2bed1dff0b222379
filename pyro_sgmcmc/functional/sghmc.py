r"""Stochastic gradient Hamiltonian Monte Carlo: the update rule, written once.

Chen, Fox & Guestrin (2014), Eq. (13) with an identity mass matrix: momentum :math:`p`, step size
:math:`h`, friction :math:`C` and an estimate :math:`\hat B` of the diffusion that the gradient
noise itself injects,

.. math::

    p &\leftarrow e^{-Ch}\,p - h\,\nabla\tilde U(\theta) + \sigma\sqrt{2(C - \hat B)h}\;\mathcal N(0, I) \\
    \theta &\leftarrow \theta + h\,p

with :math:`\nabla\tilde U = \nabla U/T + \gamma(\theta - \theta_0) + \lambda\theta`. A stochastic
gradient with per-entry variance :math:`V` adds :math:`h^2 V` to the variance of :math:`p` at every
step, i.e. diffusion :math:`B = hV/2`; with :math:`\hat B = B` the total diffusion equals the friction
and :math:`\theta` samples :math:`\exp(-\tilde U)` (up to the O(h) discretisation bias). With
:math:`\hat B = 0` the chain runs hot by a relative :math:`B/C` on the variances.

Like :func:`~pyro_sgmcmc.functional.sgnht` (which is this scheme with the friction :math:`C`
replaced by an adaptive thermostat), the friction is applied exactly, :math:`e^{-Ch}` in place of
the paper's first-order :math:`1 - Ch`: the same to first order, stable for any :math:`Ch`. Both
share one momentum step (:mod:`._momentum`).

Reference:
    T. Chen, E. B. Fox and C. Guestrin, "Stochastic gradient Hamiltonian Monte Carlo", ICML 2014.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ._common import Diagnostics
from ._momentum import kinetic_sum, momentum_tasks
from ._noise import NoisePlanCache, NoiseSource
from ._step import Step, gathered, run


def sghmc(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    *,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    **options: Any,
) -> None:
    r"""Apply one SGHMC step in place to ``params`` and ``momenta``.

    :param params: the parameters :math:`\theta`.
    :param grads: :math:`\nabla U(\theta)` (not modified).
    :param momenta: :math:`p`, shaped like ``params`` (zero where a mask is 0).
    :param lr: the step size :math:`h \ge 0`; 0 leaves everything untouched.
    :param friction: :math:`C > 0`.
    :param noise_estimate: :math:`\hat B \in [0, C)`, the diffusion already injected by the
        gradient noise (:math:`hV/2` for a gradient of per-entry variance :math:`V`).
    :param grad_scale: :math:`1/T`, or ``nbeta`` for a mean-reduced loss.
    :param localization: :math:`\gamma`; :param weight_decay: :math:`\lambda`.
    :param noise_level: :math:`\sigma`, scales the injected noise (1 samples the target).
    :param anchors: :math:`\theta_0`, needed for ``localization`` and ``bounding_box_size``.
    :param masks: 0/1 tensors shaped like each parameter; 0 freezes an entry.
    :param bounding_box_size: clamp :math:`\theta` into :math:`\theta_0 \pm b`, reversing the
        momentum of the entries that hit the wall.
    :param generator, noise, foreach, noise_plans, check_finite, diagnostics, grads_checked: as
        for :func:`~pyro_sgmcmc.functional.sgld`.

    Every keyword but ``generator`` and ``noise`` is passed on to :func:`sghmc_step`.
    """
    run(sghmc_step(params, grads, momenta, **options), noise or NoiseSource(generator))


def sghmc_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    *,
    lr: float,
    friction: float,
    noise_estimate: float = 0.0,
    grad_scale: float = 1.0,
    localization: float = 0.0,
    weight_decay: float = 0.0,
    noise_level: float = 1.0,
    anchors: Sequence[Tensor] | None = None,
    masks: Sequence[Tensor] | None = None,
    bounding_box_size: float | None = None,
    foreach: bool | None = None,
    noise_plans: NoisePlanCache | None = None,
    check_finite: bool = True,
    diagnostics: Diagnostics | None = None,
    grads_checked: bool = False,
) -> Step:
    """The :class:`~pyro_sgmcmc.functional._step.Step` of :func:`sghmc` (same arguments)."""
    if lr == 0.0 or not params:
        return [], None
    if not 0.0 <= noise_estimate < friction:
        raise ValueError(f"Invalid noise_estimate: {noise_estimate!r} (must be >= 0 and below friction={friction!r})")
    h = lr
    noise_std = noise_level * math.sqrt(2.0 * (friction - noise_estimate) / h)  # the momentum noise is h times this
    tasks = momentum_tasks(
        params, grads, momenta, math.exp(-friction * h), lr=h, noise_std=noise_std, grad_scale=grad_scale,
        localization=localization, weight_decay=weight_decay, anchors=anchors, masks=masks,
        bounding_box_size=bounding_box_size, foreach=foreach, noise_plans=noise_plans,
        check_finite=check_finite, diagnostics=diagnostics, grads_checked=grads_checked,
        kinetic_energy=diagnostics is not None,  # only reported
    )
    if diagnostics is None:
        return tasks, None

    def post(results: list[list]) -> None:
        chunks = gathered(results)
        diagnostics.add_chunks([parts for _, parts in chunks])
        num = sum(p.numel() for p in params) if masks is None else sum(float(m.sum()) for m in masks)
        diagnostics.add_value("kinetic_temperature", kinetic_sum(chunks, params[0]) / max(num, 1))

    return tasks, post
