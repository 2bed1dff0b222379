"""Hyperparameters by the marginal likelihood, with SG-MCMC sampling the weights:
:func:`marglik_hyperparameters` (its docstring states the recipe and its conditions)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import pyro
import torch
from pyro.infer import Trace_ELBO
from torch import Tensor

from .._validation import check_callable, check_flag, check_integer, check_mapping, check_names, check_number
from ..infer import AutoUnconstrainedDelta
from ..samplers import SGLD as _SGLDRule
from ._objective import ChainObjective
from ._scales import measure
from ._stats import chain_mean

__all__ = ["MarglikResult", "marglik_hyperparameters"]


@dataclass(frozen=True)
class MarglikResult:
    """Evidence-maximising hyperparameters.

    :param hyperparameters: ``{name: value}``, each the average of its iterates over the last
        ``average`` fraction of the run (constrained, as ``pyro.param`` returns it).
    :param std_error: ``{name: Monte Carlo standard error of that average}``, from the effective
        sample size of the iterates (autocorrelated: each follows the chain's draws). Honest when the
        averaged window holds many of their autocorrelation times; a chain that mixes slowly
        against the window (a small SGLD step) makes it too small.
    :param trace: ``{name: values at every step after burn-in}`` (``[steps, *shape]``).
    :param step_size: the SGLD step of the weights.
    """

    hyperparameters: dict[str, Tensor]
    std_error: dict[str, Tensor]
    trace: dict[str, Tensor]
    step_size: float


class _GuideObjective(ChainObjective):
    """One chain over the guide's unconstrained weights, with the potential as its loss (for the
    step-size measurement of :mod:`._scales`, with :math:`n\\beta = 1`)."""

    def __init__(self, loss: Callable[[], Tensor], params: list[Tensor]):
        self._loss = loss
        self.params = params
        self.masks = [None] * len(params)
        self.num_chains = 1
        self.exact = False

    def draw(self) -> Any:
        return None

    def evaluate(self, batch: Any, anchored: bool) -> tuple[Tensor, None]:
        return self._loss().reshape(1), None


def marglik_hyperparameters(
    model: Callable,
    data: tuple = (),
    *,
    model_kwargs: dict[str, Any] | None = None,
    hyperparameters: list[str] | None = None,
    num_steps: int = 4000,
    burn_in: int = 1000,
    step_size: float | None = None,
    target_bias: float = 0.02,
    hyper_optim: Any = None,
    average: float = 0.5,
    map_steps: int = 500,
    map_lr: float = 0.01,
    init_loc_fn: Callable | None = None,
    progress_bar: bool = True,
) -> MarglikResult:
    r"""Find the evidence maximiser of the model's ``pyro.param`` hyperparameters while SGLD samples
    its latent weights.

    For hyperparameters :math:`h` (a prior scale, an observation noise, declared as ``pyro.param`` in
    the model) and weights :math:`w` (its latent sites), Fisher's identity

    .. math:: \nabla_h \log p(D \mid h) = E_{p(w \mid D, h)}\big[\nabla_h \log p(D, w \mid h)\big]

    makes the gradient of the log evidence a posterior expectation, which one SG-MCMC draw of
    :math:`w` estimates without bias. So a chain that samples :math:`w` by SGLD while Adam follows
    :math:`\nabla_h \log p(D, w_t \mid h)` at the chain's current point is a stochastic approximation
    (Robbins-Monro, two time scales) of the evidence maximiser :math:`h^* = \arg\max_h p(D \mid h)`,
    type-II maximum likelihood; this is what ``laplace.marglik_training`` does with a Laplace
    approximation of the evidence, here without one. Both updates use one loss: the model's
    potential energy in the weights' unconstrained coordinates
    (:class:`~pyro_sgmcmc.infer.AutoUnconstrainedDelta` with ``Trace_ELBO``), whose gradient in
    :math:`h` is :math:`-\nabla_h \log p(D, w \mid h)` (the log-Jacobian does not depend on :math:`h`).

    The recipe, and its conditions (what this function does)::

        guide = AutoUnconstrainedDelta(model)
        elbo = Trace_ELBO()
        guide(x, y)                                          # creates the guide's parameters
        (Adam on guide_params alone, to a mode)              # start where the posterior is
        sampler = pyro_sgmcmc.samplers.SGLD(guide_params, lr=step)   # the weights: sampled
        hyper = pyro.optim.Adam({"lr": 0.01, "betas": (0.9, 0.99)})   # the hyperparameters: followed
        for t in range(burn_in + num_steps):
            loss = elbo.differentiable_loss(model, guide, x, y)
            loss.backward()                                  # one backward for both
            sampler.step()                                   # SGLD on the guide's unconstrained values
            if t >= burn_in:
                hyper(model_params)                          # Adam on the model's pyro.params
            zero the gradients

    (``guide_params`` and ``model_params``: the unconstrained tensors of the param store,
    ``pyro.get_param_store().get_param(name).unconstrained()``, of the guide's and the model's
    parameters.)

    * the chain must be near stationarity for the current :math:`h`: start it at a mode (a network's
      weights all at 0, the prior median, sit on a saddle whose gradient vanishes: start them at a
      prior draw, ``init_loc_fn=init_to_sample``, and optimize), burn in with :math:`h` fixed, and
      keep Adam's steps small against the chain's mixing (the two-time-scale condition; with a
      chain that lags, the gradient is taken at the wrong posterior);
    * the SGLD step must be small enough that the sampled posterior is the posterior (a step that
      inflates posterior variances by a relative :math:`t` moves :math:`h^*` accordingly: e.g. a prior
      variance's fixed point is :math:`E|w|^2/d`, whose posterior-variance part grows by :math:`t`);
    * the iterates fluctuate around :math:`h^*` with an amplitude set by Adam's step: the estimate is
      their average over the last part of the run (Polyak-Ruppert).

    Two ``MultiOptimizer`` objects in a ``pyro.optim.MixedMultiOptimizer`` do not work here: each
    part differentiates the loss again after the other has changed its tensors in place. One
    ``backward`` and two Pyro optimizers do.

    Example::

        def model(x, y):
            scale = pyro.param("prior_scale", torch.tensor(1.0), constraint=constraints.positive)
            w = pyro.sample("w", dist.Normal(0, scale).expand([d]).to_event(1))
            with pyro.plate("data", len(y), subsample_size=100) as i:
                pyro.sample("y", dist.Normal(x[i] @ w, 0.5), obs=y[i])

        result = marglik_hyperparameters(model, (x, y))
        result.hyperparameters["prior_scale"]

    :param model: the Pyro model, with its hyperparameters as ``pyro.param``\ s and its weights as
        latent sites.
    :param data: the model's positional arguments.
    :param model_kwargs: its keyword arguments.
    :param hyperparameters: the names of the ``pyro.param``\ s to fit (default: all the model's).
    :param num_steps: steps after burn-in (SGLD and Adam together).
    :param burn_in: SGLD steps with the hyperparameters fixed, first.
    :param step_size: SGLD's step; default: from the curvature and gradient noise of the potential
        measured after burn-in (SGLD's rule, :meth:`~pyro_sgmcmc.samplers.SGLD.suggest_lr`, with
        ``target_bias``), and at the start for the burn-in itself.
    :param target_bias: the relative bias of posterior variances the default step aims at.
    :param hyper_optim: a Pyro optimizer for the hyperparameters (default
        ``pyro.optim.Adam({"lr": 0.01, "betas": (0.9, 0.99)})``: with torch's default 0.999, Adam's
        second moment remembers the large gradients of the first steps for thousands of steps, the
        averaged iterates are not yet stationary, and their standard error came out 1.5x too small
        (on a conjugate regression, 14 runs); with 0.99 it matched the spread of 10 runs).
    :param average: the fraction of the last steps whose iterates are averaged.
    :param map_steps: Adam steps on the weights alone, from the initial point, before anything
        else: the chain starts at a mode, as Laplace's starts at the trained network (SGLD's
        accurate step is far too small to travel there).
    :param map_lr: the step size of those Adam steps.
    :param init_loc_fn: the weights' initial point, as for :class:`~pyro_sgmcmc.infer.AutoUnconstrainedDelta`
        (default: the prior median; for a network, ``pyro.infer.autoguide.init_to_sample``).
    :param progress_bar: show a tqdm progress bar.
    :returns: a :class:`MarglikResult`.
    """
    check_mapping("model_kwargs", model_kwargs, none_ok=True)
    num_steps = check_integer("num_steps", num_steps, low=2)
    burn_in = check_integer("burn_in", burn_in, low=0)
    step_size = check_number("step_size", step_size, none_ok=True)
    target_bias = check_number("target_bias", target_bias, high=1.0)
    average = check_number("average", average, high=1.0, allow_high=True)
    map_steps = check_integer("map_steps", map_steps, low=0)
    map_lr = check_number("map_lr", map_lr)
    check_names("hyperparameters", hyperparameters)
    check_callable("hyper_optim", hyper_optim, what="a Pyro optimizer (e.g. pyro.optim.Adam({'lr': 0.01}))",
                   none_ok=True)
    check_callable("init_loc_fn", init_loc_fn, what="an init strategy (e.g. pyro.infer.autoguide.init_to_sample)",
                   none_ok=True)
    check_flag("progress_bar", progress_bar)
    if not isinstance(data, tuple):
        raise ValueError(f"Invalid data: {type(data).__name__} (must be the tuple of the model's positional arguments)")
    model_kwargs = model_kwargs or {}
    guide = AutoUnconstrainedDelta(model) if init_loc_fn is None else AutoUnconstrainedDelta(model, init_loc_fn)
    elbo = Trace_ELBO()
    loss = lambda: elbo.differentiable_loss(model, guide, *data, **model_kwargs)  # noqa: E731
    with pyro.poutine.trace(param_only=True) as guide_trace:
        guide(*data, **model_kwargs)
    with pyro.poutine.trace(param_only=True) as model_trace:
        loss()
    store = pyro.get_param_store()
    weight_names = sorted(guide_trace.trace.nodes)
    model_names = sorted(name for name in model_trace.trace.nodes if name not in guide_trace.trace.nodes)
    names = model_names if hyperparameters is None else list(hyperparameters)
    unknown = [name for name in names if name not in model_names]
    if unknown or not names:
        raise ValueError(f"Invalid hyperparameters: {unknown or 'none'} (must name pyro.params of the model: "
                         f"{model_names})")
    weights = [store.get_param(name).unconstrained() for name in weight_names]
    hyper = [store.get_param(name).unconstrained() for name in names]
    objective = _GuideObjective(loss, weights)
    if map_steps:
        optimizer = torch.optim.Adam(weights, lr=map_lr)
        with pyro.validation_enabled(False):
            for _ in range(map_steps):
                optimizer.zero_grad()
                loss().backward()
                optimizer.step()
        for p in hyper:
            p.grad = None

    def measured_step() -> float:
        scales = measure(objective, 1.0, 0.0, None)
        return _SGLDRule.suggest_lr(scales.curvature, scales.noise_max, target_bias)

    lr = step_size if step_size is not None else measured_step()
    sampler = _SGLDRule(weights, lr=lr)
    if hyper_optim is None:
        hyper_optim = pyro.optim.Adam({"lr": 0.01, "betas": (0.9, 0.99)})
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        bar = tqdm(total=burn_in + num_steps, desc="marglik")
    trace: dict[str, list[Tensor]] = {name: [] for name in names}
    # Pyro's checks ran on the runs above; at every step they cost a third of a small model's step
    with pyro.validation_enabled(False):
        try:
            for t in range(burn_in + num_steps):
                if t == burn_in and step_size is None and burn_in > 0:
                    lr = measured_step()  # now in the posterior's bulk
                    for group in sampler.param_groups:
                        group["lr"] = lr
                loss().backward()
                sampler.step()
                if t >= burn_in:
                    hyper_optim(hyper)
                    for name in names:
                        trace[name].append(pyro.param(name).detach().clone())
                for p in weights + hyper:
                    p.grad = None
                if bar is not None:
                    bar.update(1)
                    if t % 100 == 99:
                        bar.set_postfix({name: f"{float(pyro.param(name).detach().reshape(-1)[0]):.4g}"
                                         for name in names[:3]}, refresh=False)
        finally:
            if bar is not None:
                bar.close()
    stacked = {name: torch.stack(values) for name, values in trace.items()}
    start = int(math.floor((1 - average) * num_steps))
    estimates, errors = {}, {}
    for name, values in stacked.items():
        kept = values[start:].double()
        flat = kept.reshape(kept.shape[0], -1)
        summaries = [chain_mean(flat[:, j].unsqueeze(0)) for j in range(flat.shape[1])]
        estimates[name] = kept.mean(0).to(values.dtype)
        errors[name] = torch.tensor([s.std_error for s in summaries], dtype=values.dtype,
                                    device=values.device).reshape(values.shape[1:])
    return MarglikResult(hyperparameters=estimates, std_error=errors, trace=stacked, step_size=lr)
