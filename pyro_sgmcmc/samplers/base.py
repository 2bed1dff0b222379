"""The base of every torch sampler: options, validation, parameter groups, schedules, state.

A sampler subclass only declares its own options and calls its update function from
:mod:`pyro_sgmcmc.functional` in :meth:`SGMCMCOptimizer._update_group`; everything a Pyro
adapter needs (``param_groups[i]["lr"]``, ``step()``, ``state_dict()``) is common and lives here,
so an adapter drives any sampler without knowing which one it is.
"""

from __future__ import annotations

import functools
import math
import operator
import warnings
from collections.abc import Mapping
from itertools import chain, repeat
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..functional import Diagnostics, NoisePlanCache, NoiseSource, NonFiniteError
from ..functional._step import Ballot, Step, execute
from ..functional.distributed import MODES, Ranks, check_process_group, check_replicas, share_noise
from .._validation import (check_choice, check_instance, check_integer, check_mask, check_number,
                           check_schedule)
from ._mala import MalaTracker

#: Options that may be given as a callable ``step -> float`` (``step`` counts the group's steps).
SCHEDULABLE = ("lr", "temperature", "nbeta")

_HALF = (torch.float16, torch.bfloat16)


class ParamGroup(dict):
    """A parameter group: a ``dict``, as torch's are, whose options are checked when written.

    An lr scheduler (``group["lr"] = ...``), ``load_state_dict`` or user code writing a value
    into ``param_groups`` goes through the same check as the constructor (``owner.check_option``),
    so a bad value is refused where it enters, naming the option, and never reaches a step; a
    step itself checks nothing again (writes are rare, steps are many).

    :param values: the group's entries.
    :param owner: the sampler class whose ``OPTION_CHECKS`` apply.
    """

    __slots__ = ("owner",)

    def __init__(self, values: Mapping[str, Any], owner: type["SGMCMCOptimizer"]):
        dict.__init__(self, values)
        self.owner = owner

    def __setitem__(self, key: str, value: Any) -> None:
        owner = getattr(self, "owner", None)  # not set yet while unpickling
        if owner is not None and key in owner.OPTION_CHECKS:
            value = owner.check_option(self, key, value)
        dict.__setitem__(self, key, value)

    def update(self, *args: Any, **kwargs: Any) -> None:  # type: ignore[override]
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def setdefault(self, key: str, default: Any = None) -> Any:
        if key not in self:
            self[key] = default
        return self[key]

    def __ior__(self, other: Any) -> "ParamGroup":  # type: ignore[override]
        self.update(other)
        return self


def _step_with_hooks(step: Callable[..., Any]) -> Callable[..., Any]:
    """What ``torch.optim.Optimizer`` wraps every ``step`` in (global and per-optimizer step
    hooks, the profiler's label), without the ~6 us ``record_function`` when no profiler runs:
    on a small model that is a sixth of a sampling step; and ``step`` runs with autograd off
    (set directly: ``torch.no_grad()`` as a decorator costs ~1 us a call). Marked ``hooked`` so
    torch does not wrap it again."""
    import torch.optim.optimizer as torch_optimizer

    global_pre = getattr(torch_optimizer, "_global_optimizer_pre_hooks", {})
    global_post = getattr(torch_optimizer, "_global_optimizer_post_hooks", {})

    def unhooked(self: "SGMCMCOptimizer", args: tuple, kwargs: dict) -> Any:
        grad_enabled = torch.is_grad_enabled()
        torch._C._set_grad_enabled(False)
        try:
            return step(self, *args, **kwargs)
        finally:
            torch._C._set_grad_enabled(grad_enabled)

    def hooked(self: "SGMCMCOptimizer", args: tuple, kwargs: dict) -> Any:
        for hook in chain(global_pre.values(), self._optimizer_step_pre_hooks.values()):
            result = hook(self, args, kwargs)
            if result is not None:
                if not (isinstance(result, tuple) and len(result) == 2):
                    raise RuntimeError(f"{step} must return None or a tuple of (new_args, new_kwargs), but got {result}.")
                args, kwargs = result
        out = unhooked(self, args, kwargs)
        self._optimizer_step_code()  # where torch's profiler, tracing Python, inspects the optimizer
        for hook in chain(self._optimizer_step_post_hooks.values(), global_post.values()):
            hook(self, args, kwargs)
        return out

    @functools.wraps(step)
    def wrapper(self: "SGMCMCOptimizer", *args: Any, **kwargs: Any) -> Any:
        if torch.autograd._profiler_enabled():
            with torch.autograd.profiler.record_function(f"Optimizer.step#{type(self).__name__}.step"):
                return hooked(self, args, kwargs)
        if global_pre or global_post or self._optimizer_step_pre_hooks or self._optimizer_step_post_hooks:
            return hooked(self, args, kwargs)
        return unhooked(self, args, kwargs)  # the common case: no hooks, no profiler

    wrapper.hooked = True  # type: ignore[attr-defined]
    return wrapper


class SGMCMCOptimizer(Optimizer):
    r"""Shared machinery of the stochastic-gradient MCMC samplers.

    Every sampler targets

    .. math:: \pi(\theta) \propto \exp\Big(-\frac{U(\theta)}{T} - \frac{\gamma}{2}\|\theta-\theta_0\|^2
              - \frac{\lambda}{2}\|\theta\|^2\Big)

    where ``U`` is the potential whose stochastic gradient is in ``p.grad``.

    Group options common to all samplers (each may differ between parameter groups):

    :param lr: step size, ``>= 0`` (0 freezes the group, noise included), or a callable
        ``step -> float``. Lives in ``param_groups[i]["lr"]``, so torch's lr schedulers drive it.
    :param temperature: :math:`T > 0`, or a callable of the step. The gradient is divided by it.
    :param nbeta: alternative to ``temperature`` for mean-reduced losses: the gradient is
        multiplied by it (``nbeta = n / T`` for a loss averaged over ``n`` terms). Giving both is
        an error; giving neither means ``T = 1``.
    :param localization: :math:`\gamma \ge 0`, pull toward :math:`\theta_0`, the parameter's value
        at the first step that updates it.
    :param weight_decay: :math:`\lambda \ge 0`, pull toward 0.
    :param noise_level: scale of the injected noise; anything but 1 does not sample the target
        (a warning says so).
    :param bounding_box_size: if set, :math:`\theta` is clamped into :math:`\theta_0 \pm` this.
    :param mask: ``None``, or one 0/1 tensor (or ``None``) per parameter of the group, shaped like
        it: entries where the mask is 0 are never changed.

    Numbers may be Python, NumPy or 0-d tensor scalars; they are stored as Python floats. Every
    option is checked where it enters: here, when a scheduler or user code writes it into
    ``param_groups`` (see :class:`ParamGroup`), and in :meth:`load_state_dict`.

    Optimizer-wide options:

    :param generator: the root ``torch.Generator`` of the noise (default: torch's global
        generator, so ``torch.manual_seed`` / ``pyro.set_rng_seed`` before the first step make a
        run reproducible). On the CPU the noise is drawn by a few streams seeded from it at the
        first step (or at the first :meth:`state_dict`, so that a checkpoint taken before the
        first step resumes exactly), in parallel (see :class:`~pyro_sgmcmc.functional.NoiseSource`);
        their states, and the generator's, are saved in ``state_dict()`` and restored by
        ``load_state_dict()``.
    :param foreach: ``True`` for the multi-tensor path, ``False`` for the per-tensor loop, ``None``
        (default) for the multi-tensor path wherever it is supported. Both give the same numbers.
    :param diagnostics: if true, each ``step()`` leaves the norms of the parts of its update in
        :attr:`step_diagnostics`; off, it costs nothing. For the Langevin samplers (SGLD,
        PSGLD), when the step knows the potential (``step(closure)`` or ``step(loss=U)``), it also
        leaves ``mala_acceptance``: the probability with which MALA would have accepted the
        previous step (:mod:`pyro_sgmcmc.functional.mala`), and :attr:`mala_acceptance_mean`
        averages it over the steps scored. ``diagnostics="mala"`` keeps only that score (what
        the MCMC kernels use: a fraction of the cost of the norms on a small model).

    :param distributed: how the sampler runs under ``torch.distributed``
        (:mod:`pyro_sgmcmc.functional.distributed`): ``"replicated"`` for a replica of one chain
        on every rank (``DistributedDataParallel``: the noise is seeded from rank 0, so every
        rank adds the same; at the first step the parameters are checked to be the same on every
        rank, else :class:`~pyro_sgmcmc.functional.distributed.ReplicaMismatchError`);
        ``"sharded"`` for one rank's share of the parameters, as the local optimizer of
        ``torch.distributed.optim.ZeroRedundancyOptimizer`` (noise streams distinct per rank, so
        the shares' noises are independent); ``"independent"`` for a chain of its own on each
        rank. ``None`` (default): a single process; a warning at the first step if
        ``torch.distributed`` runs more than one rank, since a DDP replica that draws its own
        noise drifts away from the others. ``"replicated"`` and ``"sharded"`` seed the noise
        when the sampler is made, a collective: every rank must make it.
    :param process_group: the group the chain spans (default: the default group); only with
        ``distributed="replicated"`` or ``"sharded"``.
    :param noise_ahead: right after each step, start drawing the next step's noise in the noise
        threads, so that it overlaps the caller's forward and backward passes (samplers that
        offer it: SGLD). The numbers are those drawn in ``step()``, bit for bit, and
        ``state_dict()`` is the same (noise drawn ahead and not used is given back). Drawn ahead
        only for one parameter group of one device and dtype, on the CPU, of at most
        ``NUM_STREAMS`` noise chunks (4M entries): beyond, each chunk has no buffer of its own.

    **A refused step changes nothing.** :meth:`step` raises
    :class:`~pyro_sgmcmc.functional.NonFiniteError` (naming the parameter) when a gradient holds
    NaN or Inf, or when the update from finite gradients would write a non-finite value (an
    ``lr`` far too large); the parameters, the sampler's state (momenta, thermostats,
    preconditioners, anchors, step counts), its noise streams and torch's global generator are
    then exactly as before, so a caller may fix the gradient and step again. ``p.grad`` is left
    as it was: clear it (``zero_grad``) before the next backward pass.

    **Ctrl-C.** On a large model (more than one noise chunk, ~1M entries) the step runs in the
    noise threads while the calling thread waits; a ``KeyboardInterrupt`` then is held back until
    the step, its step counts and thermostats included, is complete, and raised right after, so
    a checkpoint taken in the handler is consistent.

    **Processes.** The noise threads, like torch's own OpenMP pool, do not survive ``fork``: a
    process forked after threaded steps that steps itself can hang or crash (a warning says so
    at its first threaded step). Start sampling processes with ``spawn``
    (``multiprocessing.get_context("spawn")``); a forked child that does not step (e.g. a
    ``DataLoader`` worker) is fine.

    **Low precision.** For float16 / bfloat16 parameters whose typical move per step is below
    half the spacing of representable values at their magnitude, most of the injected noise
    rounds away and the chain does not sample its target: a warning says so (at the first step,
    and again when ``lr`` changes). Keep such parameters in float32 for the sampler.
    """

    #: Whether a step is a draw from a Langevin proposal (so MALA's acceptance can score it).
    langevin = False

    #: How each group option is checked (:mod:`pyro_sgmcmc._validation`): ``check(name, value)``
    #: returns the value to store. Subclasses add their own options.
    OPTION_CHECKS: dict[str, Callable[[str, Any], Any]] = {
        "lr": functools.partial(check_number, allow_low=True),
        "temperature": functools.partial(check_number, none_ok=True),
        "nbeta": functools.partial(check_number, none_ok=True),
        "localization": functools.partial(check_number, allow_low=True),
        "weight_decay": functools.partial(check_number, allow_low=True),
        "noise_level": functools.partial(check_number, allow_low=True),
        "bounding_box_size": functools.partial(check_number, none_ok=True),
        "mask": None,  # checked against the group's parameters (see check_option)
    }

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        diagnostics: bool | str = False,
        distributed: str | None = None,
        process_group: Any = None,
        noise_ahead: bool = False,
    ) -> None:
        diagnostics = check_choice("diagnostics", diagnostics, (True, False, "mala"))
        self.noise_ahead = check_choice("noise_ahead", noise_ahead, (False, True))
        generator = check_instance("generator", generator, torch.Generator, what="a torch.Generator", none_ok=True)
        foreach = check_choice("foreach", foreach, (None, True, False))
        distributed = check_choice("distributed", distributed, (None, *MODES))
        check_process_group(process_group, distributed)
        self._check_sampler_options(foreach=foreach, diagnostics=diagnostics, noise_ahead=self.noise_ahead)
        # Set before Optimizer.__init__, which calls add_param_group.
        self.generator = generator
        self.foreach = foreach
        self.track_diagnostics = diagnostics is True
        self._score_mala = bool(diagnostics) and self.langevin
        self.step_diagnostics: dict[str, Tensor] = {}
        self._schedules: list[dict[str, Callable[[int], float]]] = []
        self._noise_plans = NoisePlanCache()
        self._noise = NoiseSource(generator)
        self._mala = MalaTracker()
        self._fresh: list[tuple[dict, str]] = []  # state entries made during the current step
        self._fresh_rng: tuple | None = None  # the root generator before the step drew first momenta
        self._low_precision: dict[int, float] | None = None  # per group: the lr last checked
        defaults = {"mask": None, **defaults}
        self.distributed = distributed
        #: the group the chain spans (``distributed="replicated"`` or ``"sharded"``), else ``None``
        self.ranks: Ranks | None = None
        self._first_step = True  # checks of the distributed set-up wait for it
        if distributed in ("replicated", "sharded"):
            self.ranks = Ranks.of(process_group)  # before the groups: refuse early, touching nothing
        super().__init__(params, defaults)
        if self.ranks is not None:
            devices = {p.device for group in self.param_groups for p in group["params"]}
            share_noise(self._noise, distributed, self.ranks, sorted(devices, key=str))

    # ---------------------------------------------------------------- groups and validation

    @classmethod
    def check_option(cls, group: Mapping[str, Any], key: str, value: Any) -> Any:
        """``value`` checked (and normalised: numbers become floats) as option ``key`` of
        ``group``, with the rules that involve other options (``temperature`` and ``nbeta``
        exclude each other; a mask must fit the group's parameters)."""
        if key == "mask":
            return check_mask("mask", value, group["params"]) if "params" in group else value
        value = cls.OPTION_CHECKS[key](key, value)
        if key in ("temperature", "nbeta") and value is not None:
            other = "nbeta" if key == "temperature" else "temperature"
            if group.get(other) is not None:
                temperature, nbeta = (value, group[other]) if key == "temperature" else (group[other], value)
                raise ValueError(
                    f"Give either temperature or nbeta, not both (got temperature={temperature!r}, "
                    f"nbeta={nbeta!r}): nbeta multiplies the gradient of a mean-reduced loss, "
                    "temperature divides the gradient of a summed one; set the other to None first"
                )
        if key == "noise_level" and key in group and value != 1.0 and value != group[key]:
            cls._warn_noise_level(value, stacklevel=4)
        return value

    @staticmethod
    def _warn_noise_level(value: float, stacklevel: int) -> None:
        warnings.warn(
            f"noise_level={value} is not 1: the sampler no longer samples its target "
            "distribution (use temperature to change the spread of the posterior)",
            UserWarning,
            stacklevel=stacklevel,
        )

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, checking its options (see the class docstring) with clear errors."""
        super().add_param_group(param_group)
        raw = self.param_groups[-1]
        try:
            schedules = self._extract_schedules(raw)
            group = ParamGroup({"params": raw["params"]}, type(self))
            group.update(raw)
            dict.setdefault(group, "step", 0)
            self._validate_group(group)
            self.param_groups[-1] = group
            self._schedules.append(schedules)
            self._init_group(group)
        except Exception:
            self.param_groups.pop()
            if len(self._schedules) > len(self.param_groups):
                self._schedules.pop()
            raise
        if any(p.dtype in _HALF for p in group["params"]):
            self._low_precision = self._low_precision or {}

    def _extract_schedules(self, group: dict[str, Any]) -> dict[str, Callable[[int], float]]:
        """Move callable options out of the group (so ``state_dict()`` stays picklable) and put
        their value at the group's current step in their place."""
        schedules = {}
        for key in SCHEDULABLE:
            if callable(group.get(key)):
                schedules[key] = group[key]
                group[key] = check_schedule(key, group[key], group.get("step", 0), self.OPTION_CHECKS[key])
        return schedules

    def _check_sampler_options(self, **options: Any) -> None:
        """What a sampler asks of the sampler-wide ``options`` (``foreach``, ``diagnostics``,
        ``noise_ahead``), each already checked on its own, before any group is added."""

    def _validate_group(self, group: dict[str, Any]) -> None:
        """What a new group needs beyond its options' own checks."""
        if group["noise_level"] != 1.0:
            self._warn_noise_level(group["noise_level"], stacklevel=5)
        for i, p in enumerate(group["params"]):
            made_by = _fsdp_kind(p)
            if made_by is not None:
                raise ValueError(
                    f"Invalid params: parameter {i} of param_groups[{len(self.param_groups) - 1}] is {made_by} "
                    "(a sharded parameter's noise and checks are not defined here); run the model "
                    "under DistributedDataParallel with distributed='replicated', or shard the sampler's work with "
                    "ZeroRedundancyOptimizer and distributed='sharded'"
                )
        if self.generator is not None:
            for i, p in enumerate(group["params"]):
                if p.device.type != self.generator.device.type:
                    raise ValueError(
                        f"Invalid generator: it is on device {self.generator.device} but parameter {i} of "
                        f"group {len(self.param_groups) - 1} is on {p.device} (must be on the parameters' device)"
                    )

    def _init_group(self, group: dict[str, Any]) -> None:
        """Per-group state a sampler needs from the start (e.g. a thermostat)."""

    @staticmethod
    def suggest_lr(curvature: float, noise_variance: float, target_bias: float = 0.02, temperature: float = 1.0,
                   arrival: bool = False, **options: Any) -> float:
        """A step size whose bias on a target of this largest ``curvature`` (of ``U``), with
        gradient noise of this largest per-coordinate variance, is about ``target_bias``
        (relative, on variances); with ``arrival``, the largest step that is still stable (for
        the first part of warmup, where bias does not matter). Each sampler gives its own rule;
        adaptation uses it."""
        raise NotImplementedError

    @staticmethod
    def adapted_options(curvature: float, noise_variance: float, temperature: float = 1.0,
                        given: dict[str, Any] | None = None) -> dict[str, Any]:
        """Options of the sampler (other than ``lr``) that an adapting kernel should set from the
        measured curvature and gradient-noise variance, unless the user gave them in ``given``.
        None by default."""
        return {}

    def set_anchors(self, anchors: Iterable[Tensor]) -> None:
        """Set :math:`\theta_0`, the centre of ``localization`` and ``bounding_box_size``, of every
        parameter (in ``param_groups`` order) to ``anchors``, instead of its value at the first
        step: for a sampler made after the chain has left its centre (the LLC's chains switch
        samplers mid-run, and must stay localized at :math:`w^*`)."""
        params = [p for group in self.param_groups for p in group["params"]]
        anchors = list(anchors)
        if len(anchors) != len(params) or any(a.shape != p.shape for a, p in zip(anchors, params)):
            raise ValueError(f"Invalid anchors: {[tuple(a.shape) for a in anchors]} (must match the parameters' "
                             f"shapes {[tuple(p.shape) for p in params]})")
        for p, anchor in zip(params, anchors):
            self.state[p]["anchor"] = anchor.detach().to(p).clone(memory_format=torch.preserve_format)

    def reset_auxiliary(self) -> None:
        """Put auxiliary variables (momenta, thermostats) back to their initial law, leaving the
        parameters where they are. Samplers without any do nothing. MCMC kernels call this at the
        end of warmup."""

    def freeze_adaptation(self) -> None:
        """Stop any adaptation inside the sampler (e.g. PSGLD's preconditioner), so that from here
        on it is a fixed-parameter Markov chain. Samplers that adapt nothing do nothing. MCMC
        kernels call this at the end of warmup."""

    def typical_move(self, group: dict[str, Any]) -> float:
        """About how far one step moves an entry of the group's parameters by its noise (for the
        low-precision warning): ``noise_level * sqrt(lr)`` for the Langevin samplers."""
        return float(group["noise_level"]) * math.sqrt(group["lr"])

    # ------------------------------------------------------------------------------ step

    @_step_with_hooks  # and autograd off
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Tensor | float | None = None) -> Any:
        """Take one sampling step with the gradients in ``p.grad``.

        :param closure: optional, re-evaluates the model and returns the loss (as in torch).
        :param loss: optional, the potential ``U`` at the current parameters (the loss whose
            gradient is in ``p.grad``), for the MALA diagnostic when a closure does not give it.
        :raises NonFiniteError: if a gradient holds NaN or Inf, or the update would write a
            non-finite value, naming the parameter; nothing is changed then (see the class
            docstring).
        """
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for index, group in enumerate(self.param_groups):
            if self._schedules[index]:
                self._apply_schedules(index, group)
            params, grads, masks = self._gather(index, group)
            if params:
                work.append((index, group, params, grads, masks, None))
        if self._low_precision is not None:
            self._check_precision(work)
        scoring = self._score_mala
        if scoring and not self.track_diagnostics:
            self.step_diagnostics = {}
        log_ratio = self._mala.before(self, work, loss) if scoring else None
        self._run(work)
        if scoring:
            self._mala.after(self, work)
            if log_ratio is not None:
                self.step_diagnostics["mala_log_ratio"] = log_ratio
                self.step_diagnostics["mala_acceptance"] = log_ratio.clamp(max=0.0).exp()
        if self._noise.interrupted:
            self._noise.raise_if_interrupted()
        return loss

    @property
    def mala_acceptance_mean(self) -> float:
        """The MALA acceptance probability averaged over the steps scored so far (NaN if none;
        see ``diagnostics``)."""
        return self._mala.mean

    def score_last_step(self, loss: Tensor | float) -> Tensor | None:
        """MALA's log acceptance ratio of the last step, scored now from the gradients in ``p.grad``
        and the potential ``loss`` where it landed (``None`` if it cannot be scored: not a
        Langevin sampler, no ``diagnostics``, or no step to score). Nothing moves and nothing
        is counted: the next :meth:`step` scores the same step for ``mala_acceptance``. A
        caller that decides on a step before taking the next one (an MCMC kernel in warmup)
        uses this."""
        if not self._score_mala:
            return None
        work = []
        for index, group in enumerate(self.param_groups):
            params, grads, masks = self._gather(index, group)
            if params:
                work.append((index, group, params, grads, masks, None))
        return self._mala.score(self, work, loss)

    def forget_last_step(self) -> None:
        """Do not score the last step for the MALA diagnostic (the caller moved the parameters
        since, e.g. an MCMC kernel undoing a divergent step)."""
        self._mala.pending = None

    def proposal_preconditioner(self, param: Tensor) -> Tensor | None:
        """The diagonal preconditioner of ``param``'s last Langevin proposal (``None``: identity)."""
        return None

    def proposal_noise_variance(self, group: dict[str, Any]) -> float:
        """The factor on the variance of the injected noise of ``group``'s last step: the
        proposal is ``N(theta - (lr/2) G grad U, lr * factor * G)`` (``noise_level ** 2``)."""
        noise_level = float(group["noise_level"])
        return noise_level * noise_level

    def step_tensors(self, targets: dict[Tensor, Tensor], grads: dict[Tensor, Tensor]) -> None:
        """One step in which the new value of each parameter ``p`` is written into
        ``targets[p]`` (e.g. a differentiable clone of ``p``) from the gradient ``grads[p]``.
        The sampler's state advances as in :meth:`step`; the parameters themselves are unchanged.
        This is how a Pyro ``MultiOptimizer.get_step`` reuses the sampler's math."""
        work = []
        for index, group in enumerate(self.param_groups):
            self._apply_schedules(index, group)
            keep = [i for i, p in enumerate(group["params"]) if p in grads]
            if keep:
                params = [group["params"][i] for i in keep]
                masks = None if group["mask"] is None else [group["mask"][i] for i in keep]
                work.append((index, group, params, [grads[p] for p in params], masks, [targets[p] for p in params]))
        # fresh noise buffers of their own per tensor: the update carries autograd history, which
        # must not reach the buffers that later steps refill in place, and autograd cannot follow
        # in-place writes into several views of one buffer
        plans, self._noise_plans = self._noise_plans, NoisePlanCache(private=True)
        try:
            self._run(work)
        finally:
            self._noise_plans = plans
        self._noise.raise_if_interrupted()

    def _apply_schedules(self, index: int, group: dict[str, Any]) -> None:
        for key, schedule in self._schedules[index].items():
            dict.__setitem__(group, key, check_schedule(key, schedule, group["step"], self.OPTION_CHECKS[key]))

    def _run(self, work: list[tuple]) -> None:
        """Update every group of ``work`` as one step: all or nothing (see the class docstring)."""
        if self._first_step:
            self._check_distributed()
        # the ranks of a sharded chain refuse a step together, even a rank with nothing to step
        ballot = Ballot(self.ranks.agree) if self.distributed == "sharded" else None
        if not work:
            if ballot is not None:
                execute([], self._noise, ballot)
            return
        diagnostics = Diagnostics() if self.track_diagnostics else None
        steps: list[Step] = []
        try:
            for index, group, params, grads, masks, targets in work:
                steps.append(self._update_group(group, params, grads, masks, diagnostics, targets))
            tasks = steps[0][0] if len(steps) == 1 else [task for step in steps for task in step[0]]
            results = execute(tasks, self._noise, ballot)
        except NonFiniteError as error:
            if ballot is not None and not ballot.cast:
                ballot(False)
            self._forget_fresh_state()
            refusal = self._refusal(error, work, steps)
            if self._noise.interrupted:  # nothing changed; the user asked to stop
                self._noise.interrupted = False
                raise KeyboardInterrupt from refusal
            raise refusal from None
        except BaseException:
            if ballot is not None and not ballot.cast:
                ballot(False)
            self._forget_fresh_state()
            raise
        if self._fresh:
            self._fresh.clear()
            self._fresh_rng = None
        if self.noise_ahead and len(tasks) == 1 and tasks[0].ahead_std:
            self._noise.draw_ahead(tasks[0].plan, tasks[0].ahead_std)
        offset = 0
        for step_tasks, post in steps:
            if post is not None:
                post(results[offset : offset + len(step_tasks)])
            offset += len(step_tasks)
        for item in work:
            dict.__setitem__(item[1], "step", item[1]["step"] + 1)
        if diagnostics is not None:
            self.step_diagnostics = diagnostics.result()

    def _check_distributed(self) -> None:
        """What the first step checks of the distributed set-up (see ``distributed``)."""
        mode = self.distributed
        if mode is None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                warnings.warn(
                    f"torch.distributed runs {dist.get_world_size()} ranks and this {type(self).__name__} draws "
                    "its own noise on each: under DistributedDataParallel the replicas then drift apart; pass "
                    "distributed='replicated' (one chain over the ranks), 'sharded' (inside "
                    "ZeroRedundancyOptimizer) or 'independent' (a chain per rank, on purpose)",
                    UserWarning,
                    stacklevel=5,
                )
        elif mode == "replicated":
            params = [p for group in self.param_groups for p in group["params"]]
            names = [name for group in self.param_groups for name in group.get("param_names", ())]
            check_replicas(params, self.ranks, names if len(names) == len(params) else None)
        elif mode == "sharded" and any(group["step"] for group in self.param_groups):
            warnings.warn(
                "this sampler's groups count steps already taken, but its noise streams were seeded when it "
                "was made: its state was loaded without the noise (ZeroRedundancyOptimizer.load_state_dict "
                "does not pass it on), so the chain goes on with other noise than the saved run's; for an exact "
                "resume save and load each rank's state with pyro_sgmcmc.samplers.distributed."
                "sharded_state_dict / load_sharded_state_dict",
                UserWarning,
                stacklevel=5,
            )
        self._first_step = False

    def _remember_fresh(self, state: dict, key: str) -> None:
        """A state entry made during this step: removed again if the step is refused."""
        self._fresh.append((state, key))

    def _remember_rng(self, device: torch.device) -> None:
        """The generators' states before this step draws from them outside its noise (first
        momenta): restored if the step is refused."""
        if self._fresh_rng is None:
            self._fresh_rng = self._noise.snapshot([device])

    def _forget_fresh_state(self) -> None:
        for state, key in self._fresh:
            state.pop(key, None)
        if self._fresh:
            self.__dict__.pop("_momenta_cache", None)
        self._fresh.clear()
        if self._fresh_rng is not None:
            self._noise.restore(self._fresh_rng)
            self._fresh_rng = None

    def _check_precision(self, work: list[tuple]) -> None:
        """Warn for half-precision parameters whose noise rounds away (see the class docstring);
        once per group and step size."""
        for index, group, params, *_ in work:
            if self._low_precision.get(index) == group["lr"]:
                continue
            self._low_precision[index] = group["lr"]
            move = self.typical_move(group)
            names = group.get("param_names")
            for p in params:
                if p.dtype not in _HALF or not move:
                    continue
                magnitude = float(p.detach().float().abs().mean())
                if not 0 < magnitude < math.inf:
                    continue
                spacing = torch.finfo(p.dtype).eps * 2.0 ** math.floor(math.log2(magnitude))
                if move < spacing / 2:
                    position = next(i for i, q in enumerate(group["params"]) if q is p)
                    name = f"{names[position]!r} " if names else ""
                    warnings.warn(
                        f"parameter {name}(param_groups[{index}]['params'][{position}], {str(p.dtype)[6:]}, mean "
                        f"magnitude {magnitude:.3g}) moves by about {move:.2g} a step, below half the spacing of "
                        f"{str(p.dtype)[6:]} values there ({spacing / 2:.2g}, its resolution): most of the injected "
                        "noise rounds away and the chain does not sample its target; keep the parameters in "
                        "float32 for the sampler, or raise lr",
                        UserWarning,
                        stacklevel=4,
                    )

    @staticmethod
    def _gather(index: int, group: dict[str, Any]) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
        """The group's parameters that have a gradient, their gradients and masks."""
        params = group["params"]
        grads = [p.grad for p in params]
        mask = group["mask"]
        if any(map(operator.is_, grads, repeat(None))):
            keep = [i for i, g in enumerate(grads) if g is not None]
            params = [params[i] for i in keep]
            grads = [grads[i] for i in keep]
            mask = None if mask is None else [mask[i] for i in keep]
        return params, grads, mask

    def _refusal(self, error: NonFiniteError, work: list[tuple], steps: list[Step]) -> NonFiniteError:
        """The error of a refused step, naming the parameter and what was wrong."""
        for (index, group, params, *_), step in zip(work, steps):
            if any(task is error.task for task in step[0]):
                param = params[error.index]
                position = next(i for i, p in enumerate(group["params"]) if p is param)
                names = group.get("param_names")
                name = f"{names[position]!r} " if names else ""
                where = f"parameter {name}(param_groups[{index}]['params'][{position}], shape {tuple(param.shape)})"
                if error.kind == "gradient":
                    text = f"the gradient of {where} holds NaN or Inf"
                else:
                    text = (f"the update of {where} would not be finite (its gradient is finite; lr={group['lr']:g} "
                            "makes the step overflow, or the parameter or its state is already huge)")
                return NonFiniteError(position, f"step() refused: {text}; no parameter was changed", error.kind)
        return error

    # ------------------------------------------------------------------- helpers for samplers

    @staticmethod
    def grad_scale(group: dict[str, Any]) -> float:
        """The factor on the gradient: ``nbeta`` if given, else ``1 / temperature`` (1 if neither)."""
        if group.get("nbeta") is not None:
            return float(group["nbeta"])
        if group.get("temperature") is not None:
            return 1.0 / group["temperature"]
        return 1.0

    def anchors(self, group: dict[str, Any], params: list[Tensor]) -> list[Tensor] | None:
        """:math:`\theta_0` for ``params``, kept only when an option needs it, captured at the
        first step that needs it."""
        if not (group["localization"] or group["bounding_box_size"] is not None or self.track_diagnostics):
            return None
        anchors = []
        for p in params:
            state = self.state[p]
            anchor = state.get("anchor")
            if anchor is None:
                anchor = state["anchor"] = p.detach().clone(memory_format=torch.preserve_format)
                self._remember_fresh(state, "anchor")
            anchors.append(anchor)
        return anchors

    def update_options(self, group: dict[str, Any], params: list[Tensor], masks: list[Tensor] | None,
                       diagnostics: Diagnostics | None) -> dict[str, Any]:
        """The keyword arguments every step function of :mod:`pyro_sgmcmc.functional` takes,
        for ``params`` of ``group``: the common target options and the sampler's plans."""
        return dict(
            grad_scale=self.grad_scale(group),
            localization=group["localization"],
            weight_decay=group["weight_decay"],
            noise_level=group["noise_level"],
            anchors=self.anchors(group, params),
            masks=masks,
            bounding_box_size=group["bounding_box_size"],
            foreach=self.foreach,
            noise_plans=self._noise_plans,
            diagnostics=diagnostics,
            grads_checked=True,  # p.grad, or autograd.grad of the parameters: torch checked them
        )

    @staticmethod
    def _then(step: Step, after: Callable[[], None]) -> Step:
        """``step``, with ``after()`` run once its own ``post`` has (e.g. detaching the sampler's
        state after a differentiable step)."""
        tasks, post = step

        def post_then_after(results: list[list]) -> None:
            if post is not None:
                post(results)
            after()

        return tasks, post_then_after

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        masks: list[Tensor] | None,
        diagnostics: Diagnostics | None,
        targets: list[Tensor] | None = None,
    ) -> Step:
        """The sampler's update of one group, as a :class:`~pyro_sgmcmc.functional._step.Step`
        (``params`` are those with a gradient; the new values go into ``targets`` if given, else
        into ``params``). State made for it (a first momentum, an anchor) is registered with
        :meth:`_remember_fresh`, so a refused step can drop it."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state, the sampler's kind (``"sampler"``) and the state of the noise
        (streams and the given generator). The CPU streams are seeded here if no step has done
        it yet, so that a checkpoint taken before the first step resumes exactly."""
        if any(p.device.type == "cpu" for group in self.param_groups for p in group["params"]):
            self._noise.streams()
        state = super().state_dict()
        state["sampler"] = type(self).__name__
        state["noise_state"] = self._noise.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, generator state included, so that the chain
        continues exactly as it would have. A state that does not fit is refused with a
        ``ValueError`` before anything changes: another sampler's, options out of range, groups
        or state tensors that do not match the parameters, noise streams of the wrong number or
        size. A state without noise streams (e.g. a plain torch optimizer's layout) loads with a
        warning: the noise then does not continue exactly. Group tensors (masks, thermostats)
        move to the parameters' device. A mask tensor the group already holds keeps its identity
        (the saved values are copied into it), so a caller that rewrites its mask in place (e.g.
        :meth:`pyro_sgmcmc.infer.AutoUnconstrainedDelta.local_options`) still drives the group."""
        self.check_state_dict(state_dict)
        self._check_state_fits(state_dict)
        state_dict = dict(state_dict)
        state_dict.pop("sampler", None)
        noise_state = state_dict.pop("noise_state", None)
        if noise_state is None:
            warnings.warn("the state has no noise_state: the chain continues, but its noise is not the one the "
                          "saved run would have drawn (save with state_dict() of a pyro_sgmcmc sampler)",
                          UserWarning, stacklevel=2)
        held = [group.get("mask") for group in self.param_groups]
        super().load_state_dict(state_dict)
        for i, loaded in enumerate(self.param_groups):
            group = ParamGroup({"params": loaded["params"]}, type(self))
            group.update(loaded)
            self._after_load(group)
            group["mask"] = _keep_mask_tensors(held[i] if i < len(held) else None, group["mask"])
            self.param_groups[i] = group
        if noise_state is not None:
            self._noise.load_state_dict(noise_state)
            if self.distributed == "sharded":
                self._first_step = False  # the loaded streams are the saved run's: nothing to warn of

    @classmethod
    def check_state_dict(cls, state_dict: Any) -> None:
        """Refuse, with a ``ValueError`` that says what is wrong, a state that is not one of this
        sampler class's: another sampler's (by its ``"sampler"`` entry or its options), options
        out of range, step counts that are not counts, noise streams of the wrong number or
        size. What depends on the parameters is checked by :meth:`load_state_dict`."""
        name = cls.__name__
        if not isinstance(state_dict, Mapping) or not isinstance(state_dict.get("param_groups"), list) \
                or not isinstance(state_dict.get("state"), Mapping):
            raise ValueError(f"Invalid state_dict: {type(state_dict).__name__} (must be the result of state_dict() "
                             "of a pyro_sgmcmc sampler: a dict with 'state' and 'param_groups')")
        kind = state_dict.get("sampler")
        if kind is not None and kind != name:
            raise ValueError(f"Invalid state_dict: it is the state of a {kind} sampler; this is a {name} "
                             f"(load it into a {kind})")
        for i, saved in enumerate(state_dict["param_groups"]):
            if not isinstance(saved, Mapping):
                raise ValueError(f"Invalid state_dict: param_groups[{i}] is a {type(saved).__name__} (must be a dict)")
            missing = sorted(key for key in cls.OPTION_CHECKS if key not in saved)
            foreign = sorted(key for key in _all_options() if key in saved and key not in cls.OPTION_CHECKS)
            if missing or foreign:
                owner = _owner_of(saved)
                raise ValueError(
                    f"Invalid state_dict: param_groups[{i}] is not a {name} group ("
                    + (f"missing {missing}" if missing else "") + (", " if missing and foreign else "")
                    + (f"with {foreign}" if foreign else "") + ")"
                    + (f"; it is the state of a {owner} sampler" if owner else ""))
            group = ParamGroup({}, cls)
            try:
                for key in cls.OPTION_CHECKS:
                    if key != "mask":
                        group[key] = saved[key]
                check_integer("step", saved.get("step", 0))
            except ValueError as error:
                raise ValueError(f"{error} [in param_groups[{i}] of the state_dict]") from None
        noise_state = state_dict.get("noise_state")
        if noise_state is not None:
            _check_noise_state(noise_state)

    def _check_state_fits(self, state_dict: Mapping[str, Any]) -> None:
        """What :meth:`check_state_dict` cannot check without the parameters."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups):
            raise ValueError(f"Invalid state_dict: it has {len(groups)} parameter groups, this sampler "
                             f"{len(self.param_groups)}")
        params = []
        for i, (saved, group) in enumerate(zip(groups, self.param_groups)):
            if len(saved.get("params", ())) != len(group["params"]):
                raise ValueError(f"Invalid state_dict: param_groups[{i}] has {len(saved.get('params', ()))} parameters, "
                                 f"this sampler's {len(group['params'])}")
            try:
                check_mask("mask", saved.get("mask"), group["params"])
                self._check_group_state(saved)
            except ValueError as error:
                raise ValueError(f"{error} [in param_groups[{i}] of the state_dict]") from None
            params.extend(zip(saved["params"], group["params"]))
        by_id = dict(params)
        for key, entries in state_dict["state"].items():
            param = by_id.get(key)
            if param is None or not isinstance(entries, Mapping):
                raise ValueError(f"Invalid state_dict: state[{key!r}] belongs to no parameter of its param_groups")
            for entry, value in entries.items():
                if not isinstance(value, Tensor) or value.dim() == 0:
                    continue
                if value.shape != param.shape:
                    raise ValueError(f"Invalid state_dict: state[{key!r}][{entry!r}] has shape {tuple(value.shape)}, "
                                     f"its parameter {tuple(param.shape)}")
                if value.is_floating_point() and bool(torch.isnan(value).any()):
                    raise ValueError(f"Invalid state_dict: state[{key!r}][{entry!r}] holds NaN")

    def _check_group_state(self, saved: Mapping[str, Any]) -> None:
        """Check the sampler's own per-group state in a saved group (e.g. a thermostat)."""

    def _after_load(self, group: dict[str, Any]) -> None:
        """Per-group state after loading (e.g. a thermostat moved to the parameters' device)."""


def _fsdp_kind(p: Tensor) -> str | None:
    """What FSDP (or another sharding of ``torch.distributed``) made of ``p``, or ``None`` for a
    plain tensor: FSDP2's ``fully_shard`` turns parameters into DTensors; FSDP1 hands the
    optimizer its ``FlatParameter`` or, with ``use_orig_params=True``, views into one, which it
    marks ``_fsdp_flattened``."""
    if getattr(p, "_fsdp_flattened", False) or any(c.__name__ == "FlatParameter" for c in type(p).__mro__):
        return "a parameter flattened by FSDP (FullyShardedDataParallel): FSDP is not supported"
    if type(p) in (Tensor, torch.nn.Parameter) or not torch.distributed.is_available():
        return None
    DTensor = _dtensor_class()
    if DTensor is not None and isinstance(p, DTensor):
        return "a DTensor: DTensor parameters are not supported (FSDP2, tensor parallelism)"
    return None


def _dtensor_class() -> type | None:
    """``torch.distributed``'s DTensor class: public from torch 2.5, private before (``None`` if absent)."""
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:
            from torch.distributed._tensor import DTensor
        except ImportError:
            return None
    return DTensor


def _all_options() -> set[str]:
    """The group options of every sampler class."""
    options: set[str] = set()
    for cls in _samplers():
        options.update(cls.OPTION_CHECKS)
    return options


def _samplers() -> list[type[SGMCMCOptimizer]]:
    found, todo = [], [SGMCMCOptimizer]
    while todo:
        for sub in todo.pop().__subclasses__():
            found.append(sub)
            todo.append(sub)
    return found


def _owner_of(saved: Mapping[str, Any]) -> str | None:
    """The sampler class whose options a saved group has (the most specific one), if any."""
    owners = [cls for cls in _samplers() if all(key in saved for key in cls.OPTION_CHECKS)]
    return max(owners, key=lambda cls: len(cls.OPTION_CHECKS)).__name__ if owners else None


def _check_noise_state(noise_state: Any) -> None:
    """The noise state of a state_dict: as many streams as a sampler draws from, each a
    generator state."""
    from ..functional import NUM_STREAMS

    size = torch.Generator().get_state().numel()
    if not isinstance(noise_state, Mapping):
        raise ValueError(f"Invalid state_dict: noise_state is a {type(noise_state).__name__} (must be a dict)")
    streams = noise_state.get("streams")
    if streams is not None:
        if not isinstance(streams, (list, tuple)) or len(streams) != NUM_STREAMS:
            raise ValueError(f"Invalid state_dict: noise_state['streams'] holds "
                             f"{len(streams) if hasattr(streams, '__len__') else streams!r} streams (must be "
                             f"{NUM_STREAMS} generator states, or None)")
        for i, stream in enumerate(streams):
            if not (isinstance(stream, Tensor) and stream.dtype == torch.uint8 and stream.numel() == size):
                raise ValueError(f"Invalid state_dict: noise stream {i} is not a CPU generator state "
                                 f"(must be a uint8 tensor of {size} entries)")
    generator = noise_state.get("generator")
    if generator is not None and not (isinstance(generator, Tensor) and generator.dtype == torch.uint8):
        raise ValueError("Invalid state_dict: noise_state['generator'] is not a generator state (a uint8 tensor)")


def _keep_mask_tensors(held: list[Tensor | None] | None, loaded: list[Tensor | None] | None
                       ) -> list[Tensor | None] | None:
    """``loaded``'s mask values in the tensors of ``held`` where both have one of the same shape."""
    if held is None or loaded is None or len(held) != len(loaded):
        return loaded
    out = []
    for old, new in zip(held, loaded):
        if old is not None and new is not None and old.shape == new.shape:
            with torch.no_grad():
                old.copy_(new)
            new = old
        out.append(new)
    return out
