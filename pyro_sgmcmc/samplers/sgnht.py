"""SGNHT as a ``torch.optim.Optimizer``."""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from torch.optim.optimizer import required

from ..functional import Diagnostics
from ..functional._step import Step
from ..functional.sgnht import sgnht_step
from .._validation import check_number
from ._momentum import MomentumSampler

__all__ = ["SGNHT"]


class SGNHT(MomentumSampler):
    r"""Stochastic gradient Nosé–Hoover thermostat (Ding et al. 2014).

    Momentum :math:`p`, one scalar thermostat :math:`\xi` per parameter group (:math:`d` free
    entries), step size :math:`h` (``lr``) and diffusion factor :math:`A`:

    .. math::

        p &\leftarrow e^{-\xi h} p - h\nabla\tilde U(\theta) + \sqrt{2Ah}\,\mathcal N(0, I), \qquad
        \theta \leftarrow \theta + h p, \qquad
        \xi \leftarrow \xi + h(p^\top p/d - 1),

    with the new :math:`p` in the last two updates, as in the paper's Algorithm 1 (whose friction
    factor :math:`1 - \xi h` is the first-order expansion of the exact :math:`e^{-\xi h}` used
    here, which stays stable when the thermostat runs hot), and
    :math:`\tilde U = U/T + \frac{\gamma}{2}\|\theta-\theta_0\|^2 + \frac{\lambda}{2}\|\theta\|^2`.
    :math:`\xi` starts at :math:`A`, :math:`p` at a draw from :math:`\mathcal N(0, I)`. The
    thermostat adapts the friction to the (unknown) gradient noise, so :math:`\theta` samples
    :math:`\exp(-\tilde U)`. Because :math:`\theta` moves about :math:`h` per step, :math:`h` is
    comparable to :math:`\sqrt{\epsilon}` of SGLD, not to :math:`\epsilon`.

    ``state_dict()`` holds the momenta (per parameter), the thermostats and step counts (per
    group) and the anchors, so a reloaded chain continues exactly.

    :param params: parameters or parameter groups.
    :param lr: the step size :math:`h` (or a callable of the step).
    :param diffusion_factor: :math:`A > 0`, the injected noise and the thermostat's start.

    ``temperature``, ``nbeta``, ``localization``, ``weight_decay``, ``noise_level``,
    ``bounding_box_size``, ``mask``, ``generator``, ``foreach``, ``diagnostics``, ``distributed`` and
    ``process_group`` are as for
    :class:`~pyro_sgmcmc.samplers.SGMCMCOptimizer`, which also says what a refused step, Ctrl-C,
    ``fork`` and float16 / bfloat16 parameters do.
    With a bounding box, the momentum of an entry that hits the wall is reversed.
    """

    OPTION_CHECKS = {**MomentumSampler.OPTION_CHECKS, "diffusion_factor": functools.partial(check_number)}

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Callable[[int], float] = required,
        *,
        diffusion_factor: float = 1.0,
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
            diffusion_factor=diffusion_factor,
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

    def _init_group(self, group: dict[str, Any]) -> None:
        if "thermostat" not in group:
            first = group["params"][0]
            dtype = torch.promote_types(first.dtype, torch.float32)
            group["thermostat"] = torch.tensor(float(group["diffusion_factor"]), dtype=dtype, device=first.device)

    @staticmethod
    def suggest_lr(curvature: float, noise_variance: float, target_bias: float = 0.02, temperature: float = 1.0,
                   arrival: bool = False, diffusion_factor: float = 1.0, **options: Any) -> float:
        r"""The largest ``h`` with: :math:`h\,\xi/2 \le t` (theta's variance comes out low by
        about that, measured on Gaussians and conjugate models), where the thermostat settles
        near :math:`\xi = A + hB/2` (``B = noise_variance / T^2``); :math:`h\,\xi \le 1/2`
        (the friction factor :math:`1 - \xi h` stays well inside (0, 1)); and
        :math:`h\sqrt{\lambda} \le 1/2` (``lambda = curvature / T``). Arriving, ``t = 1/4``."""
        noise = noise_variance / temperature**2
        a = diffusion_factor

        def largest(bound: float) -> float:  # the h with h (A + h B / 2) = bound
            if noise <= 0:
                return bound / a
            return (-a + math.sqrt(a * a + 2 * noise * bound)) / noise

        t = 0.25 if arrival else target_bias
        return min(largest(2 * t), largest(0.5), 0.5 / math.sqrt(max(curvature / temperature, 1e-12)))

    def reset_auxiliary(self) -> None:
        """Thermostats back to ``A`` and momenta redrawn from ``N(0, I)``. The thermostat cools by
        at most 1 per unit of time (``d xi/dt = p.p/d - 1 >= -1``), so after a large transient
        (a chain started far from the posterior) it stays too high, and the chain too cold, for a
        long time; restarting it once the parameters have arrived heats it back up quickly."""
        for group in self.param_groups:
            group["thermostat"].fill_(float(group["diffusion_factor"]))
        super().reset_auxiliary()

    def _check_group_state(self, saved: dict[str, Any]) -> None:
        thermostat = saved.get("thermostat")
        if not (isinstance(thermostat, Tensor) and thermostat.dim() == 0 and bool(torch.isfinite(thermostat))):
            raise ValueError(f"Invalid thermostat: {thermostat!r} (must be a finite 0-dim tensor)")

    def _after_load(self, group: dict[str, Any]) -> None:
        super()._after_load(group)
        group["thermostat"] = group["thermostat"].to(group["params"][0].device)

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        masks: list[Tensor] | None,
        diagnostics: Diagnostics | None,
        targets: list[Tensor] | None = None,
    ) -> Step:
        num_free = None
        if masks is not None:
            num_free = float(sum(float(m.sum()) for m in masks))
        momenta = self._momenta(params, masks)
        step = sgnht_step(
            params if targets is None else targets,
            grads,
            momenta,
            group["thermostat"],
            lr=group["lr"],
            diffusion_factor=group["diffusion_factor"],
            num_free=num_free,
            **self.update_options(group, params, masks, diagnostics),
        )
        if targets is None:
            return step
        return self._then(step, lambda: (self._detach(momenta), group["thermostat"].detach_()))  # plain state
