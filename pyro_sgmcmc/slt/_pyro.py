"""A Pyro model as a likelihood of its latent values, for the LLC and WBIC.

The likelihood is the observed sites' log densities (as the plates scale them: a minibatch of
``pyro.plate(..., subsample_size=m)`` counts ``N/m`` times, an unbiased estimate of the full-data
sum); the latent sites' values are set by conditioning. The exact full-data value walks the data
set in minibatch-sized pieces (:func:`pyro_sgmcmc.infer.subsample.full_data_potential`, shared with
the kernels' control variates).
"""

from __future__ import annotations

from contextlib import ExitStack
from typing import Any, Callable, Iterable

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions.util import scale_and_mask
from pyro.infer.autoguide.initialization import InitMessenger, init_to_median
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch import Tensor
from torch.distributions import biject_to

from .._validation import check_integer
from ..infer.sites import check_latent_site
from ..infer.subsample import SubsampleControl, full_data_potential, subsampled_plates
from ._objective import ChainObjective, _checked_masks


class _SiteLogDensity(Messenger):
    """Sets the latent sites to ``values`` and sums the scaled, masked log densities of the sites
    named in ``sites`` as the model runs (a trace would cost a third of a small model's run)."""

    def __init__(self, values: dict[str, Tensor], sites: set[str]):
        super().__init__()
        self.values, self.sites = values, sites
        self.total: Tensor | float = 0.0

    def _pyro_sample(self, msg: dict) -> None:
        value = self.values.get(msg["name"])
        if value is not None and not msg["is_observed"]:
            msg["value"] = value
            msg["is_observed"] = True

    def _pyro_post_sample(self, msg: dict) -> None:
        if msg["name"] in self.sites and not site_is_subsample(msg):
            log_p = msg["fn"].log_prob(msg["value"], *msg["args"], **msg["kwargs"])
            self.total = self.total + scale_and_mask(log_p, msg["scale"], msg["mask"]).sum()


class ModelLikelihood:
    """The likelihood of a Pyro model's latent values.

    :param model: the Pyro model.
    :param args, kwargs: its arguments (the data).
    :param n: the data set's size; read from the plate that holds every observed site if not given.
    """

    def __init__(self, model: Callable, args: tuple, kwargs: dict[str, Any], n: int | None = None):
        if not callable(model):
            raise ValueError(f"Invalid model: {type(model).__name__} (must be a Pyro model, or a torch module with "
                             "loss_fn or evaluate)")
        self.model, self.args, self.kwargs = model, args, kwargs
        trace = poutine.trace(model).get_trace(*args, **kwargs)
        self.transforms: dict[str, Any] = {}  # unconstrained -> constrained
        self.devices: dict[str, torch.device] = {}  # where each latent site's value lives
        self.observed: list[str] = []
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            if site["is_observed"]:
                self.observed.append(name)
            else:
                check_latent_site(name, site)
                self.transforms[name] = biject_to(site["fn"].support)
                self.devices[name] = torch.as_tensor(site["value"]).device
        if not self.observed:
            raise ValueError("Invalid model: it has no observed sites (no likelihood to temper or to measure)")
        if not self.transforms:
            raise ValueError("Invalid model: it has no latent sites")
        plates = subsampled_plates(trace)
        if len(plates) > 1:
            raise NotImplementedError(f"Models with more than one subsampled plate ({[p.name for p in plates]}) are "
                                      "not supported: the full-data likelihood walks one plate")
        self.plate = plates[0] if plates else None
        self.n = self._data_size(trace, n)
        self._checked = False

    def _data_size(self, trace: Any, n: int | None) -> int:
        frames = None
        for name in self.observed:
            names = {f.name: f.full_size or f.size for f in trace.nodes[name]["cond_indep_stack"] if f.vectorized}
            frames = names if frames is None else {k: v for k, v in frames.items() if k in names}
        if self.plate is not None and self.plate.name in (frames or {}):
            frames = {self.plate.name: self.plate.size}
        found = next(iter(frames.values())) if frames and len(frames) == 1 else None
        if n is not None:
            n = check_integer("n", n, low=1)
            if found is not None and n != found:
                raise ValueError(f"Invalid n: {n} (the observed sites sit in a plate of size {found}; n is the size of "
                                 "the whole data set, never the batch size)")
            return n
        if found is None:
            raise ValueError("Invalid n: None (the observed sites are not in exactly one plate, so the data set's size "
                             f"cannot be read; plates shared by them: {sorted(frames or {})}; give n)")
        return int(found)

    def constrained(self, unconstrained: dict[str, Tensor]) -> dict[str, Tensor]:
        return {name: self.transforms[name](value) for name, value in unconstrained.items()}

    def on_site_devices(self, values: dict[str, Any]) -> dict[str, Tensor]:
        """Given values of latent sites (e.g. a user's ``w_star``) as tensors on their sites'
        devices (dtypes as given)."""
        return {name: torch.as_tensor(v, device=self.devices.get(name)).detach() for name, v in values.items()}

    def unconstrained(self, values: dict[str, Tensor]) -> dict[str, Tensor]:
        missing = set(self.transforms) - set(values)
        if missing:
            raise ValueError(f"Invalid w_star: it misses the latent sites {sorted(missing)}")
        values = self.on_site_devices({name: values[name] for name in self.transforms})
        return {name: self.transforms[name].inv(values[name]).detach() for name in self.transforms}

    def log_density(self, values: dict[str, Tensor], control: SubsampleControl | None = None,
                    prior: bool = False) -> Tensor:
        """The observed sites' log density (with ``prior``, the latent sites' too) at the
        constrained ``values``, on the minibatch the model draws (or ``control`` imposes). Pyro's
        argument checks run on the first call only (they cost more than a small model)."""
        summed = _SiteLogDensity(values, set(self.observed) | (set(self.transforms) if prior else set()))
        with ExitStack() as stack:
            if control is not None:
                stack.enter_context(control)
            stack.enter_context(summed)
            if self._checked:
                stack.enter_context(pyro.validation_enabled(False))
            self.model(*self.args, **self.kwargs)
        self._checked = True
        return summed.total

    def full_log_density(self, values: dict[str, Tensor], prior: bool = False) -> Tensor:
        """:meth:`log_density` on the whole data set, exactly."""
        if self.plate is None:
            return self.log_density(values, prior=prior)
        return -full_data_potential(lambda control, _: -self.log_density(values, control, prior), self.plate)

    def initial_values(self) -> dict[str, Tensor]:
        """The prior medians (as ``AutoDelta`` starts), unconstrained."""
        trace = poutine.trace(InitMessenger(init_to_median)(self.model)).get_trace(*self.args, **self.kwargs)
        return self.unconstrained({name: trace.nodes[name]["value"].detach() for name in self.transforms})

    def find_map(self, max_iter: int = 500) -> dict[str, Tensor]:
        """The posterior mode (the maximum of the full-data log joint in constrained space, as
        ``AutoDelta`` finds it) by L-BFGS from the prior medians; constrained values."""
        start = self.initial_values()
        names = list(start)
        u = [start[name].clone().requires_grad_(True) for name in names]
        optimizer = torch.optim.LBFGS(u, max_iter=max_iter, line_search_fn="strong_wolfe", tolerance_grad=1e-9,
                                      tolerance_change=1e-12, history_size=20)

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = -self.full_log_density(self.constrained(dict(zip(names, u))), prior=True)
            loss.backward()
            return loss

        optimizer.step(closure)
        with torch.no_grad():
            return {name: value.detach() for name, value in self.constrained(dict(zip(names, u))).items()}


class PyroObjective(ChainObjective):
    """The chains over a Pyro model's latent values (unconstrained), with
    :math:`L = -\\frac1n\\log p(\\text{observed} \\mid w)`, one model run per chain and evaluation (each
    draws its own minibatch; the evaluation at :math:`w^*` replays it).

    :param likelihood: the model (:class:`ModelLikelihood`).
    :param w_star: constrained values of every latent site (default: the MAP).
    :param params: the latent sites to sample (default: all); the others stay at ``w_star``.
    :param mask: ``{site: 0/1 tensor}`` of the unconstrained value's shape.
    """

    def __init__(self, likelihood: ModelLikelihood, w_star: dict[str, Tensor] | None, *,
                 params: Iterable[str] | None, mask: dict[str, Tensor] | None, num_chains: int):
        self.likelihood = likelihood
        self.n = likelihood.n
        self.num_chains = num_chains
        self.exact = likelihood.plate is None
        values = likelihood.find_map() if w_star is None else w_star
        self.w_star = likelihood.on_site_devices(values)
        unconstrained = likelihood.unconstrained(self.w_star)
        self.names = list(unconstrained) if params is None else list(params)
        unknown = [name for name in self.names if name not in unconstrained]
        if unknown or not self.names:
            raise ValueError(f"Invalid params: {unknown or 'empty'} (must name latent sites of the model: "
                             f"{sorted(unconstrained)})")
        self.fixed = {name: value for name, value in self.w_star.items() if name not in self.names}
        mask = {} if mask is None else dict(mask)
        if set(mask) - set(self.names):
            raise ValueError(f"Invalid mask: {sorted(set(mask) - set(self.names))} are not sampled sites ({self.names})")
        self.masks = _checked_masks(self.names, mask, unconstrained)
        self._stack([unconstrained[name] for name in self.names])

    def _values(self, tensors: list[Tensor], chain: int | None) -> dict[str, Tensor]:
        pick = (lambda t: t) if chain is None else (lambda t: t[chain])  # noqa: E731
        values = {name: pick(t) for name, t in zip(self.names, tensors)}
        return {**self.fixed, **self.likelihood.constrained(values)}

    def draw(self) -> Any:
        return None  # each model run draws its own minibatch

    def evaluate(self, batch: Any, anchored: bool) -> tuple[Tensor, Tensor | None]:
        own, at_anchor = [], []
        for c in range(self.num_chains):
            control = SubsampleControl()
            own.append(-self.likelihood.log_density(self._values(self.params, c), control) / self.n)
            if anchored:
                replay = SubsampleControl(indices=control.recorded)
                at_anchor.append(-self.likelihood.log_density(self._values(self.anchor_stack, c), replay) / self.n)
        return torch.stack(own), torch.stack(at_anchor) if anchored else None

    def full_loss(self, gradient: bool) -> tuple[float, list[Tensor] | None]:
        anchor = [a.detach().clone().requires_grad_(gradient) for a in self.anchor]
        with torch.set_grad_enabled(gradient):
            value = -self.likelihood.full_log_density(self._values(anchor, None)) / self.n
        grads = None
        if gradient:
            grads = [torch.zeros_like(a) if g is None else g
                     for a, g in zip(anchor, torch.autograd.grad(value, anchor, allow_unused=True))]
        return float(value.detach()), grads

