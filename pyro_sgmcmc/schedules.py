r"""Step-size (and temperature) schedules for every sampler.

A schedule is a callable ``step -> float``; give it as ``lr=`` (or ``temperature=``) to any torch
sampler or through ``optim_args`` of a Pyro optimizer, or as ``step_size_schedule=`` to an MCMC
kernel, where it multiplies the step size that warmup adapted.

Reference:
    R. Zhang, C. Li, J. Zhang, C. Chen and A. G. Wilson, "Cyclical stochastic gradient MCMC for
    Bayesian deep learning", ICLR 2020.
"""

from __future__ import annotations

import math

from ._validation import check_integer, check_number

__all__ = ["CyclicalSchedule"]


class CyclicalSchedule:
    r"""The cosine cyclical schedule of Zhang et al. (2020), Eq. (1):

    .. math::

        \alpha_k = \frac{\alpha_0}{2}\left[\cos\left(\frac{\pi\,\mathrm{mod}(k - 1, L)}{L}\right) + 1\right],
        \qquad L = \lceil K / M \rceil,

    for steps :math:`k = 1, \dots, K` in :math:`M` cycles. Each cycle starts with a large step
    (exploration: the chain jumps to a new region, a new mode) and ends with small ones (sampling
    that region). The fraction :math:`r_k = \mathrm{mod}(k - 1, L)/L` of the cycle decides the
    phase: exploration while :math:`r_k < \beta`, sampling after; keep samples only from the
    sampling phase (``SampleCollector(keep_if=schedule.in_sampling_phase)``, or an MCMC kernel's
    ``step_size_schedule``, which returns samples from that phase only).

    Called with the sampler's step counter (0 for the first step, as ``param_groups[i]["step"]``),
    ``schedule(step)`` is :math:`\alpha_{step + 1}`; past :math:`K` the cycles go on.

    :param initial: :math:`\alpha_0 > 0`, the value at the start of each cycle.
    :param num_steps: :math:`K`, the number of steps the cycles cover.
    :param num_cycles: :math:`M \ge 1`.
    :param exploration_fraction: :math:`\beta \in [0, 1)`, the part of each cycle that is exploration.
    """

    def __init__(self, initial: float, num_steps: int, num_cycles: int, exploration_fraction: float = 0.5):
        self.initial = check_number("initial", initial)
        self.num_steps = check_integer("num_steps", num_steps, low=1)
        self.num_cycles = check_integer("num_cycles", num_cycles, low=1)
        if self.num_cycles > self.num_steps:
            raise ValueError(f"Invalid num_cycles: {num_cycles!r} (must be an integer in [1, num_steps={num_steps}])")
        self.exploration_fraction = check_number("exploration_fraction", exploration_fraction, allow_low=True,
                                                 high=1.0)
        self.cycle_length = -(-self.num_steps // self.num_cycles)  # ceil, in integers: num_steps may be huge

    def position(self, step: int) -> float:
        """:math:`r \\in [0, 1)`, how far into its cycle ``step`` (0-based) is."""
        return (step % self.cycle_length) / self.cycle_length

    def __call__(self, step: int) -> float:
        return self.initial / 2 * (math.cos(math.pi * self.position(step)) + 1)

    def in_sampling_phase(self, step: int) -> bool:
        """Whether ``step`` (0-based) lies in the sampling phase of its cycle."""
        return self.position(step) >= self.exploration_fraction

    def __repr__(self) -> str:
        return (f"CyclicalSchedule(initial={self.initial}, num_steps={self.num_steps}, num_cycles={self.num_cycles}, "
                f"exploration_fraction={self.exploration_fraction})")
