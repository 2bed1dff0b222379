"""SG-MCMC kernels for :class:`pyro.infer.MCMC`: any torch sampler of the package, on minibatches.

``MCMC(pyro_sgmcmc.infer.SGLD(model, step_size=1e-4), num_samples=2000, warmup_steps=500).run(data)``
gives Pyro's whole MCMC loop (progress bar, ``get_samples``, ``summary``, ``diagnostics``,
``Predictive``) for models whose likelihood sits in ``pyro.plate(..., subsample_size=m)``, which
HMC and NUTS refuse.

The kernel owns no update math: it builds the potential energy of the model in unconstrained space
and hands its gradient to one torch sampler (:mod:`pyro_sgmcmc.optim`).
"""

from __future__ import annotations

import inspect
import math
from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from ..functional import NonFiniteError
from .._validation import check_number
from ..samplers import SGMCMCOptimizer
from .compiled import PotentialEvaluator
from .sites import check_latent_site
from .subsample import (
    SubsampleControl,
    SubsampledPlate,
    draw_indices,
    full_data_potential,
    full_data_value_and_grad,
    subsampled_plates,
    unconstrained_anchor,
)
from .adaptation import (
    Whitening,
    curvature,
    hutchinson_diagonal,
    low_rank_whitening,
    usable_curvature,
    measure_scales,
    whitening_from_curvature,
    window_ends,
)

__all__ = ["SGMCMCKernel", "ModelPotential", "kernel_class"]

#: Data walked in at most this many minibatches counts as small: its Hessian is taken on all of
#: it, and the mode search needs no first pass on a subset.
_SMALL_DATA_MINIBATCHES = 32


class _LogJoint(Messenger):
    """Conditions latent sites on ``values`` and sums the scaled, masked log density of every
    sample site as the model runs: ``poutine.trace(poutine.condition(model, values)).log_prob_sum()``
    without building the trace (15% of a small model's evaluation, measured)."""

    def __init__(self, values: dict[str, Tensor]):
        super().__init__()
        self.values = values
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
        self.total = self.total + scale_and_mask(log_p, msg["scale"], msg["mask"]).sum()


class _Converged(Exception):
    """Raised from an L-BFGS closure to end the search (see ``SGMCMCKernel._lbfgs``)."""


class ModelPotential:
    r"""The potential energy of a Pyro model in unconstrained space,

    .. math:: U(u) = -\log p(x, T(u)) - \log\left|\det \frac{\partial T}{\partial u}\right|,

    as Pyro's HMC uses, but evaluated by running the model afresh at every call, so that each
    evaluation sees a fresh minibatch of every ``pyro.plate(..., subsample_size=m)`` (whose log
    likelihood Pyro scales by ``N/m``, an unbiased estimate of the full-data one). Pyro's
    ``initialize_model`` refuses subsample sites, rightly for HMC; here they are the point.

    The first evaluation runs with Pyro's validation as set (distribution arguments, supports)
    and records a full trace (which also checks the model's structure, e.g. duplicate sites);
    later ones run without validation and sum the log densities as the sites go by, without a
    trace: together about 35% of a small model's step (measured: 2.39 -> 1.81 ms per
    control-variate step of a logistic regression from validation alone). A value that would
    have failed validation later shows up as a non-finite potential, which the kernels count as
    a divergence.

    :param model: the Pyro model.
    :param transforms: ``{site: transform}`` from constrained to unconstrained space.
    :param model_args, model_kwargs: the model's arguments.
    """

    def __init__(self, model: Callable, transforms: dict[str, Any], model_args: tuple, model_kwargs: dict):
        self.model = model
        self.transforms = transforms
        self.model_args = model_args
        self.model_kwargs = model_kwargs
        self._validated = False

    def __call__(self, params: dict[str, Tensor], control: SubsampleControl | None = None,
                 jacobian: bool = True) -> Tensor:
        """``U(params)``; under ``control`` (e.g. replaying a minibatch), and without the
        log-Jacobian if ``jacobian`` is false (a piece of a full-data sum that counts it once)."""
        values, log_det = {}, 0.0
        for name, transform in self.transforms.items():
            to_constrained = transform.inv
            values[name] = to_constrained(params[name])
            if jacobian:
                log_det = log_det + to_constrained.log_abs_det_jacobian(params[name], values[name]).sum()
        if self._validated:  # Pyro's argument/support checks once, not at every one of thousands of calls
            log_joint = _LogJoint(values)
            model = self.model if control is None else control(self.model)
            with pyro.validation_enabled(False), log_joint:
                model(*self.model_args, **self.model_kwargs)
            return -(log_joint.total + log_det)
        conditioned = poutine.condition(self.model, data=values)
        if control is not None:
            conditioned = control(conditioned)
        trace = poutine.trace(conditioned).get_trace(*self.model_args, **self.model_kwargs)
        potential = -(trace.log_prob_sum() + log_det)
        self._validated = True
        return potential


def latent_transforms(model: Callable, model_args: tuple, model_kwargs: dict,
                      init_strategy: Callable) -> tuple[dict, dict, list[SubsampledPlate]]:
    """Run the model (its structure, then its initial state): ``(transforms, initial
    unconstrained values, subsampled plates)``. Refuses, with a clear error, the latent sites SG-MCMC cannot sample
    (:func:`~pyro_sgmcmc.infer.sites.check_latent_site`) and a model with no latent site."""
    structure = poutine.trace(model).get_trace(*model_args, **model_kwargs)  # draws from the prior
    transforms = {}
    for name, site in structure.iter_stochastic_nodes():
        if site_is_subsample(site):
            continue
        check_latent_site(name, site)
        transforms[name] = biject_to(site["fn"].support).inv
    if not transforms:
        raise ValueError("The model has no latent sites to sample")
    trace = poutine.trace(InitMessenger(init_strategy)(model)).get_trace(*model_args, **model_kwargs)
    initial = {name: transform(trace.nodes[name]["value"].detach()).detach() for name, transform in transforms.items()}
    return transforms, initial, subsampled_plates(structure)


class SGMCMCKernel(MCMCKernel):
    r"""An SG-MCMC kernel for :class:`pyro.infer.MCMC`, driving the torch sampler
    :attr:`sampler_class` (``pyro_sgmcmc.infer.SGLD``, ``.SGNHT``, ... set it).

    Each :meth:`sample` takes ``num_steps`` sampler steps; each step evaluates the potential
    (:class:`ModelPotential`, a fresh minibatch per evaluation), differentiates it and hands the
    gradient to the sampler. Constrained sites are sampled in unconstrained space with the
    log-Jacobian, so the samples ``MCMC`` returns (in constrained space) follow the posterior.

    :param model: a Pyro model (or give ``potential_fn``).
    :param potential_fn: a function of a dict of unconstrained tensors returning the potential
        energy, as for HMC (then give ``initial_params`` to ``MCMC`` and, if needed, ``transforms``).
    :param step_size: the sampler's step size (``lr``: SGLD's epsilon, SGNHT's h); with
        ``adapt_step_size`` only the first one (default: measured).
    :param adapt_step_size: during warmup, set the step size from the sampler's bias rule
        (``suggest_lr``) and the measured curvature and minibatch-gradient noise (see
        :mod:`pyro_sgmcmc.infer.adaptation`), then freeze it; with it, options that the sampler
        sets from the same measurements (``adapted_options``: SGHMC's friction), unless given.
    :param adapt_mass_matrix: during warmup, estimate a preconditioner (the inverse Hessian of
        the potential, at the start and at the ends of doubling windows) and freeze it: the chain
        then runs on whitened coordinates (see :mod:`pyro_sgmcmc.infer.adaptation`).
    :param full_mass: a dense preconditioner (for correlated posteriors, e.g. collinear
        regressors) instead of a diagonal one.
    :param mass_rank: a low-rank-plus-diagonal preconditioner (for models too big for a dense
        one): the diagonal, corrected along the ``mass_rank`` directions where the diagonally
        whitened Hessian is furthest from the identity (Lanczos on Hessian-vector products), so
        the stiffest and the softest (collinear) directions are whitened too; ``O(d k)`` per step.
    :param target_bias: the relative bias on posterior variances the step-size rule aims at.
    :param exact_gaussian: make each step exact on the Gaussian the preconditioner describes (the
        Laplace approximation, with ``full_mass`` or ``mass_rank``): the sampler is told that the
        whitened posterior has curvature 1 (SGLD's ``reference_curvature``: the injected noise
        shrinks to ``1 - lr/4`` of its variance; Cotter et al.'s Crank-Nicolson Langevin step), and
        the step-size rule bounds the bias by how far the whitened curvature strays from 1 (its
        largest and smallest values are measured, with the gradient noise) instead of by the
        curvature itself. On big-data posteriors, which are nearly Gaussian, steps approach
        ``lr = 2``, an almost independent draw per step (plain SGLD: ``4 t``). Langevin samplers
        with a ``reference_curvature`` option only (SGLD).
    :param num_steps: sampler steps per returned sample (thinning inside the kernel).
    :param temperature: posterior temperature (1 samples the posterior).
    :param transforms: ``{site: transform}`` to unconstrained space (default: from the model).
    :param init_strategy: per-site initialisation, as for HMC (default ``init_to_uniform``).
    :param on_divergence: what a NaN/Inf potential or gradient does: ``"skip"`` (the step is not
        taken, the divergence is counted, the chain goes on) or ``"raise"`` (stop with an error).
        Either way, nothing non-finite enters the chain, and divergences after warmup are listed in
        ``diagnostics()["divergences"]`` and counted by ``MCMC.summary()``, as for HMC.
    :param step_size_schedule: after warmup, the step size is the adapted one times
        ``step_size_schedule(k)`` at the ``k``-th sampling step (e.g.
        ``CyclicalSchedule(initial=1.0, num_steps=..., num_cycles=...)`` from
        :mod:`pyro_sgmcmc.schedules`: cycles that start at the adapted step). If the schedule has
        ``in_sampling_phase`` (as ``CyclicalSchedule`` does), every returned sample comes from the
        sampling phase of a cycle: the kernel steps on through each exploration phase.
    :param control_variates: replace the minibatch gradient by the control-variate estimator
        (:mod:`pyro_sgmcmc.functional.control_variates`; Baker et al. 2019), for a model with one
        subsampled plate: ``True`` finds the anchor, the posterior mode, by L-BFGS on the
        full-data potential (the data walked in minibatch-sized pieces) from the initial point;
        a dict ``{site: constrained value}`` gives it (e.g. from ``AutoDelta`` after SVI). The
        chain starts at the anchor (no arrival phase to pay for). Each step then evaluates the
        model twice (at the point and, on the same minibatch, at the anchor), and its gradient
        noise shrinks with the distance to the anchor: for big ``N``, far larger steps for the
        same bias.
    :param jit_compile: evaluate the potential through ``torch.jit.trace`` (as for HMC): one trace
        per kind of evaluation (a minibatch, a control-variate pair, a piece of a full-data walk),
        with the minibatch indices as inputs, replayed without Pyro's Python overhead (about 2x
        cheaper on small models; see :mod:`pyro_sgmcmc.infer.compiled`). Only for models whose
        operations do not depend on the values of their latent sites or minibatch.
    :param jit_options: keyword arguments of ``torch.jit.trace`` (default ``{"check_trace": False}``).
    :param ignore_jit_warnings: silence the tracer's warnings.

    At the end of warmup the sampler stops adapting anything of its own (PSGLD's preconditioner:
    :meth:`~pyro_sgmcmc.samplers.SGMCMCOptimizer.freeze_adaptation`) and its auxiliary variables (SGNHT's momenta and thermostat) are
    put back to their initial law (:meth:`~pyro_sgmcmc.samplers.SGMCMCOptimizer.reset_auxiliary`):
    a thermostat cools by at most 1 per unit of time, so the heat of the warmup's transient would
    otherwise leave the first samples too cold.
    :param sampler_options: further options of the torch sampler (``diffusion_factor``,
        ``localization``, ...).
    """

    sampler_class: type[SGMCMCOptimizer]

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable[[dict[str, Tensor]], Tensor] | None = None,
        *,
        step_size: float | None = None,
        adapt_step_size: bool = True,
        adapt_mass_matrix: bool = True,
        full_mass: bool = False,
        mass_rank: int = 0,
        target_bias: float = 0.02,
        exact_gaussian: bool = False,
        num_steps: int = 1,
        temperature: float = 1.0,
        transforms: dict[str, Any] | None = None,
        init_strategy: Callable = init_to_uniform,
        on_divergence: str = "skip",
        step_size_schedule: Callable[[int], float] | None = None,
        control_variates: bool | dict[str, Tensor] = False,
        jit_compile: bool = False,
        jit_options: dict[str, Any] | None = None,
        ignore_jit_warnings: bool = False,
        **sampler_options: Any,
    ) -> None:
        if (model is None) == (potential_fn is None):
            raise ValueError("Give exactly one of model and potential_fn")
        if step_size is None and not adapt_step_size:
            raise ValueError("Invalid step_size: None (give a step size, or leave adapt_step_size=True)")
        check_number("step_size", step_size, none_ok=True)
        check_number("temperature", temperature)
        check_number("target_bias", target_bias)
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"Invalid num_steps: {num_steps!r} (must be an integer >= 1)")
        if not isinstance(mass_rank, int) or isinstance(mass_rank, bool) or mass_rank < 0:
            raise ValueError(f"Invalid mass_rank: {mass_rank!r} (must be an integer >= 0)")
        if mass_rank and full_mass:
            raise ValueError("Give either full_mass=True or mass_rank > 0, not both")
        if on_divergence not in ("skip", "raise"):
            raise ValueError(f"Invalid on_divergence: {on_divergence!r} (must be 'skip' or 'raise')")
        if step_size_schedule is not None and not callable(step_size_schedule):
            raise ValueError(f"Invalid step_size_schedule: {step_size_schedule!r} (must be a callable of the step, "
                             "e.g. pyro_sgmcmc.schedules.CyclicalSchedule, or None)")
        if not isinstance(control_variates, (bool, dict)):
            raise ValueError(f"Invalid control_variates: {control_variates!r} (must be True, False, or a dict "
                             "{site: constrained value} giving the anchor)")
        if control_variates is not False and potential_fn is not None:
            raise ValueError("Invalid control_variates: needs a model (it replays the model's minibatches), "
                             "not a potential_fn")
        if not isinstance(exact_gaussian, bool):
            raise ValueError(f"Invalid exact_gaussian: {exact_gaussian!r} (must be True or False)")
        if exact_gaussian and "reference_curvature" not in inspect.signature(self.sampler_class.__init__).parameters:
            raise ValueError(f"Invalid exact_gaussian: {self.sampler_class.__name__} has no reference_curvature "
                             "option (exact_gaussian=True needs a Langevin sampler with one: SGLD)")
        if not isinstance(jit_compile, bool):
            raise ValueError(f"Invalid jit_compile: {jit_compile!r} (must be True or False)")
        if jit_options is not None and not isinstance(jit_options, dict):
            raise ValueError(f"Invalid jit_options: {jit_options!r} (must be a dict of torch.jit.trace options, or None)")
        self.model = model
        self.potential_fn = potential_fn
        self.step_size = step_size
        self.adapt_step_size = adapt_step_size
        self.adapt_mass_matrix = adapt_mass_matrix
        self.full_mass = full_mass
        self.mass_rank = mass_rank
        self.target_bias = target_bias
        self.exact_gaussian = exact_gaussian
        # the whitened, tempered posterior has curvature 1 where the preconditioner fits it
        self._gaussian_options = {"reference_curvature": 1.0} if exact_gaussian else {}
        self.num_steps = num_steps
        self.temperature = temperature
        self._given_transforms = transforms
        self.transforms = transforms
        self.init_strategy = init_strategy
        self.on_divergence = on_divergence
        self.sampler_options = sampler_options
        self.step_size_schedule = step_size_schedule
        self.control_variates = control_variates
        self.jit_compile = jit_compile
        self.jit_options = jit_options
        self.ignore_jit_warnings = ignore_jit_warnings
        self._user_initial_params: dict[str, Tensor] | None = None
        self._reset()

    # ---------------------------------------------------------------- MCMC driver interface

    def _reset(self) -> None:
        self._initial_params: dict[str, Tensor] | None = None
        self._z: Tensor | None = None
        self._whitening: Whitening | None = None
        self._layout: list[tuple[str, torch.Size, int]] = []
        self._lr = self.step_size
        self._scales = (float("nan"), float("nan"), float("nan"))
        self._adapt_at: list[int] = []
        self._hessians: list[Tensor] = []
        self._arrival_end = 0
        self._sampler: SGMCMCOptimizer | None = None
        self._adapted_options: dict[str, Any] = {}
        self._potential: Callable | None = None
        self._evaluator: PotentialEvaluator | None = None
        self._t = 0
        self._sampling_steps = 0
        self._warmup_steps = 0
        self._divergences: list[int] = []
        self._num_divergent_steps = 0
        self._warmup_jumps = 0
        self._divergent_run = 0
        self._best_warmup: tuple[float, Tensor | None] = (math.inf, None)
        self._last_potential = float("nan")
        self._mala_total, self._mala_count = 0.0, 0
        self._plate: SubsampledPlate | None = None
        self._plates: list[SubsampledPlate] = []
        self._anchor_theta: Tensor | None = None
        self._anchor_energy: Tensor | None = None
        self._anchor_grad_theta: Tensor | None = None
        self._anchor_grad_z: tuple[Any, Tensor, Tensor] | None = None
        self._map_evaluations = 0

    def setup(self, warmup_steps: int, *args: Any, **kwargs: Any) -> None:
        """Prepare a new chain: all state is reset (``MCMC`` reuses one kernel for sequential
        chains, and calls ``setup`` again in the parent after parallel ones)."""
        self._reset()
        self._warmup_steps = warmup_steps
        if self.model is not None:
            transforms, initial, plates = latent_transforms(self.model, args, kwargs, self.init_strategy)
            self._plates = plates
            if self.control_variates is not False:
                if not plates:
                    raise ValueError("Invalid control_variates: the model has no subsampled plate "
                                     "(pyro.plate(name, N, subsample_size=m)); there is no minibatch noise to reduce")
                if len(plates) > 1:
                    raise NotImplementedError(
                        f"control_variates with more than one subsampled plate ({[p.name for p in plates]}) "
                        "is not supported yet")
                self._plate = plates[0]
            if self._given_transforms is not None:  # re-express the initial values in the given coordinates
                defaults, transforms = transforms, {**transforms, **self._given_transforms}
                initial = {name: transforms[name](defaults[name].inv(value)) for name, value in initial.items()}
            self.transforms = transforms
            self._potential = ModelPotential(self.model, transforms, args, kwargs)
        else:
            self.transforms = self._given_transforms if self._given_transforms is not None else {}
            self._potential = self.potential_fn
            initial = None
        if self._user_initial_params is not None:
            initial = {name: torch.as_tensor(value).detach().clone() for name, value in self._user_initial_params.items()}
        if initial is None:
            raise ValueError("With potential_fn, give initial_params (to MCMC, as for HMC)")
        self._initial_params = initial
        self._evaluator = PotentialEvaluator(self._potential, self._unflatten, is_model=self.model is not None,
                                             jit_compile=self.jit_compile, jit_options=self.jit_options,
                                             ignore_jit_warnings=self.ignore_jit_warnings)

    @property
    def initial_params(self) -> dict[str, Tensor]:
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params: dict[str, Tensor]) -> None:
        self._user_initial_params = params
        self._initial_params = params

    # -------------------------------------------------------------------------- sampling

    def _flatten(self, params: dict[str, Tensor]) -> Tensor:
        return torch.cat([params[name].reshape(-1) for name, _, _ in self._layout])

    def _unflatten(self, flat: Tensor) -> dict[str, Tensor]:
        out, offset = {}, 0
        for name, shape, size in self._layout:
            out[name] = flat[offset : offset + size].view(shape)
            offset += size
        return out

    def _potential_z(self, z: Tensor, control: SubsampleControl | None = None) -> Tensor:
        return self._evaluator([self._whitening.to_theta(z)], control)[0]

    def _estimate(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(potential, gradient)`` at ``z`` as the sampler sees them: on a fresh minibatch, or,
        with control variates, the control-variate estimates (the same minibatch replayed at
        the anchor, corrected by the anchor's full-data values)."""
        z = z.detach().requires_grad_(True)
        minibatch = self._minibatch()
        if self._plate is None:
            potential = self._potential_z(z, minibatch)
            return potential.detach(), torch.autograd.grad(potential, z)[0]
        anchor_z, full_grad_z = self._anchor_z()
        anchor = anchor_z.detach().requires_grad_(True)
        to_theta = self._whitening.to_theta
        potential, at_anchor = self._evaluator([to_theta(z), to_theta(anchor)], minibatch)
        grad, grad_at_anchor = torch.autograd.grad(potential + at_anchor, [z, anchor])
        energy = (potential - at_anchor).detach() + self._anchor_energy
        return energy, grad - grad_at_anchor + full_grad_z

    def _gradient_z(self, z: Tensor) -> Tensor:
        return self._estimate(z)[1]

    def _minibatch(self) -> SubsampleControl | None:
        """Fresh minibatch indices for every subsampled plate, drawn here in O(m) (see
        :func:`~pyro_sgmcmc.infer.subsample.draw_indices`) instead of by the plate's O(N)
        ``randperm``; ``None`` for a model without subsampling or a ``potential_fn``."""
        if not self._plates:
            return None
        return SubsampleControl(indices={plate.name: draw_indices(plate) for plate in self._plates})

    # ------------------------------------------------------------------ control variates

    def _full_potential_theta(self, theta: Tensor, rows: Tensor | None = None) -> Tensor:
        """The exact full-data potential (the data set walked in minibatch-sized pieces), or its
        estimate on ``rows`` only."""
        if rows is None:
            self._map_evaluations += 1
        return full_data_potential(
            lambda control, jacobian: self._evaluator([theta], control, jacobian)[0], self._plate, rows)

    def _set_anchor(self, theta: Tensor) -> Tensor:
        """Choose the anchor (the mode found from ``theta``, or the one given), compute the
        full-data potential and gradient there (or take them from the mode search's last
        evaluation, when that was at the anchor); the chain starts at the anchor."""
        known = None
        if isinstance(self.control_variates, dict):
            given = unconstrained_anchor(self.control_variates, self.transforms, "control_variates")
            anchor = self._flatten(given).to(theta)
        else:
            anchor, known = self._find_mode(theta)
        anchor = anchor.detach().requires_grad_(True)
        if known is not None and torch.isfinite(known[0]) and bool(torch.isfinite(known[1]).all()):
            energy, grad = known
        else:
            self._map_evaluations += 1
            energy, (grad,) = full_data_value_and_grad(
                lambda control, jacobian: self._evaluator([anchor], control, jacobian)[0], self._plate, [anchor])
        self._anchor_theta, self._anchor_energy, self._anchor_grad_theta = anchor.detach(), energy, grad
        return self._anchor_theta.clone()

    def _find_mode(self, theta: Tensor, max_iter: int = 100) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """The posterior mode (in unconstrained space) by L-BFGS on the full-data potential, and
        the potential and gradient there if known. On big data (more than 32 minibatches) a first
        search runs on a fixed random subset of 16 minibatches' rows, weighted to the full size:
        it does the long way in from the initial point at a fraction of the cost, and the
        full-data search goes on from near the mode (measured: 10 posterior sds away at
        ``N = 100k``) with the curvature pairs the first one collected (same scale)."""
        theta = theta.detach().clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=20,
                                      line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-12)
        plate = self._plate
        if plate.num_minibatches > _SMALL_DATA_MINIBATCHES:
            rows = torch.randperm(plate.size, device=plate.device)[: 16 * plate.subsample_size]
            self._lbfgs(optimizer, theta, lambda point: self._full_potential_theta(point, rows), stop_early=False)
            # the next iteration must not pair the subset's last gradient with the full one: a
            # zero last step makes L-BFGS skip that pair and keep the others
            optimizer.state[theta]["t"] = 0.0
        return self._lbfgs(optimizer, theta, self._full_potential_theta)

    def _lbfgs(self, optimizer: torch.optim.LBFGS, theta: Tensor, objective: Callable[[Tensor], Tensor],
               stop_early: bool = True) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """Minimise ``objective`` over ``theta`` (the optimizer's parameter). With ``stop_early``,
        stop once two evaluations in a row come within ``0.01 T`` nats of the best value
        (``U - U* = d^2 / 2`` for a point ``d`` posterior sds from the mode: a small fraction of
        an sd, all a control-variate anchor needs; L-BFGS's own tolerances go on polishing
        float32 rounding, and its step tolerance is not scale-free). Returns the point and, when
        the last evaluation was there, its value and gradient."""
        tolerance = 0.01 * self.temperature
        best, streak, last = math.inf, 0, None

        def closure() -> Tensor:
            nonlocal best, streak, last
            optimizer.zero_grad()
            value = objective(theta)
            value.backward()
            current = float(value.detach())
            streak = streak + 1 if abs(current - best) < tolerance else 0
            best = min(best, current)
            last = (theta.detach().clone(), value.detach(), theta.grad.detach().clone())
            if stop_early and streak >= 2:
                raise _Converged
            return value

        try:
            optimizer.step(closure)
        except _Converged:
            pass
        point = theta.detach().clone()
        known = (last[1], last[2]) if last is not None and torch.equal(last[0], point) else None
        return point, known

    def _anchor_z(self) -> tuple[Tensor, Tensor]:
        """The anchor and its full-data gradient (``L^T grad U``) in the current coordinates,
        cached per preconditioner (the hot path needs both at every step)."""
        if self._anchor_grad_z is None or self._anchor_grad_z[0] is not self._whitening:
            z = self._whitening.to_z(self._anchor_theta).detach().requires_grad_(True)
            (grad,) = torch.autograd.grad(self._whitening.to_theta(z), z, self._anchor_grad_theta)
            self._anchor_grad_z = (self._whitening, z.detach(), grad)
        return self._anchor_grad_z[1], self._anchor_grad_z[2]

    def _theta(self) -> Tensor:
        return self._whitening.to_theta(self._z.detach())

    def _start(self, params: dict[str, Tensor]) -> None:
        """The chain's first step: coordinates, schedule, step size and sampler."""
        self._layout = [(name, params[name].shape, params[name].numel()) for name in sorted(params)]
        theta = self._flatten({k: torch.as_tensor(v).detach() for k, v in params.items()})
        if self._plate is not None:
            theta = self._set_anchor(theta)
        self._whitening = Whitening.identity(theta.numel(), theta)
        adapting = (self.adapt_mass_matrix or self.adapt_step_size) and self._warmup_steps > 0
        # the first 15% of warmup is arrival: bias does not matter yet, so steps are as large as
        # stability allows; then windows with the accurate rule. A chain that starts at the mode
        # (control variates) has nowhere to arrive.
        arrival = 0 if self._plate is not None else int(0.15 * self._warmup_steps)
        self._arrival_end = arrival
        self._adapt_at = sorted({arrival, *window_ends(self._warmup_steps)} - {0}) if adapting else []
        if self.adapt_mass_matrix and self._warmup_steps > 0:
            self._update_preconditioner(theta)
        self._restart(theta, measure=self.adapt_step_size and self._warmup_steps > 0, arrival=arrival > 0)

    def _update_preconditioner(self, theta: Tensor) -> None:
        """Add the curvature at ``theta`` to the running mean and whiten with the mean (and, with
        ``mass_rank``, the extreme directions measured here). The mean starts afresh at the end
        of arrival: the curvature at the initial point (or on the way in) is of a place the
        chain has left, often 100x off (a scale model started where the scale is tiny), and
        kept in the mean it would weigh on the preconditioner for the rest of warmup."""
        fresh = self._t > 0 and self._t == self._arrival_end
        if self.mass_rank:
            hvp = self._hessian_vector_product(theta)
            diagonal = hutchinson_diagonal(hvp, theta.numel(), theta.device)
            if torch.isfinite(diagonal).all():
                self._hessians = [diagonal] if fresh else [*self._hessians, diagonal]
                mean = torch.stack(self._hessians).mean(0)
                whitening = low_rank_whitening(hvp, mean, self.mass_rank, self.temperature, theta.dtype)
                if bool(torch.isfinite(whitening.vectors).all() and torch.isfinite(whitening.factors).all()):
                    self._whitening = whitening
            return
        if self.full_mass:
            hessian = self._exact_hessian(theta)
        else:
            hessian = curvature(self._gradient_z, self._whitening.to_z(theta), self._whitening, self.full_mass)
        if bool(torch.isfinite(hessian).all()):
            # a saddle counts by its diagonal only (see usable_curvature)
            hessian = usable_curvature(hessian)
            self._hessians = [hessian] if fresh else [*self._hessians, hessian]
            mean = torch.stack(self._hessians).mean(0)
            self._whitening = whitening_from_curvature(mean, self.temperature, theta.dtype)

    def _exact_hessian(self, theta: Tensor) -> Tensor:
        """The dense Hessian at ``theta`` (theta coordinates, float64) from exact products
        (:meth:`_hessian_vector_product`); by finite differences of the gradient if the potential
        cannot be differentiated twice."""
        try:
            hvp = self._hessian_vector_product(theta)
            eye = torch.eye(theta.numel(), dtype=torch.float64, device=theta.device)
            hessian = torch.stack([hvp(e) for e in eye], 1)
            return (hessian + hessian.T) / 2
        except RuntimeError:  # e.g. a custom autograd function without a double backward
            return curvature(self._gradient_z, self._whitening.to_z(theta), self._whitening, True)

    def _hessian_potential(self, point: Tensor, in_z: bool) -> Tensor:
        """The potential whose Hessian the preconditioner and the curvature checks use: exact on
        small data (one subsampled plate walked in at most 32 pieces), else averaged over
        16 fresh minibatches. One minibatch's Hessian (``N/m`` times a sum over ``m`` rows) is off
        by a relative ``~sqrt(d/m)`` (measured: the whitened Hessian of a ``d = 20`` logistic
        regression spread over 0.81-1.16 at ``m = 1000``; 0.93-1.02 averaged)."""
        params = lambda: self._unflatten(self._whitening.to_theta(point) if in_z else point)  # noqa: E731
        if not self._plates:
            return self._potential(params())
        if len(self._plates) == 1 and self._plates[0].num_minibatches <= _SMALL_DATA_MINIBATCHES:
            return full_data_potential(lambda control, jacobian: self._potential(params(), control, jacobian),
                                       self._plates[0])
        return sum(self._potential(params(), self._minibatch()) for _ in range(16)) / 16

    def _hessian_vector_product(self, point: Tensor, in_z: bool = False) -> Callable[[Tensor], Tensor]:
        """``v -> H v`` at ``point`` (theta coordinates, or the current ``z`` ones with ``in_z``;
        float64 out), exact, by double backward through :meth:`_hessian_potential` (its
        minibatches drawn now, kept for every product)."""
        point = point.detach().requires_grad_(True)
        (grad,) = torch.autograd.grad(self._hessian_potential(point, in_z), point, create_graph=True)

        def product(v: Tensor) -> Tensor:
            if not grad.requires_grad:  # a potential linear in the point: no curvature
                return torch.zeros_like(v, dtype=torch.float64)
            (out,) = torch.autograd.grad(grad, point, v.to(grad.dtype), retain_graph=True, allow_unused=True)
            return torch.zeros_like(v, dtype=torch.float64) if out is None else out.detach().double()

        return product

    def _restart(self, theta: Tensor, measure: bool, arrival: bool = False) -> None:
        """Put the chain at ``theta`` in the current coordinates, with a fresh sampler (warmup
        only) and, if asked, a step size measured there: from the sampler's bias rule, or, while
        arriving, the largest stable one."""
        self._z = self._whitening.to_z(theta).detach().clone().requires_grad_(True)
        if measure:
            # exact_gaussian's rule needs the whitened curvature's spread, which one minibatch's
            # finite differences overstate (see _hessian_potential): exact, averaged products, on
            # minibatches of their own, not the preconditioner's (whitened by those, the spread
            # would come out 1 whatever the preconditioner's own estimation error)
            hvp = self._hessian_vector_product(self._z, in_z=True) if self.exact_gaussian else None
            # at the control-variate anchor the gradient has no noise: measure it a typical
            # (whitened) distance away, where the chain will be
            at_anchor = self._anchor_theta is not None and bool(torch.equal(theta, self._anchor_theta))
            noise_point = self._z.detach() + torch.randn_like(self._z) if at_anchor else None
            largest_curvature, noise, smallest = measure_scales(self._gradient_z, self._z.detach(),
                                                                smallest=self.exact_gaussian, hvp=hvp,
                                                                noise_point=noise_point)
            self._scales = (largest_curvature, noise, smallest)
            if math.isfinite(largest_curvature) and math.isfinite(noise) and largest_curvature > 0:
                self._adapted_options = self.sampler_class.adapted_options(
                    largest_curvature, noise, self.temperature, self.sampler_options)
                options = {**self._gaussian_options, **self.sampler_options, **self._adapted_options}
                if self.exact_gaussian:
                    options["smallest_curvature"] = smallest if math.isfinite(smallest) else 0.0
                self._lr = self.sampler_class.suggest_lr(largest_curvature, noise, self.target_bias, self.temperature,
                                                         arrival=arrival, **options)
        if self._lr is None:
            raise RuntimeError("Could not measure a step size at the initial point; give step_size")
        self._new_sampler()

    def _new_sampler(self) -> None:
        group = {"params": [("z", self._z)]}
        options = {**self._gaussian_options, **self.sampler_options, **self._adapted_options}
        # the Langevin samplers score their steps with MALA's acceptance (cheap on the flat z)
        self._sampler = self.sampler_class([group], lr=self._lr, temperature=self.temperature,
                                           diagnostics="mala" if self.sampler_class.langevin else False, **options)
        self._last_good = self._z.detach().clone()

    def _adapt(self) -> None:
        """The end of a warmup window: the preconditioner with the curvature here, then the step
        size in the new coordinates; a fresh sampler (its state belongs to the old ones)."""
        if self._exact_potential():
            # the last step is only tested when the next one evaluates where it landed: test it
            # now, before measuring anything there (a jump into a steep region would otherwise
            # set the preconditioner and step size, and the jump test would then keep undoing
            # the steps that lead out of it)
            previous, self._last_potential = self._last_potential, float(self._estimate(self._z)[0])
            self._undo_bad_step(previous)
        theta = self._theta()
        if self._t == self._arrival_end and not self._arrived():
            self._last_potential, theta = self._best_warmup
        if self.adapt_mass_matrix:
            self._update_preconditioner(theta)
        self._restart(theta, measure=self.adapt_step_size)

    def _arrived(self) -> bool:
        """Whether the chain ends arrival in the typical set, as far as an exact potential can
        tell: no more than ``T (d/2 + 5 sqrt(d/2))`` above the lowest potential warmup has seen.
        Near a Gaussian mode ``U - U_min`` is ``T`` times a Gamma(d/2) variable (mean ``d/2``, sd
        ``sqrt(d/2)``), and the lowest value seen is at least ``U_min``, so a chain in the
        typical set fails this with a probability of 0.25% for ``d = 2`` and less for larger
        ``d``; a chain that wandered off during arrival (a scale model drifting to where the scale
        is 10x the data's, 12 nats above its best point, with 40 warmup steps left) fails it
        and the accurate phase starts from the best point instead, where a wrong start costs
        only a warmup window (warmup draws are discarded)."""
        best, point = self._best_warmup
        if point is None or not self._exact_potential() or not math.isfinite(self._last_potential):
            return True
        half = self._z.numel() / 2
        return self._last_potential - best <= self.temperature * (half + 5 * math.sqrt(half))

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """``num_steps`` sampler steps from ``params``; the new (unconstrained) state."""
        if self._sampler is None:
            self._start(params)
        elif self._t in self._adapt_at:
            self._adapt()
        elif self._t == self._warmup_steps and self._t > 0:
            # the end of warmup (MCMC never calls end_warmup): a fixed-parameter chain from here on
            self._sampler.freeze_adaptation()
            self._sampler.reset_auxiliary()
        for _ in range(self.num_steps):
            self._one_step()
        in_phase = getattr(self.step_size_schedule, "in_sampling_phase", None)
        if in_phase is not None and self._t >= self._warmup_steps:
            while not in_phase(self._sampling_steps - 1):  # through the exploration phase
                self._one_step()
        theta = self._theta()
        self._t += 1
        return {name: value.clone() for name, value in self._unflatten(theta).items()}

    def _one_step(self) -> None:
        sampler = self._sampler
        if self._t >= self._warmup_steps:
            if self.step_size_schedule is not None:
                factor = float(self.step_size_schedule(self._sampling_steps))
                for group in sampler.param_groups:
                    group["lr"] = self._lr * factor
            self._sampling_steps += 1
        potential, grad = self._estimate(self._z)
        previous, self._last_potential = self._last_potential, float(potential)
        if self._undo_bad_step(previous):
            return
        self._divergent_run = 0
        if self._t < self._warmup_steps and self._last_potential < self._best_warmup[0] and self._exact_potential():
            self._best_warmup = (self._last_potential, self._theta())
        self._last_good = self._z.detach().clone()
        self._z.grad = grad
        try:
            sampler.step(loss=potential)
        except NonFiniteError as error:
            self._diverged(str(error))
            return
        acceptance = sampler.step_diagnostics.get("mala_acceptance")
        if acceptance is not None and self._t >= self._warmup_steps:
            self._mala_total += float(acceptance)
            self._mala_count += 1
        if not bool(torch.isfinite(self._z).all()):  # the dynamics blew up
            self._revert()
            self._diverged("the sampler's update is not finite")

    def _undo_bad_step(self, previous: float) -> bool:
        """With ``_last_potential`` just evaluated where the last step landed (``previous``
        where it started): undo the step if the potential there is not finite (a divergence)
        or if it is a warmup jump (:meth:`_warmup_jump`); whether it was undone."""
        if not math.isfinite(self._last_potential):
            value, self._last_potential = self._last_potential, previous  # the next rise counts from here
            self._revert()
            self._diverged(f"the potential energy is {value}")
            return True
        return self._warmup_jump(previous)

    def _warmup_jump(self, previous: float) -> bool:
        """During warmup, with step-size adaptation and an exact (or control-variate) potential:
        a step that raised the potential by more than ``T max(25, 10 sqrt(d))`` nats is undone
        and the step size halved. Such a jump is a step thrown into a steep region by a
        preconditioner measured where the posterior is not: along a nearly singular direction
        of the initial point's Hessian, or after an arrival step moved the chain to where the
        curvature is 100x what it was (a location next to a log-scale that just fell); from there
        the chain is thrown tens of sds out, or the accurate rule gives tiny steps for the rest
        of warmup. The threshold: one Langevin step at ``lr = 1/lambda`` (the largest warmup
        takes) on a ``d``-dimensional Gaussian changes ``U`` by ``T sqrt(4 d / 3)`` in sd at
        stationarity (computed), and less on the way in, where the drift lowers it; a rise of
        ``10 sqrt(d) T`` is 8.7 of those sds, and 25 nats covers the heavier tail of small ``d``
        (for ``d = 1`` the rise is at most ``2 xi^2 T / 3``, above ``25 T`` with probability
        ~1e-9). A fixed threshold
        (HMC's 1000 nats on the energy error) missed rises of 130 nats in ``d = 2`` and would
        undo ordinary steps of a model with 10^6 parameters. Warmup draws are discarded, so this
        does not touch the samples; minibatch potentials are too noisy for the test, and
        control-variate ones keep a threshold of ``1000 T`` for their noise."""
        if not (self._t < self._warmup_steps and self.adapt_step_size and math.isfinite(previous)):
            return False
        if not self._exact_potential():
            return False
        limit = self.temperature * max(25.0, 10.0 * math.sqrt(self._z.numel()))
        if self._plates:
            # a control-variate potential still carries minibatch noise (measured: +-50 nats
            # between minibatches a posterior sd from the anchor, N/m = 20): HMC's 1000 T there
            limit = max(limit, 1000.0 * self.temperature)
        if self._last_potential - previous <= limit:
            return False
        self._revert()
        self._last_potential = previous
        self._warmup_jumps += 1
        self._lr *= 0.5
        self._new_sampler()
        return True

    def _exact_potential(self) -> bool:
        """Whether the potential the sampler sees is exact up to little noise (no subsampling,
        or control variates), so that values at different points can be compared."""
        return not self._plates or self._plate is not None

    def _revert(self) -> None:
        with torch.no_grad():
            self._z.copy_(self._last_good)
        self._sampler.reset_auxiliary()
        self._sampler.forget_last_step()

    def _diverged(self, why: str) -> None:
        """Count a divergent step (the chain stays where it was) or stop, as asked. During warmup,
        with step-size adaptation, the step size is also halved (a fresh sampler takes over)."""
        self._num_divergent_steps += 1
        if self._t < self._warmup_steps and self.adapt_step_size:
            self._lr *= 0.5
            self._divergent_run += 1
            if self._divergent_run >= 3 and math.isfinite(self._best_warmup[0]):
                # stuck where every step diverges (e.g. thrown far out, where the potential
                # overflows): go back to the best point warmup has seen
                with torch.no_grad():
                    self._z.copy_(self._whitening.to_z(self._best_warmup[1]))
                self._last_potential = self._best_warmup[0]
                self._divergent_run = 0
            self._new_sampler()
        if self._t >= self._warmup_steps and (not self._divergences or self._divergences[-1] != self._t - self._warmup_steps):
            self._divergences.append(self._t - self._warmup_steps)
        if self.on_divergence == "raise":
            raise RuntimeError(
                f"Divergence at iteration {self._t} ({why}); the chain was not moved. "
                "Lower step_size, or pass on_divergence='skip' to count divergences and go on"
            )

    def logging(self) -> dict[str, str]:
        """What the progress bar shows (cheap: ``MCMC`` serialises it every iteration)."""
        return {"step size": f"{self._lr:.2e}", "potential": f"{self._last_potential:.4g}"}

    def diagnostics(self) -> dict[str, Any]:
        """Divergences (iteration indices after warmup, as HMC reports them), the number of
        divergent steps in all, what warmup adapted (the step size, the preconditioner, the
        curvature and gradient-noise variance last measured, in whitened coordinates, and any
        option the sampler adapted), and, for the Langevin samplers (SGLD, PSGLD), the MALA
        acceptance probability of the steps after warmup, averaged
        (:mod:`pyro_sgmcmc.functional.mala`; ``None`` for the others): well below 1 means a step
        size large enough to bias the samples. On minibatches it is computed from minibatch
        potentials, a noisy and pessimistic estimate."""
        return {
            "divergences": list(self._divergences),
            "divergent steps": self._num_divergent_steps,
            "warmup jumps undone": self._warmup_jumps,
            "step size": self._lr,
            "preconditioner": None if self._whitening is None else self._whitening.kind,
            "curvature": self._scales[0],
            "gradient noise": self._scales[1],
            **({"smallest curvature": self._scales[2]} if self.exact_gaussian else {}),
            "temperature": self.temperature,
            "mala acceptance": self._mala_total / self._mala_count if self._mala_count else None,
            "control variates": None if self._anchor_energy is None else {
                "anchor potential": float(self._anchor_energy),
                "full-data evaluations": self._map_evaluations},
            **self._adapted_options,
        }

    def cleanup(self) -> None:
        """Release the chain's sampler (``MCMC`` calls this twice per chain: idempotent). What
        ``diagnostics()`` reports stays."""
        self._sampler = None


def kernel_class(name: str, sampler_class: type[SGMCMCOptimizer]) -> type[SGMCMCKernel]:
    """The MCMC kernel class of a torch sampler: :class:`SGMCMCKernel` with ``sampler_class``
    set, named like the sampler and importable from :mod:`pyro_sgmcmc.infer` (so parallel chains
    can pickle it)."""
    return type(name, (SGMCMCKernel,), {
        "sampler_class": sampler_class,
        "__module__": "pyro_sgmcmc.infer",
        "__qualname__": name,
        "__doc__": f"{SGMCMCKernel.__doc__.split(chr(10))[0]} Sampler: :class:`{sampler_class.__module__}.{name}`."
        + chr(10) + chr(10).join(SGMCMCKernel.__doc__.split(chr(10))[1:]),
    })
