"""The potential energy of a Pyro model in unconstrained space, and how it is evaluated.

* :class:`ModelPotential` -- ``U(u) = -log p(x, T(u)) - log|det dT/du|``, run afresh at every call
  so that each evaluation sees a fresh minibatch of every ``pyro.plate(..., subsample_size=m)``
  (or the one a :class:`~pyro_sgmcmc.infer.subsample.SubsampleControl` imposes);
* :func:`model_sites` -- the latent sites of a model, their transforms and its subsampled plates;
* :func:`find_initial_point` -- an initial point where the potential and its gradient are finite,
  retrying the init strategy as Pyro's HMC does;
* :class:`FlatLayout` -- ``{site: tensor}`` to one flat vector and back;
* :class:`PotentialEvaluator` -- ``U`` at flat points, in Python or through ``torch.jit.trace``.

Used by the MCMC kernels (through :mod:`pyro_sgmcmc.infer.estimators`) and by the SVI-side
:class:`~pyro_sgmcmc.infer.ControlVariateELBO`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask, sum_rightmost
from pyro.infer.autoguide.initialization import InitMessenger
from pyro.infer.util import is_validation_enabled
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import ignore_jit_warnings
from torch import Tensor
from torch.distributions import biject_to

from .sites import LocalSite, check_latent_site, trace_model
from .subsample import SubsampleControl, SubsampledPlate, subsampled_plates

__all__ = ["FlatLayout", "ModelPotential", "ModelSites", "PotentialEvaluator", "find_initial_point", "model_sites"]


class _LogJoint(Messenger):
    """Conditions latent sites on ``values`` and sums the scaled, masked log density of every
    sample site as the model runs: ``poutine.trace(poutine.condition(model, values)).log_prob_sum()``
    without building the trace (15% of a small model's evaluation, measured)."""

    def __init__(self, values: dict[str, Tensor], row_log_det: dict[str, Tensor] | None = None):
        super().__init__()
        self.values = values
        self.row_log_det = row_log_det or {}
        self.total: Tensor | float = 0.0

    def _pyro_sample(self, msg: dict) -> None:
        value = self.values.get(msg["name"])
        if value is not None:
            msg["value"] = value
            msg["is_observed"] = True

    def _pyro_post_sample(self, msg: dict) -> None:
        if site_is_subsample(msg):
            return
        log_p = msg["fn"].log_prob(msg["value"], *msg["args"], **msg["kwargs"])
        log_det = self.row_log_det.get(msg["name"])
        if log_det is not None:  # a local site's Jacobian, row by row, scaled as its log density
            log_p = log_p + log_det
        self.total = self.total + scale_and_mask(log_p, msg["scale"], msg["mask"]).sum()


class ModelPotential:
    r"""The potential energy of a Pyro model in unconstrained space,

    .. math:: U(u) = -\log p(x, T(u)) - \log\left|\det \frac{\partial T}{\partial u}\right|,

    as Pyro's HMC uses, but evaluated by running the model afresh at every call, so that each
    evaluation sees a fresh minibatch of every ``pyro.plate(..., subsample_size=m)`` (whose log
    likelihood Pyro scales by ``N/m``, an unbiased estimate of the full-data one). Pyro's
    ``initialize_model`` refuses subsample sites, rightly for HMC; here they are the point.

    The first evaluation with Pyro's validation enabled checks distribution arguments and
    supports through a full trace; every other one runs without validation and sums the log
    densities as the sites go by, without a trace (about a third of a small model's evaluation). A value that would have failed validation later shows up as a
    non-finite potential, which the kernels treat as a divergence. So does a constrained value
    that overflows (``exp`` of a large log-scale): it is added to the potential times 0, which
    is 0 for a finite value and NaN for an infinite one, so no step can land there unnoticed.

    :param model: the Pyro model.
    :param transforms: ``{site: transform}`` from constrained to unconstrained space.
    :param model_args: the model's positional arguments.
    :param model_kwargs: the model's keyword arguments.
    :param local_sites: sites local to a subsampled plate (:class:`~pyro_sgmcmc.infer.sites.LocalSite`):
        ``params`` holds their minibatch rows, and the log-Jacobian of each row is added to the
        row's log density, so that the plate scales it as it scales the row (by ``N/m``).
    """

    def __init__(self, model: Callable, transforms: dict[str, Any], model_args: tuple, model_kwargs: dict,
                 local_sites: Sequence[LocalSite] = ()):
        self.model = model
        self.transforms = transforms
        self.local_sites = {site.name: site for site in local_sites}
        self.model_args = model_args
        self.model_kwargs = model_kwargs
        self._validated = False
        #: whether the model has run once (so that it may be traced: the first run is Pyro's validation)
        self.evaluated = False

    def constrained(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The constrained values ``T(u)`` of ``params``."""
        return {name: transform.inv(params[name]) for name, transform in self.transforms.items()}

    def __call__(self, params: dict[str, Tensor], control: SubsampleControl | None = None,
                 jacobian: bool = True) -> Tensor:
        """``U(params)``; under ``control`` (e.g. a given minibatch), and without the
        log-Jacobian if ``jacobian`` is false (a piece of a full-data sum that counts it once)."""
        values, log_det = {}, 0.0
        for name, transform in self.transforms.items():
            to_constrained = transform.inv
            values[name] = value = to_constrained(params[name])
            if jacobian:
                log_det = log_det + to_constrained.log_abs_det_jacobian(params[name], value).sum()
                if to_constrained.codomain is not torch.distributions.constraints.real:
                    log_det = log_det + 0.0 * value.detach().sum()  # NaN if the value overflowed
        row_log_det = {}
        for name, site in self.local_sites.items():
            to_constrained = site.transform.inv
            values[name] = value = to_constrained(params[name])
            ladj = to_constrained.log_abs_det_jacobian(params[name], value)
            row_log_det[name] = sum_rightmost(ladj, site.event_dim - to_constrained.codomain.event_dim)
            if to_constrained.codomain is not torch.distributions.constraints.real:
                log_det = log_det + 0.0 * value.detach().sum()  # NaN if the value overflowed
        self.evaluated = True
        # Pyro's argument/support checks once (when validation is on), not at every one of thousands of calls
        if self._validated or not is_validation_enabled():
            log_joint = _LogJoint(values, row_log_det)
            model = self.model if control is None else control(self.model)
            with pyro.validation_enabled(False), log_joint:
                model(*self.model_args, **self.model_kwargs)
            return -(log_joint.total + log_det)
        conditioned = poutine.condition(self.model, data=values)
        if control is not None:
            conditioned = control(conditioned)
        trace = poutine.trace(conditioned).get_trace(*self.model_args, **self.model_kwargs)
        for name, row in row_log_det.items():
            node = trace.nodes[name]
            log_det = log_det + scale_and_mask(row, node["scale"], node["mask"]).sum()
        potential = -(trace.log_prob_sum() + log_det)
        self._validated = True
        return potential


@dataclass(frozen=True)
class ModelSites:
    """What a kernel needs to know of a model's latent sites: the transforms to unconstrained
    space of its global ones, the model's subsampled plates, and its sites local to one of them."""

    transforms: dict[str, Any]
    plates: list[SubsampledPlate]
    local_sites: list[LocalSite] = field(default_factory=list)


def model_sites(model: Callable, model_args: tuple, model_kwargs: dict, allow_local: bool = False) -> ModelSites:
    """Run the model once (drawing from its prior) for its structure. Refuses, with a clear
    error, the latent sites SG-MCMC cannot sample (:func:`~pyro_sgmcmc.infer.sites.check_latent_site`;
    with ``allow_local``, sites local to one subsampled plate are returned in ``local_sites``)
    and a model with no latent site. The global RNG is left as it was."""
    rng = pyro.util.get_rng_state()  # the structure run must not move the RNG (a continued chain draws as before)
    try:
        with poutine.block(), pyro.validation_enabled(False):  # a prior draw may be an invalid point
            structure = trace_model(model, *model_args, **model_kwargs)
    finally:
        pyro.util.set_rng_state(rng)
    transforms, local_sites = {}, []
    for name, site in structure.iter_stochastic_nodes():
        if site_is_subsample(site):
            continue
        frame = check_latent_site(name, site, allow_local)
        transform = biject_to(site["fn"].support).inv
        if frame is None:
            transforms[name] = transform
        else:
            local_sites.append(LocalSite.of(name, site, frame, transform))
    if not transforms and not local_sites:
        raise ValueError("The model has no latent sites to sample (every sample site is observed)")
    if not transforms:
        raise NotImplementedError(
            f"The model's latent sites ({', '.join(repr(s.name) for s in local_sites)}) are all local to a subsampled "
            "plate: the kernels need at least one global latent site (one value for all the data) to return as "
            "samples; without one, the rows are conditionally independent: run without subsampling")
    return ModelSites(transforms, subsampled_plates(structure), local_sites)


def initial_values(model: Callable, model_args: tuple, model_kwargs: dict, transforms: dict[str, Any],
                   init_strategy: Callable) -> dict[str, Tensor]:
    """One draw of the init strategy, in the coordinates of ``transforms`` (unconstrained)."""
    with poutine.block(), pyro.validation_enabled(False):  # an invalid draw is retried by the caller
        trace = poutine.trace(InitMessenger(init_strategy)(model)).get_trace(*model_args, **model_kwargs)
    return {name: transform(trace.nodes[name]["value"].detach()).detach() for name, transform in transforms.items()}


def find_initial_point(draw: Callable[[], dict[str, Tensor]], is_valid: Callable[[dict[str, Tensor]], bool],
                       max_tries: int = 100) -> dict[str, Tensor]:
    """The first of up to ``max_tries`` draws where ``is_valid`` holds (the potential and its
    gradient finite there), as Pyro's ``initialize_model`` retries its init strategy; a clear
    error if none is."""
    for _ in range(max_tries):
        point = draw()
        if is_valid(point):
            return point
    raise ValueError(
        f"Could not find a valid initial point in {max_tries} tries: the potential energy or its gradient is "
        "not finite at every point the init strategy proposed. Check the model's support, or give "
        "init_strategy (e.g. pyro.infer.autoguide.initialization.init_to_value) or initial_params")


class FlatLayout:
    """The sites of a point as one flat vector: ``{site: tensor}`` <-> ``tensor[d]``, sites in
    name order (as :class:`pyro.infer.MCMC` orders them)."""

    def __init__(self, params: dict[str, Tensor]):
        self.entries = [(name, params[name].shape, params[name].numel()) for name in sorted(params)]
        self.size = sum(size for _, _, size in self.entries)

    def flatten(self, params: dict[str, Tensor]) -> Tensor:
        return torch.cat([torch.as_tensor(params[name]).reshape(-1) for name, _, _ in self.entries])

    def unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, shape, size in self.entries:
            out[name] = flat[offset: offset + size].view(shape)
            offset += size
        return out

    def describe(self) -> list[tuple[str, tuple[int, ...]]]:
        """``[(site, shape)]``: what a saved state records to be checked against a model."""
        return [(name, tuple(shape)) for name, shape, _ in self.entries]


class PotentialEvaluator:
    """``U`` at flat points under one minibatch control, traced per kind of call if asked.

    Running a Pyro model costs Python time for every ``pyro.sample`` and handler, however small
    the model. With ``jit_compile`` (as for Pyro's HMC) each kind of call (a minibatch, a pair
    of points on one minibatch, a piece of a full-data walk) is traced once into a TorchScript
    graph that replays the tensor operations without the Python (about 2x cheaper on small
    models). The minibatch indices, the row weights of a full-data walk and the points are
    inputs of the graph, so one trace serves every minibatch; the data, the model's structure
    and its constants are frozen into it. As with HMC, that is only correct for a model whose
    operations do not depend on the values of its latent sites or on its minibatch.

    :param potential: ``(params, control, jacobian) -> U`` for a model (a :class:`ModelPotential`)
        or ``params -> U`` (a user's ``potential_fn``, never under a control).
    :param unflatten: flat tensor -> ``{site: tensor}``.
    :param jit_compile: trace the evaluations with ``torch.jit.trace``.
    :param jit_options: keyword arguments of ``torch.jit.trace`` (default ``{"check_trace": False}``,
        as Pyro's HMC).
    :param ignore_jit_warnings: silence the tracer's warnings while tracing.
    :param local_rows: for a model with sites local to a subsampled plate, ``indices -> {site: rows}``
        (:meth:`pyro_sgmcmc.infer.local.LocalTable.gather`): the rows of each local site at the
        minibatch a call imposes, unless the call gives them (``rows``).
    """

    def __init__(self, potential: Callable, unflatten: Callable[[Tensor], dict[str, Tensor]], *, is_model: bool,
                 jit_compile: bool = False, jit_options: dict[str, Any] | None = None,
                 ignore_jit_warnings: bool = False,
                 local_rows: Callable[[dict[str, Tensor]], dict[str, Tensor]] | None = None):
        if local_rows is not None and jit_compile:
            raise NotImplementedError("Invalid jit_compile: True is not supported with latent sites local to a "
                                      "subsampled plate (their rows would have to be inputs of the traced graph)")
        self.local_rows = local_rows
        self.potential = potential
        self.unflatten = unflatten
        self.is_model = is_model
        self.jit_compile = jit_compile
        self.jit_options = {"check_trace": False} if jit_options is None else dict(jit_options)
        self.ignore_jit_warnings = ignore_jit_warnings
        self._traced: dict[tuple, Callable] = {}

    def __call__(self, points: Sequence[Tensor], control: SubsampleControl | None = None,
                 jacobian: bool = True, rows: dict[str, Tensor] | None = None) -> list[Tensor]:
        """``[U(point) for point in points]``, every one under ``control`` (the same minibatch);
        ``rows``: the local sites' rows at that minibatch (default: from ``local_rows``)."""
        if self.local_rows is not None:
            if rows is None:
                if control is None:
                    raise RuntimeError("a model with local latent sites is evaluated on given minibatch indices only")
                rows = self.local_rows(control.indices)
            return [self._python(point, control, jacobian, rows) for point in points]
        # the model's first evaluation runs in Python: it is the one Pyro validates
        if not self.jit_compile or (self.is_model and not self.potential.evaluated):
            return [self._python(point, control, jacobian) for point in points]
        indices = sorted(control.indices.items()) if control is not None else []
        weights = sorted(control.weights.items()) if control is not None else []
        keep_outside = control.keep_outside if control is not None else True
        key = (len(points), tuple(n for n, _ in indices), tuple(n for n, _ in weights), keep_outside, jacobian,
               control is None)
        inputs = (*points, *(v for _, v in indices), *(v for _, v in weights))
        traced = self._traced.get(key)
        if traced is None:
            traced = self._trace(key, inputs)
        out = traced(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def _python(self, point: Tensor, control: SubsampleControl | None, jacobian: bool,
                rows: dict[str, Tensor] | None = None) -> Tensor:
        params = self.unflatten(point)
        if rows:
            params = {**params, **rows}
        if not self.is_model:
            value = self.potential(params)
            if not isinstance(value, Tensor):
                raise TypeError(f"Invalid potential_fn: it returned {type(value).__name__} {value!r} "
                                "(must return a scalar tensor, differentiable in the params)")
            return value
        return self.potential(params, control, jacobian)

    def _trace(self, key: tuple, inputs: tuple) -> Callable:
        count, index_names, weight_names, keep_outside, jacobian, no_control = key

        def evaluate(*args: Tensor) -> tuple[Tensor, ...]:
            points = args[:count]
            indices = dict(zip(index_names, args[count: count + len(index_names)]))
            weights = dict(zip(weight_names, args[count + len(index_names):]))
            results = []
            # Pyro's filter acts only inside a trace, so it is entered here
            with ignore_jit_warnings() if self.ignore_jit_warnings else contextlib.nullcontext():
                for point in points:
                    control = None if no_control else SubsampleControl(indices, weights, keep_outside)
                    results.append(self._python(point, control, jacobian))
            return tuple(results)

        with pyro.validation_enabled(False), warnings.catch_warnings():
            if self.ignore_jit_warnings:  # torch 2.9+ deprecates torch.jit.trace (Pyro's HMC uses it too)
                warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.trace.*")
            traced = torch.jit.trace(evaluate, tuple(t.detach() for t in inputs), **self.jit_options)
        self._traced[key] = traced
        return traced


def is_finite(value: Tensor | float) -> bool:
    """Whether a tensor (every entry) or a number is finite."""
    if isinstance(value, Tensor):
        return bool(torch.isfinite(value).all())
    return math.isfinite(value)
