"""Layer 2: samplers as ``torch.optim.Optimizer`` classes.

* :class:`pyro_sgmcmc.optim.sgld.SGLD` -- stochastic gradient Langevin dynamics;
* :class:`pyro_sgmcmc.optim.sgnht.SGNHT` -- stochastic gradient Nosé-Hoover thermostat.

They run in a plain PyTorch loop (``loss.backward(); sampler.step()``) with no Pyro at all.

Pyro optimizers (layer 3), one generic wrapper for every sampler:

* ``pyro_sgmcmc.optim.SGLD(optim_args, clip_args=None)``, ``pyro_sgmcmc.optim.SGNHT(...)`` --
  :class:`~pyro_sgmcmc.optim.pyro_optim.SGMCMCPyroOptim` instances, accepted by ``SVI`` and
  usable as a ``MultiOptimizer``.
"""

from .base import SGMCMCOptimizer
from .pyro_optim import SGMCMCPyroOptim, pyro_wrapper
from .sgld import SGLD as _SGLD
from .sgnht import SGNHT as _SGNHT

#: Every torch sampler of the package, by name (the Pyro adapters iterate over this).
SAMPLERS = {"SGLD": _SGLD, "SGNHT": _SGNHT}

# Pyro optimizers: pyro_sgmcmc.optim.SGLD({"lr": ...}) as pyro.optim.Adam({"lr": ...}).
for _name, _sampler in SAMPLERS.items():
    globals()[_name] = pyro_wrapper(_sampler)

__all__ = ["SAMPLERS", "SGMCMCOptimizer", "SGMCMCPyroOptim", "pyro_wrapper", *SAMPLERS]
