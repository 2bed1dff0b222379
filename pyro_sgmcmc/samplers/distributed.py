"""Saving and resuming a sampler sharded by ``torch.distributed.optim.ZeroRedundancyOptimizer``.

``ZeroRedundancyOptimizer(params, optimizer_class=SGLD, lr=..., distributed="sharded")`` gives
each rank a local sampler (``zero.optim``) over its share of the parameters and broadcasts the
new values from their owner after each step. Its own ``consolidate_state_dict`` /
``state_dict`` / ``load_state_dict`` carry the per-parameter state and the group options, but
not a local optimizer's other entries: the noise streams of our samplers are lost, and a chain
resumed that way goes on with other noise than the saved run's (a warning says so at its first
step). These two functions save and load each rank's local state whole, so that a run resumed
on the same number of ranks continues exactly.

ZeRO keeps its ``process_group`` argument for itself: the sampler it makes with
``distributed="sharded"`` spans the default group. ZeRO over a subgroup is therefore not
supported (these functions refuse it).
"""

from __future__ import annotations

from typing import Any

from .base import SGMCMCOptimizer

__all__ = ["load_sharded_state_dict", "sharded_state_dict"]


def _local(zero: Any) -> SGMCMCOptimizer:
    sampler = getattr(zero, "optim", None)
    if not isinstance(sampler, SGMCMCOptimizer):
        raise TypeError(f"Invalid zero: {type(zero).__name__} (must be a ZeroRedundancyOptimizer whose "
                        "optimizer_class is a pyro_sgmcmc sampler)")
    group, ranks = getattr(zero, "process_group", None), getattr(sampler, "ranks", None)
    if group is not None and ranks is not None:
        import torch.distributed as dist

        if group is not (ranks.group if ranks.group is not None else dist.group.WORLD):
            raise ValueError("Invalid zero: its process_group is not the group its sampler spans (ZeRO keeps "
                             "process_group for itself, so the sampler it makes spans the default group): ZeRO over a "
                             "subgroup is not supported")
    return sampler


def sharded_state_dict(zero: Any) -> dict[str, Any]:
    """This rank's state of a ``ZeroRedundancyOptimizer`` over one of our samplers: its local
    sampler's ``state_dict()``, noise streams included. Save one per rank (no collective)."""
    return _local(zero).state_dict()


def load_sharded_state_dict(zero: Any, state_dict: dict[str, Any]) -> None:
    """Load what :func:`sharded_state_dict` saved on this rank into ``zero`` (made over the same
    parameters on the same number of ranks), so that the chain continues exactly.

    The group options the local sampler loaded (step counts included) are copied into
    ``zero.param_groups`` too: ``ZeroRedundancyOptimizer.step`` copies those into the local
    sampler before each step, and would otherwise put the step counts back to 0."""
    sampler = _local(zero)
    sampler.load_state_dict(state_dict)
    for outer, inner in zip(zero.param_groups, sampler.param_groups):
        for key, value in inner.items():
            if key != "params":
                outer[key] = value
