"""SGHMC as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import required

from ..functional import Diagnostics
from ..functional._step import Step
from ..functional.sghmc import baoab_heat, injected_noise_variance, sghmc_step
from .._validation import check_choice, check_number
from ._momentum import MomentumSampler

__all__ = ["SGHMC"]

#: The integrators of :class:`SGHMC`'s ``splitting``.
SPLITTINGS = ("euler", "baoab")


class SGHMC(MomentumSampler):
    r"""Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014).

    Momentum :math:`p` (identity mass), step size :math:`h` (``lr``), friction :math:`C`, with the
    friction factor and noise of the exact Ornstein-Uhlenbeck step over a time :math:`h`:

    .. math::

        p \leftarrow e^{-Ch} p - h\nabla\tilde U(\theta)
            + \sqrt{1 - e^{-2Ch} - h^2\hat V/T^2}\,\mathcal N(0, I),
        \qquad \theta \leftarrow \theta + h p,

    with :math:`\tilde U = U/T + \frac{\gamma}{2}\|\theta-\theta_0\|^2 + \frac{\lambda}{2}\|\theta\|^2`
    and :math:`h^2\hat V/T^2` the momentum variance per step that a stochastic gradient of
    per-entry variance :math:`\hat V` (``gradient_noise_variance``, of the gradient in ``p.grad``)
    already injects (the diffusion :math:`\hat B = h\hat V/(2T^2)` of the paper, times :math:`2h`);
    a step where it would leave no noise to inject (:math:`h^2\hat V/T^2 \ge 1 - e^{-2Ch}`) is
    refused. The paper's friction factor :math:`1 - Ch` is replaced by the exact :math:`e^{-Ch}`
    (the same to first order, stable for any :math:`Ch`), and its noise :math:`2(C - \hat B)h` by
    the variance that matches that factor (with :math:`e^{-Ch}`, :math:`2Ch` runs hot by
    :math:`Ch/2`), as in :class:`~pyro_sgmcmc.samplers.SGNHT`, which is this sampler with the
    friction adapted by a thermostat.

    Bias, exact on a Gaussian target with :math:`\hat V` equal to the true gradient noise
    :math:`V`: in an eigen-direction of curvature :math:`\omega^2` of :math:`\tilde U`, with
    :math:`a = e^{-Ch}`, the chain's stationary variance of :math:`\theta` is

    .. math::

        \operatorname{Var}\theta = \frac{1}{\omega^2}\,\frac{(1 + a)/2}{1 - h^2\omega^2/(2(1 + a))}
            = \frac{1}{\omega^2}\Big(1 - \frac{Ch}{2} + \frac{h^2(C^2 + \omega^2)}{4} + O(h^3)\Big),

    cold by :math:`Ch/2` to first order (see :mod:`pyro_sgmcmc.functional.sghmc`). With
    :math:`\hat V = 0` the variances are also hot by the factor
    :math:`1 + h^2 V/(T^2(1 - e^{-2Ch})) \approx 1 + hV/(2CT^2)` (the thermostat of SGNHT removes
    this). ``h`` moves :math:`\theta` by about ``h`` per step, so it compares with
    :math:`\sqrt\epsilon` of SGLD.

    ``splitting="baoab"`` runs the same kick, friction and noise as BAOAB (Leimkuhler & Matthews
    2013): a half drift, the friction and noise, a half drift (the half kicks of consecutive steps
    merged, one gradient a step). On a Gaussian target with exact gradients :math:`\theta`'s
    stationary law is then exact for any :math:`h\omega < 2` and any friction, and a gradient noise
    heats it by :math:`\frac{h^2 V(1 + a)}{(1 - a)(4 - h^2\omega^2)} \approx hV/(2C)` (less
    :math:`h^2\hat V/(1 - a^2)` for the estimate; see :func:`~pyro_sgmcmc.functional.sghmc`). The
    friction is then free to be chosen for mixing: near :math:`2\sqrt{a_{min}}`, twice the square root
    of the smallest curvature, every direction relaxes at about :math:`\sqrt{a_{min}}` per unit time
    (:math:`h\sqrt{a_{min}}` per step), where SGLD's flattest direction relaxes at
    :math:`\epsilon a_{min}` per step with :math:`\epsilon < 4/a_{max}`.

    :param params: parameters or parameter groups.
    :param lr: the step size :math:`h` (or a callable of the step).
    :param friction: :math:`C > 0` (``1 - e^{-Ch}`` is the momentum lost per step: the
        "1 - momentum" of SGD with momentum).
    :param gradient_noise_variance: :math:`\hat V \ge 0`; must keep
        :math:`h^2\hat V/T^2 < 1 - e^{-2Ch}`.
    :param splitting: ``"euler"`` (the scheme above) or ``"baoab"``.

    ``temperature``, ``nbeta``, ``localization``, ``weight_decay``, ``noise_level``,
    ``bounding_box_size``, ``mask``, ``generator``, ``foreach``, ``diagnostics``, ``distributed`` and
    ``process_group`` are as for
    :class:`~pyro_sgmcmc.samplers.SGMCMCOptimizer`, which also says what a refused step, Ctrl-C,
    ``fork`` and float16 / bfloat16 parameters do.
    With a bounding box, the momentum of an entry that hits the wall is reversed.
    """

    OPTION_CHECKS = {
        **MomentumSampler.OPTION_CHECKS,
        "friction": functools.partial(check_number),
        "gradient_noise_variance": functools.partial(check_number, allow_low=True),
        "splitting": functools.partial(check_choice, choices=SPLITTINGS),
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = required,
        *,
        friction: float = 1.0,
        gradient_noise_variance: float = 0.0,
        splitting: str = "euler",
        temperature: float | Callable[[int], float] | None = None,
        nbeta: float | Callable[[int], float] | None = None,
        localization: float = 0.0,
        weight_decay: float = 0.0,
        noise_level: float = 1.0,
        bounding_box_size: float | None = None,
        mask: list[Tensor | None] | None = None,
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        diagnostics: bool | str = False,
        distributed: str | None = None,
        process_group: Any = None,
    ) -> None:
        defaults = dict(
            lr=lr,
            friction=friction,
            gradient_noise_variance=gradient_noise_variance,
            splitting=splitting,
            temperature=temperature,
            nbeta=nbeta,
            localization=localization,
            weight_decay=weight_decay,
            noise_level=noise_level,
            bounding_box_size=bounding_box_size,
            mask=mask,
        )
        super().__init__(params, defaults, generator=generator, foreach=foreach, diagnostics=diagnostics,
                         distributed=distributed, process_group=process_group)

    def noise_estimate(self, group: dict[str, Any]) -> float:
        """:math:`\\hat B = h \\hat V / (2 T^2)` for the group's current step size (the gradient
        noise it stands for adds :math:`2h\\hat B` to the momentum's variance per step)."""
        variance = group["gradient_noise_variance"]
        if not variance:
            return 0.0
        scale = self.grad_scale(group)
        return group["lr"] * variance * scale * scale / 2  # a product, not ** 2: inf past the float range

    @staticmethod
    def suggest_lr(curvature: float, noise_variance: float, target_bias: float = 0.02, temperature: float = 1.0,
                   arrival: bool = False, friction: float = 1.0, gradient_noise_variance: float = 0.0,
                   splitting: str = "euler", **options: Any) -> float:
        r"""The largest ``h`` whose bias, from the exact stationary variance of the class docstring
        on a Gaussian of largest curvature :math:`\lambda` (``curvature / T``) with gradient noise
        of variance :math:`V` (``noise_variance``), stays within ``t = target_bias`` on the
        variances, with :math:`a = e^{-Ch}`:

        * the flattest directions, cold by :math:`(1 - a)/2 \le t`;
        * the steepest, :math:`((1 + a)/2)/(1 - h^2\lambda/(2(1 + a))) - 1 \le t`;
        * the heat of the gradient noise left unestimated,
          :math:`h^2|V - \hat V|/(T^2(1 - a^2)) \le t`;

        and, whatever the bias: :math:`h\sqrt\lambda \le 1/2` (stable below
        :math:`\sqrt{2(1 + a)}`), :math:`hC \le 1/2`, and :math:`h^2\hat V/T^2 \le \frac34(1 - a^2)`
        (the estimate leaves at least a quarter of the noise to inject). Arriving, only these last
        three (bias costs accuracy, not stability).

        With ``splitting="baoab"`` the first two vanish (its Gaussian stationary law is exact) and
        the third is BAOAB's :math:`h^2(V(1 + a)^2/(4 - h^2\lambda) - \hat V)/(T^2(1 - a^2))`."""
        c = friction
        lam = max(curvature / temperature, 1e-12)
        unestimated = abs(noise_variance - gradient_noise_variance) / temperature**2
        estimated = gradient_noise_variance / temperature**2
        t = target_bias
        baoab = check_choice("splitting", splitting, SPLITTINGS) == "baoab"
        upper = min(0.5 / c, 0.5 / math.sqrt(lam))
        if not arrival and 2 * t < 1 and not baoab:
            upper = min(upper, -math.log1p(-2 * t) / c)  # (1 - a) / 2 <= t

        def fits(h: float) -> bool:
            a, ou = math.exp(-c * h), -math.expm1(-2 * c * h)
            if h * h * estimated > 0.75 * ou:
                return False
            if arrival:
                return True
            if baoab:
                return abs(baoab_heat(h, c, lam, noise_variance / temperature**2, estimated)) <= t
            steep = (1 + a) / 2 / (1 - h * h * lam / (2 * (1 + a))) - 1
            return steep <= t and h * h * unestimated <= t * ou

        if fits(upper):
            return upper
        low, high = 0.0, upper  # each condition holds on an interval [0, h*]
        for _ in range(60):
            mid = 0.5 * (low + high)
            low, high = (mid, high) if fits(mid) else (low, mid)
        return low

    @staticmethod
    def adapted_options(curvature: float, noise_variance: float, temperature: float = 1.0,
                        given: dict[str, Any] | None = None) -> dict[str, Any]:
        r"""The friction :math:`C = \max(1, \sqrt B)` (``B = noise_variance / T^2``) unless given:
        it balances the two biases :math:`hB/(2C)` and :math:`hC/2`, which allows the largest
        step for a given accuracy."""
        if given and "friction" in given:
            return {}
        return {"friction": max(1.0, math.sqrt(max(noise_variance, 0.0)) / temperature)}

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        masks: list[Tensor] | None,
        diagnostics: Diagnostics | None,
        targets: list[Tensor] | None = None,
    ) -> Step:
        estimate = self.noise_estimate(group)
        h, c = group["lr"], group["friction"]
        if h > 0:
            try:
                injected_noise_variance(h, c, estimate)
            except ValueError:
                raise ValueError(
                    f"Invalid gradient_noise_variance: {group['gradient_noise_variance']!r} gives B = h V / (2 T^2) = "
                    f"{estimate:g} at lr={h:g}, but the noise left to inject, 1 - exp(-2 C h) - 2 h B, must stay "
                    f"positive: B must stay below (1 - exp(-2 C h)) / (2 h) = {-math.expm1(-2 * c * h) / (2 * h):g}, "
                    f"a bound below friction={c!r} (lower lr or the variance, or raise the friction)"
                ) from None
        momenta = self._momenta(params, masks)
        step = sghmc_step(
            params if targets is None else targets,
            grads,
            momenta,
            lr=group["lr"],
            friction=group["friction"],
            noise_estimate=estimate,
            splitting=group["splitting"],
            **self.update_options(group, params, masks, diagnostics),
        )
        if targets is None:
            return step
        return self._then(step, lambda: self._detach(momenta))  # keep the sampler's state plain
