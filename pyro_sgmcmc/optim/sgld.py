"""SGLD as a ``torch.optim.Optimizer``."""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from ..functional import Diagnostics, sgld
from torch.optim.optimizer import required

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
    :param temperature, nbeta, localization, weight_decay, noise_level, bounding_box_size, mask,
        generator, foreach, diagnostics: see :class:`~pyro_sgmcmc.optim.base.SGMCMCOptimizer`.
    """

    langevin = True

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = required,
        *,
        temperature: float | Callable[[int], float] | None = None,
        nbeta: float | Callable[[int], float] | None = None,
        localization: float = 0.0,
        weight_decay: float = 0.0,
        noise_level: float = 1.0,
        bounding_box_size: float | None = None,
        mask: list[Tensor | None] | None = None,
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        diagnostics: bool = False,
    ) -> None:
        defaults = dict(
            lr=lr,
            temperature=temperature,
            nbeta=nbeta,
            localization=localization,
            weight_decay=weight_decay,
            noise_level=noise_level,
            bounding_box_size=bounding_box_size,
            mask=mask,
        )
        super().__init__(params, defaults, generator=generator, foreach=foreach, diagnostics=diagnostics)

    @staticmethod
    def suggest_lr(curvature: float, noise_variance: float, target_bias: float = 0.02, temperature: float = 1.0,
                   arrival: bool = False, **options: Any) -> float:
        r"""``4 t / (lambda + B)``: on a Gaussian of curvature :math:`\lambda` (tempered:
        ``curvature / T``), with gradient noise of variance :math:`B` (``noise_variance / T^2``),
        SGLD's stationary variance is :math:`(1 + \epsilon B/4)/(\lambda(1 - \epsilon\lambda/4))`,
        a relative excess of about :math:`\epsilon(\lambda + B)/4`. Arriving: ``1 / lambda``
        (stable below ``4 / lambda``; gradient noise costs accuracy, not stability)."""
        lam = max(curvature / temperature, 1e-12)
        if arrival:
            return 1.0 / lam
        return 4.0 * target_bias / (lam + noise_variance / temperature**2)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        masks: list[Tensor] | None,
        check_finite: bool,
        diagnostics: Diagnostics | None,
        targets: list[Tensor] | None = None,
    ) -> None:
        sgld(
            params if targets is None else targets,
            grads,
            lr=group["lr"],
            **self.update_options(group, params, masks, check_finite, diagnostics),
        )
