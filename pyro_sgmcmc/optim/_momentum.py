"""What the samplers with a momentum (SGHMC, SGNHT) share: their momenta, drawn and redrawn."""

from __future__ import annotations

import torch
from torch import Tensor

from .base import SGMCMCOptimizer


class MomentumSampler(SGMCMCOptimizer):
    """A sampler with one momentum per parameter, ``state[p]["momentum"]``, drawn from
    ``N(0, I)`` (its stationary law; 0 where masked) at the parameter's first step."""

    def _momenta(self, params: list[Tensor], masks: list[Tensor] | None) -> list[Tensor]:
        momenta = []
        for i, p in enumerate(params):
            state = self.state[p]
            momentum = state.get("momentum")
            if momentum is None:
                momentum = torch.empty_like(p, memory_format=torch.contiguous_format)
                self._draw(momentum, None if masks is None else masks[i])
                state["momentum"] = momentum
            momenta.append(momentum)
        return momenta

    def _draw(self, momentum: Tensor, mask: Tensor | None) -> None:
        momentum.normal_(generator=self.generator)
        if mask is not None:
            momentum.mul_(mask)

    def reset_auxiliary(self) -> None:
        """Momenta redrawn from ``N(0, I)``, the parameters left where they are."""
        for group in self.param_groups:
            masks = group["mask"]
            for i, p in enumerate(group["params"]):
                momentum = self.state[p].get("momentum")
                if momentum is not None:
                    self._draw(momentum, None if masks is None else masks[i])

    @staticmethod
    def _detach(momenta: list[Tensor]) -> None:
        """After a differentiable step: keep the sampler's own state plain."""
        for momentum in momenta:
            momentum.detach_()
