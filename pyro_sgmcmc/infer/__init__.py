"""Pyro inference helpers for SG-MCMC: a Jacobian-correct autoguide for the SVI path and the
collection of visited states as posterior samples."""

from .autoguide import AutoUnconstrainedDelta
from .samples import SampleCollector, run_svi

__all__ = ["AutoUnconstrainedDelta", "SampleCollector", "run_svi"]
