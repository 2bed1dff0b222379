"""Pyro adapters: any torch sampler of :mod:`pyro_sgmcmc.samplers` as a Pyro optimizer.

``pyro_sgmcmc.optim.SGLD({"lr": 1e-4})`` is accepted wherever ``pyro.optim.Adam({...})`` is
(``SVI``, ``MixedMultiOptimizer``) and is a :class:`~pyro.optim.multi.MultiOptimizer` too. It owns
no math: it routes parameters into one torch sampler and steps it.

Unlike Pyro's stock :class:`~pyro.optim.optim.PyroOptim`, which builds one torch optimizer per
tensor and steps them in the order of a Python ``set``, all parameters of a step are updated by
one sampler, together, in the order of their param-store names. So the multi-tensor path spans the
whole model, an SGNHT thermostat is shared by a parameter group, and a run draws the same noise
every time (and again after a save and load).
"""

from __future__ import annotations

import inspect
import warnings
from collections.abc import Hashable, Mapping
from typing import Any, Callable, Iterable

import pyro
import pyro.infer.autoguide as autoguide
import torch
from pyro.distributions import constraints
from pyro.optim.multi import MultiOptimizer
from pyro.optim.optim import PyroOptim
from pyro.params.param_store import module_from_param_with_module_name, normalize_param_name, user_param_name
from torch import Tensor

from .. import samplers
from .._validation import check_callable, check_choice, check_instance, check_mapping, check_number, check_options
from ..functional import NonFiniteError
from ..functional.distributed import Ranks, average, check_process_group, check_replicas
from ..samplers import SGMCMCOptimizer

OptimArgs = dict[str, Any] | Callable[..., dict[str, Any]]


class SGMCMCPyroOptim(PyroOptim, MultiOptimizer):
    """Wraps a torch sampler class for Pyro (see the module docstring).

    :param sampler_constructor: a subclass of :class:`~pyro_sgmcmc.samplers.SGMCMCOptimizer`.
    :param optim_args: the sampler's options as a dict, or a callable of the parameter name
        (``fn(name)`` or ``fn(module_name, param_name)``, as in Pyro) returning such a dict, for
        per-parameter step sizes, temperatures, localization... ``lr=0`` freezes a parameter.
        A misspelt option is refused with the closest valid one. ``mask`` is per parameter: the
        parameter's own 0/1 mask (a tensor or a nested list shaped like it).
    :param clip_args: ``clip_norm`` and/or ``clip_value`` (a dict or a callable, as in Pyro),
        applied to each parameter's gradient before the step.
    :param generator: optional root ``torch.Generator`` of the noise.
    :param foreach: passed to the sampler.
    :param diagnostics: passed to the sampler; read them from ``.sampler.step_diagnostics``.
    :param distributed: ``None``, ``"replicated"`` (data sharded across ranks: see below) or
        ``"independent"`` (a chain of its own on each rank, on purpose: silences the sampler's
        warning when several ranks run).
    :param process_group: the ``torch.distributed`` group (default: the default group).
    :param noise_ahead: passed to the sampler (samplers that offer it: SGLD).
    :param fused: passed to the sampler (samplers that offer it: SGLD; CUDA only, and not with
        ``get_step``, which differentiates the step).

    These keyword options concern the whole optimizer: given as keys of ``optim_args`` they are
    refused (naming the keyword to use), never taken for a parameter group's option.

    Parameters seen for the first time in a step join the sampler as a new parameter group
    (one per distinct set of options). Tensors outside Pyro's param store (``optimizer([a, b])``,
    as ``PyroOptim`` allows) are named ``<tensor 0>``, ``<tensor 1>``... in the order first seen.
    ``get_state()``/``save()`` hold the sampler's whole state (noise streams included) and its
    group layout by parameter name, so ``set_state()``/``load()`` into a fresh wrapper continue
    the chain bit for bit; ``load()`` reads with ``torch.load(weights_only=True)``, so it runs no
    code from the file, and ``set_state()`` refuses another sampler's state or options out of range
    at once.

    A refused step (:class:`~pyro_sgmcmc.functional.NonFiniteError`: a NaN or Inf gradient, or an
    update that would not be finite) changes nothing, and zeroes the gradients of the step's
    parameters, as ``SVI`` does after every step it completes: the exception propagates, and the
    next ``svi.step()`` starts from clean gradients.

    ``distributed="replicated"``: one chain over the ranks of ``torch.distributed``, each rank
    with a shard of the data. Each rank's model is the potential as its shard estimates it (the
    prior once, the shard's likelihood scaled by the number of ranks), so that the average of the
    ranks' gradients, taken here before each step (one all-reduce), is the full gradient; the
    sampler adds the same noise on every rank (``distributed="replicated"`` of
    :mod:`pyro_sgmcmc.samplers`), so every rank holds the same parameters. New parameters must
    start equal on every rank (seed every rank alike before the first step: Pyro's
    initialisations draw at random), else
    :class:`~pyro_sgmcmc.functional.distributed.ReplicaMismatchError` names the first that
    differs. Not with :meth:`get_step`. ``process_group``: the group (default: the default group).

    Stepping a guide that is not a point mass (``AutoNormal``, ``AutoDiagonalNormal``...), or
    Pyro's ``AutoDelta`` with constrained sites (its loss lacks the change of variables), warns:
    use :class:`~pyro_sgmcmc.infer.AutoUnconstrainedDelta`.
    """

    def __init__(
        self,
        sampler_constructor: type[SGMCMCOptimizer],
        optim_args: OptimArgs,
        clip_args: OptimArgs | None = None,
        *,
        generator: torch.Generator | None = None,
        foreach: bool | None = None,
        diagnostics: bool | str = False,
        distributed: str | None = None,
        process_group: Any = None,
        noise_ahead: bool = False,
        fused: bool | None = None,
    ) -> None:
        if not (isinstance(sampler_constructor, type) and issubclass(sampler_constructor, SGMCMCOptimizer)):
            raise TypeError(
                f"Invalid sampler_constructor: {sampler_constructor!r} (must be a pyro_sgmcmc sampler class, "
                "e.g. pyro_sgmcmc.samplers.SGLD)"
            )
        if not (callable(optim_args) or isinstance(optim_args, Mapping)):
            raise TypeError(f"Invalid optim_args: {optim_args!r} (must be a dict or a callable returning one)")
        if clip_args is not None and not (callable(clip_args) or isinstance(clip_args, Mapping)):
            raise TypeError(f"Invalid clip_args: {clip_args!r} (must be a dict, a callable returning one, or None)")
        check_instance("generator", generator, torch.Generator, what="a torch.Generator", none_ok=True)
        check_choice("foreach", foreach, (None, True, False))
        check_choice("diagnostics", diagnostics, (True, False, "mala"))
        check_choice("distributed", distributed, (None, "replicated", "independent"))
        check_process_group(process_group, distributed, ("replicated",))
        check_choice("noise_ahead", noise_ahead, (False, True))
        check_choice("fused", fused, (None, True, False))
        offered = inspect.signature(sampler_constructor.__init__).parameters
        for name, value, lacks in (("noise_ahead", noise_ahead, "does not draw its noise ahead"),
                                   ("fused", fused, "has no fused step")):
            if value and name not in offered:
                raise ValueError(f"Invalid {name}: True, but {sampler_constructor.__name__} {lacks} (samplers that "
                                 "do: SGLD)")
        self._accepted = _group_options(sampler_constructor)
        self._where = f"{type(self).__module__.split('.')[0]}.optim.{sampler_constructor.__name__}"
        if not callable(optim_args):
            optim_args = dict(optim_args)
            self._check_options(optim_args)
        if clip_args is not None and not callable(clip_args):
            clip_args = dict(clip_args)
            _check_clip_args(clip_args)
        super().__init__(sampler_constructor, optim_args, clip_args)
        self.sampler_options = dict(generator=generator, foreach=foreach, diagnostics=diagnostics,
                                    distributed=distributed, process_group=process_group)
        if noise_ahead:
            self.sampler_options["noise_ahead"] = True
        if fused:  # only SGLD takes it (checked above); False and None are every sampler's default step
            self.sampler_options["fused"] = True
        self._ranks: Ranks | None = None
        self.sampler: SGMCMCOptimizer | None = None
        self._by_name: dict[str, Tensor] = {}
        self._unnamed: dict[int, tuple[Tensor, str]] = {}
        self._clips: dict[str, dict[str, float] | None] = {}
        self._saved: dict[str, Any] | None = None
        self._warned_pending = False
        self._frozen = False

    def _check_options(self, options: Mapping[str, Any]) -> None:
        check_options(options, self._accepted, self._where, hints={
            key: f"it is an option of the Pyro optimizer itself: {self._where}(optim_args, {key}=...)"
            for key in _OPTIMIZER_WIDE})

    def freeze_adaptation(self) -> None:
        """Stop the sampler's own adaptation (PSGLD's preconditioner), now and for parameters
        that join later: from here on a fixed-parameter chain. :func:`~pyro_sgmcmc.infer.run_svi`
        calls this at the end of the collector's burn-in."""
        self._frozen = True
        if self.sampler is not None:
            self.sampler.freeze_adaptation()

    # ------------------------------------------------------------------------------ stepping

    def __call__(self, params: Iterable[Tensor], *args: Any, **kwargs: Any) -> None:
        """Take one sampling step for ``params`` (the unconstrained tensors of the param store,
        as ``SVI`` passes them; tensors outside it are stepped too, see the class docstring)."""
        store = pyro.get_param_store()
        named = {}
        for p in params:
            name = store.param_name(p)
            named[self._unnamed_name(p) if name is None else name] = p
        self._step_named(named)

    def _unnamed_name(self, tensor: Tensor) -> str:
        known = self._unnamed.get(id(tensor))
        if known is None:
            known = self._unnamed[id(tensor)] = (tensor, f"<tensor {len(self._unnamed)}>")  # held: ids stay unique
        return known[1]

    def step(self, loss: Tensor, params: dict[str, Tensor]) -> None:
        """:class:`~pyro.optim.multi.MultiOptimizer` step: differentiate ``loss`` and take one
        sampling step for the named ``params``."""
        values = list(params.values())
        grads = torch.autograd.grad(loss, values)
        for value, grad in zip(values, grads):
            value.grad = grad
        self._step_named(params)

    def get_step(self, loss: Tensor, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """The updated values of ``params`` after one sampling step, differentiable in ``params``
        (the noise is a reparameterised draw). The sampler's state (momenta, thermostats, step
        counts, noise streams) advances as in :meth:`step`; ``params`` themselves are unchanged."""
        if self.sampler_options["distributed"] == "replicated":
            raise ValueError("Invalid distributed: get_step (a differentiable step) is not supported with "
                             "distributed='replicated'; use step")
        values = list(params.values())
        grads = torch.autograd.grad(loss, values, create_graph=True)
        names = sorted(params)
        self._register(names, params)
        order = {name: i for i, name in enumerate(params)}
        targets = {params[name]: params[name].clone() for name in names}
        by_param = {params[name]: self._clipped(name, grads[order[name]]) for name in names}
        self.sampler.step_tensors(targets, by_param)
        return {name: targets[params[name]] for name in params}

    def _step_named(self, named: dict[str, Tensor]) -> None:
        names = sorted(named)
        self._register(names, named)
        if self._saved is not None and not self._warned_pending:
            self._warn_pending(names)
        stepping = {id(named[name]) for name in names}
        if self._ranks is not None:  # the ranks' gradients, averaged: the full gradient
            average([named[name].grad for name in names if named[name].grad is not None], self._ranks)
        if self.pt_clip_args:
            with torch.no_grad():
                for name in names:
                    p = named[name]
                    if p.grad is not None:
                        p.grad.copy_(self._clipped(name, p.grad))
        # Parameters the sampler knows but this step does not carry must not move (SVI leaves
        # zeroed gradients on them, which would let the noise drift them).
        hidden = []
        for group in self.sampler.param_groups:
            for p in group["params"]:
                if id(p) not in stepping and p.grad is not None:
                    hidden.append((p, p.grad))
                    p.grad = None
        try:
            self.sampler.step()
        except NonFiniteError:
            for name in names:  # what SVI does after a step: the next one starts clean
                p = named[name]
                if p.grad is not None:
                    p.grad = torch.zeros_like(p.grad)
            raise
        finally:
            for p, grad in hidden:
                p.grad = grad

    def _clipped(self, name: str, grad: Tensor) -> Tensor:
        """``grad`` clipped as ``clip_args`` asks for parameter ``name`` (as Pyro does: its
        norm to ``clip_norm``, then its entries to ``clip_value``); out of place."""
        if name not in self._clips:
            self._clips[name] = self._clip_args(name)
        clip = self._clips[name]
        if not clip:
            return grad
        if clip.get("clip_norm") is not None:
            norm = torch.linalg.vector_norm(grad.detach(), dtype=torch.float64)
            grad = grad * (clip["clip_norm"] / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype)
        if clip.get("clip_value") is not None:
            grad = grad.clamp(-clip["clip_value"], clip["clip_value"])
        return grad

    def _clip_args(self, name: str) -> dict[str, float] | None:
        if not self.pt_clip_args:
            return None
        if not callable(self.pt_clip_args):
            return self.pt_clip_args
        clip = self.pt_clip_args(module_from_param_with_module_name(name), user_param_name(name))
        check_mapping("clip_args", clip, what=f"a dict (the callable returned it for {name!r})")
        clip = dict(clip)
        _check_clip_args(clip)
        return clip

    # ------------------------------------------------------------------------------ layout

    def _register(self, names: list[str], named: dict[str, Tensor]) -> None:
        """Create the sampler, or add parameter groups, for parameters not seen before."""
        new = [name for name in names if self._by_name.get(name) is not named[name]]
        if not new:
            return
        for name in new:
            if name in self._by_name:
                raise RuntimeError(
                    f"Parameter {name!r} was replaced by a new tensor after the sampler started "
                    "(was the param store cleared?); make a new optimizer for a new run"
                )
        if self.sampler_options["distributed"] == "replicated":
            if self._ranks is None:
                self._ranks = Ranks.of(self.sampler_options["process_group"])
            # the first gradient was taken at each rank's values: they must be one point already
            check_replicas([named[name] for name in new], self._ranks, new)
        layout = self._saved["layout"] if self._saved is not None else None
        groups = self._groups_for(new, named, layout)
        if self.sampler is None:
            self.sampler = self.pt_optim_constructor(groups, **self.sampler_options)
        else:
            for group in groups:
                self.sampler.add_param_group(group)
        for name in new:
            self._by_name[name] = named[name]
        _check_guide(new)
        if self._saved is not None and self._layout() == self._saved["layout"]:
            self.sampler.load_state_dict(self._saved["sampler"])
            self._saved = None
        if self._frozen:
            self.sampler.freeze_adaptation()

    def _warn_pending(self, names: list[str]) -> None:
        missing = sorted({n for group in self._saved["layout"] for n in group} - set(self._by_name))
        self._warned_pending = True
        warnings.warn(
            "the state given to set_state()/load() is not applied: it is for parameters "
            f"{missing[:5]}{' ...' if len(missing) > 5 else ''} that this run has not had (is it the state of "
            "another model?); until they all appear, the sampler runs from a fresh state",
            UserWarning,
            stacklevel=4,
        )

    def _groups_for(self, names: list[str], named: dict[str, Tensor], layout: list[list[str]] | None) -> list[dict]:
        """Groups for new parameters: the saved layout where there is one, else one group per
        distinct set of options, in name order. Each parameter's ``mask`` joins its group's list."""
        options = {name: self._options(name) for name in names}
        if layout is not None:
            known = set(names)
            plan = [[n for n in group if n in known] for group in layout]
            placed = {n for group in plan for n in group}
            plan = [group for group in plan if group] + [[n] for n in names if n not in placed]
        else:
            plan, keys = [], {}
            for name in names:
                key = _options_key(options[name])
                if key not in keys:
                    keys[key] = len(plan)
                    plan.append([])
                plan[keys[key]].append(name)
        groups = []
        for group in plan:
            shared = {k: v for k, v in options[group[0]].items() if k != "mask"}
            masks = [options[n].get("mask") for n in group]
            if any(m is not None for m in masks):
                shared["mask"] = masks
            groups.append({"params": [(n, named[n]) for n in group], **shared})
        return groups

    def _layout(self) -> list[list[str]]:
        return [list(group["param_names"]) for group in self.sampler.param_groups]

    def _options(self, name: str) -> dict[str, Any]:
        if not callable(self.pt_optim_args):
            return dict(self.pt_optim_args)
        if self.pt_optim_args_argc == 1:
            options = self.pt_optim_args(normalize_param_name(name))
        else:
            options = self.pt_optim_args(module_from_param_with_module_name(name), user_param_name(name))
        if not isinstance(options, Mapping):
            raise TypeError(f"Invalid optim_args: the callable returned {options!r} for {name!r} (must return a dict)")
        options = dict(options)
        self._check_options(options)
        return options

    # ------------------------------------------------------------------------------- state

    def get_state(self) -> dict[str, Any]:
        """Everything needed to continue the chain: the sampler's ``state_dict()`` and its
        group layout by parameter name."""
        if self.sampler is None:
            return dict(self._saved) if self._saved is not None else {}
        return {"layout": self._layout(), "sampler": self.sampler.state_dict()}

    def set_state(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`get_state`'s result, now or (for parameters not seen yet) as soon as
        they are. A state that is not one of this sampler's is refused at once (see
        :meth:`~pyro_sgmcmc.samplers.SGMCMCOptimizer.check_state_dict`); one that never applies
        (its parameters never appear) warns at the first step."""
        if not state_dict:
            return
        if not isinstance(state_dict, Mapping) or not {"layout", "sampler"} <= set(state_dict) <= {
                "layout", "sampler", "scheduler"}:
            raise ValueError(
                "Invalid state: expected the result of get_state() of a pyro_sgmcmc optimizer "
                f"(keys 'layout' and 'sampler'), got {sorted(state_dict) if isinstance(state_dict, Mapping) else state_dict!r}"
            )
        layout, sampler_state = state_dict["layout"], state_dict["sampler"]
        if not (isinstance(layout, list) and all(isinstance(g, list) and all(isinstance(n, str) for n in g)
                                                 for g in layout)):
            raise ValueError(f"Invalid state: its layout {layout!r} is not a list of lists of parameter names")
        self.pt_optim_constructor.check_state_dict(sampler_state)
        if len(layout) != len(sampler_state["param_groups"]) or any(
                len(g) != len(saved.get("params", ())) for g, saved in zip(layout, sampler_state["param_groups"])):
            raise ValueError("Invalid state: its layout does not match its sampler's parameter groups")
        self._saved = dict(state_dict)
        self._warned_pending = False
        if self.sampler is not None and self._layout() == state_dict["layout"]:
            self.sampler.load_state_dict(state_dict["sampler"])
            self._saved = None

    def load(self, filename: str, map_location: Any = None) -> None:
        """Load a state saved by :meth:`save` (``torch.load(weights_only=True)``: tensors and
        plain containers only, no code from the file runs) and :meth:`set_state` it."""
        with open(filename, "rb") as input_file:
            state = torch.load(input_file, map_location=map_location, weights_only=True)
        self.set_state(state)


#: The sampler's options that concern the whole optimizer, not a parameter group: keyword
#: arguments of the Pyro optimizer itself, never keys of ``optim_args``.
_OPTIMIZER_WIDE = ("generator", "foreach", "diagnostics", "distributed", "process_group", "noise_ahead", "fused")


def _group_options(sampler_class: type[SGMCMCOptimizer]) -> list[str]:
    """The options a Pyro optimizer of ``sampler_class`` takes in ``optim_args``: the keyword
    arguments of its constructor but the optimizer-wide ones."""
    parameters = inspect.signature(sampler_class.__init__).parameters
    return [name for name, parameter in parameters.items()
            if name not in ("self", "params") + _OPTIMIZER_WIDE
            and parameter.kind in (parameter.KEYWORD_ONLY, parameter.POSITIONAL_OR_KEYWORD)]


def _check_clip_args(clip: dict[str, Any]) -> None:
    check_options(clip, ("clip_norm", "clip_value"), "clip_args")
    for key, value in clip.items():
        clip[key] = check_number(key, value, none_ok=True)


#: Pyro's autoguides that are point masses at the unconstrained latent, Jacobian included.
_POINT_GUIDES = ("AutoLaplaceApproximation",)


def _check_guide(names: list[str]) -> None:
    """Warn when the parameters stepped belong to a Pyro autoguide that is not a point mass at
    the latent values (the noise then goes into variational parameters), or to ``AutoDelta``
    with constrained sites (whose loss lacks the change of variables)."""
    store = pyro.get_param_store()
    for name in names:
        guide = getattr(autoguide, name.split(".", 1)[0], None)
        if not (isinstance(guide, type) and issubclass(guide, autoguide.AutoGuide)) or guide.__name__ in _POINT_GUIDES:
            continue
        if issubclass(guide, autoguide.AutoGuideList):
            continue
        if issubclass(guide, autoguide.AutoDelta):
            constraint = store._constraints.get(name, constraints.real) if name in store else constraints.real
            while isinstance(constraint, constraints.independent):
                constraint = constraint.base_constraint
            if constraint is constraints.real:
                continue
            text = (f"{guide.__name__} with the constrained site of {name!r} ({constraint}): its loss leaves out "
                    "log|det J| of the transform to unconstrained space, so the sampler samples the wrong density; "
                    "use pyro_sgmcmc.infer.AutoUnconstrainedDelta")
        else:
            text = (f"the guide {guide.__name__} is not a point mass (parameter {name!r}): the sampler adds noise to "
                    "its variational parameters, which samples neither the posterior nor the variational fit; use "
                    "pyro_sgmcmc.infer.AutoUnconstrainedDelta to sample, or pyro.optim.Adam to fit the guide")
        warnings.warn(text, UserWarning, stacklevel=5)
        return


def _options_key(options: dict[str, Any]) -> tuple:
    """Options that make one group, as a hashable key (a value that is not hashable, or a
    schedule, by identity)."""
    return tuple(sorted((k, v if isinstance(v, Hashable) and not callable(v) else ("id", id(v)))
                        for k, v in options.items() if k != "mask"))


class _NamedPyroOptim(SGMCMCPyroOptim):
    """A Pyro optimizer of one sampler class (:attr:`sampler_class`), built as Pyro's are:
    ``SGLD(optim_args, clip_args=None)``."""

    sampler_class: type[SGMCMCOptimizer]

    def __init__(self, optim_args: OptimArgs, clip_args: OptimArgs | None = None, *,
                 generator: torch.Generator | None = None, foreach: bool | None = None,
                 diagnostics: bool | str = False, distributed: str | None = None, process_group: Any = None,
                 noise_ahead: bool = False, fused: bool | None = None) -> None:
        super().__init__(self.sampler_class, optim_args, clip_args, generator=generator, foreach=foreach,
                         diagnostics=diagnostics, distributed=distributed, process_group=process_group,
                         noise_ahead=noise_ahead, fused=fused)


class SGLD(_NamedPyroOptim):
    """Pyro optimizer sampling with :class:`pyro_sgmcmc.samplers.SGLD` (options and math there)::

        svi = SVI(model, AutoUnconstrainedDelta(model), pyro_sgmcmc.optim.SGLD({"lr": 1e-4}), Trace_ELBO())

    :param optim_args: the sampler's options (a dict, or a callable of the parameter name
        returning one).
    :param clip_args: gradient clipping, as in Pyro.

    The keyword options (``generator``, ``foreach``, ``diagnostics``, ``distributed``,
    ``process_group``, ``noise_ahead``, ``fused``): see :class:`SGMCMCPyroOptim`.
    """

    sampler_class = samplers.SGLD


class SGNHT(_NamedPyroOptim):
    """Pyro optimizer sampling with :class:`pyro_sgmcmc.samplers.SGNHT` (options and math
    there); arguments as for :class:`SGLD`."""

    sampler_class = samplers.SGNHT


class SGHMC(_NamedPyroOptim):
    """Pyro optimizer sampling with :class:`pyro_sgmcmc.samplers.SGHMC` (options and math
    there); arguments as for :class:`SGLD`."""

    sampler_class = samplers.SGHMC


class PSGLD(_NamedPyroOptim):
    """Pyro optimizer sampling with :class:`pyro_sgmcmc.samplers.PSGLD` (options and math
    there); arguments as for :class:`SGLD`."""

    sampler_class = samplers.PSGLD


#: The Pyro optimizer of every sampler, by name.
PYRO_OPTIMIZERS: dict[str, type[SGMCMCPyroOptim]] = {"SGLD": SGLD, "SGNHT": SGNHT, "SGHMC": SGHMC, "PSGLD": PSGLD}
assert set(PYRO_OPTIMIZERS) == set(samplers.SAMPLERS)


class SGMCMCPyroScheduler(SGMCMCPyroOptim):
    """A torch lr scheduler driving one wrapped sampler, with the calling convention of Pyro's
    :class:`~pyro.optim.lr_scheduler.PyroLRScheduler`::

        scheduler = pyro_sgmcmc.optim.ExponentialLR(
            {"optimizer": pyro_sgmcmc.samplers.SGLD, "optim_args": {"lr": 1e-3}, "gamma": 0.99})
        svi = SVI(model, guide, scheduler, Trace_ELBO())
        for epoch in range(epochs):
            svi.step(data)
            scheduler.step()

    Unlike Pyro's, which builds one optimizer and one scheduler per parameter, all parameters
    are stepped together by one sampler, in param-store name order, and one scheduler drives it;
    its state is part of :meth:`get_state`. The scheduler is built at the first step, so every
    parameter must exist by then (a parameter appearing later is refused with an error).

    :param scheduler_constructor: a ``torch.optim.lr_scheduler`` class.
    :param optim_args: ``{"optimizer": sampler class, "optim_args": sampler options, **scheduler
        options}``; the sampler class is a :mod:`pyro_sgmcmc.samplers` class (as Pyro's schedulers
        take a ``torch.optim`` class), or its Pyro optimizer (``pyro_sgmcmc.optim.SGLD``).
    :param clip_args: as for :class:`SGMCMCPyroOptim`.
    """

    def __init__(self, scheduler_constructor: type, optim_args: dict[str, Any], clip_args: OptimArgs | None = None,
                 **options: Any) -> None:
        check_mapping("optim_args", optim_args, what="a dict with 'optimizer', 'optim_args' and the scheduler's options")
        optim_args = dict(optim_args)
        try:
            sampler_constructor = optim_args.pop("optimizer")
            sampler_args = optim_args.pop("optim_args")
        except KeyError as missing:
            raise ValueError(f"Invalid optim_args: missing key {missing} (needs 'optimizer' and 'optim_args')") from None
        if isinstance(sampler_constructor, type) and issubclass(sampler_constructor, _NamedPyroOptim):
            sampler_constructor = sampler_constructor.sampler_class
        if not (isinstance(sampler_constructor, type) and issubclass(sampler_constructor, SGMCMCOptimizer)):
            raise TypeError(f"Invalid optimizer: {sampler_constructor!r} (must be a pyro_sgmcmc sampler class, e.g. "
                            "pyro_sgmcmc.samplers.SGLD, or its Pyro optimizer, pyro_sgmcmc.optim.SGLD)")
        check_callable("scheduler_constructor", scheduler_constructor, what="a torch.optim.lr_scheduler class")
        super().__init__(sampler_constructor, sampler_args, clip_args, **options)
        self.scheduler_constructor = scheduler_constructor
        self.scheduler_args = optim_args
        self.scheduler = None
        self._saved_scheduler: dict[str, Any] | None = None

    def _register(self, names: list[str], named: dict[str, Tensor]) -> None:
        if self.scheduler is not None:
            new = [name for name in names if self._by_name.get(name) is not named[name]]
            if new:
                raise NotImplementedError(
                    f"Parameters {new} appeared after the lr scheduler was built; with a scheduler, every "
                    "parameter must exist at the first step"
                )
            return
        super()._register(names, named)
        self.scheduler = self.scheduler_constructor(self.sampler, **self.scheduler_args)
        if self._saved_scheduler is not None:
            self.scheduler.load_state_dict(self._saved_scheduler)
            self._saved_scheduler = None

    def step(self, *args: Any, **kwargs: Any) -> None:
        """Step the scheduler (arguments as torch's scheduler takes, e.g. a loss for
        ``ReduceLROnPlateau``)."""
        if self.scheduler is not None:
            self.scheduler.step(*args, **kwargs)

    def get_state(self) -> dict[str, Any]:
        state = super().get_state()
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        elif self._saved_scheduler is not None:
            state["scheduler"] = self._saved_scheduler
        return state

    def set_state(self, state_dict: dict[str, Any]) -> None:
        state_dict = dict(state_dict)
        scheduler_state = state_dict.pop("scheduler", None)
        super().set_state(state_dict)
        if scheduler_state is not None:
            if self.scheduler is not None:
                self.scheduler.load_state_dict(scheduler_state)
            else:
                self._saved_scheduler = scheduler_state


def scheduler_wrapper(scheduler_constructor: type) -> Callable[..., SGMCMCPyroScheduler]:
    """``fn(optim_args, clip_args=None, **options)`` making an :class:`SGMCMCPyroScheduler` of
    ``scheduler_constructor``, named like it."""

    def wrapper(optim_args: dict[str, Any], clip_args: OptimArgs | None = None, **options: Any) -> SGMCMCPyroScheduler:
        return SGMCMCPyroScheduler(scheduler_constructor, optim_args, clip_args, **options)

    wrapper.__name__ = wrapper.__qualname__ = scheduler_constructor.__name__
    wrapper.__doc__ = (f"Wraps :class:`torch.optim.lr_scheduler.{scheduler_constructor.__name__}` with "
                       ":class:`~pyro_sgmcmc.optim.SGMCMCPyroScheduler` (arguments there).")
    return wrapper
