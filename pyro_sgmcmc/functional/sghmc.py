r"""Stochastic gradient Hamiltonian Monte Carlo: the update rule, written once.

Chen, Fox & Guestrin (2014), Eq. (13) with an identity mass matrix: momentum :math:`p`, step size
:math:`h`, friction :math:`C` and an estimate :math:`\hat B` of the diffusion that the gradient
noise itself injects, with the friction and the injected noise of the exact Ornstein-Uhlenbeck
step :math:`dp = -Cp\,dt + \sqrt{2C}\,dW` over a time :math:`h`:

.. math::

    p &\leftarrow e^{-Ch}\,p - h\,\nabla\tilde U(\theta)
        + \sigma\sqrt{1 - e^{-2Ch} - 2h\hat B}\;\mathcal N(0, I) \\
    \theta &\leftarrow \theta + h\,p

with :math:`\nabla\tilde U = \nabla U/T + \gamma(\theta - \theta_0) + \lambda\theta`. A stochastic
gradient with per-entry variance :math:`V` (of :math:`\nabla U`) adds :math:`h^2 V/T^2 = 2hB` to the
variance of :math:`p` at every step (diffusion :math:`B = hV/(2T^2)`); with :math:`\hat B = B` the
friction factor and the total noise are those of the exact Ornstein-Uhlenbeck step, which leaves
:math:`p \sim \mathcal N(0, I)` invariant, and the only bias left is the splitting of that step from
the (symplectic Euler) Hamiltonian step. The scheme refuses :math:`2h\hat B \ge 1 - e^{-2Ch}` (no
noise left to inject).

Bias, exact for a Gaussian target: in an eigen-direction of curvature :math:`\omega^2` (of
:math:`\tilde U`), with :math:`a = e^{-Ch}`, the discretised chain's stationary variances are

.. math::

    \operatorname{Var}\theta = \frac{q}{1 - a^2}\,\frac{1}{\omega^2}\,
        \frac{(1 + a)/2}{1 - h^2\omega^2 / (2(1 + a))}, \qquad
    \operatorname{Var}p = \frac{q}{1 - a^2}\,\frac{1}{1 - h^2\omega^2 / (2(1 + a))}

where :math:`q = 1 - a^2 + 2h(B - \hat B)` is the momentum's total noise variance per step: with
:math:`\hat B = B`, :math:`\theta`'s variance is low by a relative
:math:`-Ch/2 + h^2(C^2 + \omega^2)/4 + O(h^3)` (cold, to first order), stable for
:math:`h\omega < 2\sqrt{(1+a)/2}`. An unestimated gradient noise (:math:`\hat B = 0`) makes both
variances hot by the factor :math:`1 + h^2 V/(T^2(1 - e^{-2Ch})) \approx 1 + B/C`. The paper's
noise :math:`2(C - \hat B)h`, paired with the factor :math:`e^{-Ch}`, would run hot by the factor
:math:`2Ch/(1 - e^{-2Ch}) \approx 1 + Ch`, i.e. :math:`+Ch/2` on the variances to first order.

BAOAB (``splitting="baoab"``; Leimkuhler & Matthews 2013): the same kick, friction and noise, with
the friction and noise between two half drifts (see :mod:`._momentum`; consecutive half kicks are
merged, one gradient a step). On a Gaussian target with exact gradients :math:`\theta`'s stationary
law is then *exact* for every :math:`h\omega < 2` and every :math:`C`: the momentum's friction does
not enter it, so the friction can be chosen for mixing alone. With a gradient noise of variance
:math:`V` and the estimate :math:`\hat V` (both of :math:`\nabla U/T`):

.. math::

    \omega^2\operatorname{Var}\theta = 1 - \frac{h^2\hat V}{1 - a^2}
        + \frac{h^2 V\,(1 + a)}{(1 - a)(4 - h^2\omega^2)}
        \approx 1 + \frac{h(V - \hat V)}{2C}.

Like :func:`~pyro_sgmcmc.functional.sgnht` (which is this scheme with the friction :math:`C`
replaced by an adaptive thermostat), the friction is applied exactly, :math:`e^{-Ch}` in place of
the paper's first-order :math:`1 - Ch`: the same to first order, stable for any :math:`Ch`. Both
share one implementation of the momentum step.

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


def injected_noise_variance(lr: float, friction: float, noise_estimate: float = 0.0) -> float:
    r""":math:`1 - e^{-2Ch} - 2h\hat B`, the variance per step of the noise SGHMC injects into each
    momentum entry (before ``noise_level``); a ``ValueError`` if it is not positive.

    :param lr: :math:`h > 0`; :param friction: :math:`C > 0`; :param noise_estimate: :math:`\hat B \ge 0`.
    """
    h = lr
    ou = -math.expm1(-2.0 * friction * h)  # 1 - exp(-2 C h), accurate for small C h
    gradient = 2.0 * h * noise_estimate
    if not noise_estimate >= 0.0 or not gradient < ou:
        raise ValueError(
            f"Invalid noise_estimate: {noise_estimate!r} (must be >= 0 with 2 h B_hat = {gradient:g} below "
            f"1 - exp(-2 C h) = {ou:g} at lr={h!r}, friction={friction!r})"
        )
    return ou - gradient


def baoab_heat(lr: float, friction: float, curvature: float, noise_variance: float,
               noise_estimate: float = 0.0) -> float:
    r"""BAOAB's relative excess of :math:`\theta`'s stationary variance along a direction of
    ``curvature`` :math:`\omega^2` (the closed form above, less 1):
    :math:`h^2(V(1 + a)^2/(4 - h^2\omega^2) - \hat V)/(1 - a^2)`, with :math:`V` the gradient
    noise's variance and :math:`\hat V` its estimate (both of :math:`\nabla U/T`); ``inf`` where
    :math:`h\omega \ge 2` (unstable)."""
    h = lr
    room = 4.0 - h * h * curvature
    if room <= 0:
        return math.inf
    a = math.exp(-friction * h)
    return h * h * (noise_variance * (1 + a) ** 2 / room - noise_estimate) / -math.expm1(-2.0 * friction * h)


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

    ``generator``, ``noise``, ``foreach``, ``noise_plans``, ``check_finite``, ``diagnostics`` and
    ``grads_checked`` are as for :func:`~pyro_sgmcmc.functional.sgld`.

    :param params: the parameters :math:`\theta`.
    :param grads: :math:`\nabla U(\theta)` (not modified).
    :param momenta: :math:`p`, shaped like ``params`` (zero where a mask is 0).
    :param lr: the step size :math:`h \ge 0`; 0 leaves everything untouched.
    :param friction: :math:`C > 0`.
    :param noise_estimate: :math:`\hat B \ge 0`, the diffusion already injected by the gradient
        noise (:math:`hV/(2T^2)` for a gradient of per-entry variance :math:`V`), with
        :math:`2h\hat B < 1 - e^{-2Ch}`.
    :param grad_scale: :math:`1/T`, or ``nbeta`` for a mean-reduced loss.
    :param localization: :math:`\gamma`, strength of the pull toward ``anchors``.
    :param weight_decay: :math:`\lambda`, strength of the pull toward 0.
    :param noise_level: :math:`\sigma`, scales the injected noise (1 samples the target).
    :param anchors: :math:`\theta_0`, needed for ``localization`` and ``bounding_box_size``.
    :param masks: 0/1 tensors shaped like each parameter; 0 freezes an entry.
    :param bounding_box_size: clamp :math:`\theta` into :math:`\theta_0 \pm b`, reversing the
        momentum of the entries that hit the wall.
    :param splitting: ``"euler"`` (the scheme above) or ``"baoab"``.

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
    splitting: str = "euler",
) -> Step:
    """The :class:`~pyro_sgmcmc.functional._step.Step` of :func:`sghmc` (same arguments)."""
    if lr == 0.0 or not params:
        return [], None
    h = lr
    injected = injected_noise_variance(h, friction, noise_estimate)
    noise_std = noise_level * math.sqrt(injected) / h  # the momentum noise is h times this
    tasks = momentum_tasks(
        params, grads, momenta, math.exp(-friction * h), lr=h, noise_std=noise_std, grad_scale=grad_scale,
        localization=localization, weight_decay=weight_decay, anchors=anchors, masks=masks,
        bounding_box_size=bounding_box_size, foreach=foreach, noise_plans=noise_plans,
        check_finite=check_finite, diagnostics=diagnostics, grads_checked=grads_checked,
        kinetic_energy=diagnostics is not None,  # only reported
        splitting=splitting,
    )
    if diagnostics is None:
        return tasks, None

    def post(results: list[list]) -> None:
        chunks = gathered(results)
        diagnostics.add_chunks([parts for _, parts in chunks])
        num = sum(p.numel() for p in params) if masks is None else sum(float(m.sum()) for m in masks)
        diagnostics.add_value("kinetic_temperature", kinetic_sum(chunks, params[0]) / max(num, 1))

    return tasks, post
