"""SG-MCMC kernels for :class:`pyro.infer.MCMC`: any torch sampler of the package, on minibatches.

``MCMC(pyro_sgmcmc.infer.SGLD(model, step_size=1e-4), num_samples=2000, warmup_steps=500).run(data)``
gives Pyro's whole MCMC loop (progress bar, ``get_samples``, ``summary``, ``diagnostics``,
``Predictive``) for models whose likelihood sits in ``pyro.plate(..., subsample_size=m)``, which
HMC and NUTS refuse.

The kernel owns no update math: it builds the potential energy of the model in unconstrained space
and hands its gradient to one torch sampler (:mod:`pyro_sgmcmc.optim`).
"""

from __future__ import annotations

import math

from typing import Any, Callable

import pyro
import pyro.poutine as poutine
import torch
from pyro.infer.autoguide.initialization import InitMessenger, init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from ..functional import NonFiniteError
from ..optim.base import SGMCMCOptimizer, check_number
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
    measure_scales,
    whitening_from_curvature,
    window_ends,
)

__all__ = ["SGMCMCKernel", "ModelPotential", "kernel_class"]


class ModelPotential:
    r"""The potential energy of a Pyro model in unconstrained space,

    .. math:: U(u) = -\log p(x, T(u)) - \log\left|\det \frac{\partial T}{\partial u}\right|,

    as Pyro's HMC uses, but evaluated by running the model afresh at every call, so that each
    evaluation sees a fresh minibatch of every ``pyro.plate(..., subsample_size=m)`` (whose log
    likelihood Pyro scales by ``N/m``, an unbiased estimate of the full-data one). Pyro's
    ``initialize_model`` refuses subsample sites, rightly for HMC; here they are the point.

    The first evaluation runs with Pyro's validation as set (distribution arguments, supports);
    later ones without it, which makes a step about 25% cheaper on a small model (measured: 2.39
    -> 1.81 ms per control-variate step of a logistic regression). A value that would have failed
    validation later shows up as a non-finite potential, which the kernels count as a divergence.

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
        conditioned = poutine.condition(self.model, data=values)
        if control is not None:
            conditioned = control(conditioned)
        if self._validated:  # Pyro's argument/support checks once, not at every one of thousands of calls
            with pyro.validation_enabled(False):
                trace = poutine.trace(conditioned).get_trace(*self.model_args, **self.model_kwargs)
                return -(trace.log_prob_sum() + log_det)
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
    :param jit_compile: not supported yet (must be False).

    At the end of warmup the sampler stops adapting anything of its own (PSGLD's preconditioner:
    :meth:`~pyro_sgmcmc.optim.base.SGMCMCOptimizer.freeze_adaptation`) and its auxiliary variables (SGNHT's momenta and thermostat) are
    put back to their initial law (:meth:`~pyro_sgmcmc.optim.base.SGMCMCOptimizer.reset_auxiliary`):
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
        num_steps: int = 1,
        temperature: float = 1.0,
        transforms: dict[str, Any] | None = None,
        init_strategy: Callable = init_to_uniform,
        on_divergence: str = "skip",
        step_size_schedule: Callable[[int], float] | None = None,
        control_variates: bool | dict[str, Tensor] = False,
        jit_compile: bool = False,
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
        if jit_compile:
            raise NotImplementedError("jit_compile is not supported by SG-MCMC kernels yet")
        self.model = model
        self.potential_fn = potential_fn
        self.step_size = step_size
        self.adapt_step_size = adapt_step_size
        self.adapt_mass_matrix = adapt_mass_matrix
        self.full_mass = full_mass
        self.mass_rank = mass_rank
        self.target_bias = target_bias
        self.num_steps = num_steps
        self.temperature = temperature
        self._given_transforms = transforms
        self.transforms = transforms
        self.init_strategy = init_strategy
        self.on_divergence = on_divergence
        self.sampler_options = sampler_options
        self.step_size_schedule = step_size_schedule
        self.control_variates = control_variates
        self._user_initial_params: dict[str, Tensor] | None = None
        self._reset()

    # ---------------------------------------------------------------- MCMC driver interface

    def _reset(self) -> None:
        self._initial_params: dict[str, Tensor] | None = None
        self._z: Tensor | None = None
        self._whitening: Whitening | None = None
        self._layout: list[tuple[str, torch.Size, int]] = []
        self._lr = self.step_size
        self._scales = (float("nan"), float("nan"))
        self._adapt_at: list[int] = []
        self._hessians: list[Tensor] = []
        self._sampler: SGMCMCOptimizer | None = None
        self._adapted_options: dict[str, Any] = {}
        self._potential: Callable | None = None
        self._t = 0
        self._sampling_steps = 0
        self._warmup_steps = 0
        self._divergences: list[int] = []
        self._num_divergent_steps = 0
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
        params = self._unflatten(self._whitening.to_theta(z))
        return self._potential(params) if control is None else self._potential(params, control)

    def _estimate(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """``(potential, gradient)`` at ``z`` as the sampler sees them: on a fresh minibatch, or,
        with control variates, the control-variate estimates (the same minibatch replayed at
        the anchor, corrected by the anchor's full-data values)."""
        z = z.detach().requires_grad_(True)
        minibatch = self._minibatch()
        potential = self._potential_z(z, minibatch)
        if self._plate is None:
            return potential.detach(), torch.autograd.grad(potential, z)[0]
        anchor_z, full_grad_z = self._anchor_z()
        anchor = anchor_z.detach().requires_grad_(True)
        at_anchor = self._potential_z(anchor, minibatch)
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

    def _full_potential_theta(self, theta: Tensor) -> Tensor:
        """The exact full-data potential (the data set walked in minibatch-sized pieces)."""
        self._map_evaluations += 1
        return full_data_potential(
            lambda control, jacobian: self._potential(self._unflatten(theta), control, jacobian), self._plate)

    def _set_anchor(self, theta: Tensor) -> Tensor:
        """Choose the anchor (the mode found from ``theta``, or the one given), compute the
        full-data potential and gradient there; the chain starts at the anchor."""
        if isinstance(self.control_variates, dict):
            given = unconstrained_anchor(self.control_variates, self.transforms, "control_variates")
            anchor = self._flatten(given).to(theta)
        else:
            anchor = self._find_mode(theta)
        anchor = anchor.detach().requires_grad_(True)
        self._map_evaluations += 1
        energy, (grad,) = full_data_value_and_grad(
            lambda control, jacobian: self._potential(self._unflatten(anchor), control, jacobian), self._plate, [anchor])
        self._anchor_theta, self._anchor_energy, self._anchor_grad_theta = anchor.detach(), energy, grad
        return self._anchor_theta.clone()

    def _find_mode(self, theta: Tensor, max_iter: int = 100) -> Tensor:
        """The posterior mode (in unconstrained space) by L-BFGS on the full-data potential."""
        theta = theta.detach().clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([theta], lr=1.0, max_iter=max_iter, history_size=20,
                                      line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-12)

        def closure() -> Tensor:
            optimizer.zero_grad()
            value = self._full_potential_theta(theta)
            value.backward()
            return value

        optimizer.step(closure)
        return theta.detach()

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
        # stability allows; then windows with the accurate rule
        arrival = int(0.15 * self._warmup_steps)
        self._adapt_at = sorted({arrival, *window_ends(self._warmup_steps)} - {0}) if adapting else []
        if self.adapt_mass_matrix and self._warmup_steps > 0:
            self._update_preconditioner(theta)
        self._restart(theta, measure=self.adapt_step_size and self._warmup_steps > 0, arrival=arrival > 0)

    def _update_preconditioner(self, theta: Tensor) -> None:
        """Add the curvature at ``theta`` to the running mean and whiten with the mean (and, with
        ``mass_rank``, the extreme directions measured here)."""
        if self.mass_rank:
            hvp = self._hessian_vector_product(theta)
            diagonal = hutchinson_diagonal(hvp, theta.numel(), theta.device)
            if torch.isfinite(diagonal).all():
                self._hessians.append(diagonal)
                mean = torch.stack(self._hessians).mean(0)
                whitening = low_rank_whitening(hvp, mean, self.mass_rank, self.temperature, theta.dtype)
                if bool(torch.isfinite(whitening.vectors).all() and torch.isfinite(whitening.factors).all()):
                    self._whitening = whitening
            return
        hessian = curvature(self._gradient_z, self._whitening.to_z(theta), self._whitening, self.full_mass)
        if torch.isfinite(hessian).all():
            self._hessians.append(hessian)
            mean = torch.stack(self._hessians).mean(0)
            self._whitening = whitening_from_curvature(mean, self.temperature, theta.dtype)

    def _hessian_vector_product(self, theta: Tensor) -> Callable[[Tensor], Tensor]:
        """``v -> H v`` at ``theta`` (theta coordinates, float64), by double backward through the
        potential on one minibatch (drawn now, kept for every product)."""
        theta = theta.detach().requires_grad_(True)
        minibatch = self._minibatch()
        params = self._unflatten(theta)
        potential = self._potential(params) if minibatch is None else self._potential(params, minibatch)
        (grad,) = torch.autograd.grad(potential, theta, create_graph=True)

        def product(v: Tensor) -> Tensor:
            (out,) = torch.autograd.grad(grad, theta, v.to(grad.dtype), retain_graph=True)
            return out.detach().double()

        return product

    def _restart(self, theta: Tensor, measure: bool, arrival: bool = False) -> None:
        """Put the chain at ``theta`` in the current coordinates, with a fresh sampler (warmup
        only) and, if asked, a step size measured there: from the sampler's bias rule, or, while
        arriving, the largest stable one."""
        self._z = self._whitening.to_z(theta).detach().clone().requires_grad_(True)
        if measure:
            largest_curvature, noise = measure_scales(self._gradient_z, self._z.detach())
            self._scales = (largest_curvature, noise)
            if math.isfinite(largest_curvature) and math.isfinite(noise) and largest_curvature > 0:
                self._adapted_options = self.sampler_class.adapted_options(
                    largest_curvature, noise, self.temperature, self.sampler_options)
                options = {**self.sampler_options, **self._adapted_options}
                self._lr = self.sampler_class.suggest_lr(largest_curvature, noise, self.target_bias, self.temperature,
                                                         arrival=arrival, **options)
        if self._lr is None:
            raise RuntimeError("Could not measure a step size at the initial point; give step_size")
        self._new_sampler()

    def _new_sampler(self) -> None:
        group = {"params": [("z", self._z)]}
        options = {**self.sampler_options, **self._adapted_options}
        # the Langevin samplers score their steps with MALA's acceptance (cheap on the flat z)
        self._sampler = self.sampler_class([group], lr=self._lr, temperature=self.temperature,
                                           diagnostics=self.sampler_class.langevin, **options)
        self._last_good = self._z.detach().clone()

    def _adapt(self) -> None:
        """The end of a warmup window: the preconditioner with the curvature here, then the step
        size in the new coordinates; a fresh sampler (its state belongs to the old ones)."""
        theta = self._theta()
        if self.adapt_mass_matrix:
            self._update_preconditioner(theta)
        self._restart(theta, measure=self.adapt_step_size)

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
        sampler.zero_grad(set_to_none=True)
        potential, grad = self._estimate(self._z)
        self._last_potential = float(potential)
        if not torch.isfinite(potential):
            # the last step landed where the potential is not finite: back to where it was
            self._revert()
            self._diverged(f"the potential energy is {self._last_potential}")
            return
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
            "step size": self._lr,
            "preconditioner": None if self._whitening is None else self._whitening.kind,
            "curvature": self._scales[0],
            "gradient noise": self._scales[1],
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
