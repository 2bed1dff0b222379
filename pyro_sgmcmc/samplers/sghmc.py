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
from ..functional.sghmc import sghmc_step
from .._validation import check_number
from ._momentum import MomentumSampler

__all__ = ["SGHMC"]


class SGHMC(MomentumSampler):
    r"""Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014).

    Momentum :math:`p` (identity mass), step size :math:`h` (``lr``), friction :math:`C`:

    .. math::

        p \leftarrow e^{-Ch} p - h\nabla\tilde U(\theta) + \sqrt{2(C - \hat B)h}\,\mathcal N(0, I),
        \qquad \theta \leftarrow \theta + h p,

    with :math:`\tilde U = U/T + \frac{\gamma}{2}\|\theta-\theta_0\|^2 + \frac{\lambda}{2}\|\theta\|^2`
    and :math:`\hat B = h\,\hat V/(2T^2)` the diffusion that a stochastic gradient of per-entry
    variance :math:`\hat V` (``gradient_noise_variance``, of the gradient in ``p.grad``) already
    injects. The paper's friction factor :math:`1 - Ch` is replaced by the exact :math:`e^{-Ch}`
    (the same to first order, stable for any :math:`Ch`), as in :class:`~pyro_sgmcmc.samplers.SGNHT`,
    which is this sampler with the friction adapted by a thermostat.

    Bias, with :math:`\hat V = 0` and true gradient noise :math:`V`: the chain runs hot by a relative
    :math:`hV/(2CT^2)` on the variances (the thermostat of SGNHT removes this); the discretisation
    makes the variances low by about :math:`hC/2`. ``h`` moves :math:`\theta` by about ``h`` per step,
    so it compares with :math:`\sqrt\epsilon` of SGLD.

    :param params: parameters or parameter groups.
    :param lr: the step size :math:`h` (or a callable of the step).
    :param friction: :math:`C > 0` (``1 - e^{-Ch}`` is the momentum lost per step: the
        "1 - momentum" of SGD with momentum).
    :param gradient_noise_variance: :math:`\hat V \ge 0`; must keep :math:`\hat B < C`.
    :param temperature, nbeta, localization, weight_decay, noise_level, bounding_box_size, mask,
        generator, foreach, diagnostics: see :class:`~pyro_sgmcmc.samplers.SGMCMCOptimizer`, which also
        says what a refused step, Ctrl-C, ``fork`` and float16 / bfloat16 parameters do.
        With a bounding box, the momentum of an entry that hits the wall is reversed.
    """

    OPTION_CHECKS = {
        **MomentumSampler.OPTION_CHECKS,
        "friction": functools.partial(check_number),
        "gradient_noise_variance": functools.partial(check_number, allow_low=True),
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = required,
        *,
        friction: float = 1.0,
        gradient_noise_variance: float = 0.0,
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
    ) -> None:
        defaults = dict(
            lr=lr,
            friction=friction,
            gradient_noise_variance=gradient_noise_variance,
            temperature=temperature,
            nbeta=nbeta,
            localization=localization,
            weight_decay=weight_decay,
            noise_level=noise_level,
            bounding_box_size=bounding_box_size,
            mask=mask,
        )
        super().__init__(params, defaults, generator=generator, foreach=foreach, diagnostics=diagnostics)

    def noise_estimate(self, group: dict[str, Any]) -> float:
        """:math:`\\hat B = h \\hat V / (2 T^2)` for the group's current step size."""
        variance = group["gradient_noise_variance"]
        if not variance:
            return 0.0
        scale = self.grad_scale(group)
        return group["lr"] * variance * scale * scale / 2  # a product, not ** 2: inf past the float range

    @staticmethod
    def suggest_lr(curvature: float, noise_variance: float, target_bias: float = 0.02, temperature: float = 1.0,
                   arrival: bool = False, friction: float = 1.0, **options: Any) -> float:
        r"""The largest ``h`` with :math:`hC/2 \le t` (discretisation), :math:`hB/(2C) \le t`
        (the heat of the gradient noise, ``B = noise_variance / T^2``), :math:`hC \le 1/2` and
        :math:`h\sqrt\lambda \le 1/2` (``lambda = curvature / T``). Arriving, ``t = 1/4`` and no
        bound from the noise (its heat costs accuracy, not stability)."""
        t = 0.25 if arrival else target_bias
        noise = noise_variance / temperature**2
        bounds = [2 * t / friction, 0.5 / friction, 0.5 / math.sqrt(max(curvature / temperature, 1e-12))]
        if noise > 0 and not arrival:
            bounds.append(2 * t * friction / noise)
        return min(bounds)

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
        if estimate >= group["friction"]:
            raise ValueError(
                f"Invalid gradient_noise_variance: {group['gradient_noise_variance']!r} gives B = h V / (2 T^2) = "
                f"{estimate:g} at lr={group['lr']:g}, which must stay below friction={group['friction']!r} "
                "(lower lr or the variance, or raise the friction)"
            )
        momenta = self._momenta(params, masks)
        step = sghmc_step(
            params if targets is None else targets,
            grads,
            momenta,
            lr=group["lr"],
            friction=group["friction"],
            noise_estimate=estimate,
            **self.update_options(group, params, masks, diagnostics),
        )
        if targets is None:
            return step
        return self._then(step, lambda: self._detach(momenta))  # keep the sampler's state plain
