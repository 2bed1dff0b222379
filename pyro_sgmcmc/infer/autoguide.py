"""An autoguide whose ELBO loss is exactly the unconstrained potential energy.

Pyro's :class:`~pyro.infer.autoguide.AutoDelta` is a point mass at ``z = T(u)`` with density 1, so
its ``Trace_ELBO`` loss is ``-log p(x, T(u))``. Langevin noise on ``u`` with that gradient samples
``p(x, T(u))`` in ``u``, which is not the posterior: the change of variables needs the factor
``|det dT/du|``. For a Beta(6, 3) posterior of a probability, SVI + AutoDelta + SGLD gives a mean
of about 0.706 instead of 0.667.

:class:`AutoUnconstrainedDelta` is the same point guide with that factor put into the guide's log
density (``Delta(T(u), log_density=-log|det dT/du|)``), so the loss is
``-log p(x, T(u)) - log|det dT/du|`` for every latent site (positive, unit-interval, simplex,
correlation, ...), and an SG-MCMC optimizer on the param store's ``u`` samples the true posterior.
"""

from __future__ import annotations

import operator
from contextlib import ExitStack
from typing import Any, Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.util import sum_rightmost
from pyro.infer.autoguide import AutoGuide
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.infer.autoguide.utils import deep_setattr, helpful_support_errors
from pyro.nn.module import PyroModule, PyroParam
from torch.distributions import biject_to

from .sites import check_latent_site, trace_model

__all__ = ["AutoUnconstrainedDelta"]


class AutoUnconstrainedDelta(AutoGuide):
    r"""A point guide at ``z = T(u)`` with log density :math:`-\log|\det \partial T/\partial u|`.

    With it, ``Trace_ELBO``'s loss is the potential energy of the model in unconstrained space,

    .. math:: \mathcal L(u) = -\log p(x, T(u)) - \log\left|\det \frac{\partial T}{\partial u}\right|,

    the potential that Pyro's HMC/NUTS sample, so ``SVI(model, AutoUnconstrainedDelta(model),
    pyro_sgmcmc.optim.SGLD({...}), Trace_ELBO())`` draws posterior samples of ``u`` (and so of
    ``z``). The current sample, in constrained space, is :meth:`current_sample`.

    Usage::

        guide = AutoUnconstrainedDelta(model)
        svi = SVI(model, guide, pyro_sgmcmc.optim.SGLD({"lr": 1e-4}), Trace_ELBO())

    :param callable model: a Pyro model (``PyroModule`` models with ``PyroSample`` priors too).
    :param callable init_loc_fn: per-site initialisation, as for ``AutoDelta``.
    :param callable create_plates: as for other autoguides.

    Discrete latent sites are refused, and so are local latent sites inside a subsampled plate
    (one value per data row): under subsampling Pyro scales their log density by ``N/m``, which
    would sample them at the wrong temperature.
    """

    def __init__(self, model: Callable, init_loc_fn: Callable = init_to_median, *, create_plates: Callable | None = None):
        self.init_loc_fn = init_loc_fn
        model = InitMessenger(self.init_loc_fn)(model)
        super().__init__(model, create_plates=create_plates)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        """Trace the model and make one unconstrained parameter per latent site. The tracing
        draws from torch's generators (subsample indices, ``init_to_median``'s prior draws), and
        happens at the guide's first call, which after a restore comes after the user set the
        RNG state: so it runs on a copy of the RNG state and leaves the state as it found it, and
        a run resumed from a checkpoint (param store, optimizer, RNG) continues bit for bit."""
        rng = pyro.util.get_rng_state()
        try:
            super()._setup_prototype(*args, **kwargs)
        except Exception:
            trace_model(self.model, *args, **kwargs)  # a clearer error when it names the cause
            raise
        finally:
            pyro.util.set_rng_state(rng)
        self._event_dims: dict[str, int] = {}
        self.locs = PyroModule()
        found = False
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            found = True
            check_latent_site(name, site)
            support = site["fn"].support
            with helpful_support_errors(site):
                unconstrained = biject_to(support).inv(site["value"].detach()).detach()
            self._event_dims[name] = site["fn"].event_dim + unconstrained.dim() - site["value"].dim()
            deep_setattr(self.locs, name, PyroParam(unconstrained, constraints.real, self._event_dims[name]))
        if not found:
            raise ValueError("AutoUnconstrainedDelta: the model has no latent sites to sample")

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """Sample every latent site at the guide's point, with the log-Jacobian as density.

        :return: a dict from site name to (constrained) value.
        """
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            transform = biject_to(site["fn"].support)
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                u = operator.attrgetter(name)(self.locs)
                z = transform(u)
                log_det = sum_rightmost(
                    transform.log_abs_det_jacobian(u, z), self._event_dims[name] - transform.domain.event_dim
                )
                result[name] = pyro.sample(
                    name, dist.Delta(z, log_density=-log_det, event_dim=site["fn"].event_dim)
                )
        return result

    @torch.no_grad()
    def current_sample(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The guide's current point in constrained space: the chain's current sample."""
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        out = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            u = operator.attrgetter(name)(self.locs)
            out[name] = biject_to(site["fn"].support)(u).detach().clone()
        return out

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The current point (the guide is a point mass; for ``AutoGuide`` API compatibility)."""
        return self.current_sample(*args, **kwargs)
