r"""Preconditioned SGLD (RMSprop preconditioner): the update rule, written once.

Li, Chen, Carlson & Carin (2016), Algorithm 1, with step size :math:`\epsilon`, decay
:math:`\alpha`, regulariser :math:`\lambda_G` and :math:`g = \nabla U / T` (the tempered
stochastic gradient):

.. math::

    V &\leftarrow \alpha V + (1 - \alpha)\, g \odot g \\
    G &= 1 / (\lambda_G + \sqrt V) \\
    \theta &\leftarrow \theta - \frac{\epsilon}{2}\, G \odot \nabla\tilde U(\theta)
        + \sigma\sqrt{\epsilon\, G} \odot \mathcal N(0, I)

with :math:`\nabla\tilde U = \nabla U/T + \gamma(\theta - \theta_0) + \lambda\theta`. The paper's
correction term :math:`\frac{\epsilon}{2}\Gamma`, :math:`\Gamma_i = \sum_j \partial G_{ij}/\partial\theta_j`,
is left out, as in the paper's experiments: :math:`V` is a running average of past gradients, not
a function of the current :math:`\theta`, and the term is small when :math:`V` changes slowly
(:math:`\alpha` near 1). With ``update_preconditioner=False`` :math:`V` is frozen and this is
exactly SGLD with the fixed preconditioner :math:`M = \mathrm{diag}(G)`, which keeps its target;
while :math:`V` adapts, the bias measured on Gaussian targets is given in
:class:`pyro_sgmcmc.samplers.PSGLD`.

How it is computed: per noise chunk, the new :math:`V` and :math:`D = \lambda_G + \sqrt V`
(chunk-sized temporaries, never full-size), the drift over :math:`D` in one buffer, checked
before any noise is drawn (:mod:`._step`); then the noise (scaled by
:math:`2\sigma/\sqrt\epsilon`) over :math:`\sqrt D` is added, :math:`V` written back and the buffer
applied as :math:`\theta \leftarrow \theta - \frac{\epsilon}{2} b`. A gradient entry so large that
:math:`g^2` overflows (beyond ~1e19 in float32) saturates its :math:`V` at infinity: :math:`G = 0`
freezes that entry from then on (the parameter stays finite).

Reference:
    C. Li, C. Chen, D. Carlson and L. Carin, "Preconditioned stochastic gradient Langevin dynamics
    for deep neural networks", AAAI 2016.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ._common import Diagnostics, apply_buffer, fill_drift, plan_layout, sum_of_squares, take
from ._noise import Chunk, NoisePlanCache, NoiseSource, fill
from ._step import Z_MAX, Step, Task, drift_bound, gathered, run


def psgld(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    *,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    **options: Any,
) -> None:
    r"""Apply one preconditioned SGLD step to ``params`` (and ``square_avgs``) in place.

    ``anchors``, ``masks``, ``bounding_box_size``, ``generator``, ``noise``, ``foreach``,
    ``noise_plans``, ``check_finite``, ``diagnostics`` and ``grads_checked`` are as for
    :func:`~pyro_sgmcmc.functional.sgld`.

    :param params: the parameters :math:`\theta`.
    :param grads: :math:`\nabla U(\theta)` (not modified).
    :param square_avgs: :math:`V`, shaped like ``params``.
    :param lr: the step size :math:`\epsilon \ge 0`; 0 leaves everything untouched.
    :param alpha: :math:`\alpha \in [0, 1)`, the decay of :math:`V` (0 replaces :math:`V` by
        :math:`g \odot g`: how a sampler starts :math:`V` at its first step).
    :param eps: :math:`\lambda_G > 0`, keeps :math:`G` bounded where :math:`V` is tiny.
    :param update_preconditioner: update :math:`V` with this gradient (else it is frozen).
    :param grad_scale: :math:`1/T`, or ``nbeta`` for a mean-reduced loss.
    :param localization: :math:`\gamma`, strength of the pull toward ``anchors``.
    :param weight_decay: :math:`\lambda`, strength of the pull toward 0.
    :param noise_level: :math:`\sigma` (1 samples the target).

    Every keyword but ``generator`` and ``noise`` is passed on to :func:`psgld_step`.
    """
    run(psgld_step(params, grads, square_avgs, **options), noise or NoiseSource(generator))


def psgld_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    square_avgs: Sequence[Tensor],
    *,
    lr: float,
    alpha: float = 0.99,
    eps: float = 1e-5,
    update_preconditioner: bool = True,
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
) -> Step:
    """The :class:`~pyro_sgmcmc.functional._step.Step` of :func:`psgld` (same arguments)."""
    if lr == 0.0 or not params:
        return [], None
    step_size = lr / 2
    noise_std = 2.0 * noise_level / math.sqrt(lr)  # the buffer is applied with factor lr / 2
    ops, layout = plan_layout(params, grads, noise_plans, foreach, grads_checked)
    tasks = layout.tasks_of(PSGLDTask)
    for task in tasks:
        task.set(ops, params, grads, square_avgs, anchors, masks, step_size, noise_std, alpha, eps,
                 update_preconditioner, grad_scale, localization, weight_decay, bounding_box_size, check_finite,
                 diagnostics)
    return tasks, (None if diagnostics is None else lambda results: diagnostics.add_chunks(gathered(results)))


class PSGLDTask(Task):
    """One bucket of a PSGLD step: the preconditioned drift :math:`G\nabla\tilde U` (with the
    new :math:`V` in temporaries) is the candidate, checked before the noise is drawn."""

    __slots__ = ("params", "square_avgs", "anchors", "masks", "step_size", "noise_std", "alpha", "eps",
                 "update_preconditioner", "grad_scale", "localization", "weight_decay", "bounding_box_size",
                 "diagnostics")

    def set(self, ops, params, grads, square_avgs, anchors, masks, step_size: float, noise_std: float, alpha: float,
            eps: float, update_preconditioner: bool, grad_scale: float, localization: float, weight_decay: float,
            bounding_box_size: float | None, check_finite: bool, diagnostics: Diagnostics | None) -> None:
        """This step's values (the lists as handed to :func:`psgld`)."""
        indices = self.indices
        if len(indices) != len(params):
            params, grads, square_avgs, anchors, masks = (take(indices, t)
                                                          for t in (params, grads, square_avgs, anchors, masks))
        self.ops, self.params, self.grads, self.square_avgs = ops, params, grads, square_avgs
        self.anchors, self.masks, self.step_size, self.noise_std = anchors, masks, step_size, noise_std
        self.alpha, self.eps, self.update_preconditioner = alpha, eps, update_preconditioner
        self.grad_scale, self.localization, self.weight_decay = grad_scale, localization, weight_decay
        self.bounding_box_size, self.diagnostics = bounding_box_size, diagnostics
        self.set_limit(check_finite, step_size, noise_std * Z_MAX / math.sqrt(eps), step_size,
                       localization + weight_decay, localization, (1.0 - alpha) * grad_scale * grad_scale)

    @property
    def written(self) -> list[Sequence[Tensor]]:
        return [self.params, self.square_avgs]

    def prepare(self, chunk: Chunk, measure: bool = True) -> tuple[Tensor | None, tuple[list[Tensor], list[Tensor]]]:
        ops = self.ops
        thetas, gs = chunk.pieces(self.params), chunk.pieces(self.grads, readonly=True)
        theta0 = None if self.anchors is None else chunk.pieces(self.anchors, readonly=True)
        # the new V goes into temporaries, written back only once the step is known to pass
        new_vs = chunk.pieces(self.square_avgs)
        if self.update_preconditioner:
            new_vs = ops.scaled(new_vs, self.alpha)
            ops.addcmul_(new_vs, gs, gs, value=(1.0 - self.alpha) * self.grad_scale * self.grad_scale)
        # square roots through rsqrt: torch's sqrt called from the noise threads leaves the
        # process's later small sqrt/exp calls ~20x slower (measured on this CPU build), rsqrt not
        denominators = ops.rsqrt(new_vs)
        if torch.is_grad_enabled():  # a differentiable step: rsqrt's output is kept for its derivative
            denominators = [d.reciprocal() + self.eps for d in denominators]
        else:
            ops.reciprocal_(denominators)  # sqrt(V), 0 where V is 0
            ops.add_scalar_(denominators, self.eps)  # D = eps + sqrt(V) = 1 / G
        fill_drift(ops, chunk, gs, thetas, theta0, self.grad_scale, self.localization, self.weight_decay)
        ops.div_each_(chunk.noise, denominators)  # G drift
        return sum_of_squares(chunk.flat) if measure else None, (new_vs, denominators)

    def bound(self, chunk: Chunk) -> float:
        """The drift's bound over :math:`\\lambda_G`: :math:`G \\le 1/\\lambda_G`."""
        return drift_bound(self.ops, chunk, self.grads, self.params, self.anchors, self.grad_scale, self.localization,
                           self.weight_decay) / self.eps

    def finish(self, chunk: Chunk, context: tuple[list[Tensor], list[Tensor]], generator: torch.Generator | None
               ) -> dict | None:
        ops, diagnostics = self.ops, self.diagnostics
        new_vs, denominators = context
        thetas = chunk.pieces(self.params)
        theta0 = None if self.anchors is None else chunk.pieces(self.anchors, readonly=True)
        ms = None if self.masks is None else chunk.pieces(self.masks, readonly=True)
        parts = None
        if self.noise_std:
            fill(chunk.spare, self.noise_std, generator)
        elif diagnostics is not None:
            chunk.spare.zero_()
        if diagnostics is not None:
            parts = Diagnostics.before_update(chunk.spares, chunk.pieces(self.grads, readonly=True), thetas, theta0,
                                              ms, self.step_size, self.grad_scale, self.localization,
                                              self.weight_decay)
        if self.noise_std:
            ops.mul_each_(chunk.spares, ops.rsqrt(denominators))  # G sqrt(D) xi = xi / sqrt(D)
            chunk.flat.add_(chunk.spare)
        if self.update_preconditioner:
            ops.copy_(chunk.pieces(self.square_avgs), new_vs)
        apply_buffer(ops, chunk, thetas, theta0, ms, self.step_size, self.bounding_box_size)
        return parts if parts is None else Diagnostics.after_update(parts, thetas, theta0)
