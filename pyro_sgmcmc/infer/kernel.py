"""SG-MCMC kernels for :class:`pyro.infer.MCMC`: any torch sampler of the package, on minibatches.

``MCMC(pyro_sgmcmc.infer.SGLD(model), num_samples=2000, warmup_steps=500).run(data)`` gives Pyro's
whole MCMC loop (progress bar, ``get_samples``, ``summary``, ``diagnostics``, ``Predictive``) for
models whose likelihood sits in ``pyro.plate(..., subsample_size=m)``, which HMC and NUTS refuse.

The kernel holds the chain only. The model's potential comes from :mod:`.potential`, the
gradient (minibatch, control variates, ...) from an estimator of :mod:`.estimators`, warmup's
preconditioner and step size from :class:`~pyro_sgmcmc.infer.adaptation.WarmupAdapter`, and the
update from one torch sampler of :mod:`pyro_sgmcmc.samplers`.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import pyro
import torch
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel
from pyro.ops.stats import effective_sample_size, split_gelman_rubin
from torch import Tensor

from .. import samplers
from .._validation import (
    check_callable,
    check_choice,
    check_flag,
    check_integer,
    check_mapping,
    check_number,
    check_options,
)
from ..functional import NonFiniteError
from ..functional.distributed import Ranks, check_process_group, check_replicas, shared_generator
from ..samplers import SGMCMCOptimizer
from .adaptation import Adaptation, WarmupAdapter, Whitening
from .estimators import (
    ControlVariates,
    Estimate,
    ExactPotential,
    GradientEstimator,
    MinibatchPotential,
    SelfSubsampledPotential,
    ShardedPotential,
)
from .potential import (
    FlatLayout,
    ModelPotential,
    PotentialEvaluator,
    find_initial_point,
    initial_values,
    model_sites,
)
from .local import (
    PROBE_EVERY,
    WARMUP_OBSERVATIONS,
    LocalBlock,
    LocalControlVariates,
    LocalLatents,
    LocalMoments,
    LocalRecorder,
    LocalSteps,
    LocalTable,
    check_local_options,
    merged_moments,
)
from .subsample import unconstrained_anchor

__all__ = ["PSGLD", "SGHMC", "SGLD", "SGMCMCKernel", "SGNHT", "KERNELS", "MixingWarning"]


class MixingWarning(UserWarning):
    """A run ended with evidence that its samples do not yet represent the posterior well."""


#: Options of other Pyro kernels (or of the samplers) that a user may reach for, with what ours use.
_OTHER_OPTIONS = {
    "lr": "the kernel's step size is step_size (the sampler's lr)",
    "nbeta": "a kernel samples a Pyro model's summed potential: give temperature instead (nbeta = 1 / T)",
    "diagnostics": "the kernel sets the sampler's diagnostics itself; read kernel.diagnostics() or mcmc.diagnostics()",
    "max_plate_nesting": "SG-MCMC kernels enumerate nothing (discrete latent sites are refused), so they need no "
                         "max_plate_nesting",
    "target_accept_prob": "SG-MCMC steps are not accepted or rejected: the step size follows target_bias, the "
                          "relative bias on posterior variances it may cause (default 0.02)",
    "dense_mass": "give full_mass=True for a dense preconditioner, or mass_rank=k for low rank plus diagonal",
    "trajectory_length": "SG-MCMC takes num_steps sampler steps per sample, not leapfrog trajectories",
    "max_tree_depth": "SG-MCMC builds no trees: num_steps sampler steps per sample",
    "use_multinomial_sampling": "SG-MCMC builds no trajectories to sample from",
    "find_heuristic_step_size": "warmup measures the step size (adapt_step_size=True)",
    "inverse_mass_matrix": "warmup measures the preconditioner (adapt_mass_matrix=True); "
                           "a saved one comes back with load_state_dict()",
    "generator": "the kernel's noise follows torch's global generator (pyro.set_rng_seed), as its minibatches do",
}
#: Sampler arguments the kernel sets itself.
_SET_BY_KERNEL = {"self", "params", "lr", "temperature", "nbeta", "diagnostics", "generator", "distributed",
                  "process_group"}
#: Estimates of the Monte Carlo error are checked only with at least this many samples.
_MIN_SAMPLES_TO_JUDGE = 50
#: A step size that ends warmup below this share of its last measurement (7 halvings) has collapsed.
_COLLAPSED = 1e-2


@dataclass
class ChainStats:
    """What the chain counted: divergences (sample indices after warmup, as HMC reports them), the
    divergent steps of the whole run, and MALA's acceptance of the steps after warmup."""

    divergences: list[int] = field(default_factory=list)
    divergent_steps: int = 0
    mala_total: float = 0.0
    mala_count: int = 0

    @property
    def mala_acceptance(self) -> float | None:
        return self.mala_total / self.mala_count if self.mala_count else None


def rank_normalized(series: Tensor) -> Tensor:
    """Each column of ``series`` (``[chains, samples, k]``) replaced by the normal scores of its
    ranks pooled over chains (ties share their average rank): the rank-normalised draws on which
    Vehtari et al. (2021) compute the bulk effective sample size and split R-hat. Unlike the raw
    values they are not dominated by a few outliers: a chain thrown far out once, then drifting
    slowly, has a variance made of the one jump, and the raw R-hat and ESS call it mixed."""
    chains, samples, k = series.shape
    flat = series.reshape(chains * samples, k)
    ordered = flat.sort(0).values
    below = torch.searchsorted(ordered.T.contiguous(), flat.T.contiguous(), side="left").T
    through = torch.searchsorted(ordered.T.contiguous(), flat.T.contiguous(), side="right").T
    rank = (below + through + 1).double() / 2  # average 1-based rank of the ties
    scores = torch.special.ndtri((rank - 0.375) / (chains * samples + 0.25))  # Blom's offsets, as Vehtari et al.
    return scores.reshape(chains, samples, k)


class MixingMonitor:
    """The potential and a few projections of the whitened point at every sample after warmup:
    enough to say, at the end, whether the chain mixed (effective sample size, split R-hat, both
    rank-normalised), at a cost of ``O(8)`` numbers per sample whatever the model's size. Up to 8
    coordinates are recorded as they are, beyond that 8 fixed random directions."""

    PROJECTIONS = 8
    MAX_JUDGED = 2000

    def __init__(self, z: Tensor):
        d = z.numel()
        if d <= self.PROJECTIONS:
            self.directions = None
        else:
            # fixed directions, from a generator of their own: recording must not move the global RNG
            generator = torch.Generator(device=z.device).manual_seed(0)
            self.directions = torch.randn(d, self.PROJECTIONS, generator=generator, device=z.device).to(z.dtype)
            self.directions /= math.sqrt(d)
        self.records: list[Tensor] = []

    def record(self, z: Tensor, potential: Tensor) -> None:
        projected = z if self.directions is None else z @ self.directions
        self.records.append(torch.cat([potential.reshape(1).to(z), projected]).detach().double().cpu())

    def problems(self, stats: ChainStats, exact: bool, langevin: bool, minibatches: bool, dense: bool,
                 control_variates: bool = False, local_rows: bool = False) -> list[str]:
        """What the run shows that a user must know, each with its remedy ([] if nothing; a
        remedy the run already uses is not offered)."""
        n = len(self.records)
        if n < 2:
            return []
        series = torch.stack(self.records)
        if bool((series == series[:1]).all(0).any()):
            # a constant record: the step is too small to change the point in its floating-point
            # precision (or every step was undone); ESS and R-hat are undefined (0 / 0)
            return ["the chain did not move during sampling (the potential or a coordinate kept exactly one value "
                    f"over {n} samples: a step size too small to change the point, or every step undone as "
                    "divergent); remedies: leave adapt_step_size=True (or give a larger step_size), more "
                    "warmup_steps, or an init_strategy closer to the posterior (e.g. init_to_median)"]
        if n < _MIN_SAMPLES_TO_JUDGE:
            return []
        # evenly thinned to at most MAX_JUDGED points: Pyro's estimators take O(n^2) memory, and
        # the thresholds below (at most 100 effective samples) are far from that many
        stride = -(-n // self.MAX_JUDGED)
        series = rank_normalized(series[::stride][None])  # [1 chain, n / stride, k]
        ess = float(effective_sample_size(series, chain_dim=0, sample_dim=1).nan_to_num(0.0).min())
        rhat = float(split_gelman_rubin(series, chain_dim=0, sample_dim=1).nan_to_num(math.inf).max())
        more = ["a larger num_steps (sampler steps per sample)"]
        if local_rows:
            more.append("a larger subsample_size (each row of a local site moves once every N/m steps, and "
                        "globals tied to the rows, a hierarchical mean or scale, relax at the rows' pace)")
        if minibatches and not control_variates:
            more.append("control_variates=True (minibatch noise limits the step size)")
        if not dense:
            more.append("full_mass=True or mass_rank=k (correlated coordinates mix slowly under a diagonal "
                        "preconditioner)")
        problems = []
        if ess < min(100.0, n / 4):
            problems.append(
                f"the effective sample size is {ess:.0f} of {n} samples (worst of the potential and {series.shape[-1] - 1} "
                f"projections, rank-normalised), so posterior means carry a Monte Carlo error of about "
                f"{1 / math.sqrt(max(ess, 1)):.0%} of a posterior sd; remedies: more num_samples, " + ", ".join(more))
        if rhat > 1.1:
            problems.append(
                f"the chain drifted during sampling (rank-normalised split R-hat {rhat:.2f} > 1.1): it had not reached "
                "its stationary law when warmup ended; remedies: more warmup_steps, or init_strategy closer to the "
                "posterior")
        acceptance = stats.mala_acceptance
        if langevin and exact and acceptance is not None and acceptance < 0.5:
            problems.append(
                f"MALA would accept only {acceptance:.0%} of the steps: the step size is large enough to bias the "
                "samples; remedies: a smaller target_bias (or step_size)")
        return problems


class SGMCMCKernel(MCMCKernel):
    r"""The SG-MCMC kernel for :class:`pyro.infer.MCMC` of one torch sampler (:attr:`sampler_class`);
    use its subclasses :class:`SGLD`, :class:`SGNHT`, :class:`SGHMC`, :class:`PSGLD`.

    Each :meth:`sample` takes ``num_steps`` sampler steps. Each step hands the sampler the
    gradient of the potential (a fresh minibatch per evaluation; the model's own
    ``pyro.plate(..., subsample_size=m)``), then evaluates the potential and its gradient where
    the step landed *before anything is returned*: a landing whose potential, gradient or
    constrained value is not finite is undone and counted as a divergence, so no returned sample
    is a point the chain would reject; the evaluation is kept for the next step's drift, so this
    costs nothing. Constrained sites are sampled in unconstrained space with the log-Jacobian.

    :param model: a Pyro model (or give ``potential_fn``).
    :param potential_fn: a function of a dict of unconstrained tensors returning the potential
        energy, as for HMC (give ``initial_params`` to ``MCMC`` and, if needed, ``transforms``).
    :param step_size: the sampler's step size (SGLD's epsilon, SGNHT's h); with
        ``adapt_step_size`` only the first one (default: measured). Needed with
        ``warmup_steps=0`` unless a saved state is loaded.
    :param adapt_step_size: during warmup, set the step size from the sampler's bias rule
        (``suggest_lr``) and the measured curvature and minibatch-gradient noise, then freeze it;
        with it, the options the sampler sets from the same measurements (SGHMC's friction),
        unless given.
    :param adapt_mass_matrix: during warmup, estimate a preconditioner (``T H^-1``, the Hessian
        averaged over the chain's path after arrival) and freeze it: the chain runs on whitened
        coordinates (see :mod:`pyro_sgmcmc.infer.adaptation`).
    :param full_mass: a dense preconditioner (correlated posteriors, e.g. collinear regressors);
        by default (``None``) dense for models of at most :attr:`DENSE_MAX` latent dimensions and
        diagonal beyond. A diagonal one leaves correlated directions as slow as they are: on a
        real logistic regression with collinear features (scikit-learn's breast cancer, 31
        coefficients, minibatches of 64) the diagonal chain had an effective sample size of 3
        in 30,000 samples, the dense one 60 to 100 (``benchmarks/real_models.py``). The dense
        Hessian costs ``d`` Hessian-vector products at each of warmup's window ends.
    :param mass_rank: a low-rank-plus-diagonal preconditioner for models too big for a dense one:
        the diagonal, corrected along the ``mass_rank`` directions where the diagonally whitened
        Hessian is furthest from the identity (Lanczos on Hessian-vector products); ``O(d k)``.
    :param target_bias: the relative bias on posterior variances the step-size rule aims at.
    :param exact_gaussian: make each step exact on the Gaussian the preconditioner describes
        (SGLD's ``reference_curvature``: Crank-Nicolson Langevin); the step size is then bounded
        by how far the whitened curvature strays from 1, not by the curvature itself, and on
        big-data posteriors approaches ``2``, an almost independent draw per step. Samplers with
        a ``reference_curvature`` option only (SGLD). Off by default: on a posterior far from
        Gaussian (a hierarchical scale, a funnel) the Gaussian the preconditioner describes
        misleads the step and warmup can stall (measured on eight schools from random starts);
        turn it on for near-Gaussian posteriors (regressions on many data, ``control_variates``
        on big data), where it gives several times the effective sample size of plain steps.
    :param num_steps: sampler steps per returned sample (thinning inside the kernel).
    :param temperature: posterior temperature (1 samples the posterior).
    :param transforms: ``{site: transform}`` to unconstrained space (default: from the model).
    :param init_strategy: per-site initialisation, as for HMC (default ``init_to_uniform``),
        retried (up to 100 times) until the potential and its gradient are finite.
    :param on_divergence: ``"skip"`` (a divergent step is undone and counted, the chain goes on)
        or ``"raise"``.
    :param step_size_schedule: after warmup, the step size is the adapted one times
        ``step_size_schedule(k)`` at the ``k``-th sampling step (e.g. ``CyclicalSchedule`` from
        :mod:`pyro_sgmcmc.schedules`); with ``in_sampling_phase`` on the schedule, every returned
        sample comes from a sampling phase.
    :param control_variates: the control-variate gradient (Baker et al. 2019) for a model with
        one subsampled plate: ``True`` finds the anchor, the posterior mode, by L-BFGS on the
        full-data potential; a dict ``{site: constrained value}`` gives it. The chain starts at the
        anchor; each step evaluates the model twice; the gradient noise shrinks with the distance
        to the anchor, which allows far larger steps on big data. With latent sites local to the
        subsampled plate, ``True`` anchors the globals only, at the chain's start, then where
        warmup's adaptation points and its end find them, and keeps the anchor's full-data
        gradient up to date as the rows move (:class:`~pyro_sgmcmc.infer.local.LocalControlVariates`:
        three evaluations a step; the globals' noise no longer grows with ``N/m``).
    :param stochastic_potential: the ``potential_fn`` draws its own minibatch at every call (an
        unbiased estimate): its values are then never compared between points.
    :param jit_compile: evaluate the potential through ``torch.jit.trace`` (as for HMC): about 2x
        cheaper steps on small models; only for models whose operations do not depend on the
        values of their latent sites or minibatch.
    :param jit_options: keyword arguments of ``torch.jit.trace`` (default ``{"check_trace": False}``).
    :param ignore_jit_warnings: silence the tracer's warnings.
    :param distributed: ``"replicated"`` for one chain over the ranks of ``torch.distributed``,
        each rank with a shard of the data (``None``: one process). Each rank's model (or
        ``potential_fn``) is the potential as its shard estimates it: the prior once and the
        shard's likelihood scaled by the number of ranks (e.g. inside
        ``pyro.poutine.scale(scale=world_size)``), with the shard's own subsampled plate; every
        potential and gradient the kernel uses is the average over the ranks
        (:class:`~pyro_sgmcmc.infer.estimators.ShardedPotential`: the full potential), the chain
        starts at rank 0's initial point, and its sampler adds the same noise on every rank
        (``distributed="replicated"`` of :mod:`pyro_sgmcmc.samplers`). Every rank then holds the
        same chain and the same samples (keep rank 0's). Warmup's random curvature probes come
        from a generator seeded from rank 0's (:func:`~pyro_sgmcmc.functional.distributed.shared_generator`),
        the same on every rank whatever each rank's minibatches draw. After each sample the
        ranks' chains are compared (one all-gather of one integer), and a chain that differs
        raises :class:`~pyro_sgmcmc.functional.distributed.ReplicaMismatchError`. A model or
        ``potential_fn`` that raises on one rank leaves the others waiting in the average until
        the process group's timeout: make each rank's model fail alike (or set a short
        ``timeout`` in ``init_process_group``). Not with ``control_variates`` (its mode search is
        not sharded yet), nor with ``MCMC``'s ``num_chains > 1`` (refused: parallel chains would run
        in child processes sharing their parent's process group).
        ``"independent"``: a chain of its own on each rank, on purpose (silences the sampler's
        warning when several ranks run).
    :param process_group: the group (default: the default group); only with ``distributed="replicated"``.
    :param local_samples: for latent sites local to a subsampled plate (see below): ``"moments"``
        keeps running means and variances of every row (:meth:`local_moments`, ``O(N)`` memory
        whatever the number of samples), ``"all"`` also every ``local_thin``-th sample of every
        row (:meth:`local_samples`).
    :param local_thin: with ``local_samples="all"``, keep every ``local_thin``-th sample.
    :param local_step_size: the local sites' step size (default: measured, per site, during
        warmup; see :class:`~pyro_sgmcmc.infer.local.LocalSteps`).
    :param local_exact_gaussian: make the local rows' steps exact on a Gaussian of the rows'
        measured curvature (:class:`~pyro_sgmcmc.infer.local.LocalSteps`): steps up to ``2 /
        curvature``, so each visit redraws a near-Gaussian row almost independently (many groups,
        each well identified); off by default for the reason ``exact_gaussian`` is.
    :param sampler_options: further options of the torch sampler (``diffusion_factor``,
        ``localization``, ...), checked when the kernel is made.

    **Latent sites local to a subsampled plate** (one value per group, user, datum: a site
    sampled inside ``pyro.plate(name, N, subsample_size=m)``) are kept in a table with one row
    per element of the plate, outside the samples ``MCMC`` returns: each step updates the globals
    with the ``N/m``-scaled minibatch gradient and the minibatch's rows with SGLD on their own,
    unscaled, conditional gradient (a random-scan blocked scheme after Ahn et al. 2015; its
    stationary law and remaining bias: :mod:`pyro_sgmcmc.infer.local`). ``mcmc.get_samples()``
    holds the globals; :meth:`local_moments` and :meth:`local_samples` the locals. A local site
    must be local to one subsampled plate (nested plates inside it may be subsampled too) and
    every term that depends on a row must sit inside that plate. ``control_variates=True`` only
    with no plate subsampled inside it; not with ``jit_compile``; with several chains, only
    sequential ones (``mp_context`` runs keep their tables in their processes).

    After warmup nothing adapts: the sampler's own adaptation is frozen
    (:meth:`~pyro_sgmcmc.samplers.SGMCMCOptimizer.freeze_adaptation`) and its auxiliary variables
    (momenta, thermostat) are redrawn from their initial law
    (:meth:`~pyro_sgmcmc.samplers.SGMCMCOptimizer.reset_auxiliary`): a thermostat cools by at most
    1 per unit of time, and the heat of warmup's transient would leave the first samples cold.
    When the run ends with evidence that it has not mixed (a chain that did not move, a step size
    that warmup's safety rules halved by orders of magnitude after its last measurement, a small
    effective sample size or a drift over the run, both on ranks, a MALA score that says the step
    biases the samples, a local rows' step that the rows' curvature probed after warmup says
    is biased beyond its rule or unstable at the globals the chain visits) :meth:`diagnostics` warns once, with the cause and the remedy
    (:class:`MixingWarning`).

    A run is continued, without a new warmup, from :meth:`state_dict` (the adapted
    preconditioner, step size, sampler state, control-variate anchor and the chain's point)::

        state = kernel.state_dict()                 # after mcmc.run(...)
        kernel = pyro_sgmcmc.infer.SGLD(model)
        kernel.load_state_dict(state)
        MCMC(kernel, num_samples=1000, warmup_steps=0).run(data)
    """

    sampler_class: ClassVar[type[SGMCMCOptimizer]]
    #: Up to this many latent dimensions the default preconditioner is dense.
    DENSE_MAX: ClassVar[int] = 100

    def __init__(
        self,
        model: Callable | None = None,
        potential_fn: Callable[[dict[str, Tensor]], Tensor] | None = None,
        *,
        step_size: float | None = None,
        adapt_step_size: bool = True,
        adapt_mass_matrix: bool = True,
        full_mass: bool | None = None,
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
        stochastic_potential: bool = False,
        jit_compile: bool = False,
        jit_options: dict[str, Any] | None = None,
        ignore_jit_warnings: bool = False,
        distributed: str | None = None,
        process_group: Any = None,
        local_samples: str = "moments",
        local_thin: int = 1,
        local_step_size: float | None = None,
        local_exact_gaussian: bool = False,
        **sampler_options: Any,
    ) -> None:
        if not hasattr(type(self), "sampler_class"):
            raise TypeError("SGMCMCKernel is the base class: use pyro_sgmcmc.infer.SGLD, SGNHT, SGHMC or PSGLD")
        if (model is None) == (potential_fn is None):
            raise ValueError("Give exactly one of model and potential_fn")
        check_callable("model" if model is not None else "potential_fn", model or potential_fn,
                       what="a callable (a Pyro model, or a potential function of a dict of tensors)")
        self.step_size = check_number("step_size", step_size, none_ok=True)
        self.adapt_step_size = check_flag("adapt_step_size", adapt_step_size)
        if self.step_size is None and not self.adapt_step_size:
            raise ValueError("Invalid step_size: None (give a step size, or leave adapt_step_size=True)")
        self.adapt_mass_matrix = check_flag("adapt_mass_matrix", adapt_mass_matrix)
        self.full_mass = None if full_mass is None else check_flag("full_mass", full_mass)
        self.mass_rank = check_integer("mass_rank", mass_rank)
        if self.mass_rank and self.full_mass:
            raise ValueError("Give either full_mass=True or mass_rank > 0, not both")
        self.target_bias = check_number("target_bias", target_bias, high=1.0)
        self.exact_gaussian = check_flag("exact_gaussian", exact_gaussian)
        self.num_steps = check_integer("num_steps", num_steps, low=1)
        self.temperature = check_number("temperature", temperature)
        self._given_transforms = check_mapping("transforms", transforms, what="a dict {site: transform}",
                                               none_ok=True)
        self.transforms = transforms
        self.init_strategy = check_callable("init_strategy", init_strategy,
                                            what="a callable, e.g. pyro.infer.autoguide.init_to_median")
        self.on_divergence = check_choice("on_divergence", on_divergence, ("skip", "raise"))
        self.step_size_schedule = check_callable(
            "step_size_schedule", step_size_schedule, none_ok=True,
            what="a callable of the step, e.g. pyro_sgmcmc.schedules.CyclicalSchedule")
        if not isinstance(control_variates, (bool, dict)):
            raise ValueError(f"Invalid control_variates: {control_variates!r} (must be True, False, or a dict "
                             "{site: constrained value} giving the anchor)")
        if control_variates is not False and potential_fn is not None:
            raise ValueError("Invalid control_variates: needs a model (it replays the model's minibatches), "
                             "not a potential_fn")
        self.control_variates = control_variates
        self.stochastic_potential = check_flag("stochastic_potential", stochastic_potential)
        if self.stochastic_potential and potential_fn is None:
            raise ValueError("Invalid stochastic_potential: True is for a potential_fn that draws its own minibatch; "
                             "a model's minibatches come from its subsampled plates")
        self.jit_compile = check_flag("jit_compile", jit_compile)
        self.jit_options = check_mapping("jit_options", jit_options, what="a dict of torch.jit.trace options",
                                         none_ok=True)
        self.ignore_jit_warnings = check_flag("ignore_jit_warnings", ignore_jit_warnings)
        self.distributed = check_choice("distributed", distributed, (None, "replicated", "independent"))
        check_process_group(process_group, self.distributed, ("replicated",))
        if self.distributed == "replicated" and control_variates is not False:
            raise ValueError("Invalid control_variates: not with distributed='replicated' (the mode search is not "
                             "sharded across ranks yet)")
        self.process_group = process_group
        self._ranks: Ranks | None = None
        self._made_in = os.getpid()  # a chain that spans ranks runs in the process that made its kernel
        self.local_samples_kept, self.local_thin = check_local_options(local_samples, local_thin)
        self.local_step_size = check_number("local_step_size", local_step_size, none_ok=True)
        self.local_exact_gaussian = check_flag("local_exact_gaussian", local_exact_gaussian)
        self._local_records: list[LocalRecorder] = []
        self.sampler_options = self._check_sampler_options(sampler_options)
        if self.exact_gaussian and "reference_curvature" not in self._sampler_parameters():
            raise ValueError(f"Invalid exact_gaussian: {self.sampler_class.__name__} has no reference_curvature "
                             "option (exact_gaussian=True needs a Langevin sampler with one: SGLD)")
        self.model = model
        self.potential_fn = potential_fn
        self._user_initial_params: dict[str, Tensor] | None = None
        self._restored: dict[str, Any] | None = None
        self._reset()

    # ------------------------------------------------------------------------- options

    @classmethod
    def _sampler_parameters(cls) -> set[str]:
        return set(inspect.signature(cls.sampler_class.__init__).parameters) - _SET_BY_KERNEL

    def _check_sampler_options(self, options: dict[str, Any]) -> dict[str, Any]:
        """Options meant for the sampler: names checked against its signature (a misspelt one
        names the closest valid option), values by building one (its own checks)."""
        kernel_options = set(inspect.signature(SGMCMCKernel.__init__).parameters) - {"self", "sampler_options"}
        check_options(options, self._sampler_parameters() | kernel_options, f"{type(self).__name__}",
                      hints=_OTHER_OPTIONS)
        probe = torch.zeros(1, requires_grad=True)
        try:
            self.sampler_class([probe], lr=self.step_size or 1e-3, temperature=self.temperature, **options)
        except (TypeError, ValueError) as error:
            raise type(error)(f"{error} [option of the {type(self).__name__} kernel, for its sampler "
                              f"{self.sampler_class.__module__}.{self.sampler_class.__name__}]") from None
        return dict(options)

    # ------------------------------------------------------------------ MCMC driver interface

    def _reset(self) -> None:
        self._initial_params: dict[str, Tensor] | None = None
        self._layout: FlatLayout | None = None
        self._estimator: GradientEstimator | None = None
        self._adapter: WarmupAdapter | None = None
        self._tuning: Adaptation | None = None
        self._sampler: SGMCMCOptimizer | None = None
        self._z: Tensor | None = None
        self._estimate: Estimate | None = None
        self._grad_z: Tensor | None = None
        self._warmup_steps = 0
        self._t = 0
        self._sampling_steps = 0
        self._stats = ChainStats()
        self._monitor: MixingMonitor | None = None
        self._warned = False
        self._minibatches = False
        self._mass = "diagonal"
        self._exact_gaussian = False
        self._local_table: LocalTable | None = None
        self._local_steps: LocalSteps | None = None
        self._local_observed = False

    def setup(self, warmup_steps: int, *args: Any, **kwargs: Any) -> None:
        """Prepare a new chain: all state is reset (``MCMC`` reuses one kernel for sequential
        chains, and calls ``setup`` again in the parent after parallel ones), the estimator is
        built, and a valid initial point is found."""
        if self.distributed == "replicated" and os.getpid() != self._made_in:
            raise ValueError("Invalid num_chains: a kernel with distributed='replicated' runs one chain over the ranks, "
                             "in the processes that made it; MCMC's parallel chains run it in child processes, whose "
                             "process group is their parent's (use num_chains=1)")
        self._reset()
        self._warmup_steps = check_integer("warmup_steps", warmup_steps)
        if self.distributed == "replicated":
            self._ranks = Ranks.of(self.process_group)
        local_rows = None
        if self.model is not None:
            sites = model_sites(self.model, args, kwargs, allow_local=True)
            transforms = sites.transforms
            if self._given_transforms is not None:
                transforms = {**transforms, **self._given_transforms}
            self.transforms = transforms
            potential = ModelPotential(self.model, transforms, args, kwargs, sites.local_sites)
            if sites.local_sites:
                local_rows = self._setup_local_sites(sites.local_sites, args, kwargs)
            self._minibatches = bool(sites.plates)
            draw = lambda: initial_values(self.model, args, kwargs, transforms, self.init_strategy)  # noqa: E731
        else:
            self.transforms = dict(self._given_transforms or {})
            potential = self.potential_fn
            self._minibatches = self.stochastic_potential
            draw = None
        if draw is not None and self._ranks is not None:
            draw_here = draw
            draw = lambda: self._from_rank_0(draw_here())  # noqa: E731
        if self._restored is not None:
            initial = self._restored_point()
        elif self._user_initial_params is not None:
            initial = {name: torch.as_tensor(value).detach().clone() for name, value in self._user_initial_params.items()}
        elif draw is not None:
            initial = draw()  # rank 0's already
        else:
            raise ValueError("With potential_fn, give initial_params (to MCMC, as for HMC)")
        if self._ranks is not None and (self._restored is not None or self._user_initial_params is not None):
            initial = self._from_rank_0(initial)
        self._layout = FlatLayout(initial)
        evaluator = PotentialEvaluator(potential, self._layout.unflatten, is_model=self.model is not None,
                                       jit_compile=self.jit_compile, jit_options=self.jit_options,
                                       ignore_jit_warnings=self.ignore_jit_warnings, local_rows=local_rows)
        self._estimator = self._make_estimator(evaluator, sites.plates if self.model is not None else [])
        if type(self._estimator) is ExactPotential and self.potential_fn is not None and self._restored is None:
            self._detect_subsampling(initial)  # on this rank's potential, before the ranks' average
        if self._ranks is not None:
            self._estimator = ShardedPotential(self._estimator, self._ranks)
        def valid(point: dict[str, Tensor]) -> bool:
            with pyro.validation_enabled(False):  # an invalid point is retried, not a validation error
                return self._estimator.estimate(self._layout.flatten(point)).finite

        if self._restored is None and not valid(initial):
            if draw is None or self._user_initial_params is not None or self._restored is not None:
                raise ValueError("Invalid initial_params: the potential energy or its gradient is not finite there")
            initial = find_initial_point(draw, valid)
        self._initial_params = initial

    def _from_rank_0(self, point: dict[str, Tensor]) -> dict[str, Tensor]:
        """Rank 0's ``point``, on every rank (a collective)."""
        layout = FlatLayout(point)
        flat = self._ranks.broadcast(layout.flatten(point))
        return {name: value.clone() for name, value in layout.unflatten(flat).items()}
    def _setup_local_sites(self, local_sites: list, args: tuple, kwargs: dict) -> Callable:
        """The table of the local sites (restored, or drawn by the init strategy), their stepper
        and this chain's recorder; returns the evaluator's row lookup."""
        names = ", ".join(repr(site.name) for site in local_sites)
        if self.distributed == "replicated":
            raise NotImplementedError(f"Invalid distributed: 'replicated' is not supported with the latent sites {names} "
                                      "local to a subsampled plate (each rank would hold its own table of rows)")
        if isinstance(self.control_variates, dict):
            raise NotImplementedError(f"Invalid control_variates: an anchor is not taken with the latent sites {names} "
                                      "local to a subsampled plate (use True: the anchor of the globals follows "
                                      "warmup)")
        if self.jit_compile:
            raise NotImplementedError(f"Invalid jit_compile: True is not supported with the latent sites {names} local "
                                      "to a subsampled plate (their rows would have to be inputs of the traced graph)")
        saved = (self._restored or {}).get("locals")
        if saved is not None:
            table = LocalTable(local_sites, saved["table"])
        else:
            table = LocalTable.initial(self.model, args, kwargs, local_sites, self.init_strategy)
        self._local_table = table
        self._local_steps = LocalSteps(table, self.temperature, self.local_exact_gaussian)
        if saved is not None:
            self._local_steps.step_sizes = dict(saved["step_sizes"])
            self._local_steps.reference = dict(saved.get("reference", {}))
        elif self.local_step_size is not None:
            self._local_steps.step_sizes = {site.name: self.local_step_size for site in local_sites}
            self._local_steps.given = True
        self._local_records.append(LocalRecorder(self.local_samples_kept, self.local_thin))
        return table.gather

    def _measure_local_steps(self, arrival: bool, fresh: bool = False) -> None:
        """Measure the local sites' step sizes at the chain's globals (unless given; their reference
        curvatures too, for ``local_exact_gaussian``)."""
        if self._local_table is None or (self.local_step_size is not None and not self.local_exact_gaussian):
            return
        if self._restored is not None and self._warmup_steps == 0:
            return
        self._local_steps.measure(self._estimator, self._theta(), self.target_bias, arrival, self.local_step_size,
                                  fresh=fresh)

    def _detect_subsampling(self, point: dict[str, Tensor]) -> None:
        """A ``potential_fn`` that returns two values at one point draws its own minibatches:
        treated as exact, warmup would take its noise for jumps and freeze the chain. Say so, and
        treat it as ``stochastic_potential=True``."""
        flat = self._layout.flatten(point)
        with torch.no_grad():
            first, second = (self._estimator.fixed_potential()(flat) for _ in range(2))
        detected = bool(torch.isfinite(first)) and not torch.equal(first, second)
        if self._ranks is not None:  # the ranks decide together: one rank's potential that subsamples is enough
            detected = not self._ranks.agree(not detected)
        if detected:
            warnings.warn("potential_fn returned two different values at the same point: it seems to draw its own "
                          "minibatch, so the kernel treats it as stochastic_potential=True (pass that to say so)",
                          UserWarning, stacklevel=3)
            self._estimator = SelfSubsampledPotential(self._estimator.evaluator)
            self._minibatches = True

    def _make_estimator(self, evaluator: PotentialEvaluator, plates: list) -> GradientEstimator:
        if self.potential_fn is not None:
            return SelfSubsampledPotential(evaluator) if self.stochastic_potential else ExactPotential(evaluator)
        if self._local_table is not None:
            if self.control_variates is False:
                return LocalLatents(evaluator, plates, self._local_table)
            if len(plates) != 1:
                raise NotImplementedError(
                    f"Invalid control_variates: True needs exactly one subsampled plate with local latent sites "
                    f"(found {[plate.name for plate in plates]}: a plate subsampled inside the rows' plate would make "
                    "every update of the anchor's full-data gradient a noisy one)")
            return LocalControlVariates(evaluator, plates, self._local_table)
        if not plates:
            if self.control_variates is not False:
                raise ValueError("Invalid control_variates: the model has no subsampled plate "
                                 "(pyro.plate(name, N, subsample_size=m)); there is no minibatch noise to reduce")
            return ExactPotential(evaluator)
        minibatch = MinibatchPotential(evaluator, plates)
        if self.control_variates is False:
            return minibatch
        anchor = None
        if isinstance(self.control_variates, dict):
            anchor = self._layout.flatten(unconstrained_anchor(self.control_variates, self.transforms,
                                                               "control_variates"))
        return ControlVariates(minibatch, anchor, self.temperature)

    @property
    def initial_params(self) -> dict[str, Tensor] | None:
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params: dict[str, Tensor]) -> None:
        check_mapping("initial_params", params, what="a dict {site: unconstrained tensor}", none_ok=True)
        if params is not None and not params:
            raise ValueError("Invalid initial_params: {} (must name at least one latent site)")
        self._user_initial_params = params
        self._initial_params = params

    # --------------------------------------------------------------------------- sampling

    def sample(self, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """``num_steps`` sampler steps from ``params``; the new (unconstrained) state."""
        if self._sampler is None:
            self._start(params)
        elif self._t < self._warmup_steps:
            if self._local_table is not None and self._t in self._adapter.adapt_at:
                # local control variates: the anchor follows warmup, moved before the step size is
                # measured (the noise is then measured a typical distance from it)
                self._estimator.reanchor(self._theta())
            update = self._adapter.step(self._t, self._theta(), self._estimate)
            half = self._warmup_steps // 2
            if update is not None:
                self._tune(*update)
                # the rows' rule over the second half of warmup: its first measurement starts afresh
                later = self._t >= half
                self._measure_local_steps(arrival=self._t < self._adapter.arrival_end,
                                          fresh=not (later and self._local_observed))
                self._local_observed = self._local_observed or later
            elif self._local_steps is not None and self._t >= max(half, self._adapter.arrival_end) and \
                    self._t % max(1, self._warmup_steps // WARMUP_OBSERVATIONS) == 0:
                # the rows' curvature at more of the globals the chain visits
                self._local_steps.observe(self._estimator, self._theta(), fresh=not self._local_observed)
                self._local_observed = True
        elif self._t == self._warmup_steps and self._t > 0:  # MCMC never calls end_warmup
            self._tuning = self._adapter.final()
            self._sampler.freeze_adaptation()
            self._sampler.reset_auxiliary()
            # the rows' rule at the final globals too; then frozen
            self._measure_local_steps(arrival=False, fresh=not self._local_observed)
            if self._local_table is not None:
                self._estimator.reanchor(self._theta())  # fixed from here on
        if self._t >= self._warmup_steps and self._monitor is None:
            self._monitor = MixingMonitor(self._z.detach())
        for _ in range(self.num_steps):
            self._step()
        in_phase = getattr(self.step_size_schedule, "in_sampling_phase", None)
        if in_phase is not None and self._t >= self._warmup_steps:
            while not in_phase(self._sampling_steps - 1):  # through the exploration phase
                self._step()
        if self._t >= self._warmup_steps:
            self._monitor.record(self._z.detach(), self._estimate.potential)
            if self._local_table is not None:
                self._local_records[-1].record(self._local_table)
                if (self._local_records[-1].count - 1) % PROBE_EVERY == 0:
                    self._local_steps.probe(self._estimator, self._theta())
        if self._ranks is not None:
            check_replicas([self._z], self._ranks, what="chain state")
        self._t += 1
        return {name: value.clone() for name, value in self._layout.unflatten(self._theta()).items()}

    def _start(self, params: dict[str, Tensor]) -> None:
        """The chain's first step: its estimator prepared, its tuning (measured, or restored)."""
        theta = self._layout.flatten({k: torch.as_tensor(v).detach() for k, v in params.items()})
        dense = self.full_mass if self.full_mass is not None else theta.numel() <= self.DENSE_MAX
        self._mass = "low-rank" if self.mass_rank else "dense" if dense else "diagonal"
        exact_gaussian = self.exact_gaussian
        if self._restored is not None and self._warmup_steps == 0:
            exact_gaussian = bool(self._restored.get("exact_gaussian", exact_gaussian))
        self._exact_gaussian = exact_gaussian
        self._adapter = WarmupAdapter(
            self._estimator, self.sampler_class, step_size=self.step_size, adapt_step_size=self.adapt_step_size,
            adapt_mass_matrix=self.adapt_mass_matrix,
            mass=self._mass, mass_rank=self.mass_rank,
            target_bias=self.target_bias, temperature=self.temperature, exact_gaussian=exact_gaussian,
            sampler_options=self.sampler_options,
            # the curvature's probes, the same on every rank (each rank's minibatches draw from its
            # global generator as many numbers as its shard's size asks)
            generator=shared_generator(self._ranks, theta.device) if self._ranks is not None else None)
        restored = self._restored
        if restored is not None and self._warmup_steps == 0:
            self._estimator.load_state_dict(restored["estimator"])
            tuning = Adaptation(Whitening.from_state_dict(restored["whitening"]), restored["step_size"],
                                dict(restored["sampler_options"]))
            estimate = Estimate(restored["potential"], restored["grad"])
            self._adapter.current = tuning
            self._adapter.final()
            self._tune(tuning, theta, estimate, z=restored.get("z"))
            self._sampler.load_state_dict(restored["sampler"])
            self._sampling_steps = restored["sampling_steps"]
            return
        start = self._estimator.prepare(theta)
        estimate = self._estimator.estimate(start)
        if not estimate.finite:
            raise ValueError("The potential energy or its gradient is not finite at the chain's start")
        at_mode = isinstance(self._estimator, ControlVariates)
        self._tune(self._adapter.init(start, self._warmup_steps, at_mode=at_mode, estimate=estimate), start, estimate)
        self._measure_local_steps(arrival=self._adapter.arrival_end > 0, fresh=True)
        if self._warmup_steps == 0:
            self._adapter.final()

    def _tune(self, tuning: Adaptation, theta: Tensor, estimate: Estimate, z: Tensor | None = None) -> None:
        """Put the chain at ``theta`` (with its ``estimate``) in ``tuning``'s coordinates, with a
        fresh sampler at its step size (the old sampler's state belongs to other coordinates).
        ``z``, when given, is ``theta`` already in those coordinates (a restored chain's exact point)."""
        self._tuning = tuning
        z = tuning.whitening.to_z(theta) if z is None else z
        self._z = z.detach().clone().requires_grad_(True)
        self._estimate = estimate
        self._grad_z = tuning.whitening.pullback(estimate.grad)
        options = {**self.sampler_options, **tuning.sampler_options}
        # the Langevin samplers score their steps with MALA's acceptance (cheap on the flat z); the
        # sampler's warnings (e.g. noise_level) were shown when the kernel was made
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            self._sampler = self.sampler_class([{"params": [("z", self._z)]}], lr=tuning.step_size,
                                               temperature=self.temperature,
                                               diagnostics="mala" if self.sampler_class.langevin else False,
                                               distributed=self.distributed,
                                               process_group=self.process_group if self._ranks is not None else None,
                                               **options)
        if self._t < self._adapter.arrival_end or self._adapter.frozen:
            # while arriving, the sampler adapts nothing of its own: PSGLD's squared-gradient
            # average would fill with the transient's huge gradients and shrink every later step
            self._sampler.freeze_adaptation()

    def _step(self) -> None:
        """One sampler step, decided before anything is returned: the potential and gradient where
        it lands are evaluated now, and a landing the chain would reject is undone."""
        sampling = self._t >= self._warmup_steps
        if sampling:
            if self.step_size_schedule is not None:
                factor = float(self.step_size_schedule(self._sampling_steps))
                for group in self._sampler.param_groups:
                    group["lr"] = self._tuning.step_size * factor
            self._sampling_steps += 1
        previous = self._z.detach().clone()
        self._z.grad = self._grad_z
        try:
            self._sampler.step(loss=self._estimate.potential)
        except NonFiniteError as error:
            self._reject(previous, str(error))
            return
        z = self._z.detach()
        if not bool(torch.isfinite(z).all()):
            self._reject(previous, "the sampler's update is not finite")
            return
        local = self._step_local_rows(previous)
        if local is False:
            return
        theta = self._tuning.whitening.to_theta(z)
        landing = self._estimator.estimate(theta)
        if not landing.finite:
            self._reject(previous, f"the potential energy or its gradient is not finite where the step landed "
                                   f"(potential {float(landing.potential):.4g})", local=local)
            return
        grad_z = self._tuning.whitening.pullback(landing.grad)
        if not sampling and self._adapter.judges_steps:
            log_ratio = None
            if self.sampler_class.langevin and self._adapter.scores_steps:
                self._z.grad = grad_z  # the gradient where the step landed scores it now
                log_ratio = self._sampler.score_last_step(landing.potential)
            if self._adapter.is_jump(float(self._estimate.potential), float(landing.potential), z.numel(),
                                     None if log_ratio is None else float(log_ratio)):
                self._reject(previous, "warmup jump", jump=True, local=local)
                return
        previous_grad = self._estimate.grad
        previous_estimate = self._estimate
        self._estimate = landing
        self._grad_z = grad_z
        if sampling:
            acceptance = self._sampler.step_diagnostics.get("mala_acceptance")
            if acceptance is not None:
                self._stats.mala_total += float(acceptance)
                self._stats.mala_count += 1
        else:
            change = None
            if self._estimator.fixed_minibatch_secants and self._adapter.fits_secants:
                # the step's secant on the minibatch it started from (one more evaluation per
                # warmup step): the globals' Hessian along the step without minibatch noise
                same = self._estimator.gradient_on(theta, previous_estimate)
                change = None if same is None else same - previous_grad
            self._adapter.accepted(theta, landing, z - previous, previous_grad, change)

    def _step_local_rows(self, previous: Tensor) -> tuple[LocalBlock, dict[str, Tensor]] | None | bool:
        """The SGLD step of the local rows of the cached estimate's minibatch (at the same state as
        the globals' step): ``(block, rows before)`` to undo it, ``None`` without local sites,
        ``False`` if it was refused (the whole step is then undone)."""
        if self._local_table is None:
            return None
        block = getattr(self._estimate, "block", None)
        if block is None:
            return None
        try:
            before = self._local_steps.step(block)
        except NonFiniteError as error:
            self._reject(previous, f"local rows: {error}")
            return False
        self._estimator.rows_moved(block)
        return block, before

    def _reject(self, previous: Tensor, why: str, jump: bool = False,
                local: tuple[LocalBlock, dict[str, Tensor]] | None = None) -> None:
        """Undo the step (the chain stays at ``previous``, whose estimate is kept; the local rows
        it moved go back); count it; during warmup, let the adapter halve the step size (and, when
        stuck, go back to its best point)."""
        if local is not None:
            self._local_steps.undo(*local)
            self._estimator.rows_restored()
        with torch.no_grad():
            self._z.copy_(previous)
        self._sampler.reset_auxiliary()
        self._sampler.forget_last_step()
        if not jump:
            self._stats.divergent_steps += 1
            index = self._t - self._warmup_steps
            if index >= 0 and (not self._stats.divergences or self._stats.divergences[-1] != index):
                self._stats.divergences.append(index)
        if self._t < self._warmup_steps:
            tuning, theta, estimate = self._adapter.rejected(jump)
            if theta is None:
                theta, estimate = self._theta(), self._estimate
            self._tune(tuning, theta, estimate)
        if self.on_divergence == "raise" and not jump:
            raise RuntimeError(f"Divergence at iteration {self._t} ({why}); the chain was not moved. "
                               "Lower step_size, or pass on_divergence='skip' to count divergences and go on")

    def _theta(self) -> Tensor:
        return self._tuning.whitening.to_theta(self._z.detach())

    # ---------------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue the chain exactly, without a new warmup (plain tensors,
        numbers and strings: ``torch.save`` / ``torch.load(weights_only=True)`` take it): the
        chain's point and the potential and gradient cached there, the adapted preconditioner,
        step size and sampler options, the sampler's state (noise streams included) and the
        estimator's (a control-variate anchor). With the global RNG restored too
        (``torch.get_rng_state()``), a continued run draws what the uninterrupted one would have."""
        if self._sampler is None:
            raise RuntimeError("state_dict() needs a chain that has started (run MCMC first)")
        return {
            "kernel": type(self).__name__,
            "sites": self._layout.describe(),
            "theta": self._theta().clone(),
            "z": self._z.detach().clone(),  # theta -> z is not exact in floating point
            "exact_gaussian": self._exact_gaussian,
            "potential": self._estimate.potential.clone(),
            "grad": self._estimate.grad.clone(),
            "whitening": self._tuning.whitening.state_dict(),
            "step_size": float(self._tuning.step_size),
            "sampler_options": dict(self._tuning.sampler_options),
            "sampler": self._sampler.state_dict(),
            "estimator": self._estimator.state_dict(),
            "sampling_steps": self._sampling_steps,
            "temperature": self.temperature,
            **({} if self._local_table is None else {"locals": {
                "table": {name: value.clone() for name, value in self._local_table.values.items()},
                "step_sizes": dict(self._local_steps.step_sizes),
                "reference": dict(self._local_steps.reference)}}),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` at the next run: with ``warmup_steps=0`` the chain goes
        on with the saved tuning and sampler state; with warmup, it adapts afresh from the saved
        point."""
        check_mapping("state", state, what="the dict of a kernel's state_dict()")
        missing = {"kernel", "sites", "theta", "potential", "grad", "whitening", "step_size", "sampler"} - set(state)
        if missing:
            raise ValueError(f"Invalid state: missing {sorted(missing)} (must be the result of a kernel's state_dict())")
        if state["kernel"] != type(self).__name__:
            raise ValueError(f"Invalid state: it is a {state['kernel']} kernel's, not a {type(self).__name__}'s")
        if state.get("temperature", self.temperature) != self.temperature:
            raise ValueError(f"Invalid state: saved at temperature {state['temperature']}, this kernel samples at "
                             f"{self.temperature}")
        check_number("state['step_size']", state["step_size"])
        self._restored = dict(state)

    def _restored_point(self) -> dict[str, Tensor]:
        """The saved point, checked against the model's latent sites."""
        sites = [(name, tuple(shape)) for name, shape in self._restored["sites"]]
        if self.model is not None and {name for name, _ in sites} != set(self.transforms):
            raise ValueError(f"Invalid state: saved for the sites {sorted(name for name, _ in sites)}, the model has "
                             f"{sorted(self.transforms)}")
        layout = FlatLayout({name: torch.empty(shape) for name, shape in sites})
        if self._restored["theta"].numel() != layout.size:
            raise ValueError(f"Invalid state: its point has {self._restored['theta'].numel()} entries, its sites "
                             f"{layout.size}")
        return {name: value.clone() for name, value in layout.unflatten(self._restored["theta"]).items()}

    # -------------------------------------------------------------------------- reports

    def logging(self) -> dict[str, str]:
        """What the progress bar shows (cheap: ``MCMC`` serialises it every iteration): the step
        size, the divergences so far and, for the Langevin samplers after warmup, MALA's
        acceptance of the steps (near 1: the step is small enough for the target bias)."""
        out = {"step size": f"{self._tuning.step_size:.2e}" if self._tuning is not None else "-",
               "divergences": str(self._stats.divergent_steps)}
        acceptance = self._stats.mala_acceptance
        if acceptance is not None:
            out["accept"] = f"{acceptance:.3f}"
        return out

    def diagnostics(self) -> dict[str, Any]:
        """Divergences (iteration indices after warmup, as HMC reports them), what warmup adapted
        (the step size, the preconditioner, the curvature and gradient-noise variance last
        measured, in whitened coordinates, and any option the sampler adapted), MALA's acceptance
        of the steps after warmup for the Langevin samplers (well below 1: a step size large
        enough to bias the samples; on minibatches a noisy and pessimistic estimate), and the
        mixing checks. The first call after a run warns (:class:`MixingWarning`) if they found
        a problem."""
        tuning = self._tuning
        problems = []
        collapse = self._step_collapse()
        if collapse is not None:
            problems.append(collapse)
        if self._local_steps is not None:
            problems += self._local_steps.problems(self.target_bias)
        if self._monitor is not None:
            problems += self._monitor.problems(
                self._stats, exact=not self._minibatches,
                langevin=self.sampler_class.langevin, minibatches=self._minibatches,
                dense=self._mass != "diagonal", control_variates=isinstance(self._estimator, (ControlVariates, LocalControlVariates)),
                local_rows=self._local_steps is not None)
            if problems and not self._warned:
                self._warned = True
                warnings.warn(f"{type(self).__name__} kernel: " + "; ".join(problems), MixingWarning, stacklevel=2)
        scales = tuning.scales if tuning is not None else None
        return {
            "divergences": list(self._stats.divergences),
            "divergent steps": self._stats.divergent_steps,
            "warmup jumps undone": self._adapter.jumps if self._adapter is not None else 0,
            "step size": tuning.step_size if tuning is not None else self.step_size,
            "preconditioner": None if tuning is None else tuning.whitening.kind,
            "curvature": scales.curvature if scales else math.nan,
            "gradient noise": scales.noise if scales else math.nan,
            "exact gaussian": self._exact_gaussian,
            **({"smallest curvature": scales.smallest if scales else math.nan} if self._exact_gaussian else {}),
            "temperature": self.temperature,
            "mala acceptance": self._stats.mala_acceptance,
            "control variates": None if not isinstance(self._estimator, ControlVariates) or
            self._estimator.anchor is None else {
                "anchor potential": float(self._estimator.anchor.potential),
                "full-data evaluations": self._estimator.full_evaluations},
            "mixing problems": problems,
            **({} if self._local_steps is None else {"local step sizes": dict(self._local_steps.step_sizes),
                                                     "local reference curvatures": dict(self._local_steps.reference)}),
            **(tuning.sampler_options if tuning is not None else {}),
        }

    def _step_collapse(self) -> str | None:
        """The problem of a warmup that ended with its step size :data:`_COLLAPSED` or less of
        what its rule measured last (the safety rules halved it at every step undone since),
        or ``None``."""
        adapter = self._adapter
        if adapter is None or not adapter.frozen or not self.adapt_step_size or self._tuning is None:
            return None
        measured, final = adapter.measured_step_size, self._tuning.step_size
        if not (math.isfinite(measured) and measured > 0 and final < _COLLAPSED * measured):
            return None
        return (f"warmup ended with step size {final:.2g}, {measured / final:.0f} times smaller than the {measured:.2g} "
                f"its rule measured last ({math.log2(measured / final):.0f} halvings, one per step undone since: a "
                "potential or gradient not finite where it landed, or a jump), so the chain moves about "
                f"{math.sqrt(measured / final):.0f} times slower than it should; remedies: more warmup_steps, an "
                "init_strategy closer to the posterior (e.g. init_to_median), or a model whose potential is finite "
                "around the posterior")

    # -------------------------------------------------------------------- local latent sites

    def _recorded(self) -> list[LocalRecorder]:
        records = [record for record in self._local_records if record.count]
        if not records:
            raise RuntimeError("No samples of local latent sites were recorded: the model has none, no run has "
                               "sampled yet, or the chains ran in other processes (use sequential chains)")
        return records

    def local_moments(self) -> dict[str, LocalMoments]:
        """``{site: LocalMoments(count, mean, variance)}``: the posterior mean and variance of
        every row of every local site (constrained values), from all samples after warmup of the
        chains run so far, pooled."""
        return merged_moments(self._recorded())

    def local_samples(self, group_by_chain: bool = False) -> dict[str, Tensor]:
        """``{site: tensor[num_kept, *shape]}`` (constrained values, every row; the chains run
        so far one after the other): every ``local_thin``-th sample, for ``local_samples="all"``.
        With :meth:`pyro.infer.MCMC.get_samples` thinned alike (one chain:
        ``{k: v[::local_thin] for k, v in mcmc.get_samples().items()}``) it forms the dict that
        :class:`pyro.infer.Predictive` takes. ``group_by_chain=True``: ``[num_chains, num_kept,
        *shape]``, as ``mcmc.get_samples(group_by_chain=True)``, for ArviZ
        (``arviz.from_dict(posterior={**globals_thinned, **kernel.local_samples(group_by_chain=True)})``)."""
        if self.local_samples_kept != "all":
            raise RuntimeError("local_samples() needs local_samples='all' (this kernel keeps running moments only: "
                               "see local_moments())")
        records = self._recorded()
        per_chain = [record.samples() for record in records]
        join = torch.stack if group_by_chain else torch.cat
        return {name: join([samples[name] for samples in per_chain]) for name in per_chain[0]}

    def cleanup(self) -> None:
        """Release the chain's sampler (``MCMC`` calls this twice per chain: idempotent). What
        ``diagnostics()`` and ``state_dict()`` report stays."""


class SGLD(SGMCMCKernel):
    r"""Stochastic gradient Langevin dynamics (Welling & Teh 2011) as a kernel for
    :class:`pyro.infer.MCMC`, on the model's minibatches.

    The sampler is :class:`pyro_sgmcmc.samplers.SGLD`; its options (``localization``,
    ``weight_decay``, ``noise_level``, ...) may be given here. Every other argument: see
    :class:`SGMCMCKernel`. Example::

        def model(x, y):
            w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
            with pyro.plate("data", len(y), subsample_size=100) as idx:
                pyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])

        mcmc = MCMC(pyro_sgmcmc.infer.SGLD(model), num_samples=2000, warmup_steps=500)
        mcmc.run(x, y)
        mcmc.summary()
    """

    sampler_class = samplers.SGLD


class SGNHT(SGMCMCKernel):
    r"""The stochastic gradient Nosé-Hoover thermostat (Ding et al. 2014) as a kernel for
    :class:`pyro.infer.MCMC`: momentum with a thermostat that absorbs the minibatch noise.

    The sampler is :class:`pyro_sgmcmc.samplers.SGNHT`; its options (``diffusion_factor``, ...) may
    be given here. Every other argument: see :class:`SGMCMCKernel`. Example::

        mcmc = MCMC(pyro_sgmcmc.infer.SGNHT(model, num_steps=5), num_samples=2000, warmup_steps=500)
        mcmc.run(x, y)
    """

    sampler_class = samplers.SGNHT


class SGHMC(SGMCMCKernel):
    r"""Stochastic gradient Hamiltonian Monte Carlo (Chen, Fox & Guestrin 2014) as a kernel for
    :class:`pyro.infer.MCMC`; warmup sets the friction from the measured gradient noise unless
    ``friction`` is given.

    The sampler is :class:`pyro_sgmcmc.samplers.SGHMC`. Every other argument: see
    :class:`SGMCMCKernel`. Example::

        mcmc = MCMC(pyro_sgmcmc.infer.SGHMC(model, num_steps=5), num_samples=2000, warmup_steps=500)
        mcmc.run(x, y)
    """

    sampler_class = samplers.SGHMC


class PSGLD(SGMCMCKernel):
    r"""SGLD with an RMSprop preconditioner (Li et al. 2016) as a kernel for :class:`pyro.infer.MCMC`,
    on top of the kernel's own (frozen) preconditioner; the RMSprop average is frozen at the end of
    warmup, so the samples come from a fixed-parameter chain.

    The sampler is :class:`pyro_sgmcmc.samplers.PSGLD`. Every other argument: see
    :class:`SGMCMCKernel`. Example::

        mcmc = MCMC(pyro_sgmcmc.infer.PSGLD(model), num_samples=2000, warmup_steps=500)
        mcmc.run(x, y)
    """

    sampler_class = samplers.PSGLD


#: The kernel of every sampler, by name.
KERNELS: dict[str, type[SGMCMCKernel]] = {"SGLD": SGLD, "SGNHT": SGNHT, "SGHMC": SGHMC, "PSGLD": PSGLD}
assert set(KERNELS) == set(samplers.SAMPLERS)
