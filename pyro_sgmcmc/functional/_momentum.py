r"""The momentum step shared by the second-order samplers (SGHMC, SGNHT), written once.

.. math::

    p &\leftarrow f\,p - h\,\nabla\tilde U(\theta) + \sigma_p\,\mathcal N(0, I) \\
    \theta &\leftarrow \theta + h\,p

with a friction factor :math:`f` (a number, :math:`e^{-Ch}` for SGHMC's fixed friction, or a
0-dim tensor, :math:`e^{-\xi h}` for SGNHT's thermostat) and the momentum noise :math:`\sigma_p` given as
``noise_std`` in the units of the drift (the buffer is applied with factor :math:`h`). Each sampler
only decides :math:`f` and :math:`\sigma_p` and what it does with the kinetic energy returned.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ._common import (Diagnostics, check_buffer, chunk_sum_of_squares, clamp_to_box, fill_drift, plan_buckets,
                      reflect_at_box, take)
from ._noise import Chunk, NoisePlanCache, NoiseSource


def momentum_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    momenta: Sequence[Tensor],
    friction: Tensor | float,
    *,
    lr: float,
    noise_std: float,
    grad_scale: float,
    localization: float,
    weight_decay: float,
    anchors: Sequence[Tensor] | None,
    masks: Sequence[Tensor] | None,
    bounding_box_size: float | None,
    noise: NoiseSource,
    foreach: bool | None,
    noise_plans: NoisePlanCache | None,
    check_finite: bool,
    diagnostics: Diagnostics | None,
    grads_checked: bool = False,
    kinetic_energy: bool = True,
) -> Tensor | None:
    """Apply the step above in place; return :math:`p^\\top p` after it (a 0-dim tensor on the
    first parameter's device, in its dtype or float32 if wider), or ``None`` without
    ``kinetic_energy``. With a bounding box, the momentum of an entry that hits a wall is
    reversed (an elastic wall) and the entry clamped."""
    h = lr
    kinetic = None
    first = params[0]
    kinetic_dtype = torch.promote_types(first.dtype, torch.float32)
    ops, work = plan_buckets(params, grads, noise_plans, check_finite, foreach, grads_checked)
    for indices, plan, check_in_buffer, gates in work:
        ps, gs_all, moms = take(indices, params), take(indices, grads), take(indices, momenta)
        theta0_all, masks_all = take(indices, anchors), take(indices, masks)
        # a 0-dim tensor even for a number: on the CPU a multi-tensor multiply by a Python number
        # wraps it anew for every tensor (~1.7 us each; by a 0-dim tensor ~0.45 us)
        if isinstance(friction, Tensor):
            bucket_friction = friction.to(device=ps[0].device, dtype=ps[0].dtype)
        else:
            bucket_friction = torch.tensor(friction, device=ps[0].device, dtype=ps[0].dtype)

        def update(chunk: Chunk) -> tuple[Tensor, dict | None]:
            thetas, gs, p = chunk.pieces(ps), chunk.pieces(gs_all, readonly=True), chunk.pieces(moms)
            theta0 = chunk.pieces(theta0_all, readonly=True) if theta0_all is not None else None
            ms = chunk.pieces(masks_all, readonly=True) if masks_all is not None else None
            parts = None
            if diagnostics is not None:
                parts = Diagnostics.before_update(chunk, gs, thetas, theta0, ms, h, grad_scale, localization,
                                                  weight_decay)
            fill_drift(ops, chunk, gs, thetas, theta0, grad_scale, localization, weight_decay)
            if check_in_buffer:
                check_buffer(chunk)
            ops.mul_(p, bucket_friction)
            if ms is None:
                ops.add_(p, chunk.noise, alpha=-h)
            else:
                ops.addcmul_(p, chunk.noise, ms, value=-h)
            ops.add_(thetas, p, alpha=h)
            if bounding_box_size is not None:
                reflect_at_box(p, thetas, theta0, bounding_box_size)
                clamp_to_box(ops, thetas, theta0, bounding_box_size, chunk.noise)
            if parts is not None:
                parts = Diagnostics.after_update(parts, thetas, theta0)
            return (chunk_sum_of_squares(ops, chunk, p) if kinetic_energy else None), parts

        for chunk_kinetic, parts in noise.run(plan, noise_std, update, gates):
            if kinetic_energy:
                chunk_kinetic = chunk_kinetic.to(device=first.device, dtype=kinetic_dtype)
                kinetic = chunk_kinetic if kinetic is None else kinetic + chunk_kinetic
            if parts is not None:
                diagnostics.add(parts)
    return kinetic
