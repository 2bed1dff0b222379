"""Layer 3: the samplers as Pyro optimizers, as :mod:`pyro.optim` wraps :mod:`torch.optim`.

* ``pyro_sgmcmc.optim.SGLD(optim_args, clip_args=None)`` (and ``SGNHT``, ``SGHMC``, ``PSGLD``):
  :class:`SGMCMCPyroOptim` subclasses, accepted by ``SVI`` (with
  :class:`~pyro_sgmcmc.infer.AutoUnconstrainedDelta`) and usable as a ``MultiOptimizer``;
* ``pyro_sgmcmc.optim.ExponentialLR({"optimizer": pyro_sgmcmc.samplers.SGLD, "optim_args": {...},
  "gamma": ...})`` and every other torch lr scheduler around one sampler, called as Pyro's
  scheduler wrappers are.

The torch samplers themselves, for a plain PyTorch loop, are :mod:`pyro_sgmcmc.samplers`.
"""

import torch as _torch

from .._deprecated import moved_module as _moved_module
from .pyro_optim import (
    PSGLD,
    PYRO_OPTIMIZERS,
    SGHMC,
    SGLD,
    SGNHT,
    SGMCMCPyroOptim,
    SGMCMCPyroScheduler,
    scheduler_wrapper,
)

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

# moved to pyro_sgmcmc.samplers (SGMCMCOptimizer, SAMPLERS): still found here for one release
__getattr__ = _moved_module(__name__, "pyro_sgmcmc.samplers")

__all__ = ["PSGLD", "PYRO_OPTIMIZERS", "SGHMC", "SGLD", "SGMCMCPyroOptim", "SGMCMCPyroScheduler", "SGNHT",
           "scheduler_wrapper", *_SCHEDULERS]
