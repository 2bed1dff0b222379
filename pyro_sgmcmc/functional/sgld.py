r"""Stochastic gradient Langevin dynamics: the update rule, written once.

.. math::

    \theta \leftarrow \theta - \frac{\epsilon}{2}\Big(\frac{1}{T}\nabla U(\theta)
        + \gamma(\theta - \theta_0) + \lambda\theta\Big) + \sigma\sqrt{\epsilon}\,\xi,
    \qquad \xi \sim \mathcal N(0, I),

which for small :math:`\epsilon` samples
:math:`\pi(\theta) \propto \exp(-U(\theta)/T - \tfrac{\gamma}{2}\|\theta-\theta_0\|^2 - \tfrac{\lambda}{2}\|\theta\|^2)`
when the noise level :math:`\sigma` is 1 (Welling & Teh 2011; the localized form of Lau et al. 2023).

How it is computed: per chunk (:mod:`._noise`), the gradient of the tempered, localized
potential is written into a small buffer and checked (:mod:`._step`), then the noise, drawn into
a second buffer scaled by :math:`2\sigma/\sqrt{\epsilon}`, is added to it, and the buffer is
applied as :math:`\theta \leftarrow \theta - \frac{\epsilon}{2} b`. With :math:`\sigma = 0`,
:math:`T = 1` it is bit for bit ``torch.optim.SGD`` with learning rate :math:`\epsilon/2`.
With ``fused=True`` (CUDA, Triton) the same arithmetic runs in one kernel per device and dtype
that generates the noise in registers (:mod:`._fused`, :mod:`._triton`): other noise numbers,
the same law.

References:
    * M. Welling and Y. W. Teh, "Bayesian learning via stochastic gradient Langevin dynamics", ICML 2011.
    * E. Lau, Z. Furman, G. Wang, D. Murfet and S. Wei, "The local learning coefficient: a
      singularity-aware complexity measure", 2023.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ._common import Diagnostics, apply_buffer, fill_drift, plan_layout, sum_of_squares, take
from ._fused import fused_layout
from ._noise import Chunk, NoisePlanCache, NoiseSource, draw
from ._ops import FOREACH, FOREACH_NORM_DTYPE
from ._step import Z_MAX, Step, Task, drift_bound, drift_norm_bound, gathered, run


def sgld(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    generator: torch.Generator | None = None,
    noise: NoiseSource | None = None,
    **options: Any,
) -> None:
    r"""Apply one SGLD step to ``params`` in place.

    :param params: the parameters :math:`\theta` (updated in place).
    :param grads: :math:`\nabla U(\theta)`, one per parameter (not modified).
    :param lr: the step size :math:`\epsilon \ge 0`; 0 leaves the parameters untouched.
    :param grad_scale: :math:`1/T`, or ``nbeta`` for a mean-reduced loss.
    :param localization: :math:`\gamma`, strength of the pull toward ``anchors``.
    :param weight_decay: :math:`\lambda`, strength of the pull toward 0.
    :param noise_level: :math:`\sigma`, the scale of the injected noise (1 samples the target).
    :param anchors: :math:`\theta_0`, needed for ``localization`` and ``bounding_box_size``.
    :param masks: 0/1 tensors (or ``None``) shaped like each parameter; 0 freezes an entry.
    :param bounding_box_size: clamp :math:`\theta` into :math:`\theta_0 \pm b` after the step.
    :param generator: root of the noise (torch's global generator if ``None``).
    :param noise: a persistent :class:`~pyro_sgmcmc.functional.NoiseSource` (built from
        ``generator`` if not given); keep one across steps for a long chain.
    :param foreach: multi-tensor path (default where supported) or per-tensor loop; same numbers.
    :param noise_plans: a cache of noise layouts to reuse between steps.
    :param check_finite: refuse the step with :class:`~pyro_sgmcmc.functional.NonFiniteError`,
        changing nothing (noise streams and generators included), if a gradient holds NaN or
        Inf or the update would write a non-finite value (:mod:`._step`).
    :param diagnostics: accumulates norms of the parts of this update when given.
    :param grads_checked: the caller vouches that each gradient has its parameter's shape,
        dtype and device (as torch guarantees of ``p.grad``; the optimizers pass ``True``). Then,
        outside autograd, the gradients of small 1-d tensors are gathered with one ``torch.cat``
        instead of one op each; unchecked, a mismatch raises in the per-tensor ops.
    :param fused: one Triton kernel per device and dtype, the noise generated inside it from a
        seed drawn from the generator at each step (:mod:`._fused`: CUDA tensors; a
        ``ValueError`` says why not elsewhere); no ``diagnostics``, not differentiable.
        ``check_finite=False`` then saves the check's read of the gradients.

    Every keyword but ``generator`` and ``noise`` is passed on to :func:`sgld_step`.
    """
    run(sgld_step(params, grads, **options), noise or NoiseSource(generator))


def sgld_step(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    *,
    lr: float,
    grad_scale: float = 1.0,
    localization: float = 0.0,
    weight_decay: float = 0.0,
    noise_level: float = 1.0,
    anchors: Sequence[Tensor] | None = None,
    masks: Sequence[Tensor | None] | None = None,
    bounding_box_size: float | None = None,
    foreach: bool | None = None,
    noise_plans: NoisePlanCache | None = None,
    check_finite: bool = True,
    diagnostics: Diagnostics | None = None,
    grads_checked: bool = False,
    fused: bool = False,
) -> Step:
    """The :class:`~pyro_sgmcmc.functional._step.Step` of :func:`sgld` (same arguments), for a
    caller that runs several updates as one step."""
    if lr == 0.0 or not params:
        return [], None
    step_size = lr / 2
    noise_std = 2.0 * noise_level / math.sqrt(lr)  # the buffer is applied with factor lr / 2
    if fused:
        if diagnostics is not None:
            raise ValueError("Invalid diagnostics: the fused step computes no parts of its update (use fused=False)")
        tasks = fused_layout(params, grads, noise_plans).tasks_of(FusedSGLDTask)
        for task in tasks:
            task.set(None, params, grads, anchors, masks, step_size, noise_std, grad_scale, localization,
                     weight_decay, bounding_box_size, check_finite, None)
        return tasks, None
    ops, layout = plan_layout(params, grads, noise_plans, foreach, grads_checked)
    tasks = layout.tasks_of(SGLDTask)
    for task in tasks:
        task.set(ops, params, grads, anchors, masks, step_size, noise_std, grad_scale, localization, weight_decay,
                 bounding_box_size, check_finite, diagnostics)
    return tasks, (None if diagnostics is None else lambda results: diagnostics.add_chunks(gathered(results)))


class SGLDTask(Task):
    """One bucket of an SGLD step: the drift is the candidate, checked before the noise is
    drawn into the second buffer and added."""

    __slots__ = ("params", "anchors", "masks", "step_size", "noise_std", "grad_scale", "localization",
                 "weight_decay", "bounding_box_size", "diagnostics")

    def set(self, ops, params, grads, anchors, masks, step_size: float, noise_std: float, grad_scale: float,
            localization: float, weight_decay: float, bounding_box_size: float | None, check_finite: bool,
            diagnostics: Diagnostics | None) -> None:
        """This step's values (the lists as handed to :func:`sgld`)."""
        indices = self.indices
        if len(indices) != len(params):
            params, grads, anchors, masks = (take(indices, t) for t in (params, grads, anchors, masks))
        self.ops, self.params, self.grads, self.anchors, self.masks = ops, params, grads, anchors, masks
        self.step_size, self.noise_std, self.grad_scale = step_size, noise_std, grad_scale
        self.localization, self.weight_decay = localization, weight_decay
        self.bounding_box_size, self.diagnostics = bounding_box_size, diagnostics
        self.set_limit(check_finite, step_size, noise_std * Z_MAX, step_size, localization + weight_decay,
                       localization)

    @property
    def written(self) -> list[Sequence[Tensor]]:
        return [self.params]

    @property
    def ahead_std(self) -> float | None:
        return self.noise_std or None

    def prepare(self, chunk: Chunk, measure: bool = True) -> tuple[Tensor | None, None]:
        anchors = self.anchors
        fill_drift(self.ops, chunk, chunk.pieces(self.grads, readonly=True), chunk.pieces(self.params),
                   None if anchors is None else chunk.pieces(anchors, readonly=True), self.grad_scale,
                   self.localization, self.weight_decay)
        return sum_of_squares(chunk.flat) if measure else None, None

    def bound(self, chunk: Chunk) -> float:
        return drift_bound(self.ops, chunk, self.grads, self.params, self.anchors, self.grad_scale, self.localization,
                           self.weight_decay)

    def finish(self, chunk: Chunk, context: None, generator: torch.Generator | None) -> dict | None:
        thetas = chunk.pieces(self.params)
        theta0 = None if self.anchors is None else chunk.pieces(self.anchors, readonly=True)
        ms = None if self.masks is None else chunk.pieces(self.masks, readonly=True)
        noise_std, diagnostics = self.noise_std, self.diagnostics
        parts = None
        if noise_std:
            draw(chunk, noise_std, generator)
        elif diagnostics is not None:
            chunk.spare.zero_()
        if diagnostics is not None:
            parts = Diagnostics.before_update(chunk.spares, chunk.pieces(self.grads, readonly=True), thetas, theta0,
                                              ms, self.step_size, self.grad_scale, self.localization,
                                              self.weight_decay)
        if noise_std:
            chunk.flat.add_(chunk.spare)
        apply_buffer(self.ops, chunk, thetas, theta0, ms, self.step_size, self.bounding_box_size)
        return parts if parts is None else Diagnostics.after_update(parts, thetas, theta0)


class FusedSGLDTask(SGLDTask):
    """One (device, dtype) bucket of a fused SGLD step (:mod:`._fused`). Its "candidate" is not
    materialised: :meth:`prepare` measures a bound on the drift's norm from the norms of its
    inputs (the check pass, reading the gradients, and the parameters and anchors where the
    update uses them), and :meth:`finish` runs the kernel, noise included."""

    __slots__ = ()

    #: what :mod:`._step` looks in for a non-finite input when the gradients are finite
    candidate = "inputs"

    def set(self, ops, params, grads, anchors, masks, *args: Any) -> None:
        super().set(FOREACH, params, grads, anchors, masks, *args)
        self.plan.chunks[0].inputs = self.params

    @property
    def buffer_dtype(self) -> torch.dtype:
        """The kernel computes the update in float32 (float64 for float64 parameters), so a
        float16 buffer's range does not bound it."""
        return self.plan.compute_dtype

    def prepare(self, chunk: Any, measure: bool = True) -> tuple[float | None, None]:
        r"""The square of :math:`|s|\,\|g\| + (\gamma + \lambda)\|\theta\| + \gamma\|\theta_0\|`,
        a bound on the drift's norm (NaN or Inf if an input is not finite), from one multi-tensor
        norm of the inputs and one transfer to the host: few launches, as the step waits for it.
        The launch is staged (:meth:`~._fused.FusedPlan.stage`) while the device computes it."""
        if not measure or self.limit is None:  # no check (check_finite=False): the gradients are not read
            self._stage()
            return None, None
        shrink, localization = self.localization + self.weight_decay, self.localization
        inputs = [*self.grads, *(self.params if shrink else ()), *(self.anchors if localization else ())]
        try:
            if self.plan.dtype in (torch.float32, torch.float64):
                norms = torch._foreach_norm(inputs)
            elif FOREACH_NORM_DTYPE:  # half precisions, accumulated in float32
                norms = torch._foreach_norm(inputs, dtype=torch.float32)
            else:
                norms = self.ops.norms(inputs)
            norms = torch.stack(norms)
        except (TypeError, RuntimeError):  # a list the kernel would refuse: say which tensor and why
            self._stage()
            raise
        self._stage()
        norms = norms.tolist()
        count = len(self.grads)
        parts = [norms[:count], norms[count : 2 * count] if shrink else (), norms[-count:] if localization else ()]
        total = drift_norm_bound(self.grad_scale, localization, self.weight_decay,
                                 *(math.sqrt(sum(x * x for x in part)) for part in parts))
        return total * total, None

    def _stage(self) -> None:
        box = self.bounding_box_size
        values = (self.step_size, self.noise_std, self.grad_scale, self.localization + self.weight_decay,
                  self.localization, 0.0 if box is None else box)
        self.plan.stage(self.params, self.grads, self.anchors, self.masks, values, localize=bool(self.localization),
                        boxed=box is not None)

    def finish(self, chunk: Any, context: None, generator: torch.Generator | None) -> None:
        self.plan.launch(generator)

    def discard(self) -> None:
        self.plan.discard()
