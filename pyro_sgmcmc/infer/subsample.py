"""Control over the minibatches a Pyro model draws: record them, replay them, or walk the whole
data set in minibatch-sized pieces (for full-data potentials and gradients)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor


@dataclass(frozen=True)
class SubsampledPlate:
    """A ``pyro.plate(name, size, subsample_size=...)`` of a model."""

    name: str
    size: int
    subsample_size: int
    device: torch.device

    @property
    def num_minibatches(self) -> int:
        """How many minibatch-sized pieces a walk through the whole data set takes."""
        return math.ceil(self.size / self.subsample_size)


def subsampled_plates(trace: Any) -> list[SubsampledPlate]:
    """The plates of a model trace that draw proper minibatches."""
    plates = []
    for name, site in trace.nodes.items():
        if site["type"] == "sample" and site_is_subsample(site):
            fn = site["fn"]
            m = fn.subsample_size
            if m is not None and 0 < m < fn.size:
                plates.append(SubsampledPlate(name, int(fn.size), int(m), site["value"].device))
    return plates


def draw_indices(plate: SubsampledPlate, generator: torch.Generator | None = None) -> Tensor:
    """A uniformly random minibatch of ``plate`` (distinct rows, in random order) in ``O(m log m)``,
    from ``generator`` (on the plate's device; default: torch's global generator).

    Pyro's plate draws ``torch.randperm(N)[:m]``, which is ``O(N)`` per minibatch: 150 ms at
    ``N = 5e6``, a hundred times the rest of a step. Here: ``m`` and a few more uniform draws,
    the distinct values among them (every set of distinct values of a given size is equally
    likely, by symmetry), and a random ``m`` of those; drawn again in the rare case that fewer
    than ``m`` are distinct. Small data sets (``4 m > N``) use ``randperm``.
    """
    n, m = plate.size, plate.subsample_size
    if 4 * m > n:
        return torch.randperm(n, device=plate.device, generator=generator)[:m]
    while True:
        distinct = torch.unique(torch.randint(n, (m + m // 8 + 16,), device=plate.device, generator=generator))
        if distinct.numel() >= m:
            return distinct[torch.randperm(distinct.numel(), device=plate.device, generator=generator)[:m]]


class SubsampleControl(Messenger):
    """Records the subsample indices a model draws (:attr:`recorded`), or imposes given ones.

    :param indices: ``{plate name: index tensor}`` to impose (else the plate draws its own).
    :param weights: ``{plate name: tensor[m]}``: each row's log density inside the plate is
        weighted by it *instead of* the plate's ``N/m`` (so a row counts once, or not at all).
    :param keep_outside: with ``weights``, whether sites outside the weighted plate (priors,
        global latents) count; walking the data set in pieces, only the first piece keeps them.
    """

    def __init__(self, indices: dict[str, Tensor] | None = None, weights: dict[str, Tensor] | None = None,
                 keep_outside: bool = True):
        super().__init__()
        self.indices = indices or {}
        self.weights = weights or {}
        self.keep_outside = keep_outside
        self.recorded: dict[str, Tensor] = {}

    def _pyro_sample(self, msg: dict) -> None:
        if site_is_subsample(msg):
            if msg["name"] in self.indices:
                msg["value"] = self.indices[msg["name"]]
                msg["done"] = True
            return
        if not self.weights:
            return
        for frame in msg["cond_indep_stack"]:
            weight = self.weights.get(frame.name)
            if weight is not None:
                # the plate multiplied the scale by N/m (this handler runs after it): undo that.
                # The weights live with the plate's indices (Pyro's are on the CPU unless the plate
                # names a device); an observed site's log density on its data's device
                shape = (weight.shape[0],) + (1,) * (-frame.dim - 1)
                if isinstance(msg["value"], torch.Tensor):
                    weight = weight.to(msg["value"].device)
                msg["scale"] = msg["scale"] * (frame.size / frame.full_size) * weight.reshape(shape)
                return
        if not self.keep_outside:
            msg["scale"] = msg["scale"] * 0.0

    def _pyro_post_sample(self, msg: dict) -> None:
        if site_is_subsample(msg):
            self.recorded[msg["name"]] = msg["value"]


def full_data_potential(potential: Callable[[SubsampleControl, bool], Tensor], plate: SubsampledPlate,
                        rows: Tensor | None = None) -> Tensor:
    """The exact full-data potential of a model whose likelihood sits in ``plate``: the data set in
    consecutive minibatch-sized pieces, each row weighted once (the last piece is padded with rows
    of weight 0, since the plate only takes minibatches of its own size), priors and the Jacobian
    counted with the first piece only.

    :param potential: ``(control, with_jacobian) -> U`` evaluating the model under ``control``.
    :param rows: walk only these rows, each weighted ``N / len(rows)`` (an unbiased estimate of
        the full-data potential on a fixed subset: e.g. a cheap first search for the mode).
    """
    n, m = plate.size, plate.subsample_size
    everything = torch.arange(n, device=plate.device) if rows is None else rows.to(plate.device)
    count = everything.numel()
    row_weight = 1.0 if rows is None else n / count
    total = None
    for k in range(math.ceil(count / m)):
        piece = everything[k * m : (k + 1) * m]
        weight = torch.full((m,), row_weight, device=plate.device)
        if len(piece) < m:
            weight[len(piece):] = 0.0
            piece = torch.cat([piece, everything[: m - len(piece)]])
        control = SubsampleControl({plate.name: piece}, {plate.name: weight}, keep_outside=k == 0)
        value = potential(control, k == 0)
        total = value if total is None else total + value
    return total


def full_data_value_and_grad(potential: Callable[[SubsampleControl, bool], Tensor], plate: SubsampledPlate,
                             inputs: list[Tensor]) -> tuple[Tensor, tuple[Tensor, ...]]:
    """The exact full-data potential (:func:`full_data_potential`) and its gradient with respect
    to ``inputs``: what a control-variate anchor needs. Raises if either is not finite."""
    value = full_data_potential(potential, plate)
    grads = torch.autograd.grad(value, inputs)
    if not (torch.isfinite(value) and all(bool(torch.isfinite(g).all()) for g in grads)):
        raise RuntimeError("The full-data potential or its gradient at the control-variate anchor is not finite")
    return value.detach(), grads


def unconstrained_anchor(values: dict[str, Any], transforms: dict[str, Any], argument: str) -> dict[str, Tensor]:
    """A user's anchor ``{site: constrained value}`` in unconstrained coordinates; a clear error
    naming ``argument`` if a site is missing."""
    missing = set(transforms) - set(values)
    if missing:
        raise ValueError(f"Invalid {argument}: the anchor misses the sites {sorted(missing)}")
    return {name: transform(torch.as_tensor(values[name])).detach() for name, transform in transforms.items()}
