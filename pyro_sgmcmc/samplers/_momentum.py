"""What the samplers with a momentum (SGHMC, SGNHT) share: their momenta, drawn and redrawn."""

from __future__ import annotations

import operator

import torch
from torch import Tensor

from .base import SGMCMCOptimizer


class MomentumSampler(SGMCMCOptimizer):
    """A sampler with one momentum per parameter, ``state[p]["momentum"]``, drawn from
    ``N(0, I)`` (its stationary law; 0 where masked) at the parameter's first step (and dropped
    again, the draw undone, if that step is refused)."""

    def typical_move(self, group: dict) -> float:
        """``theta`` moves by ``h p`` a step, with ``p`` about ``N(0, 1)``: about ``lr``."""
        return float(group["lr"])

    def _momenta(self, params: list[Tensor], masks: list[Tensor] | None) -> list[Tensor]:
        """The momenta of ``params``, drawn at a parameter's first step. The list is remembered
        for the same parameters and the same ``state`` (``load_state_dict`` makes a new one):
        a state lookup hashes a tensor in Python, ~0.3 us a parameter on every step. Momenta are
        updated in place; one replaced in ``state`` by hand is seen after ``load_state_dict``."""
        cache = self.__dict__.setdefault("_momenta_cache", {})
        key = (id(params[0]), len(params))
        hit = cache.get(key)
        if hit is not None and hit[0] is self.state and all(map(operator.is_, hit[1], params)):
            return hit[2]
        momenta = self._lookup_momenta(params, masks)
        if len(cache) >= 64:
            cache.clear()
        cache[key] = (self.state, tuple(params), momenta)
        return momenta

    def _lookup_momenta(self, params: list[Tensor], masks: list[Tensor] | None) -> list[Tensor]:
        momenta = []
        for i, p in enumerate(params):
            state = self.state[p]
            momentum = state.get("momentum")
            if momentum is None:
                momentum = torch.empty_like(p, memory_format=torch.contiguous_format)
                self._remember_rng(p.device)  # a refused first step must not have drawn it
                self._draw(momentum, None if masks is None else masks[i])
                state["momentum"] = momentum
                self._remember_fresh(state, "momentum")
            momenta.append(momentum)
        return momenta

    def _draw(self, momentum: Tensor, mask: Tensor | None) -> None:
        """A momentum from ``N(0, I)``: on the CPU from the first noise stream (so a checkpoint
        taken before the first step holds it), elsewhere from the root generator."""
        generator = self._noise.streams()[0] if momentum.device.type == "cpu" else self.generator
        momentum.normal_(generator=generator)
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
