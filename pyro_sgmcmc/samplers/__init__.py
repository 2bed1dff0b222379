"""Layer 2: the samplers as ``torch.optim.Optimizer`` classes, for a plain PyTorch loop.

* :class:`SGLD` -- stochastic gradient Langevin dynamics;
* :class:`SGNHT` -- stochastic gradient Nosé-Hoover thermostat;
* :class:`SGHMC` -- stochastic gradient Hamiltonian Monte Carlo;
* :class:`PSGLD` -- SGLD with an RMSprop preconditioner;
* :class:`ControlVariate` -- control-variate gradients for any of them.

They are used as any torch optimizer (``loss.backward(); sampler.step()``), and this package
imports no Pyro (as ``torch.optim.Adam`` is the optimizer and ``pyro.optim.Adam`` its Pyro
wrapper, the Pyro wrappers of these samplers are :mod:`pyro_sgmcmc.optim`). Each class calls
its update function of :mod:`pyro_sgmcmc.functional`, where the math is written once.
"""

from .base import SGMCMCOptimizer
from .control_variates import ControlVariate
from .psgld import PSGLD
from .sghmc import SGHMC
from .sgld import SGLD
from .sgnht import SGNHT

#: Every sampler of the package, by name (the Pyro adapters are generated over this).
SAMPLERS: dict[str, type[SGMCMCOptimizer]] = {"SGLD": SGLD, "SGNHT": SGNHT, "SGHMC": SGHMC, "PSGLD": PSGLD}

__all__ = ["SAMPLERS", "ControlVariate", "PSGLD", "SGHMC", "SGLD", "SGMCMCOptimizer", "SGNHT"]
