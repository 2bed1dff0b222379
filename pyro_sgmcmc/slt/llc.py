r"""The local learning coefficient (LLC) of a torch module or a Pyro model.

With :math:`L_n` the mean loss (negative log likelihood per datum) over all :math:`n` rows of the
data set and :math:`w^*` a local minimum, the LLC estimate of Lau et al. (2023) is

.. math:: \hat\lambda(w^*) = n\beta\,\big(E_{w}[L_n(w)] - L_n(w^*)\big), \qquad
          w \sim \exp\Big(-n\beta L_n(w) - \frac{\gamma}{2}\|w - w^*\|^2\Big),

which tends to the learning coefficient :math:`\lambda` of singular learning theory (Watanabe 2009)
as :math:`n\beta \to \infty` slowly enough and :math:`\gamma \to 0`. Semantics, written once:

* :math:`n` is the number of rows of the whole data set, never the batch size;
* :math:`n\beta` defaults to :math:`n/\log n` (Watanabe's WBIC temperature, :math:`\beta = 1/\log n`);
* the expectation is over the draws after the adaptation and burn-in steps, which are kept in
  the loss trace but never averaged into the estimate;
* :math:`L_n(w^*)` is exact: one pass over the whole data set;
* the loss's reduction over a batch (mean, sum or per-row) is given or detected, never guessed
  (:func:`~pyro_sgmcmc.slt._data.detect_reduction`).

The chain is SGLD (:class:`pyro_sgmcmc.samplers.SGLD` with ``nbeta`` and ``localization``) on
minibatches, one independent minibatch per chain and step; :math:`E[L_n(w)]` is estimated by the
minibatch loss at every step (with control variates, by its difference from :math:`w^*` on the same
minibatch plus :math:`L_n(w^*)`). Chains run side by side, stacked along a leading dimension of every
weight (``torch.func.functional_call`` + ``vmap`` for a module that allows it, one call per chain
otherwise). The step size is chosen so that the discretisation bias of :math:`\hat\lambda` stays
below ``target_bias`` (:mod:`pyro_sgmcmc.slt._scales`).

Where this departs from devinterp (and why): :math:`n\beta` defaults to :math:`n/\log n` with the
data set's :math:`n` (devinterp's ``default_nbeta`` uses the batch size); burn-in is excluded (devinterp
2.x averages every step); chains draw independent minibatches (devinterp's default shares them, so
its spread across chains understates the error); the error bar is a Monte Carlo standard error
from the effective sample size across chains, not the standard deviation of per-chain values; the
step size is measured, not hand-tuned.

References:
    E. Lau, Z. Furman, G. Wang, D. Murfet and S. Wei, "The local learning coefficient: a
    singularity-aware complexity measure", 2023 (AISTATS 2025).
    S. Watanabe, "Algebraic geometry and statistical learning theory", Cambridge University Press 2009.
    J. Baker, P. Fearnhead, E. B. Fox and C. Nemeth, "Control variates for stochastic gradient
    MCMC", Statistics and Computing 29, 2019.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor

from .._validation import check_flag, check_integer, check_mapping, check_number
from ..functional import NonFiniteError
from ..samplers import SGLD
from ._data import Minibatches
from ._objective import ChainObjective, ModuleObjective
from ._scales import ControlVariates, Scales, choose_step, gradient_estimate, measure, step_bias
from ._stats import chain_mean

__all__ = ["LLCDiagnostics", "LLCResult", "LLCWarning", "estimate_llc"]

#: Split R-hat above this says the chains did not equilibrate (Vehtari et al. 2021 ask for 1.01 on
#: final results; minibatch loss traces are noisy enough that 1.01 fires on healthy runs).
R_HAT_LIMIT = 1.05
#: Adaptation rounds at most (each a pilot run, then a measurement).
_MAX_ROUNDS = 6
#: A pilot whose step is too large is retried from w* with a step this many times smaller.
_SHRINK = 10.0
#: Steps between snapshots of the chains, and how many times the sampling phase may start over.
_SNAPSHOT = 25
_MAX_RESTARTS = 4


class LLCWarning(UserWarning):
    """An LLC or WBIC estimate that should not be trusted as it is (see the message)."""


@dataclass(frozen=True)
class LLCDiagnostics:
    """How far the estimate can be trusted.

    :param ess: effective sample size of the loss draws, all chains together.
    :param r_hat: split :math:`\\hat R` of the loss draws (above 1.05: not equilibrated).
    :param step_bias: the relative bias of :math:`\\hat\\lambda` that the step size causes, estimated
        from the scales measured at the chains' final points and :math:`\\hat\\lambda`
        (:func:`~pyro_sgmcmc.slt._scales.step_bias`).
    :param target_bias: the bias the step was chosen for (``None``: the step was given).
    :param scales: the curvature and gradient noise measured at the final points.
    :param adaptation_steps: steps of the pilot runs that chose the step (excluded).
    :param burn_in: steps at the chosen step before the draws (excluded).
    :param restarts: how many times the sampling phase started over with a smaller step after a
        chain diverged (see :meth:`_Chains.sample`); the draws come from the last start only.
    :param vectorized: whether the chains ran in one ``vmap``-ed call.
    :param control_variates: whether the gradient and the loss estimates used control variates.
    :param full_batch: whether every evaluation used the whole data set.
    :param warnings: what was warned about.
    """

    ess: float
    r_hat: float
    step_bias: float
    target_bias: float | None
    scales: Scales
    adaptation_steps: int
    burn_in: int
    restarts: int
    vectorized: bool
    control_variates: bool
    full_batch: bool
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class LLCResult:
    """An LLC estimate.

    :param llc: :math:`\\hat\\lambda = n\\beta(\\bar L - L_n(w^*))`, the mean over every draw of every chain.
    :param std_error: its Monte Carlo standard error (effective sample size across chains).
    :param per_chain: :math:`\\hat\\lambda` of each chain (``[chains]``).
    :param loss_trace: the estimate of :math:`L_n` at every step of every chain (``[chains, steps]``),
        the excluded steps first (after a restart, see ``diagnostics.restarts``, the steps of the last
        start only).
    :param num_excluded: how many leading steps of ``loss_trace`` are adaptation and burn-in.
    :param init_loss: :math:`L_n(w^*)`, exact.
    :param n: the data set's size.
    :param nbeta: :math:`n\\beta`.
    :param localization: :math:`\\gamma`.
    :param step_size: SGLD's step :math:`\\epsilon` during the draws.
    :param diagnostics: :class:`LLCDiagnostics`.
    """

    llc: float
    std_error: float
    per_chain: Tensor
    loss_trace: Tensor
    num_excluded: int
    init_loss: float
    n: int
    nbeta: float
    localization: float
    step_size: float
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
        return (f"LLC {self.llc:.4g} ± {self.std_error:.2g} (Monte Carlo standard error; {self.per_chain.numel()} "
                f"chains, ESS {d.ess:.0f}, R-hat {d.r_hat:.3f}, step {self.step_size:.3g}, step bias "
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
    step_size: float | None = None,
    target_bias: float = 0.02,
    control_variates: bool | None = None,
    batch_size: int | None = None,
    vectorize: bool | None = None,
    progress_bar: bool = True,
) -> LLCResult:
    r"""Estimate the local learning coefficient :math:`\hat\lambda(w^*)` (see the module docstring).

    Two kinds of model:

    * a torch module with ``loss_fn`` (``loss_fn(model(inputs), target)`` on ``(inputs, target)``
      batches) or ``evaluate`` (``evaluate(model, batch)``) and ``data`` a ``DataLoader``;
      :math:`w^*` is the module's current weights (the module is not modified). ``params`` (names
      or tensors) and ``mask`` (``{name: 0/1 tensor}``) restrict the chain to some weights;
      the others stay at :math:`w^*`.
    * a Pyro model, with ``data`` the tuple of its positional arguments (and ``model_kwargs``):
      :math:`L_n(w) = -\frac1n\sum_i \log p(y_i \mid x_i, w)` over the observed sites, on the
      unconstrained latent values; minibatches come from ``pyro.plate(..., subsample_size=m)``;
      :math:`w^*` is ``w_star`` (constrained values) or the MAP. ``params`` names latent sites.

    Example::

        >>> result = estimate_llc(net, loader, torch.nn.CrossEntropyLoss())     # doctest: +SKIP
        >>> print(result)                   # LLC 41.2 ± 0.6 (Monte Carlo standard error; ...)
        >>> result.plot()

    :param reduction: ``"mean"``, ``"sum"`` or ``"none"`` (per-row losses); detected if not given.
    :param n: the data set's size (only needed where it cannot be read: an iterable data set, a
        Pyro model whose observed sites are in no single plate).
    :param nbeta: :math:`n\beta` (default :math:`n/\log n`).
    :param localization: :math:`\gamma`. A quadratic direction of curvature :math:`h` counts
        :math:`n\beta h/(n\beta h + \gamma)` instead of 1 towards :math:`\hat\lambda`; flat directions
        are held within :math:`\gamma^{-1/2}` of :math:`w^*`.
    :param num_chains, num_draws: chains, and draws of each after burn-in.
    :param num_burnin: steps at the chosen step size before the draws (default ``num_draws // 10``;
        the pilot runs that choose the step come first and are excluded too).
    :param step_size: SGLD's :math:`\epsilon`; default: chosen by short pilot runs so that the
        discretisation bias of :math:`\hat\lambda` is about ``target_bias`` (relative).
    :param control_variates: estimate the gradient and the loss by their minibatch differences from
        :math:`w^*` plus the full-data values there (default: whenever minibatches are smaller than
        the data set). Each step then also evaluates :math:`w^*` on the chains' minibatches.
    :param batch_size: minibatch size (default: the loader's).
    :param vectorize: run the chains in one ``vmap``-ed call (default: if the module allows it).
    :param progress_bar: show a tqdm progress bar.
    :returns: an :class:`LLCResult`; warnings (:class:`LLCWarning`) when the chains did not
        equilibrate, the step biases the estimate, or :math:`w^*` is not a local minimum.
    """
    num_chains = check_integer("num_chains", num_chains, low=1)
    num_draws = check_integer("num_draws", num_draws, low=4)
    num_burnin = check_integer("num_burnin", num_burnin, low=0, none_ok=True)
    num_burnin = max(num_draws // 10, 1) if num_burnin is None else num_burnin
    localization = check_number("localization", localization, allow_low=True)
    nbeta = check_number("nbeta", nbeta, none_ok=True)
    step_size = check_number("step_size", step_size, none_ok=True)
    target_bias = check_number("target_bias", target_bias, high=1.0)
    check_mapping("model_kwargs", model_kwargs, none_ok=True)
    if control_variates is not None:
        check_flag("control_variates", control_variates)
    check_flag("progress_bar", progress_bar)
    if loss_fn is not None or evaluate is not None:
        if w_star is not None:
            raise ValueError("Invalid w_star: for a torch module, w* is the module's current weights (load the "
                             "weights you want into it)")
        objective: ChainObjective = ModuleObjective(
            model, Minibatches.from_loader(data, batch_size, n), loss_fn=loss_fn, evaluate=evaluate,
            reduction=reduction, params=params, mask=mask, num_chains=num_chains, vectorize=vectorize)
    else:
        from ._pyro import ModelLikelihood, PyroObjective

        if reduction is not None or batch_size is not None:
            raise ValueError("Invalid reduction/batch_size: a Pyro model sums log densities and takes its minibatch "
                             "size from pyro.plate(..., subsample_size=m)")
        likelihood = ModelLikelihood(model, _model_args(data), model_kwargs or {}, n)
        objective = PyroObjective(likelihood, w_star, params=params, mask=mask, num_chains=num_chains)
    n = objective.n
    if nbeta is None:
        if n < 2:
            raise ValueError(f"Invalid nbeta: None with n = {n} (n / log n needs n >= 2; give nbeta)")
        nbeta = n / math.log(n)
    use_cv = (not objective.exact) if control_variates is None else (control_variates and not objective.exact)
    init_loss, full_gradient = objective.full_loss(gradient=use_cv)
    if not math.isfinite(init_loss):
        raise ValueError(f"Invalid w*: the loss there is {init_loss} (must be finite)")
    control = None
    if use_cv:
        chains = objective.num_chains
        control = ControlVariates(init_loss, [g.unsqueeze(0).expand(chains, *g.shape) for g in full_gradient])
    driver = _Chains(objective, nbeta, localization, control, init_loss, progress_bar, num_burnin + num_draws)
    try:
        lr, adaptation_steps = (step_size, 0) if step_size is not None else driver.adapt(target_bias, num_draws)
        lr, restarts = driver.sample(num_burnin + num_draws, lr, None if step_size is not None else target_bias)
    finally:
        driver.close()
    trace = driver.trace()
    excluded = trace.shape[1] - num_draws
    draws = trace[:, excluded:]
    summary = chain_mean(draws)
    llc = nbeta * (summary.mean - init_loss)
    std_error = nbeta * summary.std_error
    scales = measure(objective, nbeta, localization, control)
    bias = step_bias(lr, scales, llc)
    messages = _warnings(llc, std_error, summary.r_hat, summary.ess, bias, target_bias, step_size is not None)
    for message in messages:
        warnings.warn(message, LLCWarning, stacklevel=2)
    diagnostics = LLCDiagnostics(
        ess=summary.ess, r_hat=summary.r_hat, step_bias=bias, target_bias=None if step_size is not None else target_bias,
        scales=scales, adaptation_steps=adaptation_steps, burn_in=num_burnin, restarts=restarts, vectorized=objective.vectorized,
        control_variates=use_cv, full_batch=objective.exact, warnings=tuple(messages))
    return LLCResult(
        llc=llc, std_error=std_error, per_chain=nbeta * (draws.mean(1) - init_loss), loss_trace=trace,
        num_excluded=excluded, init_loss=init_loss, n=n, nbeta=nbeta, localization=localization, step_size=lr,
        diagnostics=diagnostics)


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
                        "estimate still depends on the start; give more num_burnin and num_draws")
    if ess < 50:
        messages.append(f"only {ess:.0f} effective draws: the standard error itself is unreliable; give more num_draws")
    if bias > 2 * target:
        why = "the given step_size" if given else "the step chosen in the pilot runs (the chains moved on to stiffer regions)"
        messages.append(f"the step size biases the estimate by about {100 * bias:.2g}% ({why}; the target is "
                        f"{100 * target:.2g}%): lower step_size or target_bias")
    if llc < -2 * std_error:
        messages.append(f"the estimate is negative ({llc:.4g} ± {std_error:.2g}): the chains found lower loss than at "
                        "w*, which is not a local minimum of L_n; train further, or localize more")
    return messages


class _Chains:
    """Runs the stacked chains: SGLD steps on the objective's parameters, recording the loss
    estimates, with the pilot runs that choose the step."""

    def __init__(self, objective: ChainObjective, nbeta: float, localization: float,
                 control: ControlVariates | None, init_loss: float, progress_bar: bool, planned: int):
        self.objective, self.nbeta, self.localization = objective, nbeta, localization
        self.control, self.init_loss = control, init_loss
        masks = objective.stacked_masks()
        group = {"params": objective.params, "mask": None if all(m is None for m in masks) else masks}
        self.sampler = SGLD([group], lr=0.0, nbeta=nbeta, localization=localization)
        self._records: list[Tensor] = []
        self.snapshots = [[p.detach().clone() for p in objective.params]] * 2
        self.llc_guess: float | None = None
        self.start_scales = measure(objective, nbeta, localization, control)
        # a step that lifts n beta (L - L*) this far above its largest possible mean (d/2), and
        # beyond the loss estimate's own minibatch noise, diverged
        self._limit = 10.0 * objective.num_sampled + 100.0 + 10.0 * self.start_scales.loss_noise
        self._bar = None
        if progress_bar:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=planned, desc="LLC")

    def set_lr(self, lr: float) -> None:
        for group in self.sampler.param_groups:
            group["lr"] = lr

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def trace(self) -> Tensor:
        return torch.stack(self._records, 1)

    def _step(self) -> Tensor:
        grads, values = gradient_estimate(self.objective, self.objective.draw(), self.control)
        for p, g in zip(self.objective.params, grads):
            p.grad = g
        self.sampler.step()
        return values.to(torch.float64)

    def _diverged(self, values: Tensor) -> bool:
        excess = self.nbeta * (values - self.init_loss)
        return not bool(torch.isfinite(values).all()) or bool((excess > self._limit).any())

    def run(self, steps: int, phase: str) -> str | None:
        """``steps`` steps, recorded; at a divergence, stop and say why (``None``: none). Every
        ``_SNAPSHOT`` steps the chains' points are kept, the two latest of them in
        :attr:`snapshots`."""
        lr = self.sampler.param_groups[0]["lr"]
        for k in range(steps):
            if k % _SNAPSHOT == 0:
                self.snapshots = [self.snapshots[-1], [p.detach().clone() for p in self.objective.params]]
            try:
                values = self._step()
            except NonFiniteError as error:
                return f"step {k}: {error}"
            if self._diverged(values):
                return f"step {k}: the loss left every plausible range"
            self._records.append(values)
            if self._bar is not None:
                self._bar.update(1)
                if k % 50 == 49:
                    recent = torch.stack(self._records[-50:])
                    self._bar.set_postfix(phase=phase, step=f"{lr:.2e}",
                                          llc=f"{self.nbeta * (float(recent.mean()) - self.init_loss):.4g}", refresh=False)
        return None

    def sample(self, steps: int, lr: float, target_bias: float | None) -> tuple[float, int]:
        """The burn-in and the draws at ``lr``: ``(the step size used, restarts)``. A chain of a
        singular model can wander along a flat direction into a region stiffer than any the pilot
        runs saw, where the step is unstable; with an automatic step (``target_bias`` given) the
        chains then go back to the older of the last two snapshots, the step is chosen again from
        the scales measured there (and at least halved), and the burn-in and draws start over, so
        that every draw comes from one fixed-step chain. A given step size is never changed: an
        error says so."""
        restarts = 0
        while True:
            self.set_lr(lr)
            start = len(self._records)
            reason = self.run(steps, phase="sampling")
            if reason is None:
                return lr, restarts
            if target_bias is None or restarts == _MAX_RESTARTS:
                raise RuntimeError(f"An LLC chain diverged at sampling {reason}, with step size {lr:.3g}; give a "
                                   "smaller step_size (or target_bias), or more localization")
            restarts += 1
            del self._records[start:]
            with torch.no_grad():
                for p, kept in zip(self.objective.params, self.snapshots[0]):
                    p.copy_(kept)
            scales = measure(self.objective, self.nbeta, self.localization, self.control)
            lr = min(lr / 2, choose_step(scales, self.llc_guess, target_bias))
            if self._bar is not None:
                self._bar.total += steps

    def _reset(self) -> None:
        with torch.no_grad():
            for p, a in zip(self.objective.params, self.objective.anchor):
                p.copy_(a.unsqueeze(0).expand_as(p))

    def adapt(self, target_bias: float, num_draws: int) -> tuple[float, int]:
        """Pilot runs from :math:`w^*`, each followed by a measurement of the scales where the chains
        are and a choice of the step (:func:`~pyro_sgmcmc.slt._scales.choose_step`, with the pilot's
        second half as the guess of :math:`\\lambda`). The first pilot runs at the largest stable
        step measured at :math:`w^*` (to arrive fast: its bias does not matter); later ones at the
        step chosen, until the choice changes by less than a factor of 1.5 (at most ``_MAX_ROUNDS``).
        A pilot that diverges is retried from :math:`w^*` with a 10x smaller step (at :math:`w^*` of
        a singular model the curvature can be 0, and gives no scale)."""
        objective = self.objective
        pilot = min(max(num_draws // 20, 50), 100)
        lr = choose_step(self.start_scales, None, 1.0)  # the stability cap alone
        start = len(self._records)
        rounds = retries = 0
        while rounds < _MAX_ROUNDS:
            self.set_lr(lr)
            if self._bar is not None:
                self._bar.total += pilot
            before = len(self._records)
            if self.run(pilot, phase="pilot") is not None:
                del self._records[before:]
                retries += 1
                if retries > 40:
                    raise RuntimeError("Could not find a stable step size for the LLC chains from w*; give step_size")
                self._reset()
                lr /= _SHRINK
                continue
            rounds += 1
            recent = torch.stack(self._records[before + pilot // 2:])
            llc = self.nbeta * (float(recent.mean()) - self.init_loss)
            llc = self.llc_guess = min(llc, objective.num_sampled / 2) if llc > 0 else None
            scales = measure(objective, self.nbeta, self.localization, self.control)
            chosen = choose_step(scales, llc, target_bias)
            settled = rounds > 1 and 1 / 1.5 <= chosen / lr <= 1.5
            lr = chosen
            if settled:
                break
        return lr, len(self._records) - start
