"""Preconditioned SGLD (RMSprop preconditioner) as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim.optimizer import required

from ..functional import Diagnostics
from ..functional._step import Step
from ..functional.psgld import psgld_step
from .._validation import check_flag, check_number
from .base import SGMCMCOptimizer
from .sgld import SGLD

__all__ = ["PSGLD"]


class PSGLD(SGMCMCOptimizer):
    r"""Preconditioned SGLD with an RMSprop preconditioner (Li, Chen, Carlson & Carin 2016).

    .. math::

        V \leftarrow \alpha V + (1-\alpha)\,g\odot g, \quad G = 1/(\lambda_G + \sqrt V), \quad
        \theta \leftarrow \theta - \frac{\epsilon}{2} G\odot\nabla\tilde U(\theta)
            + \sqrt{\epsilon G}\odot\mathcal N(0, I)

    with :math:`g = \nabla U/T` (the tempered gradient in ``p.grad``) and
    :math:`\tilde U = U/T + \frac{\gamma}{2}\|\theta-\theta_0\|^2 + \frac{\lambda}{2}\|\theta\|^2`.
    Each coordinate gets a step size in the units of its own gradient scale, so a badly scaled
    posterior (a prior-only N(0, 1) site next to a sharply identified one) mixes with one ``lr``.
    :math:`V` starts at :math:`g\odot g` of the first step (no start-up transient). Far from the
    posterior, where the gradient dominates :math:`V`, :math:`G \approx 1/|g|` and each coordinate
    moves like sign-SGD, about :math:`\epsilon/2` per step, whatever the curvature: arrival from a
    start at distance :math:`r` takes some :math:`2r/\epsilon` steps (budget the burn-in for it).

    The paper's correction term :math:`\frac{\epsilon}{2}\Gamma(\theta)` is left out (as in the
    paper's experiments). With the preconditioner frozen (``adapt_preconditioner=False``, or
    :meth:`freeze_adaptation`, which the MCMC kernels call at the end of warmup) this is SGLD with
    a fixed diagonal preconditioner and keeps its target exactly, up to SGLD's O(lr) bias
    (tested against the exact stationary law). While :math:`V` adapts, :math:`G` follows the chain
    (small where the chain has lately been far out, so it lingers there) and the missing term
    shows: on a Gaussian with precisions 1, 4 and 25, exact gradients and
    :math:`\epsilon\sqrt{\lambda_{\max}} = 0.1`, the variances come out high by 54-77% with
    ``alpha = 0.9``, 12-32% with ``alpha = 0.99`` and 3-5% with ``alpha = 0.999``. When minibatch noise dominates :math:`V` (the usual case for big data),
    :math:`V` hardly depends on :math:`\theta` and this bias vanishes into SGLD's own noise bias
    :math:`\epsilon G B/4` (measured with gradient noise of variance 100: the same variances, within
    2%, for all three ``alpha``). For unbiased samples: adapt during burn-in, then freeze.

    :param params: parameters or parameter groups.
    :param lr: the step size :math:`\epsilon` (or a callable of the step).
    :param alpha: :math:`\alpha \in [0, 1)`, the decay of the squared-gradient average.
    :param eps: :math:`\lambda_G > 0`, keeps :math:`G` bounded where gradients vanish.
    :param adapt_preconditioner: update :math:`V` at every step (else keep it as it is).
    :param initial_square_average: where :math:`V` starts (default: :math:`g\odot g` of the first
        step). The MCMC kernels start it at its stationary value for the curvature and gradient
        noise they measured: far from the posterior the first gradient is huge, and a :math:`V`
        started there shrinks the steps for hundreds of iterations.

    ``temperature``, ``nbeta``, ``localization``, ``weight_decay``, ``noise_level``,
    ``bounding_box_size``, ``mask``, ``generator``, ``foreach``, ``diagnostics``, ``distributed`` and
    ``process_group`` are as for
    :class:`~pyro_sgmcmc.samplers.SGMCMCOptimizer`, which also says what a refused step, Ctrl-C,
    ``fork`` and float16 / bfloat16 parameters do.
    """

    langevin = True

    OPTION_CHECKS = {
        **SGMCMCOptimizer.OPTION_CHECKS,
        "alpha": functools.partial(check_number, allow_low=True, high=1.0),
        "eps": functools.partial(check_number),
        "adapt_preconditioner": check_flag,
        "initial_square_average": functools.partial(check_number, allow_low=True, none_ok=True),
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = required,
        *,
        alpha: float = 0.99,
        eps: float = 1e-5,
        adapt_preconditioner: bool = True,
        initial_square_average: float | None = None,
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
            alpha=alpha,
            eps=eps,
            adapt_preconditioner=adapt_preconditioner,
            initial_square_average=initial_square_average,
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

    @staticmethod
    def suggest_lr(curvature: float, noise_variance: float, target_bias: float = 0.02, temperature: float = 1.0,
                   arrival: bool = False, **options: Any) -> float:
        r"""SGLD's rule for the preconditioned step :math:`\epsilon G`, with :math:`G` what the
        preconditioner settles at on such a target: :math:`1/\sqrt{E[g^2]} = 1/\sqrt{\lambda + B}`
        (``lambda = curvature / T``, ``B = noise_variance / T^2``)."""
        expected_square = curvature / temperature + noise_variance / temperature**2
        return SGLD.suggest_lr(curvature, noise_variance, target_bias, temperature, arrival) * max(
            expected_square, 1e-12) ** 0.5

    @staticmethod
    def adapted_options(curvature: float, noise_variance: float, temperature: float = 1.0,
                        given: dict[str, Any] | None = None) -> dict[str, Any]:
        r""":math:`V` starts at :math:`E[g^2] = \lambda + B` (``lambda = curvature / T``,
        ``B = noise_variance / T^2``), its stationary value on such a target, unless given."""
        if given and "initial_square_average" in given:
            return {}
        return {"initial_square_average": curvature / temperature + max(noise_variance, 0.0) / temperature**2}

    def freeze_adaptation(self) -> None:
        """Stop updating the preconditioner: from here on the chain is SGLD with a fixed
        preconditioner, which keeps its target."""
        for group in self.param_groups:
            group["adapt_preconditioner"] = False

    def proposal_preconditioner(self, param: Tensor) -> Tensor | None:
        """:math:`G` of ``param`` as it stands (``None`` before its first step): that of the
        last step, until the next one updates :math:`V`."""
        square_avg = self.state[param].get("square_avg")
        if square_avg is None:
            return None
        group = next(g for g in self.param_groups if any(p is param for p in g["params"]))
        return 1.0 / (square_avg.sqrt() + group["eps"])

    def _square_avgs(self, group: dict[str, Any], params: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
        """Each parameter's :math:`V`, started at :math:`(g/T)^2` at its first step (so that the
        first update, :math:`\\alpha V + (1 - \\alpha) g^2`, leaves it there; dropped again if that
        step is refused)."""
        scale = self.grad_scale(group)
        out = []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "square_avg" not in state:
                initial = group["initial_square_average"]
                if initial is None:
                    state["square_avg"] = (g.detach() * scale).square().to(memory_format=torch.contiguous_format)
                else:
                    state["square_avg"] = torch.full_like(p, initial, memory_format=torch.contiguous_format)
                self._remember_fresh(state, "square_avg")
            out.append(state["square_avg"])
        return out

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        masks: list[Tensor] | None,
        diagnostics: Diagnostics | None,
        targets: list[Tensor] | None = None,
    ) -> Step:
        square_avgs = self._square_avgs(group, params, grads)
        step = psgld_step(
            params if targets is None else targets,
            grads,
            square_avgs,
            lr=group["lr"],
            alpha=group["alpha"],
            eps=group["eps"],
            update_preconditioner=group["adapt_preconditioner"],
            **self.update_options(group, params, masks, diagnostics),
        )
        if targets is None:
            return step
        return self._then(step, lambda: [v.detach_() for v in square_avgs])  # keep the sampler's state plain
