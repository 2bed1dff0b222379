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
from itertools import chain, repeat
from typing import Any, Callable, Iterable

import torch
from torch import Tensor
from torch.optim import Optimizer

from ..functional import Diagnostics, NoisePlanCache, NoiseSource, NonFiniteError, check_finite
from .._validation import check_number, is_number
from ._mala import MalaTracker

#: Options that may be given as a callable ``step -> float`` (``step`` counts the group's steps).
SCHEDULABLE = ("lr", "temperature", "nbeta")


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

    Optimizer-wide options:

    :param generator: the root ``torch.Generator`` of the noise (default: torch's global
        generator, so ``torch.manual_seed`` / ``pyro.set_rng_seed`` before the first step make a
        run reproducible). On the CPU the noise is drawn by a few streams seeded from it at the
        first step, in parallel (see :class:`~pyro_sgmcmc.functional.NoiseSource`); their states,
        and the generator's, are saved in ``state_dict()`` and restored by ``load_state_dict()``.
    :param foreach: ``True`` for the multi-tensor path, ``False`` for the per-tensor loop, ``None``
        (default) for the multi-tensor path wherever it is supported. Both give the same numbers.
    :param diagnostics: if true, each ``step()`` leaves the norms of the parts of its update in
        :attr:`step_diagnostics`; off, it costs nothing. For the Langevin samplers (SGLD,
        PSGLD), when the step knows the potential (``step(closure)`` or ``step(loss=U)``), it also
        leaves ``mala_acceptance``: the probability with which MALA would have accepted the
        previous step (:mod:`pyro_sgmcmc.functional.mala`), and :attr:`mala_acceptance_mean`
        averages it over the steps scored. ``diagnostics="mala"`` keeps only that score (what
        the MCMC kernels use: a fraction of the cost of the norms on a small model).
    """

    #: Whether a step is a draw from a Langevin proposal (so MALA's acceptance can score it).
    langevin = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        defaults: dict[str, Any],
        *,
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        diagnostics: bool | str = False,
    ) -> None:
        if diagnostics not in (True, False, "mala"):
            raise ValueError(f"Invalid diagnostics: {diagnostics!r} (must be True, False or 'mala')")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"Invalid generator: {generator!r} (must be a torch.Generator or None)")
        if foreach not in (None, True, False):
            raise ValueError(f"Invalid foreach: {foreach!r} (must be True, False or None)")
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
        defaults = {"mask": None, **defaults}
        super().__init__(params, defaults)

    # ---------------------------------------------------------------- groups and validation

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a group, validating its options (see the class docstring) with clear errors."""
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        try:
            self._schedules.append(self._extract_schedules(group))
            self._validate_group(group)
            group["mask"] = self._validate_mask(group)
            group.setdefault("step", 0)
            self._init_group(group)
        except Exception:
            self.param_groups.pop()
            if len(self._schedules) > len(self.param_groups):
                self._schedules.pop()
            raise

    def _extract_schedules(self, group: dict[str, Any]) -> dict[str, Callable[[int], float]]:
        """Move callable options out of the group (so ``state_dict()`` stays picklable) and put
        their value at the group's current step in their place."""
        schedules = {}
        for key in SCHEDULABLE:
            if callable(group.get(key)):
                schedules[key] = group[key]
                group[key] = self._evaluate(key, group[key], group.get("step", 0))
        return schedules

    @staticmethod
    def _evaluate(key: str, schedule: Callable[[int], float], step: int) -> float:
        value = schedule(step)
        if isinstance(value, Tensor):
            value = value.item()
        if not is_number(value):
            raise ValueError(f"Invalid {key} schedule: returned {value!r} at step {step} (must return a number)")
        return float(value)

    def _validate_group(self, group: dict[str, Any]) -> None:
        """Check the common options; subclasses extend this for their own."""
        self._validate_scheduled(group)
        if group.get("temperature") is not None and group.get("nbeta") is not None:
            raise ValueError(
                f"Give either temperature or nbeta, not both (got temperature={group['temperature']!r}, "
                f"nbeta={group['nbeta']!r}): nbeta multiplies the gradient of a mean-reduced loss, "
                "temperature divides the gradient of a summed one"
            )
        check_number("localization", group["localization"], allow_low=True)
        check_number("weight_decay", group["weight_decay"], allow_low=True)
        check_number("noise_level", group["noise_level"], allow_low=True)
        check_number("bounding_box_size", group["bounding_box_size"], none_ok=True)
        if group["noise_level"] != 1.0:
            warnings.warn(
                f"noise_level={group['noise_level']} is not 1: the sampler no longer samples its target "
                "distribution (use temperature to change the spread of the posterior)",
                UserWarning,
                stacklevel=4,
            )
        if self.generator is not None:
            for i, p in enumerate(group["params"]):
                if p.device.type != self.generator.device.type:
                    raise ValueError(
                        f"Invalid generator: it is on device {self.generator.device} but parameter {i} of "
                        f"group {len(self.param_groups) - 1} is on {p.device} (must be on the parameters' device)"
                    )

    @staticmethod
    def _validate_mask(group: dict[str, Any]) -> list[Tensor] | None:
        """The mask as one 0/1 tensor per parameter, in the parameter's dtype and device."""
        mask, params = group["mask"], group["params"]
        if mask is None:
            return None
        if isinstance(mask, Tensor):
            mask = [mask]
        if not isinstance(mask, (list, tuple)) or len(mask) != len(params):
            raise ValueError(
                f"Invalid mask: expected a list of {len(params)} tensors (one per parameter of the group, "
                f"or None), got {type(mask).__name__}" + (f" of length {len(mask)}" if hasattr(mask, "__len__") else "")
            )
        out = []
        for i, (m, p) in enumerate(zip(mask, params)):
            if m is None:
                out.append(torch.ones_like(p, memory_format=torch.contiguous_format).detach())
                continue
            m = torch.as_tensor(m)
            if m.shape != p.shape:
                raise ValueError(
                    f"Invalid mask[{i}]: shape {tuple(m.shape)} does not match its parameter's shape {tuple(p.shape)}"
                )
            m = m.to(device=p.device, dtype=p.dtype)
            if not bool(((m == 0) | (m == 1)).all()):
                raise ValueError(f"Invalid mask[{i}]: entries must be 0/1 or boolean")
            out.append(m)
        return out

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

    def reset_auxiliary(self) -> None:
        """Put auxiliary variables (momenta, thermostats) back to their initial law, leaving the
        parameters where they are. Samplers without any do nothing. MCMC kernels call this at the
        end of warmup."""

    def freeze_adaptation(self) -> None:
        """Stop any adaptation inside the sampler (e.g. PSGLD's preconditioner), so that from here
        on it is a fixed-parameter Markov chain. Samplers that adapt nothing do nothing. MCMC
        kernels call this at the end of warmup."""

    # ------------------------------------------------------------------------------ step

    @_step_with_hooks  # and autograd off
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Tensor | float | None = None) -> Any:
        """Take one sampling step with the gradients in ``p.grad``.

        :param closure: optional, re-evaluates the model and returns the loss (as in torch).
        :param loss: optional, the potential ``U`` at the current parameters (the loss whose
            gradient is in ``p.grad``), for the MALA diagnostic when a closure does not give it.
        :raises NonFiniteError: if a gradient holds NaN or Inf, naming the parameter; nothing is
            changed then.
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
        return loss

    @property
    def mala_acceptance_mean(self) -> float:
        """The MALA acceptance probability averaged over the steps scored so far (NaN if none;
        see ``diagnostics``)."""
        return self._mala.mean

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
        return float(group["noise_level"]) ** 2

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
        # fresh noise buffers: the update may carry autograd history, which must not reach the
        # buffers that later steps refill in place
        plans, self._noise_plans = self._noise_plans, NoisePlanCache()
        try:
            self._run(work)
        finally:
            self._noise_plans = plans

    def _apply_schedules(self, index: int, group: dict[str, Any]) -> None:
        schedules = self._schedules[index]
        if schedules:
            for key, schedule in schedules.items():
                group[key] = self._evaluate(key, schedule, group["step"])
            self._validate_scheduled(group)

    def _run(self, work: list[tuple]) -> None:
        """Update every group of ``work``, all or nothing as far as finiteness goes."""
        if not work:
            return
        check_each = len(work) == 1  # else: all gradients are checked here, before any update
        if not check_each:
            self._check_all([w[3] for w in work], [w[:3] for w in work])
        diagnostics = Diagnostics() if self.track_diagnostics else None
        for index, group, params, grads, masks, targets in work:
            try:
                self._update_group(group, params, grads, masks, check_each, diagnostics, targets)
            except NonFiniteError as error:
                raise self._named_error(index, group, params[error.index]) from None
            group["step"] += 1
        if diagnostics is not None:
            self.step_diagnostics = diagnostics.result()

    def _validate_scheduled(self, group: dict[str, Any]) -> None:
        """The options a schedule may set: checked when the group is added and at every step."""
        check_number("lr", group["lr"], allow_low=True)
        check_number("temperature", group.get("temperature"), none_ok=True)
        check_number("nbeta", group.get("nbeta"), none_ok=True)

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

    def _check_all(self, grad_lists: list[list[Tensor]], where: list[tuple]) -> None:
        flat = [g for grads in grad_lists for g in grads]
        try:
            check_finite(flat)
        except NonFiniteError as error:
            offset = error.index
            for (index, group, params), grads in zip(where, grad_lists):
                if offset < len(grads):
                    raise self._named_error(index, group, params[offset]) from None
                offset -= len(grads)
            raise

    @staticmethod
    def _named_error(index: int, group: dict[str, Any], param: Tensor) -> NonFiniteError:
        position = next(i for i, p in enumerate(group["params"]) if p is param)
        names = group.get("param_names")
        name = f"{names[position]!r} " if names else ""
        return NonFiniteError(
            position,
            f"step() refused: the gradient of parameter {name}(param_groups[{index}]['params'][{position}], "
            f"shape {tuple(param.shape)}) holds NaN or Inf; no parameter was changed",
        )

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
        """:math:`\\theta_0` for ``params``, kept only when an option needs it, captured at the
        first step that needs it."""
        if not (group["localization"] or group["bounding_box_size"] is not None or self.track_diagnostics):
            return None
        anchors = []
        for p in params:
            state = self.state[p]
            anchor = state.get("anchor")
            if anchor is None:
                anchor = state["anchor"] = p.detach().clone(memory_format=torch.preserve_format)
            anchors.append(anchor)
        return anchors

    def update_options(self, group: dict[str, Any], params: list[Tensor], masks: list[Tensor] | None,
                       check_finite: bool, diagnostics: Diagnostics | None) -> dict[str, Any]:
        """The keyword arguments every update function of :mod:`pyro_sgmcmc.functional` takes,
        for ``params`` of ``group``: the common target options and the sampler's noise state."""
        return dict(
            grad_scale=self.grad_scale(group),
            localization=group["localization"],
            weight_decay=group["weight_decay"],
            noise_level=group["noise_level"],
            anchors=self.anchors(group, params),
            masks=masks,
            bounding_box_size=group["bounding_box_size"],
            noise=self._noise,
            foreach=self.foreach,
            noise_plans=self._noise_plans,
            check_finite=check_finite,
            diagnostics=diagnostics,
            grads_checked=True,  # p.grad, or autograd.grad of the parameters: torch checked them
        )

    def _update_group(
        self,
        group: dict[str, Any],
        params: list[Tensor],
        grads: list[Tensor],
        masks: list[Tensor] | None,
        check_finite: bool,
        diagnostics: Diagnostics | None,
        targets: list[Tensor] | None = None,
    ) -> None:
        """Apply the sampler's update to one group (``params`` are those with a gradient; the
        new values go into ``targets`` if given, else into ``params``)."""
        raise NotImplementedError

    # ------------------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """torch's optimizer state plus the state of the noise (streams and the given generator)."""
        state = super().state_dict()
        state["noise_state"] = self._noise.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved, generator state included, so that the chain
        continues exactly as it would have. Group tensors (masks, thermostats) move to the
        parameters' device."""
        state_dict = dict(state_dict)
        noise_state = state_dict.pop("noise_state", None)
        super().load_state_dict(state_dict)
        if noise_state is not None:
            self._noise.load_state_dict(noise_state)
        for group in self.param_groups:
            self._after_load(group)

    def _after_load(self, group: dict[str, Any]) -> None:
        if group.get("mask") is not None:
            group["mask"] = [m.to(device=p.device, dtype=p.dtype) for m, p in zip(group["mask"], group["params"])]
