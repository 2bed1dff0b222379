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
import warnings
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

from .estimators import per_row
from .local import LocalTable
from .sites import LocalSite, check_latent_site, trace_model

__all__ = ["AutoUnconstrainedDelta"]

#: Rows outside a minibatch checked at the next call for moves the optimizer should not have made.
_WATCHED_ROWS = 8


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

    Discrete latent sites are refused.

    **Latent sites local to a subsampled plate** (one value per group or data row, sampled inside
    ``pyro.plate(name, N, subsample_size=m)``) get a parameter with one row per element of the
    plate (drawn by ``init_loc_fn``, the model run on the plate in minibatch-sized pieces); each
    call reads the rows of the plate's minibatch. Two things make an SG-MCMC optimizer sample
    them right, as the MCMC kernels' scheme does (:mod:`pyro_sgmcmc.infer.local`: the joint
    posterior, up to each block's discretisation bias):

    * the gradient that reaches the rows is divided by the plate's ``N/m`` (the plate scales a
      row's terms by it; a row's own terms count once): each minibatch row gets its exact
      conditional gradient, every other row 0;
    * rows outside the minibatch must not move, noise included: :meth:`local_options` gives the
      optimizer a 0/1 ``mask`` per table that each call rewrites in place (1 on the minibatch's
      rows). The rows also need a step size of their own (their curvature is one group's, not all
      the data's), e.g. SGLD's bias rule ``4 * 0.02 / curvature``::

          guide = AutoUnconstrainedDelta(model)
          guide(*args)                                   # sets the guide up
          optim = pyro_sgmcmc.optim.SGLD(lambda name: {"lr": 1e-3, **guide.local_options(name, lr=1e-2)})
          svi = SVI(model, guide, optim, Trace_ELBO())

    With a Langevin optimizer (SGLD, PSGLD) this is the kernels' blocked random-scan scheme; a
    momentum or thermostat would go stale in rows between visits, so use SGLD for the tables.
    A site local to two subsampled plates is refused. :meth:`current_sample` holds whole tables:
    collect them with ``SampleCollector(keep="moments")`` when ``N`` is large.
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
        self._local_sites: dict[str, LocalSite] = {}
        self._local_masks: dict[str, torch.Tensor] = {}
        self._watched: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned_rows: set[str] = set()
        self.locs = PyroModule()
        found = False
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            found = True
            frame = check_latent_site(name, site, allow_local=True)
            support = site["fn"].support
            with helpful_support_errors(site):
                unconstrained = biject_to(support).inv(site["value"].detach()).detach()
            self._event_dims[name] = site["fn"].event_dim + unconstrained.dim() - site["value"].dim()
            if frame is not None:
                self._local_sites[name] = LocalSite.of(name, site, frame, biject_to(support).inv)
                continue
            deep_setattr(self.locs, name, PyroParam(unconstrained, constraints.real, self._event_dims[name]))
        if not found:
            raise ValueError("AutoUnconstrainedDelta: the model has no latent sites to sample")
        if self._local_sites:
            rng = pyro.util.get_rng_state()  # as the prototype: a resumed run continues bit for bit
            try:
                table = LocalTable.initial(self.model, args, kwargs, list(self._local_sites.values()),
                                           self.init_loc_fn)
            finally:
                pyro.util.set_rng_state(rng)
            for name, value in table.values.items():
                deep_setattr(self.locs, name, PyroParam(value, constraints.real, self._event_dims[name]))
                self._local_masks[name] = torch.zeros_like(value)

    def local_options(self, param_name: str, **options: Any) -> dict[str, Any]:
        """``options`` and the live ``mask`` of a local site's table if ``param_name`` (as an
        optimizer's ``optim_args`` callable receives it) is one, else ``{}``: merge it into the
        table's options (see the class docstring). The mask is rewritten in place at every call
        of the guide (1 on the rows of the minibatch), so the optimizer must hold this very tensor."""
        if self.prototype_trace is None:
            raise RuntimeError("local_options() needs the guide set up: call the guide (or svi.step) once first")
        for name, mask in self._local_masks.items():
            if param_name == name or param_name.endswith(f"locs.{name}"):
                return {**options, "mask": mask}
        return {}

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
            local = self._local_sites.get(name)
            # a table is read outside the plates (inside, Pyro would subsample it itself) and indexed here
            table = operator.attrgetter(name)(self.locs) if local is not None else None
            with ExitStack() as stack:
                indices = {}
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        indices[frame.name] = stack.enter_context(plates[frame.name])
                if local is None:
                    u = operator.attrgetter(name)(self.locs)
                else:
                    u = self._minibatch_rows(local, table, indices[local.plate])
                z = transform(u)
                log_det = sum_rightmost(
                    transform.log_abs_det_jacobian(u, z), self._event_dims[name] - transform.domain.event_dim
                )
                result[name] = pyro.sample(
                    name, dist.Delta(z, log_density=-log_det, event_dim=site["fn"].event_dim)
                )
        return result

    def _minibatch_rows(self, local: LocalSite, table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """The table's rows at the minibatch ``index``, whose gradient is divided by ``N/m``; the
        mask of the table set to those rows."""
        with torch.no_grad():
            mask = self._local_masks[local.name]
            self._check_still(local, table)
            mask.zero_()
            mask.index_fill_(local.dim, index.to(mask.device), 1.0)
            # a few rows outside this minibatch, to see at the next call whether the optimizer left them
            outside = (per_row(mask, local.dim).amax(1) == 0).nonzero().reshape(-1)[:_WATCHED_ROWS]
            self._watched[local.name] = (outside, table.detach().index_select(local.dim, outside).clone())
        rows = table.index_select(local.dim, index.to(table.device))
        if rows.requires_grad:
            rows.register_hook(lambda grad: grad / local.scale)
        return rows

    def _check_still(self, local: LocalSite, table: torch.Tensor) -> None:
        """Warn (once per site) if rows outside the last minibatch moved since the last call: an
        optimizer without the table's mask (:meth:`local_options`) moves every row with noise, so
        the rows outside the minibatch random-walk away from their posterior."""
        watched = self._watched.get(local.name)
        if watched is None or local.name in self._warned_rows:
            return
        rows, values = watched
        if not torch.equal(table.detach().index_select(local.dim, rows), values):
            self._warned_rows.add(local.name)
            warnings.warn(
                f"AutoUnconstrainedDelta: rows of the local site {local.name!r} outside the last minibatch of the plate "
                f"{local.plate!r} changed between two calls: an SG-MCMC optimizer without the table's mask moves every "
                "row, with noise, and samples the rows outside the minibatch from a drifting target; give it "
                "guide.local_options(name, lr=...) in optim_args (see AutoUnconstrainedDelta)", UserWarning,
                stacklevel=4)

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
