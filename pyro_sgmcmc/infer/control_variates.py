"""Control variates on the SVI path: an ELBO for :class:`AutoUnconstrainedDelta` whose gradient is
the control-variate estimator (the kernels' :class:`~pyro_sgmcmc.infer.estimators.ControlVariates`)."""

from __future__ import annotations

import operator
from typing import Any, Callable

import torch
from pyro.infer.elbo import ELBO

from .._validation import check_mapping
from .autoguide import AutoUnconstrainedDelta
from .estimators import ControlVariates, Estimate, MinibatchPotential
from .potential import FlatLayout, ModelPotential, PotentialEvaluator, model_sites
from .subsample import unconstrained_anchor

__all__ = ["ControlVariateELBO"]


class ControlVariateELBO(ELBO):
    r"""``Trace_ELBO`` for :class:`~pyro_sgmcmc.infer.AutoUnconstrainedDelta` with control variates
    (Baker et al. 2019): its loss is the potential energy :math:`U(u)` of the model in
    unconstrained space (as ``Trace_ELBO`` with that guide), but its gradient is

    .. math:: \nabla U(\hat u) + \nabla\hat U(u) - \nabla\hat U(\hat u),

    the minibatch gradient corrected on the same minibatch at the anchor :math:`\hat u`, whose
    full-data gradient is computed once (the data walked through the model's own subsampled
    plate in minibatch-sized pieces). The estimator is the MCMC kernels' own
    (:class:`~pyro_sgmcmc.infer.estimators.ControlVariates`). Use it with any sampler::

        guide = AutoUnconstrainedDelta(model)
        SVI(model, guide, pyro.optim.Adam({"lr": 0.01}), Trace_ELBO())  # ... steps to the mode
        svi = SVI(model, guide, pyro_sgmcmc.optim.SGLD({"lr": ...}), ControlVariateELBO())

    :param anchor: ``{site: constrained value}``; by default the guide's point at the first step
        (so: find the mode first, as above). The arguments of the first step define the data set
        whose full-data gradient is used: later steps must pass the same data.
    """

    def __init__(self, anchor: dict[str, torch.Tensor] | None = None):
        check_mapping("anchor", anchor, what="a dict {site: constrained value}", none_ok=True)
        super().__init__()
        self.anchor = anchor
        self._prepared: tuple[FlatLayout, ControlVariates] | None = None

    def _prepare(self, model: Callable, guide: AutoUnconstrainedDelta, args: tuple, kwargs: dict
                 ) -> tuple[FlatLayout, ControlVariates]:
        if not isinstance(guide, AutoUnconstrainedDelta):
            raise TypeError(f"ControlVariateELBO needs an AutoUnconstrainedDelta guide (got {type(guide).__name__})")
        if guide.prototype_trace is None:
            guide._setup_prototype(*args, **kwargs)
        sites = model_sites(model, args, kwargs)
        if len(sites.plates) != 1:
            raise ValueError(f"ControlVariateELBO needs a model with exactly one subsampled plate "
                             f"(found {len(sites.plates)})")
        point = {name: operator.attrgetter(name)(guide.locs).detach() for name in sites.transforms}
        layout = FlatLayout(point)
        if self.anchor is not None:
            point = unconstrained_anchor(self.anchor, sites.transforms, "anchor")
        evaluator = PotentialEvaluator(ModelPotential(model, sites.transforms, args, kwargs), layout.unflatten,
                                       is_model=True)
        estimator = ControlVariates(MinibatchPotential(evaluator, sites.plates), layout.flatten(point))
        estimator.prepare(layout.flatten(point))
        return layout, estimator

    def _estimate(self, model: Callable, guide: AutoUnconstrainedDelta, args: tuple, kwargs: dict
                  ) -> tuple[dict[str, torch.Tensor], FlatLayout, Estimate]:
        if self._prepared is None:
            self._prepared = self._prepare(model, guide, args, kwargs)
        layout, estimator = self._prepared
        with guide._pyro_context:  # as in the guide's forward: the values come through pyro.param, so SVI sees them
            current = {name: operator.attrgetter(name)(guide.locs) for name, _, _ in layout.entries}
        return current, layout, estimator.estimate(layout.flatten(current).detach())

    def _get_trace(self, model, guide, args, kwargs):
        raise NotImplementedError("ControlVariateELBO evaluates the potential directly, not through traces")

    def loss(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """The control-variate estimate of the potential, ``U_batch(u) - U_batch(anchor) + U(anchor)``."""
        return float(self._estimate(model, guide, args, kwargs)[2].potential)

    def loss_and_grads(self, model: Callable, guide: Callable, *args: Any, **kwargs: Any) -> float:
        """Add the control-variate gradient to the guide's parameters' ``.grad``; return the
        estimate of the potential (as :meth:`loss`)."""
        current, layout, estimate = self._estimate(model, guide, args, kwargs)
        for name, grad in layout.unflatten(estimate.grad).items():
            value = current[name]
            leaf = value.unconstrained() if hasattr(value, "unconstrained") else value
            leaf.grad = grad.clone() if leaf.grad is None else leaf.grad + grad
        return float(estimate.potential)
