"""Bookkeeping for the MALA acceptance diagnostic of the Langevin samplers (see
:mod:`pyro_sgmcmc.functional.mala`): what a step must remember so that the next one, which
brings the potential and its gradient at the new point, can score it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..functional import mala_log_acceptance


@dataclass
class _Pending:
    params: list[Tensor]
    thetas: list[Tensor]
    drifts: list[Tensor]
    energy: Tensor
    lrs: list[float] | None = None
    preconditioners: list[Tensor | None] | None = None
    noise_variances: list[float] | None = None


class MalaTracker:
    """Scores each Langevin step once the potential at its end is known.

    ``before(work, loss)`` is called before a step with the step's groups and the potential
    ``U`` at the current point (``None`` if unknown); it returns the log acceptance ratio of the
    *previous* step, if that can be scored, and remembers the current point. ``after(work)``
    records the step size and preconditioner the step used. The running mean of the acceptance
    probability is over the steps actually scored (no step is counted unscored).
    """

    def __init__(self) -> None:
        self.pending: _Pending | None = None
        self.total = 0.0
        self.count = 0

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def before(self, sampler: Any, work: list[tuple], loss: Tensor | float | None) -> Tensor | None:
        current = self._point(sampler, work, loss)
        log_ratio = self._log_ratio(current)
        if log_ratio is not None and math.isfinite(float(log_ratio)):
            self.total += min(1.0, math.exp(min(float(log_ratio), 0.0)))
            self.count += 1
        self.pending = current
        return log_ratio

    def score(self, sampler: Any, work: list[tuple], loss: Tensor | float | None) -> Tensor | None:
        """The log acceptance ratio of the last step, now, from the point it reached (``work``'s
        parameters and gradients, ``loss``), without counting it or moving on: ``before`` of
        the next step scores it again."""
        return self._log_ratio(self._point(sampler, work, loss))

    @staticmethod
    def _point(sampler: Any, work: list[tuple], loss: Tensor | float | None) -> _Pending | None:
        """The current point, its drift and tempered energy (``None`` if they do not define one
        tempered density, or ``U`` is unknown)."""
        scales = {sampler.grad_scale(group) for _, group, *_ in work}
        if loss is None or len(scales) != 1 or not work:
            return None
        scale = scales.pop()
        energy = torch.as_tensor(loss, dtype=torch.float64).detach() * scale
        params, thetas, drifts = [], [], []
        for _, group, ps, grads, masks, _ in work:
            anchors = sampler.anchors(group, ps)
            gamma, lam = group["localization"], group["weight_decay"]
            for i, (p, g) in enumerate(zip(ps, grads)):
                theta = p.detach().to(torch.float64, copy=True)  # kept: p moves in place
                drift = g.detach().double() * scale
                if lam:  # the terms below cost a few tensor ops each: only when present
                    drift = drift + lam * theta
                    energy = energy + lam / 2 * theta.square().sum()
                if gamma and anchors is not None:
                    offset = theta - anchors[i].double()
                    drift = drift + gamma * offset
                    energy = energy + gamma / 2 * offset.square().sum()
                if masks is not None:
                    drift = drift * masks[i]
                params.append(p)
                thetas.append(theta)
                drifts.append(drift)
        return _Pending(params, thetas, drifts, energy)

    def _log_ratio(self, current: _Pending | None) -> Tensor | None:
        """MALA's log acceptance ratio of the step from the pending point to ``current``."""
        previous = self.pending
        if current is None or previous is None or previous.lrs is None or len(previous.params) != len(
                current.params) or not all(a is b for a, b in zip(previous.params, current.params)):
            return None
        return mala_log_acceptance(previous.thetas, current.thetas, previous.drifts, current.drifts, previous.energy,
                                   current.energy, previous.lrs, previous.preconditioners, previous.noise_variances)

    def after(self, sampler: Any, work: list[tuple]) -> None:
        if self.pending is None:
            return
        lrs, preconditioners, noise_variances = [], [], []
        for _, group, ps, *_ in work:
            noise_variance = sampler.proposal_noise_variance(group)
            for p in ps:
                lrs.append(float(group["lr"]))
                preconditioners.append(sampler.proposal_preconditioner(p))
                noise_variances.append(noise_variance)
        if any(lr <= 0 for lr in lrs) or any(v <= 0 for v in noise_variances):
            self.pending = None  # a frozen or noiseless group: the step is not a Langevin proposal
            return
        self.pending.lrs, self.pending.preconditioners = lrs, preconditioners
        self.pending.noise_variances = noise_variances
