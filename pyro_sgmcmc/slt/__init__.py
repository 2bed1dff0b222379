"""Singular learning theory from the chain: the local learning coefficient, WBIC, and
marginal-likelihood hyperparameters.

* :func:`estimate_llc` -- the local learning coefficient :math:`\\hat\\lambda(w^*)` of a torch module
  (a loss and a ``DataLoader``) or of a Pyro model, with a step size chosen for a stated bias and
  a Monte Carlo standard error (:class:`LLCResult`, :func:`plot_llc`);
* :func:`wbic` -- the WBIC of a Pyro model (the likelihood tempered by :func:`tempered_likelihood`,
  sampled by the kernels of :mod:`pyro_sgmcmc.infer`), and the LLC from the same chain;
* :func:`marglik_hyperparameters` -- a model's ``pyro.param`` hyperparameters by the marginal
  likelihood, with SGLD sampling its weights (Fisher's identity).

What every estimate here holds to (stated with the math in :func:`estimate_llc` and
:func:`wbic`): :math:`n` is the size of the whole data set, never the batch size; :math:`n\\beta`
defaults to :math:`n/\\log n`; adaptation and burn-in steps are never averaged into an estimate;
:math:`L_n(w^*)` is exact; a loss's reduction is given or detected, never guessed; every estimate
comes with a Monte Carlo standard error that accounts for autocorrelation and chains (from the
effective sample size across chains, or the spread of the chains' means where that is larger).

This package sits above the other layers: it uses the samplers of :mod:`pyro_sgmcmc.samplers`
for the LLC chains and the kernels of :mod:`pyro_sgmcmc.infer` for WBIC.
"""

from ._scales import Scales
from .llc import LLCDiagnostics, LLCResult, LLCWarning, default_burn_in, estimate_llc
from .marglik import MarglikResult, marglik_hyperparameters
from .plot import plot_llc
from .wbic import TemperedLikelihood, WBICResult, tempered_likelihood, wbic

__all__ = [
    "LLCDiagnostics",
    "LLCResult",
    "LLCWarning",
    "MarglikResult",
    "Scales",
    "TemperedLikelihood",
    "WBICResult",
    "default_burn_in",
    "estimate_llc",
    "marglik_hyperparameters",
    "plot_llc",
    "tempered_likelihood",
    "wbic",
]
