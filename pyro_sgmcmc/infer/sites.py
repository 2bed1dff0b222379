"""What SG-MCMC can sample: the one check of a model's latent sites, shared by the SVI guide and
the MCMC kernels, and a model trace that explains why a model fails when its global weights
first meet a subsampled plate."""

from __future__ import annotations

from typing import Any, Callable

from pyro import poutine
from pyro.poutine.trace_struct import Trace

#: What to do with a global latent site that landed inside a subsampled plate.
GLOBAL_IN_PLATE_HINT = (
    "If it is a global weight (one value for all the data, e.g. a PyroSample attribute of a PyroModule whose "
    "forward first runs inside the plate), sample it before the plate: read the module's weights once before "
    "`with pyro.plate(...)` (e.g. `self.fc.weight, self.fc.bias`; a PyroModule reuses the values drawn then, "
    "inside the plate), or call the network outside the plate"
)


def check_latent_site(name: str, site: dict[str, Any]) -> None:
    """Raise a clear error for a latent site SG-MCMC cannot sample correctly.

    * discrete (or enumerated) sites: Langevin dynamics need continuous latents, and Pyro's
      enumeration scales before it marginalises, which is biased under subsampling;
    * sites local to a subsampled plate (one value per data row): Pyro scales their log density
      by ``N/m``, which would sample them at the wrong temperature.
    """
    support = site["fn"].support
    if support.is_discrete or site["infer"].get("enumerate"):
        raise ValueError(
            f"Latent site {name!r} is discrete (support {support}): SG-MCMC needs continuous latents; "
            "marginalise it out or observe it (enumeration with subsampling is biased)"
        )
    frame = subsampled_frame(site)
    if frame is not None:
        raise NotImplementedError(
            f"Latent site {name!r} is local to the subsampled plate {frame.name!r} (size {frame.size} of "
            f"{frame.full_size}): its log density is scaled by N/m there, which would sample it at the wrong "
            "temperature. Move it out of the subsampled plate, marginalise it, or run without subsampling. "
            + GLOBAL_IN_PLATE_HINT
        )


def subsampled_frame(site: dict[str, Any]) -> Any:
    """The first subsampled plate (``size < full_size``) the site is inside, or ``None``."""
    for frame in site["cond_indep_stack"]:
        full_size = frame.full_size or frame.size
        if full_size != frame.size:
            return frame
    return None


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
