"""Pyro inference for SG-MCMC (layer 3, as :mod:`pyro.infer`).

* the MCMC path: kernels for :class:`pyro.infer.MCMC`, one per torch sampler:
  :class:`SGLD`, :class:`SGNHT`, :class:`SGHMC`, :class:`PSGLD` (``MCMC(SGLD(model), ...)``), all
  :class:`SGMCMCKernel` subclasses; :class:`MCMC`, Pyro's driver keeping the draws made before an
  interruption;
* the SVI path: :class:`AutoUnconstrainedDelta` (a Jacobian-correct point guide),
  :class:`SampleCollector` / :func:`run_svi` to keep the visited states as posterior samples, and
  :class:`ControlVariateELBO` (control-variate gradients on minibatches).
"""

from .autoguide import AutoUnconstrainedDelta
from .control_variates import ControlVariateELBO
from .kernel import KERNELS, PSGLD, SGHMC, SGLD, SGNHT, MixingWarning, SGMCMCKernel
from .mcmc import MCMC
from .potential import ModelPotential
from .samples import SampleCollector, log_likelihood, run_svi

__all__ = ["AutoUnconstrainedDelta", "ControlVariateELBO", "KERNELS", "MCMC", "MixingWarning", "ModelPotential", "PSGLD",
           "SGHMC", "SGLD", "SGMCMCKernel", "SGNHT", "SampleCollector", "log_likelihood", "run_svi"]
