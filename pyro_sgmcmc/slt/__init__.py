"""Singular learning theory from the chain: the local learning coefficient, WBIC, and
marginal-likelihood hyperparameters.

* :func:`estimate_llc` -- the local learning coefficient :math:`\\hat\\lambda(w^*)` of a torch module
  (a loss and a ``DataLoader``) or of a Pyro model, with a step size chosen for a stated bias and
  a Monte Carlo standard error (:class:`LLCResult`, :func:`plot_llc`);
* :func:`wbic` -- the WBIC of a Pyro model (the likelihood tempered by :func:`tempered_likelihood`,
  sampled by the kernels of :mod:`pyro_sgmcmc.infer`), and the LLC from the same chain;
* :func:`marglik_hyperparameters` -- a model's ``pyro.param`` hyperparameters by the marginal
  likelihood, with SGLD sampling its weights (Fisher's identity).

This package sits above the Pyro adapters: it uses the samplers of :mod:`pyro_sgmcmc.samplers`
for the chains and the kernels of :mod:`pyro_sgmcmc.infer` for WBIC.
"""

from .llc import LLCDiagnostics, LLCResult, LLCWarning, estimate_llc
from .marglik import MarglikResult, marglik_hyperparameters
from .plot import plot_llc
from .wbic import TemperedLikelihood, WBICResult, tempered_likelihood, wbic

__all__ = [
    "LLCDiagnostics",
    "LLCResult",
    "LLCWarning",
    "MarglikResult",
    "TemperedLikelihood",
    "WBICResult",
    "estimate_llc",
    "marglik_hyperparameters",
    "plot_llc",
    "tempered_likelihood",
    "wbic",
]
