r"""The momentum step shared by the second-order samplers (SGHMC, SGNHT), written once.

.. math::

    p &\leftarrow f\,p - h\,\nabla\tilde U(\theta) + \sigma_p\,\mathcal N(0, I) \\
    \theta &\leftarrow \theta + h\,p

with a friction factor :math:`f` (a number, :math:`e^{-Ch}` for SGHMC's fixed friction, or a
0-dim tensor, :math:`e^{-\xi h}` for SGNHT's thermostat) and the momentum noise :math:`\sigma_p` given as
``noise_std`` in the units of the drift (:math:`\sigma_p = h\,` ``noise_std``). Each sampler only
decides :math:`f` and :math:`\sigma_p` and what it does with the kinetic energy.

With ``splitting="baoab"`` the friction and noise act between two half drifts instead (SGHMC's
BAOAB option, Leimkuhler & Matthews 2013; the two half kicks of consecutive steps merged into one,
so that one gradient a step suffices and :math:`\theta` follows BAOAB's path exactly):

.. math::

    q &= p - h\,\nabla\tilde U(\theta), \qquad \theta_{1/2} = \theta + \tfrac h2\, q \\
    p &\leftarrow f\,q + \sigma_p\,\mathcal N(0, I), \qquad \theta \leftarrow \theta_{1/2} + \tfrac h2\, p

How it is computed, per chunk: the drift :math:`\nabla\tilde U` goes into one buffer, the
noise-free momentum :math:`q = f p - h\nabla\tilde U` into the other, and :math:`q` is checked
(:mod:`._step`) before any noise is drawn; then the noise is drawn into the first buffer,
:math:`p \leftarrow q - \sigma_p\xi` is written back and :math:`\theta` moved by :math:`h p`. The
kinetic energy :math:`p^\top p` is one dot over the second buffer.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from ._common import (Diagnostics, clamp_to_box, fill_drift, gather_into, plan_layout, reflect_at_box,
                      sum_of_squares, take)
from ._noise import Chunk, NoisePlanCache, fill
from ._step import Z_MAX, Task, drift_bound, norm


def momentum_tasks(
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
    foreach: bool | None,
    noise_plans: NoisePlanCache | None,
    check_finite: bool,
    diagnostics: Diagnostics | None,
    grads_checked: bool = False,
    kinetic_energy: bool = True,
    splitting: str = "euler",
) -> list[Task]:
    """The tasks of the step above. Each chunk's result is ``(kinetic, parts)``: its share of
    :math:`p^\top p` after the step (a 0-dim tensor in the bucket's dtype or float32 if wider;
    ``None`` without ``kinetic_energy``) and its diagnostics (or ``None``). With a bounding box,
    the momentum of an entry that hits a wall is reversed (an elastic wall) and the entry clamped.
    ``splitting``: ``"euler"`` (the step above) or ``"baoab"`` (see the module docstring)."""
    ops, layout = plan_layout(params, grads, noise_plans, foreach, grads_checked)
    tasks = layout.tasks_of(MomentumTask)
    for task in tasks:
        task.set(ops, params, grads, momenta, anchors, masks, friction, lr, noise_std, grad_scale, localization,
                 weight_decay, bounding_box_size, check_finite, diagnostics, kinetic_energy, splitting == "baoab")
    return tasks


def kinetic_sum(chunk_results: list[tuple[Tensor | None, Any]], like: Tensor) -> Tensor:
    """The chunks' shares of :math:`p^\top p`, added in chunk order, on ``like``'s device in its
    dtype or float32 if wider."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    total = None
    for kinetic, _ in chunk_results:
        kinetic = kinetic.to(device=like.device, dtype=dtype)
        total = kinetic if total is None else total + kinetic
    return total


class MomentumTask(Task):
    """One bucket of a momentum step: :math:`q = f p - h\nabla\tilde U` (BAOAB:
    :math:`q = p - h\nabla\tilde U`, the friction applied after the first half drift) is the
    candidate, in the chunk's second buffer, checked before the noise is drawn into the first."""

    __slots__ = ("params", "momenta", "anchors", "masks", "friction", "h", "noise_std", "grad_scale",
                 "localization", "weight_decay", "bounding_box_size", "diagnostics", "kinetic_energy", "baoab")

    candidate = "spares"

    def set(self, ops, params, grads, momenta, anchors, masks, friction: Tensor | float, h: float, noise_std: float,
            grad_scale: float, localization: float, weight_decay: float, bounding_box_size: float | None,
            check_finite: bool, diagnostics: Diagnostics | None, kinetic_energy: bool, baoab: bool = False) -> None:
        """This step's values (the lists as handed to :func:`momentum_tasks`)."""
        indices = self.indices
        if len(indices) != len(params):
            params, grads, momenta, anchors, masks = (take(indices, t) for t in (params, grads, momenta, anchors, masks))
        first = params[0]
        # a 0-dim tensor even for a number: on the CPU a multi-tensor multiply by a Python number
        # wraps it anew for every tensor (~1.7 us each; by a 0-dim tensor ~0.45 us)
        if isinstance(friction, Tensor):
            friction = friction.to(device=first.device, dtype=first.dtype)
        else:
            friction = torch.tensor(friction, device=first.device, dtype=first.dtype)
        self.ops, self.params, self.grads, self.momenta, self.anchors, self.masks = (ops, params, grads, momenta,
                                                                                     anchors, masks)
        self.friction, self.h, self.noise_std, self.grad_scale = friction, h, noise_std, grad_scale
        self.localization, self.weight_decay, self.bounding_box_size = localization, weight_decay, bounding_box_size
        self.diagnostics, self.kinetic_energy, self.baoab = diagnostics, kinetic_energy, baoab
        self.set_limit(check_finite, h, h * noise_std * Z_MAX, h, localization + weight_decay, localization)

    @property
    def written(self) -> list[Sequence[Tensor]]:
        return [self.params, self.momenta]

    def prepare(self, chunk: Chunk, measure: bool = True) -> tuple[Tensor | None, None]:
        ops, anchors = self.ops, self.anchors
        fill_drift(ops, chunk, chunk.pieces(self.grads, readonly=True), chunk.pieces(self.params),
                   None if anchors is None else chunk.pieces(anchors, readonly=True), self.grad_scale,
                   self.localization, self.weight_decay)
        gather_into(ops, chunk, chunk.spare, chunk.spares, chunk.pieces(self.momenta))
        if not self.baoab:
            chunk.spare.mul_(self.friction)
        if self.masks is None:
            chunk.spare.add_(chunk.flat, alpha=-self.h)  # q = f p - h grad
        else:
            ops.addcmul_(chunk.spares, chunk.noise, chunk.pieces(self.masks, readonly=True), value=-self.h)
        return sum_of_squares(chunk.spare) if measure else None, None

    def bound(self, chunk: Chunk) -> float:
        """:math:`\\|q\\| \\le f\\|p\\| + h\\|\\nabla\\tilde U\\|` (BAOAB: :math:`f = 1` here)."""
        drift = drift_bound(self.ops, chunk, self.grads, self.params, self.anchors, self.grad_scale,
                            self.localization, self.weight_decay)
        return (1.0 if self.baoab else float(self.friction)) * norm(self.ops, chunk.pieces(self.momenta, readonly=True)) + self.h * drift

    def finish(self, chunk: Chunk, context: None, generator: torch.Generator | None
               ) -> tuple[Tensor | None, dict | None]:
        ops, h, diagnostics = self.ops, self.h, self.diagnostics
        thetas, p = chunk.pieces(self.params), chunk.pieces(self.momenta)
        theta0 = None if self.anchors is None else chunk.pieces(self.anchors, readonly=True)
        ms = None if self.masks is None else chunk.pieces(self.masks, readonly=True)
        parts = None
        if self.noise_std:
            fill(chunk.flat, h * self.noise_std, generator)
        elif diagnostics is not None:
            chunk.flat.zero_()
        if diagnostics is not None:
            parts = Diagnostics.before_update(chunk.noise, chunk.pieces(self.grads, readonly=True), thetas, theta0, ms,
                                              h, self.grad_scale, self.localization, self.weight_decay,
                                              noise_scale=1.0)
        if self.baoab:  # the first half drift, then the friction
            ops.add_(thetas, chunk.spares, alpha=h / 2)
            chunk.spare.mul_(self.friction)
        if self.noise_std:
            if ms is None:
                chunk.spare.sub_(chunk.flat)
            else:
                ops.addcmul_(chunk.spares, chunk.noise, ms, value=-1.0)
        kinetic = sum_of_squares(chunk.spare) if self.kinetic_energy else None
        ops.copy_(p, chunk.spares)
        ops.add_(thetas, chunk.spares, alpha=h / 2 if self.baoab else h)
        if self.bounding_box_size is not None:
            reflect_at_box(p, thetas, theta0, self.bounding_box_size)
            clamp_to_box(ops, thetas, theta0, self.bounding_box_size, chunk.noise)
        if parts is not None:
            parts = Diagnostics.after_update(parts, thetas, theta0)
        return kinetic, parts
