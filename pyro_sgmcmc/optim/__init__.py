"""Layer 2: samplers as ``torch.optim.Optimizer`` classes.

* :class:`pyro_sgmcmc.optim.sgld.SGLD` -- stochastic gradient Langevin dynamics;
* :class:`pyro_sgmcmc.optim.sgnht.SGNHT` -- stochastic gradient Nosé-Hoover thermostat;
* :class:`pyro_sgmcmc.optim.sghmc.SGHMC` -- stochastic gradient Hamiltonian Monte Carlo;
* :class:`pyro_sgmcmc.optim.psgld.PSGLD` -- SGLD with an RMSprop preconditioner.

They run in a plain PyTorch loop (``loss.backward(); sampler.step()``) with no Pyro at all.

Pyro optimizers (layer 3), one generic wrapper for every sampler:

* ``pyro_sgmcmc.optim.SGLD(optim_args, clip_args=None)``, ``pyro_sgmcmc.optim.SGNHT(...)`` --
  :class:`~pyro_sgmcmc.optim.pyro_optim.SGMCMCPyroOptim` instances, accepted by ``SVI`` and
  usable as a ``MultiOptimizer``;
* ``pyro_sgmcmc.optim.ExponentialLR({"optimizer": SGLD, "optim_args": {...}, "gamma": ...})`` and
  every other torch lr scheduler, around one sampler, called as Pyro's scheduler wrappers are.
"""

from .base import SGMCMCOptimizer
import torch as _torch

from .pyro_optim import SGMCMCPyroOptim, SGMCMCPyroScheduler, pyro_wrapper, scheduler_wrapper
from .sgld import SGLD as _SGLD
from .sgnht import SGNHT as _SGNHT
from .sghmc import SGHMC as _SGHMC
from .psgld import PSGLD as _PSGLD

#: Every torch sampler of the package, by name (the Pyro adapters iterate over this).
SAMPLERS = {"SGLD": _SGLD, "SGNHT": _SGNHT, "SGHMC": _SGHMC, "PSGLD": _PSGLD}

# Pyro optimizers: pyro_sgmcmc.optim.SGLD({"lr": ...}) as pyro.optim.Adam({"lr": ...}).
for _name, _sampler in SAMPLERS.items():
    globals()[_name] = pyro_wrapper(_sampler)

# lr schedulers around one sampler: pyro_sgmcmc.optim.ExponentialLR({"optimizer": ..., ...}) as in pyro.optim
_SCHEDULERS = [
    _name
    for _name, _cls in vars(_torch.optim.lr_scheduler).items()
    if isinstance(_cls, type)
    and (issubclass(_cls, _torch.optim.lr_scheduler.LRScheduler) or _name == "ReduceLROnPlateau")
    and not _name.startswith("_")
    and _name != "LRScheduler"
]
for _name in _SCHEDULERS:
    globals()[_name] = scheduler_wrapper(getattr(_torch.optim.lr_scheduler, _name))

__all__ = ["SAMPLERS", "SGMCMCOptimizer", "SGMCMCPyroOptim", "SGMCMCPyroScheduler", "pyro_wrapper",
           "scheduler_wrapper", *SAMPLERS, *_SCHEDULERS]
