"""Layer 1: the update math of every sampler, pure torch over lists of tensors.

Each algorithm is written once (one module each) against a small table of list operations with
a multi-tensor (``torch._foreach_*``) and a per-tensor path; both give the same numbers. The
torch samplers of :mod:`pyro_sgmcmc.samplers`, and through them every Pyro adapter, call these
functions.
"""

from ._common import Diagnostics, NonFiniteError, check_finite
from ._noise import DEFAULT_CHUNK_NUMEL, DEVICE_CHUNK_NUMEL, NUM_STREAMS, NoisePlan, NoisePlanCache, NoiseSource
from .control_variates import control_variate_gradient_
from .mala import mala_log_acceptance
from .psgld import psgld
from .sghmc import sghmc
from .sgld import sgld
from .sgnht import sgnht

__all__ = [
    "DEFAULT_CHUNK_NUMEL",
    "DEVICE_CHUNK_NUMEL",
    "Diagnostics",
    "NoisePlan",
    "NoisePlanCache",
    "NoiseSource",
    "NUM_STREAMS",
    "NonFiniteError",
    "check_finite",
    "control_variate_gradient_",
    "mala_log_acceptance",
    "psgld",
    "sghmc",
    "sgld",
    "sgnht",
]
