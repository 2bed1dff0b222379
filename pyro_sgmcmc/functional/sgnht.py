r"""Stochastic gradient Nosé–Hoover thermostat: the update rule, written once.

Ding et al. (2014), Algorithm 1, with momentum :math:`p`, one scalar thermostat :math:`\xi` per
parameter group of :math:`d` free entries, step size :math:`h` and diffusion factor :math:`A`:

.. math::

    p &\leftarrow e^{-\xi h}\,p - h\,\nabla\tilde U(\theta) + \sigma\sqrt{2 A h}\;\mathcal N(0, I) \\
    \theta &\leftarrow \theta + h\,p \\
    \xi &\leftarrow \xi + h\,\big(p^\top p / d - 1\big)

where the new :math:`p` is used in the second and third lines (the order of the paper), and
the friction is applied exactly (:math:`e^{-\xi h}`) where the paper writes its first-order
expansion :math:`1 - \xi h`: the same scheme to first order, but stable for any :math:`\xi h \ge 0`
(with :math:`1 - \xi h`, a thermostat heated by a far start, :math:`\xi h > 2`, makes the momentum
grow without bound: measured on a logistic regression started at Pyro's default initialisation), and
:math:`\nabla\tilde U = \nabla U / T + \gamma(\theta - \theta_0) + \lambda\theta` is the gradient of
the tempered, localized potential. The dynamics leave
:math:`\exp(-\tilde U(\theta) - p^\top p/2 - \tfrac{d}{2}(\xi - A)^2)` invariant in continuous time, so
:math:`\theta` samples :math:`\exp(-\tilde U)` whatever the (unknown, constant) variance of the
gradient noise: the thermostat absorbs it by settling where the kinetic energy per entry is 1/2.
:math:`\xi` starts at :math:`A` and :math:`p` at a draw from :math:`\mathcal N(0, I)`, its stationary law.

The step size :math:`h` moves :math:`\theta` by about :math:`h` per step (unit-variance momentum),
so it plays the role of :math:`\sqrt{\epsilon}` of SGLD.

Reference:
    N. Ding, Y. Fang, R. Babbush, C. Chen, R. D. Skeel and H. Neven, "Bayesian sampling using
    stochastic gradient thermostats", NeurIPS 2014.
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


def sgnht(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    thermostat: Tensor,
    *,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    **options: Any,
) -> None:
    r"""Apply one SGNHT step in place to ``params``, ``momenta`` and the 0-dim ``thermostat``.

    :param params: the parameters :math:`\theta` of one group.
    :param grads: :math:`\nabla U(\theta)` (not modified).
    :param momenta: :math:`p`, shaped like ``params`` (zero where a mask is 0).
    :param thermostat: :math:`\xi`, a 0-dim tensor shared by the whole list.
    :param lr: the step size :math:`h \ge 0`; 0 leaves everything untouched.
    :param diffusion_factor: :math:`A > 0`, the strength of the injected noise (and friction).
    :param grad_scale: :math:`1/T`, or ``nbeta`` for a mean-reduced loss.
    :param localization: :math:`\gamma`, strength of the pull toward ``anchors``.
    :param weight_decay: :math:`\lambda`, strength of the pull toward 0.
    :param noise_level: :math:`\sigma`, scales the injected noise (1 samples the target).
    :param anchors: :math:`\theta_0`, needed for ``localization`` and ``bounding_box_size``.
    :param masks: 0/1 tensors shaped like each parameter; 0 freezes an entry.
    :param num_free: :math:`d`, the number of free entries (default: all entries of ``params``).
    :param bounding_box_size: clamp :math:`\theta` into :math:`\theta_0 \pm b`, reversing the
        momentum of the entries that hit the wall.
    :param generator: root of the noise (torch's global generator if ``None``).
    :param noise: a persistent :class:`~pyro_sgmcmc.functional.NoiseSource` (built from
        ``generator`` if not given); keep one across steps for a long chain.
    :param foreach: multi-tensor path (default where supported) or per-tensor loop; same numbers.
    :param noise_plans: a cache of noise layouts to reuse between steps.
    :param check_finite: refuse the step (changing nothing) on a NaN or Inf gradient.
    :param diagnostics: accumulates norms of the parts of the momentum update when given.
    :param grads_checked: as for :func:`~pyro_sgmcmc.functional.sgld`.

    Every keyword but ``generator`` and ``noise`` is passed on to :func:`sgnht_step`.
    """
    run(sgnht_step(params, grads, momenta, thermostat, **options), noise or NoiseSource(generator))


def sgnht_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    thermostat: Tensor,
    *,
    lr: float,
    diffusion_factor: float,
    grad_scale: float = 1.0,
    localization: float = 0.0,
    weight_decay: float = 0.0,
    noise_level: float = 1.0,
    anchors: Sequence[Tensor] | None = None,
    masks: Sequence[Tensor] | None = None,
    num_free: float | None = None,
    bounding_box_size: float | None = None,
    foreach: bool | None = None,
    noise_plans: NoisePlanCache | None = None,
    check_finite: bool = True,
    diagnostics: Diagnostics | None = None,
    grads_checked: bool = False,
) -> Step:
    """The :class:`~pyro_sgmcmc.functional._step.Step` of :func:`sgnht` (same arguments); its
    ``post`` updates the thermostat once the momenta have moved."""
    if lr == 0.0 or not params:
        return [], None
    h = lr
    noise_std = noise_level * math.sqrt(2.0 * diffusion_factor / h)  # the momentum noise is h times this
    if num_free is None:
        num_free = float(sum(map(Tensor.numel, params)))
    friction = torch.exp(-h * thermostat)  # the friction flow dp = -xi p dt, solved exactly over h
    tasks = momentum_tasks(
        params, grads, momenta, friction, lr=h, noise_std=noise_std, grad_scale=grad_scale,
        localization=localization, weight_decay=weight_decay, anchors=anchors, masks=masks,
        bounding_box_size=bounding_box_size, foreach=foreach, noise_plans=noise_plans,
        check_finite=check_finite, diagnostics=diagnostics, grads_checked=grads_checked,
    )

    def post(results: list[list]) -> None:
        chunks = gathered(results)
        kinetic = kinetic_sum(chunks, params[0])
        thermostat.add_(kinetic, alpha=h / num_free).sub_(h)  # xi += h (p.p / d - 1)
        if diagnostics is not None:
            diagnostics.add_chunks([parts for _, parts in chunks])
            diagnostics.add_value("thermostat", thermostat)
            diagnostics.add_value("kinetic_temperature", kinetic / num_free)

    return tasks, post
