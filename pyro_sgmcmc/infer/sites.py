"""What SG-MCMC can sample: the one check of a model's latent sites, shared by the SVI guide and
the MCMC kernels."""

from __future__ import annotations

from typing import Any


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
    for frame in site["cond_indep_stack"]:
        full_size = frame.full_size or frame.size
        if full_size != frame.size:
            raise NotImplementedError(
                f"Latent site {name!r} is local to the subsampled plate {frame.name!r} (size {frame.size} of "
                f"{full_size}): its log density is scaled by N/m there, which would sample it at the wrong "
                "temperature. Move it out of the subsampled plate, marginalise it, or run without subsampling"
            )
