"""The local learning coefficient (LLC) of a torch module or a Pyro model: :func:`estimate_llc`
(its docstring states the estimator and its semantics, once), its result and diagnostics, and the
driver of the stacked chains."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .._validation import check_choice, check_flag, check_integer, check_mapping, check_names, check_number
from ._data import REDUCTIONS, Minibatches
from ._engine import SNAPSHOT, LocalEngine, ProcessEngine, WorkerSetup
from ._objective import ChainObjective, ModuleObjective
from ._scales import (SAMPLERS, ChainStep, ControlVariates, Scales, sampler_step, control_pays,
                      expected_virial, flat_variance_missing, relaxation_steps, step_bias)
from ._stats import Drift, chain_mean, drift_warning, error_source, halves_drift, spread_warning

__all__ = ["LLCDiagnostics", "LLCResult", "LLCWarning", "default_burn_in", "estimate_llc"]

#: Split R-hat above this says the chains did not equilibrate (Vehtari et al. 2021 ask for 1.01 on
#: final results; minibatch loss traces are noisy enough that 1.01 fires on healthy runs).
R_HAT_LIMIT = 1.05
#: Standard errors by which the virial must fall short of its equilibrium value before the chains
#: are said to be still relaxing.
UNRELAXED_LIMIT = 4.0
#: Adaptation rounds at most (each a pilot run, then a measurement).
_MAX_ROUNDS = 6
#: A pilot whose step is too large is retried from w* with a step this many times smaller.
_SHRINK = 10.0
#: A default burn-in capped short of :func:`default_burn_in`'s bound is warned about when a direction
#: held only by the localization would still lack more than this fraction of its variance
#: (:func:`~pyro_sgmcmc.slt._scales.flat_variance_missing`).
_MISSING_LIMIT = 0.25
#: A virial above its equilibrium value by more than this fraction of the sampled directions (and
#: ``UNRELAXED_LIMIT`` standard errors) says the chains run hot: beyond the higher-order terms of
#: the step's own law, which reach a seventh of its first-order offset at the step's cap.
_HOT_LIMIT = 0.05
#: How many times the sampling phase may start over.
_MAX_RESTARTS = 4
#: How many times the step may be chosen again at the end of a burn-in (see ``_Chains.sample``).
_MAX_RECHOICES = 2
#: The burn-in after a re-choice runs at most this many of its windows (see ``settle_window``).
_SETTLE_WINDOWS = 30
#: ... and checks first after this many (a third of the flattest direction's relaxation).
_SETTLE_FIRST = 10
#: The multiprocessing contexts ``mp_context`` takes.
MP_CONTEXTS = ("spawn", "forkserver", "fork")


class LLCWarning(UserWarning):
    """An LLC or WBIC estimate that should not be trusted as it is (see the message)."""


@dataclass(frozen=True)
class LLCDiagnostics:
    """How far the estimate can be trusted.

    :param ess: effective sample size of the loss draws, all chains together.
    :param autocorrelation_std_error: the standard error of :math:`\\hat\\lambda` from ``ess``.
    :param spread_std_error: the standard error of :math:`\\hat\\lambda` from the spread of the
        chains' values (``nan`` for one chain); the estimate's ``std_error`` is the larger.
    :param spread_p: the probability of a spread that large were the autocorrelation's error right
        (below 0.01: warned about; see :class:`~pyro_sgmcmc.slt._stats.ChainMean`).
    :param r_hat: split :math:`\\hat R` of the loss draws (above 1.05: not equilibrated).
    :param drift: how far :math:`n\\beta L` moved from the first half of the draws to the second, each
        chain against itself (:func:`~pyro_sgmcmc.slt._stats.paired_drift`): near 0 at equilibrium;
        beyond 4 standard errors, warned about.
    :param drift_std_error: its standard error.
    :param unrelaxed: about how many sampled directions had not relaxed from :math:`w^*` during
        the draws: the mean virial :math:`(w - w^*)\\cdot\\nabla U` short of its equilibrium value
        :math:`d` (plus SGLD's offset; see :func:`~pyro_sgmcmc.slt._scales.virial`). Near 0 at
        equilibrium; flat directions, held only by the localization, relax over
        :math:`3/(\\epsilon\\gamma)` steps, and the loss trace alone hardly shows them.
    :param unrelaxed_std_error: its Monte Carlo standard error.
    :param step_bias: the relative bias of :math:`\\hat\\lambda` that the step size causes, estimated
        from the curvature and gradient noise measured at the chains' final points and
        :math:`\\hat\\lambda` (the bound that chose the step).
    :param target_bias: the bias the step was chosen for (``None``: the step was given).
    :param scales: the curvature and gradient noise measured at the final points.
    :param adaptation_steps: steps of the pilot runs that chose the step (excluded).
    :param burn_in: steps of burn-in before the draws (excluded): at the chosen step, and before
        it at any step found too large at a burn-in's end (see ``rechoices``).
    :param rechoices: how many times the step was chosen again at a burn-in's end, where the scales
        measured where the chains had gone said it biased the estimate beyond twice the target
        (see ``estimate_llc``); at each new step the burn-in ran on until the loss stopped drifting.
    :param restarts: how many times the sampling phase started over after a chain diverged, with a
        smaller step; the draws come from the last start only.
    :param sampler: the chains' sampler during the burn-in and draws: ``"sgld"`` or ``"baoab"``.
    :param vectorized: whether the chains ran in one ``vmap``-ed call.
    :param processes: worker processes the chains ran in (0: this process).
    :param control_variates: whether the draws' gradient and loss estimates used control variates.
    :param full_batch: whether every evaluation used the whole data set.
    :param warnings: what was warned about.
    """

    ess: float
    autocorrelation_std_error: float
    spread_std_error: float
    spread_p: float
    r_hat: float
    drift: float
    drift_std_error: float
    unrelaxed: float
    unrelaxed_std_error: float
    step_bias: float
    target_bias: float | None
    scales: Scales
    adaptation_steps: int
    burn_in: int
    rechoices: int
    restarts: int
    sampler: str
    vectorized: bool
    processes: int
    control_variates: bool
    full_batch: bool
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class LLCResult:
    """An LLC estimate.

    :param llc: :math:`\\hat\\lambda = n\\beta(\\bar L - L_n(w^*))`, the mean over every draw of every chain.
    :param std_error: its Monte Carlo standard error (from the autocorrelation, or the chains'
        spread where larger: :class:`~pyro_sgmcmc.slt._stats.ChainMean`).
    :param per_chain: :math:`\\hat\\lambda` of each chain (``[chains]``).
    :param loss_trace: the estimate of :math:`L_n` at every step of every chain (``[chains, steps]``),
        the excluded steps first (after a restart, see ``diagnostics.restarts``, the steps of the last
        start only).
    :param virial_trace: :math:`(w - w^*)\\cdot\\nabla\\hat U` at the same steps (``[chains, steps]``),
        whose mean over the draws is about the number of sampled coordinates at equilibrium (see
        ``diagnostics.unrelaxed``); NaN at the excluded steps, where it is not computed (only its
        mean over the draws is used, and it costs two passes over the weights a step).
    :param num_excluded: how many leading steps of ``loss_trace`` are adaptation and burn-in.
    :param init_loss: :math:`L_n(w^*)`, exact.
    :param n: the data set's size.
    :param nbeta: :math:`n\\beta`.
    :param localization: :math:`\\gamma`.
    :param step_size: SGLD's step :math:`\\epsilon` (BAOAB's :math:`h`) during the draws.
    :param friction: BAOAB's friction :math:`C` (``None`` for SGLD).
    :param diagnostics: :class:`LLCDiagnostics`.
    """

    llc: float
    std_error: float
    per_chain: Tensor
    loss_trace: Tensor
    virial_trace: Tensor
    num_excluded: int
    init_loss: float
    n: int
    nbeta: float
    localization: float
    step_size: float
    friction: float | None
    diagnostics: LLCDiagnostics

    @property
    def draws(self) -> Tensor:
        """The loss estimates that make the estimate (``[chains, draws]``)."""
        return self.loss_trace[:, self.num_excluded:]

    def plot(self, ax: Any = None) -> Any:
        """The loss trace as :math:`n\\beta(L - L_n(w^*))` per chain, with the estimate (see
        :func:`~pyro_sgmcmc.slt.plot_llc`)."""
        from .plot import plot_llc

        return plot_llc(self, ax=ax)

    def __str__(self) -> str:
        d = self.diagnostics
        source = error_source(d.autocorrelation_std_error, d.spread_std_error)
        return (f"LLC {self.llc:.4g} ± {self.std_error:.2g} (Monte Carlo standard error, from {source}; "
                f"{self.per_chain.numel()} "
                f"chains, ESS {d.ess:.0f}, R-hat {d.r_hat:.3f}, step {ChainStep(self.step_size, self.friction)}, step bias "
                f"{100 * d.step_bias:.2g}%, n = {self.n}, nβ = {self.nbeta:.4g}, γ = {self.localization:g})")


def estimate_llc(
    model: Any,
    data: Any = None,
    loss_fn: Callable | None = None,
    *,
    evaluate: Callable | None = None,
    reduction: str | None = None,
    model_kwargs: dict[str, Any] | None = None,
    w_star: dict[str, Tensor] | None = None,
    n: int | None = None,
    nbeta: float | None = None,
    localization: float = 1.0,
    params: Iterable[str | Tensor] | None = None,
    mask: dict[str, Tensor] | None = None,
    num_chains: int = 4,
    num_draws: int = 1000,
    num_burnin: int | None = None,
    sampler: str = "auto",
    step_size: float | None = None,
    friction: float | None = None,
    target_bias: float = 0.02,
    control_variates: bool | None = None,
    batch_size: int | None = None,
    vectorize: bool | None = None,
    mp_context: str | None = None,
    progress_bar: bool = True,
) -> LLCResult:
    r"""Estimate the local learning coefficient :math:`\hat\lambda(w^*)` of Lau et al. (2023).

    With :math:`L_n` the mean loss (negative log likelihood per datum) over all :math:`n` rows of
    the data set and :math:`w^*` a local minimum,

    .. math:: \hat\lambda(w^*) = n\beta\,\big(E_{w}[L_n(w)] - L_n(w^*)\big), \qquad
              w \sim \exp\Big(-n\beta L_n(w) - \frac{\gamma}{2}\|w - w^*\|^2\Big),

    which tends to the learning coefficient :math:`\lambda` of singular learning theory (Watanabe
    2009) as :math:`n\beta \to \infty` slowly enough and :math:`\gamma \to 0`. Semantics, enforced:

    * :math:`n` is the number of rows of the whole data set, never the batch size (a given ``n``
      that disagrees with the data set is an error);
    * :math:`n\beta` defaults to :math:`n/\log n` (Watanabe's WBIC temperature, :math:`\beta = 1/\log n`);
    * the expectation is over the draws after the adaptation and burn-in steps, which are kept in
      the loss trace but never averaged into the estimate;
    * :math:`L_n(w^*)` is exact: one pass over the whole data set;
    * the loss's reduction over a batch (mean, sum or per-row) is given, read from the loss
      module's ``reduction``, or detected from a batch and its two halves; a loss whose reduction
      cannot be told is an error, never a guess.

    The chain is SGLD (:class:`pyro_sgmcmc.samplers.SGLD` with ``nbeta`` and ``localization``), or
    underdamped Langevin with the BAOAB splitting where that relaxes faster (``sampler``), on
    minibatches: at every step each chain gets its own ``m`` distinct rows, drawn uniformly and
    independently of earlier steps, so the minibatch loss is an unbiased estimate of :math:`L_n` at
    the chain's point. With minibatches, the gradient and the loss are by default estimated with
    control variates at :math:`w^*` (Baker et al. 2019; the loss also minus its first-order Taylor
    term, which keeps its noise from hiding the chain's autocorrelation from the standard error),
    unless the pilot runs find that they do not pay for their work where the chains go.
    Chains run side by side, stacked along a leading dimension of every weight
    (``torch.func.functional_call`` + ``vmap`` for a module that allows it, one call per chain
    otherwise and for Pyro models), or, with ``mp_context``, one per worker process.

    The step size is chosen by short pilot runs: the curvature (power iteration), the Hessian's
    trace (Hutchinson) and the gradient noise are measured where the chains are, and SGLD's bias
    rule (:meth:`~pyro_sgmcmc.samplers.SGLD.suggest_lr`) is applied to the curvature and noise
    averaged over the :math:`2\hat\lambda` directions that :math:`\hat\lambda` counts, so that the
    discretisation bias of :math:`\hat\lambda` is about ``target_bias``; the scales are measured
    again at the end of the burn-in, and where the step would bias the estimate by more than
    twice the target there, it is chosen again and the burn-in runs on at the new step until
    the loss estimate has run clear of its transient (``diagnostics.rechoices``; see ``_Chains._settle``). A chain of a singular
    model that later wanders into a region too stiff for that step makes the sampling phase start
    over from an earlier snapshot with a smaller step, so that every draw comes from one
    fixed-step chain. The standard error is the Monte Carlo standard error from Pyro's effective
    sample size across chains, or from the spread of the chains' means where that is larger (see
    :class:`~pyro_sgmcmc.slt._stats.ChainMean`: the first misses a slow direction whose part of the
    loss is small against its minibatch noise; the second needs 2 chains, and 4 or more to be firm).

    Where this departs from devinterp (and why): :math:`n\beta` defaults to :math:`n/\log n` with the
    data set's :math:`n` (devinterp's ``default_nbeta`` uses the batch size); burn-in is excluded
    (devinterp 2.x averages every step); chains draw independent minibatches; the error bar is a
    Monte Carlo standard error of the mean over every chain, not the spread of per-chain values
    (which enters it only divided by :math:`\sqrt{C}`, where it exceeds the autocorrelation's
    error); the step size is measured, not hand-tuned.

    Two kinds of model:

    * a torch module with ``loss_fn`` (``loss_fn(model(inputs), target)`` on ``(inputs, target)``
      batches) or ``evaluate`` (``evaluate(model, batch)``) and ``data`` a ``DataLoader``;
      :math:`w^*` is the module's current weights (the module is not modified);
    * a Pyro model, with ``data`` the tuple of its positional arguments (and ``model_kwargs``):
      :math:`L_n(w) = -\frac1n\sum_i \log p(y_i \mid x_i, w)` over the observed sites, on the
      unconstrained latent values; minibatches come from ``pyro.plate(..., subsample_size=m)``;
      :math:`w^*` is ``w_star`` (constrained values) or the MAP.

    Example::

        result = estimate_llc(net, loader, torch.nn.CrossEntropyLoss())
        print(result)          # LLC 41.2 ± 0.6 (Monte Carlo standard error; 4 chains, ESS 950, ...)
        result.plot()          # each chain's n·beta·(L - L_n(w*)), the excluded steps shaded

    References: E. Lau, Z. Furman, G. Wang, D. Murfet and S. Wei, *The local learning coefficient:
    a singularity-aware complexity measure*, 2023; S. Watanabe, *Algebraic geometry and statistical
    learning theory*, 2009; J. Baker, P. Fearnhead, E. B. Fox and C. Nemeth, *Control variates for
    stochastic gradient MCMC*, Statistics and Computing 2019.

    :param model: a ``torch.nn.Module`` (with ``loss_fn`` or ``evaluate``) or a Pyro model.
    :param data: the module's ``DataLoader`` (its data set, batch size and collate function are
        used, not its sampler), or the tuple of the Pyro model's positional arguments.
    :param loss_fn: ``loss_fn(model(inputs), target)`` for a module.
    :param evaluate: or ``evaluate(model, batch)``, the loss of any other batch.
    :param reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-row losses); detected if not given.
    :param model_kwargs: the Pyro model's keyword arguments.
    :param w_star: the Pyro model's :math:`w^*`, constrained values of its latent sites (default: the MAP).
    :param n: the data set's size (only needed where it cannot be read: an iterable data set, a
        Pyro model whose observed sites are in no single plate).
    :param nbeta: :math:`n\beta` (default :math:`n/\log n`).
    :param localization: :math:`\gamma`. A quadratic direction of curvature :math:`h` counts
        :math:`n\beta h/(n\beta h + \gamma)` instead of 1 towards :math:`\hat\lambda`; flat directions
        are held within :math:`\gamma^{-1/2}` of :math:`w^*`.
    :param params: the parameters (names or tensors) or latent sites (names) to sample (default:
        all); the others stay at :math:`w^*`.
    :param mask: ``{name: 0/1 tensor}``: only the entries at 1 are sampled.
    :param num_chains: chains, run side by side.
    :param num_draws: draws of each chain after burn-in.
    :param num_burnin: steps at the chosen step size before the draws; default
        :func:`default_burn_in` (at least ``num_draws // 10``, more with a small step or a weak
        localization). The pilot runs that choose the step come first and are excluded too. Where
        the step is chosen again at the burn-in's end, the burn-in runs on at the new step until the
        loss stops drifting, whatever was given (the step the user sized it for is gone; a given
        ``step_size`` is never chosen again).
    :param sampler: ``"sgld"``; ``"baoab"``: underdamped Langevin with the BAOAB splitting
        (:class:`pyro_sgmcmc.samplers.SGHMC` with ``splitting="baoab"``), exact on a quadratic
        potential with exact gradients, whose momentum relaxes the flat directions far sooner
        where the gradient noise is small (see :mod:`pyro_sgmcmc.slt._scales`; the burn-in it
        needs is correspondingly shorter); ``"auto"``: the pilot runs are SGLD's, and the burn-in
        and draws BAOAB's where, from the scales the pilots measured, it relaxes the slowest
        direction at least twice as fast (:func:`~pyro_sgmcmc.slt._scales.prefer_baoab`: where the
        gradient noise is small against the curvature), after one BAOAB pilot run that measures
        them again where BAOAB takes the chains; else SGLD's. ``diagnostics.sampler`` says which
        ran. With a given ``step_size``, ``"auto"`` is SGLD.
    :param step_size: SGLD's :math:`\epsilon` (BAOAB's :math:`h`); default: chosen by the pilot
        runs so that the discretisation bias of :math:`\hat\lambda` is about ``target_bias``. A
        given step is never changed (a divergence is then an error).
    :param friction: BAOAB's friction :math:`C` (default: chosen with the step; see
        :mod:`pyro_sgmcmc.slt._scales`).
    :param target_bias: the relative bias of :math:`\hat\lambda` the step is chosen for.
    :param control_variates: estimate the gradient and the loss by their minibatch differences from
        :math:`w^*` plus the full-data values there. Each step then also evaluates :math:`w^*` on the
        chains' minibatches, twice a plain step's work. Default: on minibatches, from :math:`w^*`
        through the pilot runs, and then kept only where they pay for that work where the pilots
        took the chains (the slowest direction relaxing at least twice as fast at the step for the
        target bias, with the sampler that may run, or a loss estimate with at most half the
        variance; see :func:`~pyro_sgmcmc.slt._scales.control_pays`): far
        from :math:`w^*`, as in a network's flat directions, their noise is the plain estimates'.
        With a given ``step_size`` (no pilot runs) they are kept. ``diagnostics.control_variates``
        says which ran.
    :param batch_size: minibatch size (default: the loader's).
    :param vectorize: run the chains in one ``vmap``-ed call (default: if the module allows it).
    :param mp_context: run the chains in worker processes of this multiprocessing context
        (``"spawn"``; ``"forkserver"``, ``"fork"``), in lockstep (see
        :mod:`pyro_sgmcmc.slt._engine`): for models whose chains cannot be stacked into one
        ``vmap``-ed call (a Pyro model, a module ``vmap`` cannot batch), which otherwise run one
        after another at each step. One worker a chain, at most one a CPU (the chains shared out
        among them), each with ``torch.get_num_threads()`` divided among the workers. The model,
        its data and the loss must be picklable (defined at module level), and are copied to every
        worker; a worker takes seconds to start (``"spawn"`` imports torch anew). It pays where
        the CPUs outnumber what one chain's step keeps busy: a small Pyro model's step is mostly
        Python, on one core. Linux's default ``"fork"`` can deadlock a parent that already ran
        torch in OpenMP: prefer ``"spawn"``. Default: this process. The estimate is the same in
        law either way (each worker has its own seed, drawn from torch's global generator).
    :param progress_bar: show a tqdm progress bar.
    :returns: an :class:`LLCResult`; warnings (:class:`LLCWarning`) when the chains did not
        equilibrate, the step biases the estimate, or :math:`w^*` is not a local minimum.
    """
    num_chains = check_integer("num_chains", num_chains, low=1)
    num_draws = check_integer("num_draws", num_draws, low=4)
    num_burnin = check_integer("num_burnin", num_burnin, low=0, none_ok=True)
    sampler = check_choice("sampler", sampler, SAMPLERS)
    friction = check_number("friction", friction, none_ok=True)
    if sampler == "auto" and step_size is not None:
        sampler = "sgld"
    if friction is not None and sampler != "baoab":
        raise ValueError(f"Invalid friction: {friction!r} with sampler={sampler!r} (a friction is BAOAB's; "
                         "give sampler='baoab', or no friction)")
    localization = check_number("localization", localization, allow_low=True)
    nbeta = check_number("nbeta", nbeta, none_ok=True)
    step_size = check_number("step_size", step_size, none_ok=True)
    target_bias = check_number("target_bias", target_bias, high=1.0)
    check_mapping("model_kwargs", model_kwargs, none_ok=True)
    check_mapping("w_star", w_star, what="a dict {latent site: value}", none_ok=True)
    check_mapping("mask", mask, what="a dict {parameter or site name: 0/1 tensor}", none_ok=True)
    check_names("params", params)
    reduction = check_choice("reduction", reduction, (*REDUCTIONS, None))
    batch_size = check_integer("batch_size", batch_size, low=1, none_ok=True)
    control_variates = None if control_variates is None else check_flag("control_variates", control_variates)
    vectorize = None if vectorize is None else check_flag("vectorize", vectorize)
    check_flag("progress_bar", progress_bar)
    mp_context = check_choice("mp_context", mp_context, (*MP_CONTEXTS, None))
    in_processes = mp_context is not None and num_chains > 1
    if in_processes and vectorize:
        raise ValueError(f"Invalid vectorize: True with mp_context={mp_context!r} (chains in worker processes run one "
                         "per process; give one of them)")
    local_chains = 1 if in_processes else num_chains
    if loss_fn is not None or evaluate is not None:
        if w_star is not None:
            raise ValueError(f"Invalid w_star: a {type(w_star).__name__} (must be None for a torch module: w* is its "
                             "current weights; load the weights you want into it)")
        objective: ChainObjective = _module_objective(model, data, batch_size, n, loss_fn, evaluate, reduction, params,
                                                      mask, vectorize, num_chains=local_chains)
        build = partial(_module_objective, model, data, batch_size, n, loss_fn, evaluate, objective.reduction,
                        objective.names, mask, False)
    else:
        if reduction is not None:
            raise ValueError(f"Invalid reduction: {reduction!r} (must be None for a Pyro model: it sums log densities)")
        if batch_size is not None:
            raise ValueError(f"Invalid batch_size: {batch_size} (must be None for a Pyro model: its minibatch size is "
                             "pyro.plate(..., subsample_size=m))")
        objective = _pyro_objective(model, _model_args(data), model_kwargs or {}, n, w_star, params, mask,
                                    num_chains=local_chains)
        build = partial(_pyro_objective, model, _model_args(data), model_kwargs or {}, n, objective.w_star, params,
                        mask)
    n = objective.n
    if nbeta is None:
        if n < 2:
            raise ValueError(f"Invalid nbeta: None with n = {n} (n / log n needs n >= 2; give nbeta)")
        nbeta = n / math.log(n)
    use_cv = (not objective.exact) if control_variates is None else (control_variates and not objective.exact)
    init_loss, full_gradient = objective.full_loss(gradient=use_cv)
    if not math.isfinite(init_loss):
        raise ValueError(f"Invalid w*: the loss there is {init_loss} (must be finite)")
    if in_processes:
        seed = int(torch.randint(0, 2**62, ()))
        param_store = None
        if not isinstance(objective, ModuleObjective):
            import pyro

            param_store = pyro.get_param_store().get_state()
        setup = WorkerSetup(build, 1, nbeta, localization, init_loss, full_gradient if use_cv else None, seed, 1,
                            param_store)
        engine: LocalEngine | ProcessEngine = ProcessEngine(setup, num_chains, objective.num_sampled, objective.exact,
                                                            mp_context)
    else:
        control = None
        if use_cv:
            control = ControlVariates(init_loss, [g.unsqueeze(0).expand(num_chains, *g.shape) for g in full_gradient])
        engine = LocalEngine(objective, nbeta, localization, control, init_loss)
    burn_in_given = num_burnin is not None
    if num_burnin is None:
        burn_in = lambda step: default_burn_in(step.size, localization, num_draws, step.friction)  # noqa: E731
    else:
        burn_in = lambda step: num_burnin  # noqa: E731
    driver = None
    try:
        driver = _Chains(engine, nbeta, localization, init_loss, progress_bar, num_draws, sampler, use_cv,
                         choose_control=control_variates is None, friction=friction)
        if step_size is None:
            step, adaptation_steps = driver.adapt(target_bias, num_draws)
        else:
            step, adaptation_steps = driver.given_step(step_size, target_bias), 0
        sampled = driver.sample(burn_in, num_draws, step, None if step_size is not None else target_bias)
        step = sampled.step
        scales = engine.measure()
    finally:
        if driver is not None:
            driver.close()
        engine.close()
    trace = driver.trace()
    excluded = trace.shape[1] - num_draws
    draws = trace[:, excluded:]
    summary = chain_mean(draws)
    llc = nbeta * (summary.mean - init_loss)
    std_error = nbeta * summary.std_error
    bias = step_bias(step, scales, llc)
    messages = _warnings(llc, std_error, summary.r_hat, summary.ess, bias, target_bias, step_size is not None)
    if spread := spread_warning(summary, nbeta, "loss (times nβ)", "num_draws"):
        messages.append(spread)
    if num_chains == 1 and localization > 0 and step.size > 0 and (
            slowest := relaxation_steps(step, localization)) > num_draws:
        messages.append(f"one chain cannot show the error of directions slower than its draws (those held only by "
                        f"the localization decorrelate over about {slowest} steps at this step size, against "
                        f"{num_draws} draws), and the standard error may understate it: give num_chains=4 or more, "
                        "whose spread the standard error then includes")
    missing = math.prod(flat_variance_missing(b.step, localization, b.steps) for b in sampled.burn_ins)
    if (not burn_in_given or sampled.rechoices) and localization > 0 and step.size > 0 and missing > _MISSING_LIMIT:
        first = sampled.burn_ins[0]
        needed = relaxation_steps(first.step, localization)
        cause = (f"the step was chosen again at the burn-in's end ({sampled.rechoices} time(s): the earlier one "
                 f"biased the estimate where the chains went), and the {sampled.burn_in} steps of burn-in at the "
                 "steps so far leave" if sampled.rechoices else
                 f"the burn-in was capped at num_draws // 2 = {first.steps} steps, which leaves")
        messages.append(
            f"{cause} a direction held only by the localization lacking about {missing:.0%} of its variance "
            f"(it needs {needed} steps at the {'first' if sampled.rechoices else 'chosen'} step size): if the model "
            "has such directions (a network's flat directions), the draws may not be at equilibrium yet, and a slow "
            f"drift that starts later shows in neither R-hat nor the virial check; give num_burnin={needed} (or more "
            "num_draws)")
    if sampled.capped:
        messages.append(
            f"the step was chosen again at the burn-in's end, and after {sampled.burn_in_at_step} steps at the new "
            f"one (its cap) the loss had not run clear of its transient: nβ·L moved by {sampled.drift.change:.3g} ± "
            f"{sampled.drift.std_error:.2g} from the third quarter of those steps to the fourth (each chain against "
            "itself); the "
            "draws may still be on their way to equilibrium: give more localization (every direction then relaxes "
            "faster), or check with more num_draws")
    drift = halves_drift(nbeta * draws)
    if moving := drift_warning(drift, "loss (times nβ)", "give more num_burnin (or more localization)"):
        messages.append(moving)
    virial_trace = driver.virial_trace()
    virials = chain_mean(virial_trace[:, excluded:])
    unrelaxed = expected_virial(step, scales, objective.num_sampled, localization) - virials.mean
    if -unrelaxed > UNRELAXED_LIMIT * virials.std_error and -unrelaxed > _HOT_LIMIT * objective.num_sampled:
        messages.append(f"the chains run hotter than the step's stated bias allows: the virial (w - w*)·∇U exceeds "
                        f"its equilibrium value by {-unrelaxed:.3g} ± {virials.std_error:.2g} of the "
                        f"{objective.num_sampled} sampled directions, so the estimate is likely too high; lower "
                        "step_size or target_bias (or, with sampler='baoab', give sampler='sgld')")
    if unrelaxed > UNRELAXED_LIMIT * virials.std_error and unrelaxed / 2 > std_error:
        relax = (f" (directions held only by the localization relax over about "
                 f"{relaxation_steps(step, localization)} steps at this step size)" if localization > 0 else "")
        messages.insert(0, f"about {unrelaxed:.3g} ± {virials.std_error:.2g} of the {objective.num_sampled} sampled "
                           "directions had not relaxed from w* (the virial (w - w*)·∇U averages d at equilibrium; it "
                           "fell short by that much): the draws are not yet from the localized posterior and the "
                           "estimate may still move (on a quadratic loss by at most half that, each direction adding "
                           f"up to 1/2 as it relaxes); give more num_burnin{relax}, or more localization")
    for message in messages:
        warnings.warn(message, LLCWarning, stacklevel=2)
    diagnostics = LLCDiagnostics(
        ess=summary.ess, autocorrelation_std_error=nbeta * summary.autocorrelation_std_error,
        spread_std_error=nbeta * summary.spread_std_error, spread_p=summary.spread_p, r_hat=summary.r_hat,
        drift=drift.change, drift_std_error=drift.std_error,
        unrelaxed=unrelaxed, unrelaxed_std_error=virials.std_error,
        step_bias=bias, target_bias=None if step_size is not None else target_bias,
        scales=scales, adaptation_steps=adaptation_steps, burn_in=sampled.burn_in, rechoices=sampled.rechoices,
        restarts=sampled.restarts,
        sampler="baoab" if step.baoab else "sgld", vectorized=objective.vectorized and not in_processes,
        processes=len(engine.shares) if in_processes else 0,
        control_variates=driver.control_variates, full_batch=objective.exact, warnings=tuple(messages))
    return LLCResult(
        llc=llc, std_error=std_error, per_chain=nbeta * (draws.mean(1) - init_loss), loss_trace=trace, virial_trace=virial_trace,
        num_excluded=excluded, init_loss=init_loss, n=n, nbeta=nbeta, localization=localization, step_size=step.size,
        friction=step.friction, diagnostics=diagnostics)


def default_burn_in(step_size: float, localization: float, num_draws: int, friction: float | None = None) -> int:
    r"""The burn-in :func:`estimate_llc` runs by default: ``num_draws // 10`` steps, or, if longer,
    the relaxation of the flattest direction (:math:`3/(\epsilon\gamma)` for SGLD; for BAOAB, with
    ``friction``, :func:`~pyro_sgmcmc.slt._scales.relaxation_steps`), capped at ``num_draws // 2`` (a cap
    that leaves a flat direction lacking more than a quarter of its variance is warned about). The
    chains start at :math:`w^*`, where every direction's variance is 0; along a direction of precision
    :math:`a` (curvature of :math:`n\beta L` plus :math:`\gamma`) SGLD's variance approaches its
    stationary value as :math:`e^{-\epsilon a t}`, and every direction has :math:`a \ge \gamma`, so after
    :math:`3/(\epsilon\gamma)` steps each is within 5% of it. (On a 24-parameter tanh network at
    :math:`\gamma = 100`, 60 steps of burn-in instead of 400 left the estimates of repeated runs spread
    twice as far as their standard errors said.) Without localization there is no such bound,
    and what is left of the approach shows in split :math:`\hat R`."""
    base = max(num_draws // 10, 1)
    if localization <= 0 or step_size <= 0:
        return base
    return max(base, min(relaxation_steps(ChainStep(step_size, friction), localization), num_draws // 2))


def _module_objective(model: Any, data: Any, batch_size: int | None, n: int | None, loss_fn: Callable | None,
                      evaluate: Callable | None, reduction: str | None, params: Iterable[str | Tensor] | None,
                      mask: dict[str, Tensor] | None, vectorize: bool | None, num_chains: int) -> ChainObjective:
    """A module's chains (at module level, so that worker processes can build theirs)."""
    return ModuleObjective(model, Minibatches.from_loader(data, batch_size, n), loss_fn=loss_fn, evaluate=evaluate,
                           reduction=reduction, params=params, mask=mask, num_chains=num_chains, vectorize=vectorize)


def _pyro_objective(model: Any, args: tuple, kwargs: dict[str, Any], n: int | None, w_star: dict[str, Tensor] | None,
                    params: Iterable[str] | None, mask: dict[str, Tensor] | None, num_chains: int) -> ChainObjective:
    """A Pyro model's chains (at module level, so that worker processes can build theirs)."""
    from ._pyro import ModelLikelihood, PyroObjective

    return PyroObjective(ModelLikelihood(model, args, kwargs, n), w_star, params=params, mask=mask,
                         num_chains=num_chains)


def _model_args(data: Any) -> tuple:
    if data is None:
        return ()
    if not isinstance(data, tuple):
        raise ValueError(f"Invalid data: {type(data).__name__} (for a Pyro model, the tuple of its positional "
                         "arguments; for a torch module, give loss_fn or evaluate and a DataLoader)")
    return data


def _warnings(llc: float, std_error: float, r_hat: float, ess: float, bias: float, target: float,
              given: bool) -> list[str]:
    messages = []
    if not r_hat <= R_HAT_LIMIT:
        messages.append(f"the chains did not equilibrate (split R-hat of the loss {r_hat:.3f} > {R_HAT_LIMIT}): the "
                        "estimate may still depend on the start, or the chains are short against their "
                        "autocorrelation; give more num_burnin and num_draws")
    if ess < 50:
        messages.append(f"only {ess:.0f} effective draws: the standard error itself is unreliable; give more num_draws")
    if math.isinf(bias):
        why = "the given step_size" if given else "the step chosen in the pilot runs"
        messages.append(f"the step size is unstable where the chains ended ({why} times the largest curvature of "
                        "n·beta·L there is at least 4, beyond which SGLD diverges along that direction): the draws "
                        "may come from a chain on its way out; lower step_size or target_bias, or localize more")
    elif bias > 2 * target:
        why = ("the given step_size" if given else
               "the step chosen where the pilots and the burn-in took the chains (they moved on to stiffer regions)")
        messages.append(f"the step size biases the estimate by about {100 * bias:.2g}% ({why}; the target is "
                        f"{100 * target:.2g}%; a first-order bound, which understates the bias where the curvature "
                        "and the gradient noise grow with the chains' reach, as on a network): lower step_size or "
                        "target_bias")
    if llc < -2 * std_error:
        messages.append(f"the estimate is negative ({llc:.4g} ± {std_error:.2g}): the chains found lower loss than at "
                        "w*, which is not a local minimum of L_n; train further, or localize more")
    return messages


@dataclass(frozen=True)
class BurnIn:
    """A stretch of burn-in: its step and its length."""

    step: ChainStep
    steps: int


@dataclass(frozen=True)
class Sampled:
    """What ``_Chains.sample`` ran: the step of the draws, the restarts after a divergence, the
    times the step was chosen again at a burn-in's end, the stretches of burn-in in order (the
    last at the draws' step), and, after a re-choice, the drift of the loss over the burn-in at the
    new step, its third quarter to its fourth (``None`` without a re-choice), and whether that
    burn-in ended at its cap short of equilibrium."""

    step: ChainStep
    restarts: int
    rechoices: int
    burn_ins: tuple[BurnIn, ...]
    drift: Drift | None = None
    capped: bool = False

    @property
    def burn_in(self) -> int:
        """Steps of burn-in in all."""
        return sum(b.steps for b in self.burn_ins)

    @property
    def burn_in_at_step(self) -> int:
        """Steps of burn-in at the draws' step."""
        return self.burn_ins[-1].steps if self.burn_ins else 0


@dataclass(frozen=True)
class Settling:
    """What ``_Chains._settle`` ran: its steps, why it stopped at a divergence (``None``: it did
    not), the drift of the loss over it (its third quarter to its fourth), and whether it ended at its
    cap short of equilibrium."""

    steps: int
    reason: str | None
    drift: Drift | None
    capped: bool


def settle_window(step: ChainStep, localization: float, num_draws: int) -> int:
    """The spacing of ``_Chains._settle``'s checks: a thirtieth of the flattest direction's
    relaxation at ``step`` (:func:`~pyro_sgmcmc.slt._scales.relaxation_steps`; for SGLD
    :math:`1/(10\\epsilon\\gamma)`, the heat's time along a direction of precision :math:`10\\gamma`),
    and at least ``num_draws // 20`` and ``SNAPSHOT`` steps; so the check's cap, ``_SETTLE_WINDOWS``
    windows, is about that relaxation."""
    relaxation = relaxation_steps(step, localization) if localization > 0 and step.size > 0 else 0
    return max(SNAPSHOT, math.ceil(relaxation / _SETTLE_WINDOWS), num_draws // 20)


class _Chains:
    """Drives the chains: the pilot runs that choose the step, the burn-in and the draws, restarts
    after a divergence, the records and the progress bar; the steps themselves run in an engine
    (:mod:`~pyro_sgmcmc.slt._engine`: this process, or worker processes)."""

    def __init__(self, engine: LocalEngine | ProcessEngine, nbeta: float, localization: float, init_loss: float,
                 progress_bar: bool, planned: int, sampler: str = "sgld", control_variates: bool = False,
                 choose_control: bool = False, friction: float | None = None):
        self.engine, self.nbeta, self.localization, self.init_loss = engine, nbeta, localization, init_loss
        self.sampler = sampler  # as given: "auto" keeps choosing between SGLD and BAOAB
        self.friction = friction  # BAOAB's, the user's: kept through every choice of the step
        self.control_variates = control_variates  # whether the chains use them now
        self.choose_control = choose_control and control_variates  # whether adapt() may drop them
        self._use(baoab=sampler == "baoab")
        self.step = ChainStep(0.0)
        self._records: list[Tensor] = []  # [C, k] chunks of loss estimates
        self._virials: list[Tensor] = []  # the virial at the same steps (see _scales.virial)
        self.llc_guess: float | None = None
        self.start_scales = engine.measure()
        # a step that lifts n beta (L - L*) this far above its largest possible mean (d/2), and
        # beyond the loss estimate's own minibatch noise, diverged
        engine.set_limit(10.0 * engine.num_sampled + 100.0 + 10.0 * self.start_scales.loss_noise)
        self._bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=planned, desc="LLC")

    def _use(self, baoab: bool) -> None:
        self.baoab = baoab
        self.engine.use(baoab)

    def set_step(self, step: ChainStep) -> None:
        self.step = step
        self.engine.set_step(step)

    def choose(self, scales: Scales, llc: float | None, target_bias: float, largest: float = math.inf) -> ChainStep:
        """:func:`~pyro_sgmcmc.slt._scales.sampler_step` for the sampler now running (BAOAB at the
        user's friction, if given)."""
        return sampler_step("baoab" if self.baoab else "sgld", scales, llc, target_bias, localization=self.localization,
                            friction=self.friction, largest=largest)

    def given_step(self, step_size: float, target_bias: float) -> ChainStep:
        """The user's step; BAOAB's friction, if not given, chosen for it from the scales at :math:`w^*`."""
        if not self.baoab:
            return ChainStep(step_size)
        return ChainStep(step_size, self.choose(self.start_scales, None, target_bias, largest=step_size).friction)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def trace(self) -> Tensor:
        return torch.cat(self._records, 1)

    def virial_trace(self) -> Tensor:
        return torch.cat(self._virials, 1)

    def _forget(self, start: int) -> None:
        """Drop the records from step ``start`` on."""
        self._records, self._virials = [self.trace()[:, :start]], [self.virial_trace()[:, :start]]

    @property
    def _recorded(self) -> int:
        """How many steps are recorded."""
        return sum(chunk.shape[1] for chunk in self._records)

    def recent(self, start: int) -> Tensor:
        """The records from step ``start`` on (``[C, k]``)."""
        return self.trace()[:, start:]

    def _guess(self, start: int) -> float | None:
        r"""The guess of :math:`\lambda` from the records since step ``start`` (at most ``d/2``;
        ``None`` where not positive)."""
        llc = self.nbeta * (float(self.recent(start).mean()) - self.init_loss)
        return min(llc, self.engine.num_sampled / 2) if llc > 0 else None

    def run(self, steps: int, phase: str) -> str | None:
        """``steps`` steps, recorded, ``SNAPSHOT`` at a time (the engine keeps a snapshot at the
        start of each), the virials in the ``"sampling"`` phase only; at a divergence, stop and say
        why (``None``: none)."""
        done = 0
        while done < steps:
            chunk = self.engine.run(min(SNAPSHOT, steps - done), phase == "sampling")
            self._records.append(chunk.values)
            self._virials.append(chunk.virials)
            if chunk.reason is not None:
                return chunk.reason
            done += chunk.values.shape[1]
            if self._bar is not None:
                self._bar.update(chunk.values.shape[1])
                recent = torch.cat(self._records[-3:], 1)[:, -50:]
                self._bar.set_postfix(phase=phase, step=f"{self.step.size:.2e}",
                                      llc=f"{self.nbeta * (float(recent.mean()) - self.init_loss):.4g}", refresh=False)
        return None

    def sample(self, burn_in: Callable[[ChainStep], int], num_draws: int, step: ChainStep,
               target_bias: float | None) -> Sampled:
        r"""The burn-in (``burn_in(step)`` steps) and the draws at ``step``.

        With an automatic step (``target_bias`` given) the scales are measured again at the end of
        the burn-in: the pilots are short, and a network's chains reach regions
        of larger gradient noise and curvature only as their flat directions relax. Where the step
        would bias the estimate by more than twice ``target_bias`` there, it is chosen again from
        those scales (at most ``_MAX_RECHOICES`` times), and the burn-in runs on at the new step
        from where the chains are until their loss has run clear of its transient (:meth:`_settle`), so that the
        draws come from a step that meets the target where they are. The scales are measured at the burn-in's end, not earlier: midway, a
        network's chains have not yet reached the regions that set the step, and a step chosen
        there is still too large (on the benchmark MLP, three times).

        A chain of a singular model can wander along a flat direction into a region stiffer than
        any the pilot runs saw, where the step is unstable; with an automatic step the chains then
        go back to the older of the last two snapshots, the step is chosen again from the scales
        measured there (its :attr:`~pyro_sgmcmc.slt._scales.ChainStep.scale` at least halved), and
        the burn-in and draws start over, so that every draw comes from one fixed-step chain. BAOAB
        likewise (its :math:`h^2` at least halved, its friction a step kept), also under
        ``sampler="auto"``: SGLD at the pilots' step would have no more margin of stability than
        BAOAB at the same :attr:`~pyro_sgmcmc.slt._scales.ChainStep.scale` (:math:`\epsilon a < 4`,
        :math:`h^2 a < 4`), and the region that made BAOAB diverge is stiffer than any the pilots
        saw. A given step size is never changed: an error says so."""
        restarts = rechoices = 0
        burn_ins: list[BurnIn] = []
        settling: Settling | None = None
        while True:
            self.set_step(step)
            start = self._recorded
            if rechoices:
                settling = self._settle(step, num_draws, target_bias)
                steps, reason = settling.steps, settling.reason
            else:
                steps = burn_in(step)
                if self._bar is not None:
                    self._bar.total = self._bar.n + steps + num_draws
                reason = self.run(steps, phase="burn-in")
            if reason is None and target_bias is not None and rechoices < _MAX_RECHOICES:
                if steps:
                    self.llc_guess = self._guess(start + steps // 2) or self.llc_guess
                scales = self.engine.measure()
                if step_bias(step, scales, self.llc_guess) > 2 * target_bias:
                    rechoices += 1
                    burn_ins.append(BurnIn(step, steps))
                    step = self.choose(scales, self.llc_guess, target_bias, largest=step.size)
                    continue
            if reason is None:
                reason = self.run(num_draws, phase="sampling")
            if reason is None:
                return Sampled(step, restarts, rechoices, (*burn_ins, BurnIn(step, steps)),
                               None if settling is None else settling.drift,
                               settling is not None and settling.capped)
            if target_bias is None or restarts == _MAX_RESTARTS:
                raise RuntimeError(f"An LLC chain diverged at sampling {reason}, with step size {step}; give a "
                                   "smaller step_size (or target_bias), or more localization")
            restarts += 1
            self._forget(start)
            self.engine.restore()
            scales = self.engine.measure()
            step = self.choose(scales, self.llc_guess, target_bias, largest=step.shrunk(2).size)

    def _settle(self, step: ChainStep, num_draws: int, target_bias: float) -> Settling:
        r"""The burn-in at a step chosen again: until the loss stops drifting, checked after every
        :func:`settle_window` steps (``_SETTLE_FIRST`` windows first), at most ``_SETTLE_WINDOWS``
        windows.

        The chains come from a larger step, which kept every direction hotter by
        :math:`\epsilon(a + B)/4` of its variance (module :mod:`~pyro_sgmcmc.slt._scales`); at the new
        step that heat leaves a direction of precision :math:`a` as :math:`e^{-\epsilon a t}`. The
        directions held only by the localization hardly keep any (their variance,
        :math:`1/(\gamma(1 - \epsilon\gamma/4))`, barely depends on the step) and need not relax
        again: the burn-in before the re-choice relaxed them (:func:`estimate_llc` counts every
        stretch of burn-in toward them). The directions that carry the heat :math:`\hat\lambda`
        sees are those with :math:`n\beta h` of order :math:`\gamma` or more (a direction adds
        :math:`(a - \gamma)/(2a)` to :math:`\lambda`), the slowest of them relaxing over about
        :math:`1/(2\epsilon\gamma)` steps, a sixth of the flattest direction's relaxation. That fall
        is slow next to the loss's noise: on the benchmark's MLP, 2% of :math:`\hat\lambda` over
        5000 steps at the new step, after a fast fall of 8% in the first 500.

        So the check is Gelman's: the stretch's first half is set aside, and the mean of
        :math:`n\beta L` over its last quarter is compared with that over the quarter before, each
        chain against itself (:func:`~pyro_sgmcmc.slt._stats.halves_drift`); the burn-in ends when
        they agree within two standard errors or a quarter of the target bias. The first
        check comes after a third of the flattest direction's relaxation (``_SETTLE_FIRST``
        windows; :math:`1/(\epsilon\gamma)` steps for SGLD, over which a direction of
        :math:`n\beta h = \gamma` keeps :math:`e^{-2}` of its heat): a fall of 2% of
        :math:`\hat\lambda` over thousands of steps is within the noise of shorter quarters.
        Ending at the cap still drifting is warned about."""
        window = settle_window(step, self.localization, num_draws)
        start, steps = self._recorded, 0
        while True:
            more = window if steps else _SETTLE_FIRST * window
            if self._bar is not None:
                self._bar.total = self._bar.n + more + num_draws
            reason = self.run(more, phase="burn-in")
            steps += more
            drift = halves_drift(self.nbeta * self.recent(start + steps // 2))
            if reason is not None:
                return Settling(steps, reason, drift, False)
            guess = self._guess(self._recorded - steps // 4)
            if drift.settled(target_bias * guess / 4 if guess else 0.0):
                return Settling(steps, None, drift, False)
            if steps >= _SETTLE_WINDOWS * window:
                return Settling(steps, None, drift, True)

    def adapt(self, target_bias: float, num_draws: int) -> tuple[ChainStep, int]:
        """Pilot runs from :math:`w^*`, each followed by a measurement of the scales where the chains
        are and a choice of the step (:func:`~pyro_sgmcmc.slt._scales.choose_step`, with the pilot's
        second half as the guess of :math:`\\lambda`). The first pilot runs at the largest stable
        step measured at :math:`w^*` (to arrive fast: its bias does not matter); later ones at the
        step chosen, until the choice changes by less than a factor of 1.5 (at most ``_MAX_ROUNDS``).
        A pilot that diverges is retried from :math:`w^*` with a 10x smaller step (at :math:`w^*` of
        a singular model the curvature can be 0, and gives no scale). BAOAB's step likewise, with
        its friction (the user's, if given, kept). With ``sampler="auto"`` the pilots are
        SGLD's, and the chains go on with BAOAB if :func:`~pyro_sgmcmc.slt._scales.prefer_baoab`
        says so, before and after a BAOAB pilot (:meth:`_baoab_pilot`). With ``choose_control``
        the control variates are dropped after the pilots where, measured there,
        :func:`~pyro_sgmcmc.slt._scales.control_pays` says they do not pay for their work."""
        pilot = min(max(num_draws // 20, 50), 100)
        step = self.choose(self.start_scales, None, 1.0)  # the stability cap alone
        start = self._recorded
        rounds = retries = 0
        while rounds < _MAX_ROUNDS:
            before = self._pilot(step, pilot)
            if before is None:
                retries += 1
                if retries > 40:
                    raise RuntimeError("Could not find a stable step size for the LLC chains from w*; give step_size")
                self.engine.reset()
                step = step.shrunk(_SHRINK)
                continue
            rounds += 1
            llc = self.llc_guess = self._guess(before + pilot // 2)
            scales = self.engine.measure()
            chosen = self.choose(scales, llc, target_bias)
            settled = rounds > 1 and 1 / 1.5 <= chosen.scale / step.scale <= 1.5
            step = chosen
            if settled:
                break
        if self.choose_control and rounds:
            plain = self.engine.measure(plain=True)
            if not control_pays(scales, plain, llc, target_bias, sampler=self.sampler, localization=self.localization,
                                friction=self.friction):
                self.engine.drop_control_variates()
                self.control_variates = False
                scales, step = plain, self.choose(plain, llc, target_bias)
        if self.sampler == "auto" and rounds:
            candidate = sampler_step("auto", scales, llc, target_bias, localization=self.localization)
            if candidate.baoab:
                step = self._baoab_pilot(candidate, step, pilot, llc, target_bias)
        return step, self._recorded - start

    def _pilot(self, step: ChainStep, steps: int) -> int | None:
        """A pilot run of ``steps`` at ``step``: where its records start, or ``None`` (its records
        dropped) if it diverged."""
        self.set_step(step)
        if self._bar is not None:
            self._bar.total += steps
        before = self._recorded
        if self.run(steps, phase="pilot") is not None:
            self._forget(before)
            return None
        return before

    def _baoab_pilot(self, step: ChainStep, sgld_step: ChainStep, pilot: int, llc: float | None,
                     target_bias: float) -> ChainStep:
        """``sampler="auto"``: one BAOAB pilot run from where the SGLD pilots left the chains, and
        its step chosen again from the scales measured where BAOAB took them (its flat directions
        relax within the pilot, and a control-variate gradient's noise grows with the distance
        from :math:`w^*`, so the SGLD pilots' noise can be too small for it). Back to SGLD if the
        pilot diverges (at the SGLD pilots' step ``sgld_step``, from a snapshot) or if, from the new scales,
        BAOAB no longer relaxes the slowest direction twice as fast (at SGLD's step for them)."""
        self._use(baoab=True)
        if self._pilot(step, pilot) is None:
            self.engine.restore()
            self._use(baoab=False)
            return sgld_step
        chosen = sampler_step("auto", self.engine.measure(), llc, target_bias, localization=self.localization)
        if not chosen.baoab:
            self._use(baoab=False)
        return chosen
