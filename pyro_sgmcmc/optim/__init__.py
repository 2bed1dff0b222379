"""Layer 2: samplers as ``torch.optim.Optimizer`` classes.

* :class:`pyro_sgmcmc.optim.sgld.SGLD` -- stochastic gradient Langevin dynamics;
* :class:`pyro_sgmcmc.optim.sgnht.SGNHT` -- stochastic gradient Nosé-Hoover thermostat.

They run in a plain PyTorch loop (``loss.backward(); sampler.step()``) with no Pyro at all.
"""

from .base import SGMCMCOptimizer
from .sgld import SGLD as _SGLD
from .sgnht import SGNHT as _SGNHT

#: Every torch sampler of the package, by name (the Pyro adapters iterate over this).
SAMPLERS = {"SGLD": _SGLD, "SGNHT": _SGNHT}

__all__ = ["SAMPLERS", "SGMCMCOptimizer"]
