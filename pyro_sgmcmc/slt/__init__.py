"""Singular learning theory from the chain: the local learning coefficient.

* :func:`estimate_llc` -- the local learning coefficient :math:`\\hat\\lambda(w^*)` of a torch module
  (a loss and a ``DataLoader``) or of a Pyro model, with a step size chosen for a stated bias and
  a Monte Carlo standard error (:class:`LLCResult`, :func:`plot_llc`).

This package sits above the Pyro adapters: it uses the samplers of :mod:`pyro_sgmcmc.samplers`
for the chains.
"""

from .llc import LLCDiagnostics, LLCResult, LLCWarning, estimate_llc
from .plot import plot_llc

__all__ = ["LLCDiagnostics", "LLCResult", "LLCWarning", "estimate_llc", "plot_llc"]
