"""Deprecated: moved to :mod:`pyro_sgmcmc.samplers.psgld` (this path is kept for one release)."""

from .._deprecated import moved_module

__getattr__ = moved_module(__name__, "pyro_sgmcmc.samplers.psgld")
