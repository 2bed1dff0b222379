"""SGLD as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from torch.optim.optimizer import required

from ..functional import Diagnostics
from ..functional._fused import fused_problem
from ..functional._step import Step
from ..functional.sgld import sgld_step
from .._validation import check_choice, check_number
from .base import SGMCMCOptimizer

__all__ = ["SGLD"]


class SGLD(SGMCMCOptimizer):
    r"""Stochastic gradient Langevin dynamics (Welling & Teh 2011), localized as in Lau et al. (2023).

    .. math::

        \theta \leftarrow \theta - \frac{\epsilon}{2}\Big(\frac{1}{T}\nabla U(\theta)
            + \gamma(\theta - \theta_0) + \lambda\theta\Big) + \sigma\sqrt{\epsilon}\,\mathcal N(0, I)

    samples :math:`\pi(\theta) \propto \exp(-U/T - \frac{\gamma}{2}\|\theta-\theta_0\|^2 -
    \frac{\lambda}{2}\|\theta\|^2)` up to a bias of order :math:`\epsilon` (for a Gaussian target of
    precision :math:`P` the chain's stationary covariance is exactly :math:`(P - \epsilon P^2/4)^{-1}`).
    ``U`` is the loss whose gradient is in ``p.grad``: a summed negative log joint (in Pyro, the
    ELBO loss or the potential energy, already scaled by ``N/m`` in subsampled plates).

    Converting from peers: devinterp's ``nbeta`` is ours (``1/T`` for a summed loss);
    posteriors' ``lr`` multiplies :math:`\nabla\log p` without the 1/2, so theirs is ``lr / 2``
    of ours at ``T = 1``. With ``noise_level=0`` and ``T = 1`` this is exactly
    ``torch.optim.SGD(lr=lr / 2)``.

    **Exact on a reference Gaussian.** With ``reference_curvature`` :math:`c > 0` the injected
    noise is scaled down to

    .. math:: \sigma^2 = 1 - \frac{\epsilon}{4}\Big(c + \frac{\hat V}{T^2}\Big)

    (times ``noise_level``), with :math:`\hat V` the per-entry variance of the gradient noise
    (``gradient_noise_variance``, of the gradient in ``p.grad``). On a Gaussian target whose
    tempered curvature is :math:`c` in every direction, with gradient noise of variance
    :math:`\hat V`, the chain is then exact at every step size :math:`\epsilon < 4/c`, not just
    as :math:`\epsilon \to 0`: its stationary variance is
    :math:`(1 - \frac{\epsilon}{4}(c - \lambda) + \frac{\epsilon}{4}\frac{V-\hat V}{T^2})/(\lambda(1 - \epsilon\lambda/4))`
    for curvature :math:`\lambda` and noise variance :math:`V`, a relative bias of about
    :math:`\frac{\epsilon}{4}(|\lambda - c| + |V - \hat V|/T^2)` instead of
    :math:`\frac{\epsilon}{4}(\lambda + V/T^2)`. With :math:`a = \epsilon c/2` it is the
    exponential (Ornstein-Uhlenbeck) integrator of the Langevin diffusion linearised around that
    Gaussian, and the Crank-Nicolson Langevin proposal of Cotter et al. (2013), whose drift and
    noise are :math:`a` and :math:`a(2-a)`; at :math:`\epsilon = 2/c` each step is an independent
    draw from the reference Gaussian. It pays off in preconditioned coordinates where the
    posterior is close to :math:`\mathcal N(\cdot, I/c)` (an MCMC kernel whitening with the
    Hessian: ``exact_gaussian=True`` of :mod:`pyro_sgmcmc.infer`), where the step size is then
    limited by how far the posterior is from Gaussian, not by its curvature.

    References: S. L. Cotter, G. O. Roberts, A. M. Stuart and D. White, "MCMC methods for
    functions: modifying old algorithms to make them faster", Statistical Science 2013.

    Example::

        >>> model = torch.nn.Linear(3, 1)
        >>> sampler = SGLD(model.parameters(), lr=1e-4, temperature=1.0)
        >>> for x, y in batches:                        # doctest: +SKIP
        ...     sampler.zero_grad()
        ...     loss = n_data / len(x) * ((model(x) - y) ** 2).sum() / 2
        ...     loss.backward()
        ...     sampler.step()

    :param params: parameters or parameter groups, as for any torch optimizer.
    :param lr: the step size :math:`\epsilon` (or a callable of the step).
    :param reference_curvature: :math:`c \ge 0` (0: plain SGLD), the tempered curvature of the
        Gaussian sampled exactly; must keep :math:`\sigma^2 > 0`.
    :param gradient_noise_variance: :math:`\hat V \ge 0`, subtracted from the injected noise
        (only with ``reference_curvature`` or alone: it then removes the O(lr) heat of the
        gradient noise).

    :param fused: ``True`` for the fused step on CUDA: one Triton kernel per device and dtype
        reads each parameter and gradient once, generates the noise in registers
        (Philox-4x32-10, seeded at each step from the generator the eager step draws from, so
        ``torch.manual_seed`` and a saved generator state reproduce it) and writes each
        parameter once: 16 bytes per float32 parameter with the check that refuses a non-finite
        step before anything is written (4 of them), against 12 for
        ``torch.optim.SGD(foreach=True)`` (:mod:`pyro_sgmcmc.functional._fused` says where the
        bytes go). The numbers differ from the eager step's, the law is the same up to float32
        resolution and a clamp at 5.68 standard deviations (:mod:`pyro_sgmcmc.functional._fused`).
        Like torch's fused optimizers it is refused, at construction and for every group added,
        where it cannot run: parameters off CUDA, Triton missing or older than 3.0,
        ``foreach=True``, ``diagnostics``, ``noise_ahead``, or a differentiable step
        (``step_tensors``, Pyro's ``get_step``). ``None`` (default) or ``False``: the eager step.

    ``temperature``, ``nbeta``, ``localization``, ``weight_decay``, ``noise_level``,
    ``bounding_box_size``, ``mask``, ``generator``, ``foreach``, ``diagnostics``, ``distributed``,
    ``process_group`` and ``noise_ahead`` are as for
    :class:`~pyro_sgmcmc.samplers.SGMCMCOptimizer`, which also says what a refused step, Ctrl-C,
    ``fork`` and float16 / bfloat16 parameters do.
    """

    langevin = True

    OPTION_CHECKS = {
        **SGMCMCOptimizer.OPTION_CHECKS,
        "reference_curvature": functools.partial(check_number, allow_low=True),
        "gradient_noise_variance": functools.partial(check_number, allow_low=True),
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = required,
        *,
        reference_curvature: float = 0.0,
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
        distributed: str | None = None,
        process_group: Any = None,
        noise_ahead: bool = False,
        fused: bool | None = None,
    ) -> None:
        self.fused = check_choice("fused", fused, (None, True, False))
        defaults = dict(
            lr=lr,
            reference_curvature=reference_curvature,
            gradient_noise_variance=gradient_noise_variance,
            temperature=temperature,
            nbeta=nbeta,
            localization=localization,
            weight_decay=weight_decay,
            noise_level=noise_level,
            bounding_box_size=bounding_box_size,
            mask=mask,
        )
        super().__init__(params, defaults, generator=generator, foreach=foreach, diagnostics=diagnostics,
                         distributed=distributed, process_group=process_group, noise_ahead=noise_ahead)

    def _check_sampler_options(self, **options: Any) -> None:
        if self.fused:
            clash = [f"{name}={value!r}" for name, value in options.items() if value not in (None, False)]
            if clash:
                raise ValueError(f"Invalid fused: True with {', '.join(clash)} (the fused step takes none of them: "
                                 "one kernel, no parts to report, no noise drawn ahead; use fused=None)")

    def _validate_group(self, group: dict[str, Any]) -> None:
        super()._validate_group(group)
        if self.fused:
            problem = fused_problem(group["params"])
            if problem is not None:
                raise ValueError(f"Invalid fused: True (in param_groups[{len(self.param_groups) - 1}], {problem}; "
                                 "use fused=None)")

    def noise_variance_factor(self, group: dict[str, Any]) -> float:
        r""":math:`\sigma^2 / \text{noise\_level}^2 = 1 - \epsilon(c + \hat V/T^2)/4` at the
        group's current step size (1 for plain SGLD); an error if it is not positive."""
        c, v = group["reference_curvature"], group["gradient_noise_variance"]
        if not c and not v:
            return 1.0
        scale = self.grad_scale(group)
        factor = 1.0 - group["lr"] * (c + v * scale * scale) / 4  # a product, not ** 2: inf past the float range
        if factor <= 0:
            raise ValueError(
                f"Invalid lr: {group['lr']:g} with reference_curvature={c!r} and gradient_noise_variance={v!r} "
                f"leaves no noise to inject (lr * (c + V / T^2) / 4 = {1 - factor:g} must stay below 1)"
            )
        return factor

    def proposal_noise_variance(self, group: dict[str, Any]) -> float:
        return super().proposal_noise_variance(group) * self.noise_variance_factor(group)

    @staticmethod
    def suggest_lr(curvature: float, noise_variance: float, target_bias: float = 0.02, temperature: float = 1.0,
                   arrival: bool = False, *, smallest_curvature: float = 0.0, reference_curvature: float = 0.0,
                   gradient_noise_variance: float = 0.0, **options: Any) -> float:
        r"""Plain SGLD: ``4 t / (lambda + B)``: on a Gaussian of curvature :math:`\lambda` (tempered:
        ``curvature / T``), with gradient noise of variance :math:`B` (``noise_variance / T^2``),
        SGLD's stationary variance is :math:`(1 + \epsilon B/4)/(\lambda(1 - \epsilon\lambda/4))`,
        a relative excess of about :math:`\epsilon(\lambda + B)/4`. Arriving: ``1 / lambda``
        (stable below ``4 / lambda``; gradient noise costs accuracy, not stability).

        With ``reference_curvature`` :math:`c`: the relative error is at most
        :math:`\epsilon D/(4(1 - \epsilon\lambda/4))` with
        :math:`D = \max(\lambda - c, c - \lambda_{min}) + |B - \hat B|` over the curvatures from
        ``smallest_curvature`` to ``curvature`` (tempered), so :math:`\epsilon = 4t/(D + t\lambda)`,
        at most :math:`2/\max(\lambda, c)` (beyond it steps anti-correlate and the bias grows
        fast)."""
        lam = max(curvature / temperature, 1e-12)
        if arrival:
            return 1.0 / lam
        noise = noise_variance / temperature**2
        if not reference_curvature:
            return 4.0 * target_bias / (lam + noise)
        c = reference_curvature
        smallest = max(smallest_curvature / temperature, 0.0)
        spread = max(lam - c, c - smallest, 0.0) + abs(noise - gradient_noise_variance / temperature**2)
        lr = min(4.0 * target_bias / (spread + target_bias * lam), 2.0 / max(lam, c))
        # keep sigma^2 = 1 - lr (c + V_hat / T^2) / 4 at least 1/4
        return min(lr, 3.0 / (c + gradient_noise_variance / temperature**2))

    def typical_move(self, group: dict[str, Any]) -> float:
        return super().typical_move(group) * math.sqrt(self.noise_variance_factor(group))

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        masks: list[Tensor] | None,
        diagnostics: Diagnostics | None,
        targets: list[Tensor] | None = None,
    ) -> Step:
        if self.fused and targets is not None:
            raise ValueError("Invalid fused: True for a differentiable step (step_tensors, Pyro's get_step: the "
                             "fused kernel has no derivative; use fused=None)")
        return sgld_step(
            params if targets is None else targets,
            grads,
            lr=group["lr"],
            fused=bool(self.fused),
            **self.update_options(group, params, masks, diagnostics),
        )

    def update_options(self, group: dict[str, Any], params: list[Tensor], masks: list[Tensor] | None,
                       diagnostics: Diagnostics | None) -> dict[str, Any]:
        options = super().update_options(group, params, masks, diagnostics)
        factor = self.noise_variance_factor(group)
        if factor != 1.0:
            options["noise_level"] = options["noise_level"] * math.sqrt(factor)
        return options
