"""Pyro inference for SG-MCMC.

* the SVI path: :class:`AutoUnconstrainedDelta` (a Jacobian-correct point guide),
  :class:`SampleCollector` / :func:`run_svi` to keep the visited states as posterior samples, and
  :class:`ControlVariateELBO` (control-variate gradients on minibatches);
* the MCMC path: kernels for :class:`pyro.infer.MCMC`, one per torch sampler through one generic
  adapter (:class:`SGMCMCKernel`): ``pyro_sgmcmc.infer.SGLD(model, step_size=...)``,
  ``pyro_sgmcmc.infer.SGNHT(...)``.
"""

from ..samplers import SAMPLERS as _SAMPLERS
from .autoguide import AutoUnconstrainedDelta
from .control_variates import ControlVariateELBO
from .kernel import ModelPotential, SGMCMCKernel, kernel_class
from .samples import SampleCollector, run_svi

for _name, _sampler in _SAMPLERS.items():
    globals()[_name] = kernel_class(_name, _sampler)

__all__ = ["AutoUnconstrainedDelta", "ControlVariateELBO", "ModelPotential", "SGMCMCKernel", "SampleCollector", "kernel_class", "run_svi",
           *_SAMPLERS]
