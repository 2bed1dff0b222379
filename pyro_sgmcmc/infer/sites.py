"""What SG-MCMC can sample: the one check of a model's latent sites, shared by the SVI guide and
the MCMC kernels, and a model trace that explains why a model fails when its global weights
first meet a subsampled plate."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from pyro import poutine
from pyro.poutine.trace_struct import Trace

#: What to do with a global latent site that landed inside a subsampled plate.
GLOBAL_IN_PLATE_HINT = (
    "If it is a global weight (one value for all the data, e.g. a PyroSample attribute of a PyroModule whose "
    "forward first runs inside the plate), sample it before the plate: read the module's weights once before "
    "`with pyro.plate(...)` (e.g. `self.fc.weight, self.fc.bias`; a PyroModule reuses the values drawn then, "
    "inside the plate), or call the network outside the plate"
)


def check_latent_site(name: str, site: dict[str, Any], allow_local: bool = False) -> Any:
    """Raise a clear error for a latent site SG-MCMC cannot sample correctly; return the
    subsampled plate's frame of a site local to one (with ``allow_local``), else ``None``.

    * discrete (or enumerated) sites: Langevin dynamics need continuous latents, and Pyro's
      enumeration scales before it marginalises, which is biased under subsampling;
    * sites local to a subsampled plate (one value per data row): Pyro scales their log density
      by ``N/m``, which would sample them at the wrong temperature. With ``allow_local`` (the MCMC
      kernels, which keep such sites in a table of rows: :mod:`pyro_sgmcmc.infer.local`) a site
      local to one subsampled plate is accepted; one inside two or more is refused.
    """
    support = site["fn"].support
    if support.is_discrete or site["infer"].get("enumerate"):
        raise ValueError(
            f"Latent site {name!r} is discrete (support {support}): SG-MCMC needs continuous latents; "
            "marginalise it out or observe it (enumeration with subsampling is biased)"
        )
    frames = subsampled_frames(site)
    if not frames:
        return None
    frame = frames[0]
    if not allow_local:
        raise NotImplementedError(
            f"Latent site {name!r} is local to the subsampled plate {frame.name!r} (size {frame.size} of "
            f"{frame.full_size}): its log density is scaled by N/m there, which would sample it at the wrong "
            "temperature. The MCMC kernels (pyro_sgmcmc.infer.SGLD, ...) and AutoUnconstrainedDelta sample such local "
            "latents; here, move it out of the subsampled plate, marginalise it, or run without subsampling. "
            + GLOBAL_IN_PLATE_HINT
        )
    if len(frames) > 1:
        raise NotImplementedError(
            f"Latent site {name!r} is local to {len(frames)} subsampled plates "
            f"({', '.join(repr(f.name) for f in frames)}): a local latent is kept as one row per element of "
            "one subsampled plate; a site inside two would need a cell per pair of minibatch elements, which is "
            "not supported. Subsample at most one of the plates that hold it (e.g. the outer one)"
        )
    return frame


@dataclass(frozen=True)
class LocalSite:
    """A latent site local to one subsampled plate: one row of values per element of the plate.

    :param name: the site.
    :param plate: the subsampled plate's name.
    :param dim: the position of the plate's dimension in the site's value (counted from the left).
    :param full_size: ``N``, the plate's size.
    :param subsample_size: ``m``, its minibatch size.
    :param shape: the shape of the whole table (the value's shape, with ``N`` at ``dim``).
    :param event_dim: the site's event dimensions.
    :param transform: from the site's support to unconstrained space.
    """

    name: str
    plate: str
    dim: int
    full_size: int
    subsample_size: int
    shape: torch.Size
    event_dim: int
    transform: Any

    @property
    def scale(self) -> float:
        """``N/m``: the factor by which the plate scales each row's log density."""
        return self.full_size / self.subsample_size

    @classmethod
    def of(cls, name: str, site: dict[str, Any], frame: Any, transform: Any) -> "LocalSite":
        """The local site ``name`` of a model trace, local to the subsampled plate ``frame``."""
        value = site["value"]
        event_dim = site["fn"].event_dim
        dim = value.dim() - event_dim + frame.dim
        if dim < 0 or value.shape[dim] != frame.size:
            raise NotImplementedError(
                f"Latent site {name!r} is local to the subsampled plate {frame.name!r} but its value (shape "
                f"{tuple(value.shape)}) has no dimension of the minibatch's size {frame.size} at the plate's "
                f"dim {frame.dim}: sample it with a distribution expanded over the plate")
        shape = value.shape[:dim] + (frame.full_size,) + value.shape[dim + 1:]
        return cls(name, frame.name, dim, int(frame.full_size), int(frame.size), torch.Size(shape), event_dim,
                   transform)


def subsampled_frames(site: dict[str, Any]) -> list[Any]:
    """The subsampled plates (``size < full_size``) the site is inside."""
    return [frame for frame in site["cond_indep_stack"] if (frame.full_size or frame.size) != frame.size]


def subsampled_frame(site: dict[str, Any]) -> Any:
    """The first subsampled plate (``size < full_size``) the site is inside, or ``None``."""
    frames = subsampled_frames(site)
    return frames[0] if frames else None


def trace_model(model: Callable, *args: Any, **kwargs: Any) -> Trace:
    """The model's trace (``poutine.trace(model).get_trace(*args, **kwargs)``), with a clear
    error when the model fails and a latent site it sampled before failing sits inside a
    subsampled plate: the usual cause is a Bayesian neural net whose ``PyroSample`` weights are
    first read inside ``pyro.plate(..., subsample_size=m)``, so Pyro gives each weight one value
    per data row and the forward pass dies (``t() expects a tensor with <= 2 dimensions``).

    :raises ValueError: naming the site and the plate, and saying what to do (chained from the
        model's own error); any other failure of the model is raised as it is.
    """
    tracer = poutine.trace(model)
    try:
        return tracer.get_trace(*args, **kwargs)
    except Exception as error:
        check_partial_trace(tracer.trace, error)
        raise


def check_partial_trace(trace: Trace, error: BaseException) -> None:
    """Raise the error of :func:`trace_model` if ``trace`` (what a failed model run recorded)
    holds a latent site inside a subsampled plate; return otherwise."""
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site["is_observed"] or site["infer"].get("_do_not_trace"):
            continue
        frame = subsampled_frame(site)
        if frame is None:
            continue
        shape = tuple(site["value"].shape) if hasattr(site["value"], "shape") else ()
        raise ValueError(
            f"The model failed ({type(error).__name__}: {error}) after sampling the latent site {name!r} inside "
            f"the subsampled plate {frame.name!r} (size {frame.size} of {frame.full_size}), which gives it one "
            f"value per data row (shape {shape}). {GLOBAL_IN_PLATE_HINT}. If it is a local latent (one value per "
            "row), SG-MCMC cannot sample it under subsampling: marginalise it or run without subsampling."
        ) from error
