"""Pieces shared by every update rule: the drift buffer, the bounding box, finiteness checks,
device/dtype buckets and per-step diagnostics. Pure torch; no Pyro here."""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
from torch import Tensor

from ._noise import GRAIN, Chunk, Layout, NoisePlanCache
from ._ops import PER_TENSOR, PerTensorOps, ForeachOps, select_ops, supports_foreach

Ops = PerTensorOps | ForeachOps


class NonFiniteError(FloatingPointError):
    """A step refused because a gradient holds NaN or Inf (``kind="gradient"``), because the
    update built from finite gradients would write a non-finite value (``kind="update"``), or,
    in a chain sharded across ranks, because another rank refused its share of the step
    (``kind="elsewhere"``, ``index=-1``: no tensor of this rank is at fault); nothing was changed.

    :param index: index of the offending tensor in the list handed to the update (``-1`` for
        ``kind="elsewhere"``).
    :param message: the text (a default names the tensor by index).
    :param kind: ``"gradient"``, ``"update"`` or ``"elsewhere"``.
    :param task: the :class:`~pyro_sgmcmc.functional._step.Task` of the tensor, if known.
    """

    def __init__(self, index: int, message: str | None = None, kind: str = "gradient", task: Any = None):
        self.index = index
        self.kind = kind
        self.task = task
        what = "gradient" if kind == "gradient" else "update"
        super().__init__(message or f"non-finite {what} for tensor {index}")


def first_nonfinite(tensors: Sequence[Tensor]) -> int | None:
    """Index of the first tensor with a NaN or Inf entry, or ``None``."""
    for i, t in enumerate(tensors):
        if not bool(torch.isfinite(t).all()):
            return i
    return None


def check_finite(tensors: Sequence[Tensor], offset: int = 0) -> None:
    """Raise :class:`NonFiniteError` (with the tensor's index plus ``offset``) if any tensor
    holds NaN or Inf. On the CPU, large tensors are checked in ``GRAIN``-sized pieces (see
    :func:`first_bad_piece`); on accelerators, with one fused norm kernel."""
    if not tensors:
        return
    if tensors[0].device.type == "cpu":
        pieces, owners = [], []
        for i, t in enumerate(tensors):
            parts = t.view(-1).split(GRAIN) if t.numel() > GRAIN and t.is_contiguous() else [t]
            pieces.extend(parts)
            owners.extend([i] * len(parts))
        bad = first_bad_piece(pieces)
        if bad is not None:
            raise NonFiniteError(offset + owners[bad])
        return
    if not math.isfinite(torch.stack(torch._foreach_norm([t.detach() for t in tensors])).sum()):
        index = first_nonfinite(tensors)
        if index is not None:
            raise NonFiniteError(offset + index)


def first_bad_piece(pieces: Sequence[Tensor]) -> int | None:
    """Index of the first piece holding NaN or Inf, or ``None``.

    A sum per piece is the fast test (NaN and Inf propagate through it); only when the total is
    not finite are the pieces inspected entry by entry, so a sum that merely overflowed is not a
    false alarm. Pieces of at most ``GRAIN`` elements are summed on one thread each, so checks
    can run beside the noise threads without waking an OpenMP team that would fight them.
    """
    sums = [p.detach().sum(dtype=_acc(p)) for p in pieces]
    total = sums[0] if len(sums) == 1 else torch.stack(sums).sum()
    if math.isfinite(total):
        return None
    return first_nonfinite(pieces)


_DOT_DTYPES = (torch.float32, torch.float64)


def _acc(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def buckets(tensors: Sequence[Tensor]) -> list[list[int]]:
    """Indices of ``tensors`` split by (device, dtype), in order of first appearance."""
    first = tensors[0]
    device, dtype = first.device, first.dtype
    if all(t.dtype is dtype and t.device == device for t in tensors):
        return [list(range(len(tensors)))]
    groups: dict[tuple, list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault((t.device, t.dtype), []).append(i)
    return list(groups.values())


def take(indices: list[int], tensors: Sequence[Tensor | None] | None) -> Sequence | None:
    """``tensors`` restricted to ``indices`` (``None`` stays ``None``)."""
    if tensors is None:
        return None
    if len(indices) == len(tensors):
        return tensors
    return [tensors[i] for i in indices]


def plan_layout(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    plans: NoisePlanCache | None,
    foreach: bool | None,
    grads_checked: bool = False,
) -> tuple[Ops, Layout]:
    """The operation table and the layout of ``params``: their (device, dtype) buckets, each
    with its noise plan (see :class:`~._noise.Layout`). With autograd on (a differentiable
    update), the per-tensor table: every one of its ops has a derivative."""
    if plans is None:
        plans = NoisePlanCache()
    layout = plans.layout(params, _make_layout, params, grads, plans)
    if torch.is_grad_enabled():  # a differentiable update: not every foreach op has a derivative
        return select_ops(False), layout
    return select_ops(layout.foreach_ok if foreach is None else foreach, gather=grads_checked), layout


def check_dense_grads(grads: Sequence[Tensor]) -> None:
    """Refuse sparse gradients, as torch's optimizers do (with their error type)."""
    for i, g in enumerate(grads):
        if g.layout != torch.strided:
            raise RuntimeError(f"Sparse gradients are not supported (gradient {i} has layout {g.layout})")


def _make_layout(params: Sequence[Tensor], grads: Sequence[Tensor], plans: NoisePlanCache) -> Layout:
    check_dense_grads(grads)
    bucket_plans = [(indices, plans.plan(take(indices, params))) for indices in buckets(params)]
    return Layout(bucket_plans, supports_foreach(params))


def fill_drift(
    ops: Ops,
    chunk: Chunk,
    grads: list[Tensor],
    thetas: list[Tensor],
    anchors: list[Tensor] | None,
    grad_scale: float,
    localization: float,
    weight_decay: float,
) -> None:
    r"""Write the gradient of the tempered, localized potential into the chunk's buffer.

    .. math:: b \leftarrow s\,\nabla U + (\gamma + \lambda)\,\theta - \gamma\,\theta_0
              = \nabla \tilde U(\theta)

    with ``s = 1/T`` (or ``nbeta``), ``\gamma`` the localization and ``\lambda`` the weight decay.
    A chunk of small 1-d tensors gathers the gradients with one ``torch.cat`` (when ``ops``
    allows it); the scale is one flat op on the whole chunk, whatever the path.
    """
    buf = chunk.noise
    if ops.gathers and chunk.gathers:
        torch.cat(grads, out=chunk.flat)
    else:
        ops.copy_(buf, grads)
    if grad_scale != 1.0:
        chunk.flat.mul_(grad_scale)
    shrink = localization + weight_decay
    if shrink:
        ops.add_(buf, thetas, alpha=shrink)
    if localization:
        ops.add_(buf, anchors, alpha=-localization)


def gather_into(ops: Ops, chunk: Chunk, flat: Tensor, pieces: list[Tensor], tensors: list[Tensor]) -> None:
    """Copy ``tensors`` (the chunk's pieces of them) into ``flat`` (one of the chunk's buffers,
    whose views are ``pieces``): one ``torch.cat`` in a gathering chunk, else a list copy."""
    if ops.gathers and chunk.gathers:
        torch.cat(tensors, out=flat)
    else:
        ops.copy_(pieces, tensors)


def apply_buffer(ops: Ops, chunk: Chunk, thetas: list[Tensor], anchors: list[Tensor] | None,
                 masks: list[Tensor] | None, step_size: float, bounding_box_size: float | None) -> None:
    r""":math:`\theta \leftarrow \theta - h\,b` (only where the mask is 1), then the clamp into
    the bounding box: how the Langevin samplers apply their assembled buffer :math:`b`."""
    if masks is None:
        ops.add_(thetas, chunk.noise, alpha=-step_size)
    else:
        ops.addcmul_(thetas, chunk.noise, masks, value=-step_size)
    if bounding_box_size is not None:
        clamp_to_box(ops, thetas, anchors, bounding_box_size, chunk.noise)


def sum_of_squares(flat: Tensor) -> Tensor:
    """:math:`b^\top b` of a flat buffer, a 0-dim tensor (a BLAS dot, cheaper to launch than a
    sum; NaN and Inf propagate through it), accumulated in at least float32."""
    if flat.requires_grad:  # a differentiable step (``step_tensors``): the checks need no graph
        flat = flat.detach()
    if flat.dim() != 1:  # a differentiable step's buffers have their tensor's shape
        flat = flat.reshape(-1)
    if flat.dtype in _DOT_DTYPES:
        return flat.dot(flat)
    return torch.linalg.vector_norm(flat, dtype=_acc(flat)).square()


def clamp_to_box(ops: Ops, thetas: list[Tensor], anchors: list[Tensor], size: float, scratch: list[Tensor]) -> None:
    """Clamp each ``theta`` into ``[theta0 - size, theta0 + size]``, using ``scratch`` (the spent
    noise buffer) for the bounds, so no full-size temporary is made."""
    ops.copy_(scratch, anchors)
    ops.add_scalar_(scratch, -size)
    ops.maximum_(thetas, scratch)
    ops.copy_(scratch, anchors)
    ops.add_scalar_(scratch, size)
    ops.minimum_(thetas, scratch)


def reflect_at_box(momenta: list[Tensor], thetas: list[Tensor], anchors: list[Tensor], size: float) -> None:
    """Reverse the momentum components whose coordinate left the box (an elastic wall)."""
    for p, theta, theta0 in zip(momenta, thetas, anchors):
        outside = (theta - theta0).abs_() > size
        p.mul_(outside.to(p.dtype).mul_(-2.0).add_(1.0))


def masked(tensors: list[Tensor], masks: list[Tensor] | None) -> list[Tensor]:
    """``tensors`` times their masks (diagnostics only: allocates)."""
    if masks is None:
        return tensors
    return [t * m for t, m in zip(tensors, masks)]


def _square(x: float) -> float:
    """``x * x``: ``inf`` past the float range, where ``x ** 2`` raises."""
    return x * x


class Diagnostics:
    """Accumulates squared norms of the parts of an update over chunks, buckets and groups.

    Keys (after :meth:`result`, as 0-dim tensors): ``grad_norm`` (the raw stochastic gradient),
    ``drift_norm``, ``localization_norm``, ``weight_decay_norm``, ``noise_norm`` (the parts of the
    update, each with its step-size factor) and ``distance`` (``||theta - theta0||`` after the
    step); samplers may add values of their own (e.g. ``thermostat``).

    The per-chunk parts are computed by :meth:`before_update` / :meth:`after_update` (pure, so
    they can run in the noise threads) and added up with :meth:`add` in chunk order.
    """

    def __init__(self) -> None:
        self.squares: dict[str, Tensor] = {}
        self.values: dict[str, list[Tensor]] = {}

    def add(self, parts: dict[str, Tensor]) -> None:
        """Add squared norms (as returned by :meth:`before_update` and :meth:`after_update`)."""
        for key, value in parts.items():
            value = value.detach().cpu().double()
            self.squares[key] = self.squares[key] + value if key in self.squares else value

    def add_chunks(self, chunk_parts: list[dict[str, Tensor] | None]) -> None:
        """Add the parts of each chunk (as :meth:`add`), in chunk order; ``None`` is skipped."""
        for parts in chunk_parts:
            if parts is not None:
                self.add(parts)

    def add_value(self, key: str, value: Tensor | float) -> None:
        self.values.setdefault(key, []).append(torch.as_tensor(value).detach().cpu().double())

    @staticmethod
    def before_update(
        noise: list[Tensor],
        grads: list[Tensor],
        thetas: list[Tensor],
        anchors: list[Tensor] | None,
        masks: list[Tensor] | None,
        step_size: float,
        grad_scale: float,
        localization: float,
        weight_decay: float,
        noise_scale: float | None = None,
    ) -> dict[str, Tensor]:
        """Squared norms of the parts of the update about to be made (``noise`` is the injected
        noise as drawn, which enters the update times ``noise_scale``, by default ``step_size``;
        the drift enters it times ``step_size``)."""
        sos = PER_TENSOR.sum_of_squares
        grad_sq = sos(masked(grads, masks))
        noise_scale = step_size if noise_scale is None else noise_scale
        parts = {
            "grad_norm": grad_sq,
            "drift_norm": grad_sq * _square(step_size * grad_scale),
            "noise_norm": sos(masked(noise, masks)) * _square(noise_scale),
            "weight_decay_norm": sos(masked(thetas, masks)) * _square(step_size * weight_decay),
        }
        if anchors is not None:
            offsets = [t - t0 for t, t0 in zip(thetas, anchors)]
            parts["localization_norm"] = sos(masked(offsets, masks)) * _square(step_size * localization)
        else:
            parts["localization_norm"] = grad_sq * 0.0
        return parts

    @staticmethod
    def after_update(parts: dict[str, Tensor], thetas: list[Tensor], anchors: list[Tensor] | None) -> dict[str, Tensor]:
        if anchors is not None:
            parts["distance"] = PER_TENSOR.sum_of_squares([t - t0 for t, t0 in zip(thetas, anchors)])
        return parts

    def result(self) -> dict[str, Tensor]:
        out = {k: v.sqrt() for k, v in self.squares.items()}
        for k, vs in self.values.items():
            out[k] = torch.stack(vs) if len(vs) > 1 else vs[0]
        return out
