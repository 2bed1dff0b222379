"""Control variates on the SVI path: an ELBO for :class:`AutoUnconstrainedDelta` whose gradient is
the control-variate estimator (:mod:`pyro_sgmcmc.functional.control_variates`)."""

from __future__ import annotations

import operator
from typing import Any, Callable

import pyro.poutine as poutine
import torch
from pyro.infer.elbo import ELBO
from torch import Tensor
from torch.distributions import biject_to

from .autoguide import AutoUnconstrainedDelta
from .kernel import ModelPotential
from .subsample import (
    SubsampleControl,
    draw_indices,
    full_data_value_and_grad,
    subsampled_plates,
    unconstrained_anchor,
)

__all__ = ["ControlVariateELBO"]


class ControlVariateELBO(ELBO):
    r"""``Trace_ELBO`` for :class:`~pyro_sgmcmc.infer.AutoUnconstrainedDelta` with control variates
    (Baker et al. 2019): its loss is the potential energy :math:`U(u)` of the model in
    unconstrained space (as ``Trace_ELBO`` with that guide), but its gradient is

    .. math:: \nabla U(\hat u) + \nabla\hat U(u) - \nabla\hat U(\hat u),

    the minibatch gradient corrected on the same minibatch at the anchor :math:`\hat u`, whose
    full-data gradient is computed once (the data walked through the model's own subsampled
    plate in minibatch-sized pieces). Use it with any sampler of :mod:`pyro_sgmcmc.optim`::

        guide = AutoUnconstrainedDelta(model)
        SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO()).step(...)   # to the mode
        svi = SVI(model, guide, pyro_sgmcmc.optim.SGLD({"lr": ...}), ControlVariateELBO())

    :param anchor: ``{site: constrained value}``; by default the guide's point at the first step
        (so: find the mode first, as above). The arguments of the first step define the data set
        whose full-data gradient is used: later steps must pass the same data.
    """

    def __init__(self, anchor: dict[str, Tensor] | None = None):
        if anchor is not None and not isinstance(anchor, dict):
            raise ValueError(f"Invalid anchor: {anchor!r} (must be a dict {{site: constrained value}} or None)")
        super().__init__()
        self.anchor = anchor
        self._prepared: tuple | None = None

    def _prepare(self, model: Callable, guide: AutoUnconstrainedDelta, args: tuple, kwargs: dict) -> tuple:
        if not isinstance(guide, AutoUnconstrainedDelta):
            raise TypeError(f"ControlVariateELBO needs an AutoUnconstrainedDelta guide (got {type(guide).__name__})")
        if guide.prototype_trace is None:
            guide._setup_prototype(*args, **kwargs)
        sites = {name: site for name, site in guide.prototype_trace.iter_stochastic_nodes()}
        transforms = {name: biject_to(site["fn"].support).inv for name, site in sites.items()}
        plates = subsampled_plates(poutine.trace(model).get_trace(*args, **kwargs))  # the guide's hides them
        if len(plates) != 1:
            raise ValueError(f"ControlVariateELBO needs a model with exactly one subsampled plate (found {len(plates)})")
        potential = ModelPotential(model, transforms, args, kwargs)
        if self.anchor is not None:
            anchor = unconstrained_anchor(self.anchor, transforms, "anchor")
        else:
            anchor = {name: operator.attrgetter(name)(guide.locs).detach().clone() for name in sites}
        anchor = {name: value.requires_grad_(True) for name, value in anchor.items()}
        names = sorted(anchor)
        full, grads = full_data_value_and_grad(lambda control, jacobian: potential(anchor, control, jacobian), plates[0],
                                               [anchor[n] for n in names])
        return potential, plates[0], anchor, full, dict(zip(names, grads))

    def _terms(self, model, guide, args, kwargs) -> tuple[Tensor, Tensor, dict, dict]:
        if self._prepared is None:
            self._prepared = self._prepare(model, guide, args, kwargs)
        potential, plate, anchor, full, full_grad = self._prepared
        with guide._pyro_context:  # as in the guide's forward: the values come through pyro.param, so SVI sees them
            current = {name: operator.attrgetter(name)(guide.locs) for name in anchor}
        minibatch = SubsampleControl(indices={plate.name: draw_indices(plate)})
        energy = potential(current, minibatch)
        at_anchor = potential(anchor, minibatch)
        names = sorted(anchor)
        anchor_grads = dict(zip(names, torch.autograd.grad(at_anchor, [anchor[n] for n in names])))
        # sum <grad U(anchor) - grad U_batch(anchor), u>: a term whose gradient is the constant correction
        correction = sum(((full_grad[n] - anchor_grads[n]) * current[n]).sum() for n in names)
        estimate = energy.detach() - at_anchor.detach() + full
        return energy, correction, current, estimate

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("ControlVariateELBO evaluates the potential directly, not through traces")

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The control-variate estimate of the potential, ``U_batch(u) - U_batch(anchor) + U(anchor)``."""
        return float(self._terms(model, guide, args, kwargs)[3])

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Leave the control-variate gradient in the guide's parameters' ``.grad``; return the
        estimate of the potential (as :meth:`loss`)."""
        energy, correction, _, estimate = self._terms(model, guide, args, kwargs)
        (energy + correction).backward()
        return float(estimate)
