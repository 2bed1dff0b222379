r"""Latent variables local to a subsampled plate: one row per element of the plate, kept in a
persistent table and updated a minibatch of rows at a time (a random-scan, blocked SG-MCMC scheme).

A model such as ::

    mu = pyro.sample("mu", dist.Normal(0.0, 10.0))
    with pyro.plate("groups", N, subsample_size=m) as idx:
        theta = pyro.sample("theta", dist.Normal(mu, 1.0))          # local: one value per group
        with pyro.plate("obs", n):
            pyro.sample("y", dist.Normal(theta, 1.0), obs=y[:, idx])

has global latents :math:`g` (``mu``) and, for each element :math:`i` of the plate, local
latents :math:`z_i` (``theta``) whose terms all sit inside the plate, so that

.. math:: \log p(g, z, y) = \log p(g) + \sum_{i=1}^N \ell_i(g, z_i),
          \qquad \ell_i = \log p(z_i \mid g) + \log p(y_i \mid z_i, g) + \log|\det J_i|

in unconstrained coordinates (:math:`J_i` the Jacobian of the local transform of row :math:`i`).
Each step draws a minibatch :math:`S` of :math:`m` rows, runs the model on the globals and on the
table's rows of :math:`S`, and from the one gradient of :math:`\hat U = -\log p(g) -
\frac{N}{m}\sum_{i\in S}\ell_i` (Pyro's plate scaling):

* the globals take a step of the kernel's sampler with :math:`\nabla_g \hat U`, an unbiased
  estimate of :math:`-\nabla_g \log p(g, z, y)` at the current table;
* each row :math:`i \in S` takes an SGLD step with its exact conditional gradient
  :math:`\frac{m}{N}\nabla_{z_i}\hat U = -\nabla_{z_i}\ell_i` (the plate's :math:`N/m` undone: a row's
  own terms count once) and its own step size; rows outside :math:`S` are untouched.

**Stationary law.** The continuous-time dynamics are a sum of generators, one per block (the
globals' sampler, and each row's Langevin diffusion run at rate :math:`m/N`), each of which
leaves the conditional law of its block given the others, hence the joint posterior
:math:`p(g, z \mid y)`, invariant; which rows move is drawn independently of the state (random
scan). The chain therefore samples :math:`p(g, z \mid y)` (at temperature :math:`T`, as the kernel)
up to (a) the :math:`O(\epsilon)` discretisation bias of each block, which each block's step-size
rule holds to about the kernel's ``target_bias`` on its conditional variances (the joint's
variances then move by about as much: on a conjugate hierarchical model the exact stationary law
of the chain is computed in ``tests/hierarchical_normal.py``), (b) the minibatch noise of the
globals' gradient, which their rule counts as without local latents, and (c) that of the rows'
gradients when a plate nested inside, or one crossed with theirs (users' and items' effects, the
ratings in both plates), is subsampled too: a row's gradient undoes its own plate's scaling and
keeps the other's, an unbiased estimate of its conditional gradient whose noise the rows' rule
does not count.
The blocks move given each other (Gibbs-like): where globals and locals are strongly correlated
a posteriori (a centred hierarchy with weakly identified groups) the chain mixes slowly;
non-centred parameterisations help, as for Gibbs samplers.

**Warmup.** Three things differ from a model without local latents (measured on the
hierarchical logistic regression of ``tests/test_local_latents.py``, where without them the
random-effect scale collapsed during arrival and ``log sigma`` then dived to -500 or below):

* the globals take no arrival step (the sampler's largest stable one): their bias rule from the
  start. Rows move at a rate ``m/N`` and start far from their conditional law (drawn by the
  init strategy, independently of the data); globals that take near-independent steps given such
  rows see a scale that only adds noise to the likelihood, collapse it, and the rows given a
  collapsed scale carry no information to bring it back (a Gibbs trap at the funnel's neck);
* the globals' preconditioner takes in the secants of warmup's steps as without minibatches,
  each on the minibatch its step started from (:meth:`LocalLatents.gradient_on`, one more
  evaluation per warmup step): the Hessians at the windows' ends alone see a few places, and a
  scale measured where it is small whitens it far beyond its posterior spread (there, without
  the secants: ``log sigma`` whitened by 7.1, where its posterior sd is about 0.3; 0.2 with all
  three);
* the rows' step follows its rule over every globals measured (:class:`LocalSteps`), and is
  probed after warmup.

**Cost and mixing.** A step costs one model evaluation on the minibatch, whatever ``N`` (each
recorded sample ``O(N)``: the running moments of every row); each row moves at a rate ``m/N``
per step. The globals' minibatch gradient carries the spread of the rows'
terms (for random effects, of the effects around their mean), whose variance grows with ``N/m``
and bounds the globals' step size (the kernels' bias rule counts it): at ``N/m = 100`` the globals
of a random-effects model move far too slowly to settle in a few thousand steps
(``benchmarks/local_latents.py``). ``control_variates=True`` removes most of that noise
(:class:`LocalControlVariates`: an anchor of the globals only, whose full-data gradient is kept
up to date as the rows move; three model evaluations a step).

The scheme is the one of Ahn, Korattikara, Liu, Rajan and Welling (2015), "Large-scale
distributed Bayesian matrix factorization using stochastic gradient MCMC" (KDD), which updates
the factors of the users and items in a minibatch with SGLD and the rest not at all, and of the
blocked (Metropolis-within-Gibbs) Langevin samplers of the latent-variable SG-MCMC literature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

import pyro
import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.ops.streaming import CountMeanVarianceStats
from torch import Tensor

from .. import samplers
from ..functional import NoiseSource, sgld
from .estimators import (Estimate, MinibatchPotential, hessian_vector_product, is_linear_algebra_failure, per_row,
                         power_iteration, row_shape)
from .potential import PotentialEvaluator
from .sites import LocalSite
from .subsample import SubsampleControl, SubsampledPlate, full_data_value_and_grad

__all__ = ["LocalBlock", "LocalControlVariates", "LocalEstimate", "LocalLatents", "LocalMoments", "LocalRecorder", "LocalSteps",
           "LocalTable", "RowCurvature"]

#: Minibatches on which the rows' largest curvature is measured.
CURVATURE_MINIBATCHES = 4
#: Power iterations per measurement (exact in one for a scalar per row).
POWER_ITERATIONS = 8
#: Between the adaptation points after arrival, the rows' largest curvature is measured (on one
#: minibatch) at about this many of warmup's iterations.
WARMUP_OBSERVATIONS = 50
#: After warmup, the rows' largest curvature is probed (on one minibatch, at the chain's globals)
#: every this many recorded samples, to report a step that the globals visited make too large.
PROBE_EVERY = 50
#: A probe reports a problem when the rows' step times the curvature it found exceeds this many
#: times the ``4 * target_bias`` of the rule (the bias on the rows' variances is then more than
#: this many times the target).
PROBE_TOLERANCE = 2.0


class LocalTable:
    """The unconstrained values of every local site, one row per element of its plate.

    :param sites: the local sites.
    :param values: ``{site: tensor}`` of each site's table shape (:attr:`LocalSite.shape`).
    """

    def __init__(self, sites: list[LocalSite], values: dict[str, Tensor]):
        self.sites = {site.name: site for site in sites}
        for name, site in self.sites.items():
            if tuple(values[name].shape) != tuple(site.shape):
                raise ValueError(f"Invalid table of local site {name!r}: shape {tuple(values[name].shape)}, the "
                                 f"model's is {tuple(site.shape)}")
        self.values = {name: values[name].detach().clone() for name in self.sites}

    def gather(self, indices: dict[str, Tensor]) -> dict[str, Tensor]:
        """The rows of each site at its plate's minibatch ``indices[plate]``."""
        out = {}
        for name, site in self.sites.items():
            index = indices.get(site.plate)
            if index is None:
                raise RuntimeError(f"no minibatch indices were given for the plate {site.plate!r} of the local site "
                                   f"{name!r}")
            out[name] = self.values[name].index_select(site.dim, index)
        return out

    def scatter_(self, indices: dict[str, Tensor], rows: dict[str, Tensor]) -> None:
        """Write ``rows`` back at the minibatch ``indices`` (distinct rows)."""
        for name, value in rows.items():
            site = self.sites[name]
            self.values[name].index_copy_(site.dim, indices[site.plate], value.detach())

    def constrained(self) -> dict[str, Tensor]:
        """The table in the sites' supports."""
        return {name: site.transform.inv(self.values[name]) for name, site in self.sites.items()}

    @classmethod
    def initial(cls, model: Callable, model_args: tuple, model_kwargs: dict, sites: list[LocalSite],
                init_strategy: Callable) -> "LocalTable":
        """Every row drawn by ``init_strategy``: the model run on the plate's elements in
        minibatch-sized pieces (the last one padded with rows from the start, not written)."""
        values = {site.name: None for site in sites}
        for plate in sorted({site.plate for site in sites}):
            mine = [site for site in sites if site.plate == plate]
            n, m = mine[0].full_size, mine[0].subsample_size
            everything = torch.arange(n)
            for k in range(math.ceil(n / m)):
                piece = everything[k * m: (k + 1) * m]
                valid = len(piece)
                if valid < m:
                    piece = torch.cat([piece, everything[: m - valid]])
                control = SubsampleControl({plate: piece})
                with poutine.block(), pyro.validation_enabled(False):
                    trace = poutine.trace(InitMessenger(init_strategy)(control(model))).get_trace(
                        *model_args, **model_kwargs)
                for site in mine:
                    row = site.transform(trace.nodes[site.name]["value"].detach()).detach()
                    if values[site.name] is None:
                        values[site.name] = row.new_zeros(site.shape)
                    device_piece = piece[:valid].to(row.device)
                    values[site.name].index_copy_(site.dim, device_piece, row.narrow(site.dim, 0, valid))
        return cls(sites, values)


@dataclass(frozen=True)
class LocalBlock:
    """The local rows one evaluation saw: the minibatch, their values and their conditional
    gradients (the plate's ``N/m`` undone)."""

    indices: dict[str, Tensor]
    rows: dict[str, Tensor]
    grads: dict[str, Tensor]
    #: With :class:`LocalControlVariates`: the globals' minibatch gradient at the anchor, these rows,
    #: and which anchor (:attr:`LocalControlVariates.anchor_version`).
    anchor_grad: Tensor | None = None
    anchor_version: int = 0
    #: With :class:`LocalControlVariates`: what the estimate added to the minibatch gradient
    #: (:math:`G - \nabla_g\hat U_S(\hat g, z_S)`), for secants on the same minibatch.
    correction: Tensor | None = None

    @property
    def finite(self) -> bool:
        return all(bool(torch.isfinite(g).all()) for g in self.grads.values()) and (
            self.anchor_grad is None or bool(torch.isfinite(self.anchor_grad).all()))


@dataclass(frozen=True)
class LocalEstimate(Estimate):
    """An :class:`~pyro_sgmcmc.infer.estimators.Estimate` of the globals, with the local block it
    was computed on."""

    block: LocalBlock | None = None

    @property
    def finite(self) -> bool:
        return Estimate.finite.fget(self) and (self.block is None or self.block.finite)


class LocalLatents(MinibatchPotential):
    """The minibatch potential of a model with local latent sites: at every call a fresh
    minibatch of every subsampled plate, the table's rows of that minibatch as the local sites'
    values, and the gradient with respect to the globals (``N/m``-scaled, unbiased) and to the rows
    (each divided by its plate's ``N/m``: the exact conditional gradient of the row).

    Every other evaluation (curvature of the globals, full-data walks) reads the rows from the
    table as it stands, through the evaluator's ``local_rows``.
    """

    def __init__(self, evaluator: PotentialEvaluator, plates: list[SubsampledPlate], table: LocalTable):
        super().__init__(evaluator, plates)
        self.table = table
        self._generator: torch.Generator | None = None

    def estimate(self, point: Tensor) -> LocalEstimate:
        found = self._on_minibatch(point)
        return LocalEstimate.failed(point.detach()) if found is None else LocalEstimate(*found)

    def _on_minibatch(self, point: Tensor) -> tuple[Tensor, Tensor, LocalBlock] | None:
        """On a fresh minibatch with the table's rows: the potential, the globals' gradient and
        the block (``None`` where a linear-algebra failure makes it a divergence)."""
        control = self.minibatch()
        rows = {name: value.detach().requires_grad_(True) for name, value in self.table.gather(control.indices).items()}
        here = point.detach().requires_grad_(True)
        try:
            with torch.enable_grad():
                value = self.evaluator([here], control, rows=rows)[0]
                grad, *row_grads = torch.autograd.grad(value, [here, *rows.values()], allow_unused=True)
        except RuntimeError as error:
            if is_linear_algebra_failure(error):
                return None
            raise
        grad = torch.zeros_like(here) if grad is None else grad
        grads = {}
        for (name, row), row_grad in zip(rows.items(), row_grads):
            row_grad = torch.zeros_like(row) if row_grad is None else row_grad
            grads[name] = row_grad / self.table.sites[name].scale
        block = LocalBlock(control.indices, {name: row.detach() for name, row in rows.items()}, grads)
        return value.detach(), grad, block

    def rows_moved(self, block: LocalBlock) -> None:
        """Called after the rows of ``block`` took their step (nothing to do here)."""

    def rows_restored(self) -> None:
        """Called after the rows of the last step went back (nothing to do here)."""

    def reanchor(self, point: Tensor) -> None:
        """Called at warmup's adaptation points and its end (nothing to do here)."""

    fixed_minibatch_secants = True
    #: No arrival step for the globals: see the module's docstring, "Warmup".
    arrival_steps = False

    def gradient_on(self, point: Tensor, estimate: Estimate) -> Tensor | None:
        """The globals' gradient at ``point`` on ``estimate``'s minibatch with its rows as they
        were (before their step): a step's secant ``gradient_on(new) - estimate.grad`` is then
        the globals' Hessian (given the rows, on that minibatch) along the step, free of
        minibatch noise."""
        block = getattr(estimate, "block", None)
        if block is None:
            return None
        try:
            grad = self.globals_gradient(point, block.indices, block.rows)
        except RuntimeError as error:
            if is_linear_algebra_failure(error):
                return None
            raise
        return grad if bool(torch.isfinite(grad).all()) else None

    def globals_gradient(self, point: Tensor, indices: dict[str, Tensor], rows: dict[str, Tensor]) -> Tensor:
        """The gradient with respect to the globals ``point`` of the potential on the minibatch
        ``indices`` with the local sites' ``rows``."""
        here = point.detach().requires_grad_(True)
        with torch.enable_grad():
            value = self.evaluator([here], SubsampleControl(dict(indices)), rows=dict(rows))[0]
            (grad,) = torch.autograd.grad(value, here, allow_unused=True)
        return torch.zeros_like(here) if grad is None else grad

    def row_curvature(self, point: Tensor, name: str, minibatches: int = CURVATURE_MINIBATCHES,
                      smallest: bool = True) -> RowCurvature:
        r"""The largest and smallest curvature of the rows' conditional potentials :math:`-\ell_i`
        in the site ``name`` over the rows of ``minibatches`` minibatches, at the globals ``point``:
        power iteration on Hessian-vector products
        (:func:`~pyro_sgmcmc.infer.estimators.power_iteration` and
        :func:`~pyro_sgmcmc.infer.estimators.hessian_vector_product`) of every row at once (rows
        are independent given the globals: the Hessian is block-diagonal over them), then (unless
        ``smallest=False``) on ``largest - H`` per row for the smallest. The minibatches and the
        iterations' starts come from a generator of the measurements' own (:attr:`generator`):
        measuring moves neither torch's global generator nor, therefore, the chain."""
        site = self.table.sites[name]
        want_smallest = smallest
        largest, smallest = 0.0, math.inf
        for _ in range(minibatches):
            control = self.minibatch(self.generator)
            rows = self.table.gather(control.indices)
            product = hessian_vector_product(
                lambda leaf: self.evaluator([point.detach()], control, rows={**rows, name: leaf})[0], rows[name])
            like = rows[name]
            top = power_iteration(product, like, POWER_ITERATIONS, self.generator, dim=site.dim)
            if not bool(top.any()):
                continue  # linear in the row: no curvature
            if want_smallest:
                shift = top.reshape(row_shape(like, site.dim))
                bottom = top - power_iteration(lambda v: shift * v - product(v), like, POWER_ITERATIONS,
                                               self.generator, dim=site.dim)
            else:
                bottom = top
            high, low = float(top.max()) / site.scale, float(bottom.min()) / site.scale
            if math.isfinite(high) and math.isfinite(low):
                largest, smallest = max(largest, high), min(smallest, low)
        return RowCurvature(largest, smallest if math.isfinite(smallest) else 0.0)

    @property
    def generator(self) -> torch.Generator:
        """The generator of the rows' curvature measurements (minibatches and power iterations'
        starts), on the table's device, seeded alike in every chain: a measurement during warmup
        sets a step size from its own draws, and a probe after warmup leaves the chain as it was."""
        if self._generator is None:
            device = next(iter(self.table.values.values())).device
            self._generator = torch.Generator(device=device).manual_seed(0)
        return self._generator


class LocalControlVariates(LocalLatents):
    r"""Control variates for the globals' gradient of a model with local latents: the estimator
    of Baker et al. (2019) around an anchor :math:`\hat g` of the globals only, with the anchor's
    full-data gradient kept up to date as the rows move (no anchor per row, no mode of the rows).

    With :math:`\hat U_S(g, z_S)` the potential on the minibatch :math:`S` (the plate's ``N/m``
    in it) and :math:`G(\hat g, z) = \nabla_g U(\hat g, z)` the full-data gradient at the anchor
    and the table as it stands,

    .. math:: \tilde\nabla_g = \nabla_g\hat U_S(g, z_S) - \nabla_g\hat U_S(\hat g, z_S) + G(\hat g, z),

    unbiased for :math:`\nabla_g U(g, z)` over :math:`S`, with a noise that shrinks with
    :math:`|g - \hat g|` (and vanishes where the rows' terms are linear in the globals given the
    rows: a random effect's mean). When the rows of :math:`S` take their step
    :math:`z_S \to z_S'`, :math:`G` changes by
    :math:`\frac{m}{N}(\nabla_g\hat U_S(\hat g, z_S') - \nabla_g\hat U_S(\hat g, z_S))` (the prior
    terms cancel): one more minibatch evaluation (:meth:`rows_moved`; undone with the rows by
    :meth:`rows_restored`), three per step in all, against the ``O(N/m)`` growth of the plain
    gradient's variance. The rows' own gradients stay the exact conditional ones.

    The anchor is the chain's start, then its globals at each adaptation point of warmup and at
    its end (:meth:`reanchor`, one full-data pass each, ``G`` recomputed afresh there), fixed
    after warmup. One subsampled plate, the local sites' (a plate subsampled inside it would make
    every update of ``G`` a noisy one, and ``G`` a random walk: refused by the kernel).
    """

    def __init__(self, evaluator: PotentialEvaluator, plates: list[SubsampledPlate], table: LocalTable):
        super().__init__(evaluator, plates, table)
        self._anchor: Tensor | None = None
        #: :math:`G(\hat g, z)`, float64 (its updates accumulate).
        self.anchor_full_grad: Tensor | None = None
        self._pending: Tensor | None = None
        #: Counts the anchors: a block measured at an earlier one is measured again.
        self.anchor_version = 0

    @property
    def anchor_point(self) -> Tensor | None:
        return self._anchor

    def prepare(self, point: Tensor) -> Tensor:
        if self._anchor is None:
            self.reanchor(point)
        return point

    def reanchor(self, point: Tensor) -> None:
        """Move the anchor to the globals ``point`` and compute the full-data gradient there, at
        the table as it stands."""
        leaf = point.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            _, (grad,) = full_data_value_and_grad(
                lambda control, jacobian: self.evaluator([leaf], control, jacobian)[0], self.plates[0], [leaf])
        self._anchor = leaf.detach()
        self.anchor_full_grad = grad.detach().double()
        self._pending = None
        self.anchor_version += 1

    def estimate(self, point: Tensor) -> LocalEstimate:
        if self._anchor is None:
            return super().estimate(point)
        found = self._on_minibatch(point)
        if found is None:
            return LocalEstimate.failed(point.detach())
        value, grad, block = found
        try:
            at_anchor = self.globals_gradient(self._anchor, block.indices, block.rows)
        except RuntimeError as error:
            if is_linear_algebra_failure(error):
                return LocalEstimate.failed(point.detach())
            raise
        correction = self.anchor_full_grad.to(grad.dtype) - at_anchor
        return LocalEstimate(value, grad + correction, replace(block, anchor_grad=at_anchor,
                                                               anchor_version=self.anchor_version,
                                                               correction=correction))

    def gradient_on(self, point: Tensor, estimate: Estimate) -> Tensor | None:
        """As :meth:`LocalLatents.gradient_on`, with ``estimate``'s correction: a secant is then the
        difference of two gradients on one minibatch, free of its noise (without the correction it
        would carry the minibatch noise at the anchor, and warmup would take it for curvature)."""
        same = super().gradient_on(point, estimate)
        block = getattr(estimate, "block", None)
        if same is None or block is None or block.correction is None:
            return same
        return same + block.correction

    def rows_moved(self, block: LocalBlock) -> None:
        """The rows of ``block`` have taken their step (the table holds them): bring ``G`` up to
        date (undone by :meth:`rows_restored`)."""
        self._pending = None
        if self._anchor is None:
            return
        before = block.anchor_grad
        if before is None or block.anchor_version != self.anchor_version:  # measured before a reanchor
            before = self.globals_gradient(self._anchor, block.indices, block.rows)
        moved = self.globals_gradient(self._anchor, block.indices, self.table.gather(block.indices))
        scale = next(iter(self.table.sites.values())).scale  # the plate's N/m
        self._pending = (moved.double() - before.double()) / scale
        self.anchor_full_grad += self._pending

    def rows_restored(self) -> None:
        """The rows of the last :meth:`rows_moved` went back: so does ``G``."""
        if self._pending is not None:
            self.anchor_full_grad -= self._pending
            self._pending = None

    def state_dict(self) -> dict:
        if self._anchor is None:
            return {}
        return {"local_anchor": {"point": self._anchor, "full_grad": self.anchor_full_grad}}

    def load_state_dict(self, state: dict) -> None:
        saved = state.get("local_anchor")
        if saved is not None:
            self._anchor = saved["point"].detach().clone()
            self.anchor_full_grad = saved["full_grad"].detach().clone().double()
            self._pending = None


@dataclass(frozen=True)
class RowCurvature:
    """The largest and smallest curvature of the rows' conditionals measured (per unit of ``U``)."""

    largest: float
    smallest: float


class LocalSteps:
    r"""The rows' SGLD steps (:func:`pyro_sgmcmc.functional.sgld`, the one implementation of the
    update), one step size per local site:

    .. math:: z_i \leftarrow z_i - \frac{\epsilon_s}{2}\,\frac{1}{T}\nabla_{z_i}(-\ell_i)
              + \sqrt{\epsilon_s}\,\xi_i, \qquad i \in S.

    Whatever the kernel's sampler, rows take SGLD steps: a momentum or thermostat per row would
    go stale between a row's visits (each row is visited at a rate ``m/N``).

    **Step sizes.** Each site's :math:`\epsilon_s` follows SGLD's bias rule
    (:meth:`pyro_sgmcmc.samplers.SGLD.suggest_lr`, ``4 t / lambda``) with ``lambda`` the largest
    curvature of a row's conditional (:meth:`LocalLatents.row_curvature`, a few minibatches): the
    rows' conditional curvature is not the globals' (it is that of one group's data, not of all of
    it), so they cannot share the globals' step. A row's curvature depends on the globals (with a
    random intercept ``sigma * eta_i`` in a logistic regression it is ``1 + sigma^2 sum_j
    p_ij (1 - p_ij)``), so ``lambda`` is not measured at one point: it is the largest curvature
    measured over the second half of warmup, at its adaptation points (the windows' ends, a few
    minibatches each), at about :data:`WARMUP_OBSERVATIONS` / 2 iterations between them (one
    minibatch each, :meth:`observe`) and once more at the end of warmup, at the final globals.
    Earlier measurements set the step of the moment only: the chain may still be on its way in
    (from a start at ``sigma = 7``, a curvature of 180 was measured after arrival and would
    have frozen the rows). The step is then frozen: after warmup the rows' sampler has fixed
    parameters, as the globals' has.

    What the rule guarantees: a relative bias of at most about ``target_bias`` on each row's
    conditional variance for every row and every globals at which a curvature was measured in
    the second half of warmup (and wherever the rows' curvature is no larger). What it does not: a row or a globals that warmup
    never saw may have a larger curvature (a scale parameter that warmup only saw small): its bias
    is then ``lr * curvature / 4`` and the step is unstable beyond ``curvature = 4 / lr``. That is
    not silent: after warmup the rows' largest curvature is probed on one minibatch at the chain's
    globals every :data:`PROBE_EVERY` recorded samples (:meth:`probe`; the chain is not changed),
    and a step whose bias there exceeds :data:`PROBE_TOLERANCE` times the target, or that is
    unstable there, is reported by the kernel's :meth:`~pyro_sgmcmc.infer.SGMCMCKernel.diagnostics`
    (``"mixing problems"``, :class:`~pyro_sgmcmc.infer.MixingWarning`). A row step whose gradient or
    update is not finite is undone and counted as a divergence. Gradient noise of the rows (a
    nested subsampled plate) is not in the rule.

    **Exact on Gaussian rows** (``exact_gaussian``): the noise is scaled down to
    :math:`\sigma^2 = 1 - \epsilon_s c_s/4` with :math:`c_s` the midpoint of the rows' measured
    (tempered) curvatures, SGLD's ``reference_curvature`` (see :class:`pyro_sgmcmc.samplers.SGLD`):
    a row whose conditional is Gaussian of curvature :math:`c_s` is then sampled exactly at any
    step below :math:`4/c_s`, and the step follows that rule's bound
    (``suggest_lr(..., smallest_curvature, reference_curvature)``), up to :math:`2/c_s`, an almost
    independent draw of the row at each visit. Rows far from Gaussian (a hierarchical scale per
    row) are better served by plain steps.

    :param table: the local table, updated in place.
    :param temperature: the kernel's temperature.
    :param exact_gaussian: scale the noise for rows exact on a reference Gaussian (above).
    """

    def __init__(self, table: LocalTable, temperature: float, exact_gaussian: bool = False):
        self.table = table
        self.temperature = temperature
        self.exact_gaussian = exact_gaussian
        self.step_sizes: dict[str, float] = {}
        self.reference: dict[str, float] = {}
        #: The extremes of the rows' curvatures measured since arrival ended, per site.
        self.measured: dict[str, RowCurvature] = {}
        #: After warmup: the largest ``(step * curvature, curvature)`` probed, per site.
        self.probed: dict[str, tuple[float, float]] = {}
        #: Whether the step sizes are the user's (``local_step_size``), not the rule's.
        self.given = False
        self.noise = NoiseSource(None)

    def measure(self, estimator: LocalLatents, point: Tensor, target_bias: float, arrival: bool,
                step_size: float | None = None, fresh: bool = False) -> None:
        """Measure the rows' curvatures at the globals ``point`` and set every site's step size
        (see the class docstring), unless ``step_size`` is given (then only the reference curvature
        is set). While ``arrival``: the rule at this point alone, without a reference, and nothing
        is kept (a place the chain leaves). After arrival: the extremes of every measurement since
        the last ``fresh`` one (in the first half of warmup, where the chain may still be on its
        way, each measurement is fresh), this one included."""
        for name in self.table.sites:
            curvature = estimator.row_curvature(point, name)
            if curvature.largest <= 0:
                if name not in self.step_sizes:
                    raise ValueError(f"The conditional potential of the local site {name!r} has no curvature at the "
                                     "chain's start (it does not depend on the site?): give local_step_size")
                continue
            if arrival:
                self.measured.pop(name, None)
            elif fresh:
                self.measured[name] = curvature
            else:
                seen = self.measured.get(name)
                if seen is not None:
                    curvature = RowCurvature(max(seen.largest, curvature.largest),
                                             min(seen.smallest, curvature.smallest))
                self.measured[name] = curvature
            reference = 0.0
            if self.exact_gaussian and not arrival:
                reference = (curvature.largest + curvature.smallest) / 2 / self.temperature
            self.reference[name] = reference
            if step_size is not None:
                self.step_sizes[name] = step_size
            else:
                # the bias rule while arriving too: the globals' arrival step (the largest stable
                # one) would make every visit of a row a near-independent draw from an inflated
                # law, and the globals, seeing rows uncorrelated with their data, collapse a
                # scale (measured: sigma of a hierarchical logistic regression to 1e-200)
                self.step_sizes[name] = samplers.SGLD.suggest_lr(
                    curvature.largest, 0.0, target_bias, self.temperature,
                    smallest_curvature=curvature.smallest, reference_curvature=reference)

    def observe(self, estimator: LocalLatents, point: Tensor, fresh: bool = False) -> None:
        """During the second half of warmup: the rows' largest curvature on one minibatch at the
        globals ``point`` joins the measurements (replaces them if ``fresh``; the step follows at
        the next :meth:`measure`)."""
        for name in self.table.sites:
            seen = self.measured.get(name)
            if seen is None:
                continue
            largest = estimator.row_curvature(point, name, minibatches=1, smallest=False).largest
            if math.isfinite(largest) and (fresh or largest > seen.largest):
                self.measured[name] = RowCurvature(largest, seen.smallest)

    def probe(self, estimator: LocalLatents, point: Tensor) -> None:
        """After warmup: the rows' largest curvature on one minibatch at the globals ``point``;
        keeps the largest ``step * curvature`` (tempered) seen per site (:meth:`problems`)."""
        for name in self.table.sites:
            if name not in self.step_sizes:
                continue
            largest = estimator.row_curvature(point, name, minibatches=1, smallest=False).largest / self.temperature
            # the bias grows with the curvature's excess over the reference (none: over 0)
            product = self.step_sizes[name] * (largest - self.reference.get(name, 0.0))
            if self.step_sizes[name] * largest >= 4:
                product = max(product, 4.0)  # unstable, reference or not
            if math.isfinite(product) and product > self.probed.get(name, (0.0, 0.0))[0]:
                self.probed[name] = (product, largest)

    def problems(self, target_bias: float) -> list[str]:
        """The sites whose probed ``step * curvature`` (its excess over the reference curvature,
        with ``exact_gaussian``) exceeds :data:`PROBE_TOLERANCE` times the rule's ``4 target_bias``,
        or 4, where the step is unstable, as mixing problems. With the user's ``local_step_size``
        (:attr:`given`), only an unstable one: its bias is the user's choice."""
        out = []
        for name, (product, largest) in self.probed.items():
            if product < 4 and (self.given or product <= PROBE_TOLERANCE * 4 * target_bias):
                continue
            measured = self.measured.get(name)
            warmup = "" if measured is None else f" (warmup measured at most {measured.largest / self.temperature:.3g})"
            what = ("unstable there (step * curvature >= 4: the rows oscillate and grow)" if product >= 4 else
                    f"a relative bias of about {product / 4:.2g} on the rows' conditional variances there, "
                    f"{product / 4 / target_bias:.1f} times target_bias")
            out.append(f"the rows of the local site {name!r} reached a curvature of {largest:.3g} at the globals the "
                       f"chain visited after warmup{warmup}: their step {self.step_sizes[name]:.3g} gives {what}; "
                       "remedies: more warmup_steps (so that warmup sees the globals the chain visits), a smaller "
                       "local_step_size, or a parameterisation whose rows' curvature depends less on the globals")
        return out

    def noise_level(self, name: str) -> float:
        r""":math:`\sigma` of the site's rows: 1, or :math:`\sqrt{1 - \epsilon_s c_s/4}` on a reference."""
        factor = 1.0 - self.step_sizes[name] * self.reference.get(name, 0.0) / 4
        if factor <= 0:
            raise ValueError(f"Invalid local_step_size: {self.step_sizes[name]:g} with the local site {name!r}'s "
                             f"reference curvature {self.reference[name]:g} leaves no noise to inject (must be "
                             f"below {4 / self.reference[name]:g})")
        return math.sqrt(factor)

    def step(self, block: LocalBlock) -> dict[str, Tensor]:
        """The SGLD step of the block's rows, written into the table; returns the rows before it
        (for :meth:`undo`). Raises :class:`~pyro_sgmcmc.functional.NonFiniteError`, changing
        nothing, if a gradient or the update is not finite."""
        updated = {}
        for name, rows in block.rows.items():
            new = rows.clone()
            sgld([new], [block.grads[name]], lr=self.step_sizes[name], grad_scale=1.0 / self.temperature,
                 noise_level=self.noise_level(name), noise=self.noise)
            updated[name] = new
        self.table.scatter_(block.indices, updated)
        return block.rows

    def undo(self, block: LocalBlock, previous: dict[str, Tensor]) -> None:
        """Put the rows of ``block`` back to ``previous``."""
        self.table.scatter_(block.indices, previous)


@dataclass(frozen=True)
class LocalMoments:
    """The running mean and variance of a local site's rows (constrained values), over ``count``
    samples."""

    count: int
    mean: Tensor
    variance: Tensor

    @property
    def sd(self) -> Tensor:
        return self.variance.sqrt()


class LocalRecorder:
    """The samples of the local sites of one chain: running moments of every row always
    (``O(N)`` memory), and with ``keep="all"`` every ``thin``-th sample of every row too.

    :param keep: ``"moments"`` or ``"all"``.
    :param thin: keep every ``thin``-th sample (``"all"`` only).
    """

    def __init__(self, keep: str, thin: int):
        self.keep = keep
        self.thin = thin
        self.count = 0
        self.stats: dict[str, CountMeanVarianceStats] = {}
        self.kept: dict[str, list[Tensor]] = {}

    def record(self, table: LocalTable) -> None:
        values = table.constrained()
        for name, value in values.items():
            self.stats.setdefault(name, CountMeanVarianceStats()).update(value.detach())
            if self.keep == "all" and self.count % self.thin == 0:
                self.kept.setdefault(name, []).append(value.detach().clone())
        self.count += 1

    def moments(self) -> dict[str, LocalMoments]:
        out = {}
        for name, stats in self.stats.items():
            got = stats.get()
            out[name] = LocalMoments(int(got["count"]), got["mean"], got["variance"])
        return out

    def samples(self) -> dict[str, Tensor]:
        return {name: torch.stack(values) for name, values in self.kept.items()}


def merged_moments(recorders: list[LocalRecorder]) -> dict[str, LocalMoments]:
    """The moments of several chains' recorders pooled."""
    merged: dict[str, CountMeanVarianceStats] = {}
    for recorder in recorders:
        for name, stats in recorder.stats.items():
            merged[name] = stats if name not in merged else merged[name].merge(stats)
    out = {}
    for name, stats in merged.items():
        got = stats.get()
        out[name] = LocalMoments(int(got["count"]), got["mean"], got["variance"])
    return out


def check_local_options(keep: Any, thin: Any) -> tuple[str, int]:
    """Validate the kernel's ``local_samples`` and ``local_thin``."""
    if keep not in ("moments", "all"):
        raise ValueError(f"Invalid local_samples: {keep!r} (must be 'moments', running means and variances of every "
                         "row, or 'all', every local_thin-th sample of every row)")
    if isinstance(thin, bool) or not isinstance(thin, int) or thin < 1:
        raise ValueError(f"Invalid local_thin: {thin!r} (must be an integer >= 1)")
    return keep, thin

