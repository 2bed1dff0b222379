r"""One chain over the ranks of ``torch.distributed``: whose noise each rank draws.

Under data parallelism (``DistributedDataParallel``) every rank holds a replica of the
parameters and, after the gradients' all-reduce, the same gradient. A sampler step is then the
same on every rank *if and only if* every rank adds the same noise: a rank that draws its own
(a generator seeded per rank, as is usual for dropout or data shuffling) moves its replica away
from the others, silently, since nothing in DDP compares parameters after the first step. Two
ways keep the replicas one chain:

``"replicated"``
    Every rank draws all the noise, identically: rank 0 of the group draws the seeds of the
    noise streams (:class:`~pyro_sgmcmc.functional.NoiseSource`) from its root generator, the
    same numbers a single process draws, and broadcasts them. The chain on :math:`W` ranks is
    then the single-process chain with the same global batch, up to the floating-point order of
    the gradients' reduction, on one condition: the seeds are drawn when the sampler is made
    (a collective), where one process draws them at its first step; so the root generator (by
    default torch's global one) must draw nothing in between, or the two draw other seeds.
    Every rank pays for the whole noise.

``"sharded"``
    Each rank steps only its share of the parameters and the new values are broadcast from
    their owner, as ``torch.distributed.optim.ZeroRedundancyOptimizer`` does with a local
    optimizer per rank: the noise work per rank is :math:`O(d / W)`. The streams must then be
    *distinct* per rank (else two ranks' shares of the same layout get the same numbers: noise
    correlated across parameters, a wrong target): rank 0 draws :math:`W` sets of seeds and rank
    :math:`r` takes set :math:`r`. For SGLD, SGHMC and PSGLD, whose updates are per coordinate,
    the chain has the law of the single-process chain, but not its path (which rank owns a
    parameter depends on :math:`W`). Not for SGNHT: its thermostat is shared by a parameter group,
    and each rank's local sampler has one for its share (:math:`W` thermostats where one process
    has one). ``ZeroRedundancyOptimizer`` keeps its ``process_group`` for itself (the sampler it
    makes spans the default group): ZeRO over a subgroup is not supported (refused by
    :mod:`pyro_sgmcmc.samplers.distributed`'s state functions, where it can be seen).

Off the CPU the noise comes from the root generator itself (:class:`NoiseSource`), which must
then be given, on the parameters' device: it is reseeded from rank 0's draw (the same seed on
every rank, or one per rank when sharded).

These functions run collectives: every rank of the group must call them, in the same order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import Tensor

from ._noise import NoiseSource

__all__ = ["MODES", "Ranks", "ReplicaMismatchError", "average", "check_process_group", "check_replicas",
           "fingerprints", "share_noise", "shared_generator"]

#: The ways a sampler can run under ``torch.distributed`` (``None``: not said; see the module docstring).
#: ``"independent"``: each rank runs a chain of its own (its own seed), on purpose.
MODES = ("replicated", "sharded", "independent")


class ReplicaMismatchError(RuntimeError):
    """The replicas of one chain differ between ranks (see :func:`check_replicas`)."""


@dataclass(frozen=True)
class Ranks:
    """A process group as a sampler uses it.

    :param group: the ``torch.distributed`` process group (``None``: the default group).
    :param rank: this process's rank in the group.
    :param world_size: the number of ranks in the group.
    :param source: the global rank of the group's rank 0 (where seeds are drawn).
    :param device: where the group's collectives take tensors (CUDA for NCCL, else the CPU).
    """

    group: Any
    rank: int
    world_size: int
    source: int
    device: torch.device

    @classmethod
    def of(cls, group: Any = None, argument: str = "distributed") -> "Ranks":
        """The ranks of ``group`` (the default group if ``None``); a ``ValueError`` naming
        ``argument`` if ``torch.distributed`` is not initialized."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise ValueError(f"Invalid {argument}: it needs torch.distributed initialized (call "
                             "torch.distributed.init_process_group on every rank first, or run under torchrun)")
        rank = dist.get_rank(group)
        if rank < 0:
            raise ValueError(f"Invalid process_group: this process (global rank {dist.get_rank()}) is not in it "
                             "(make the sampler only on the group's ranks)")
        world_size = dist.get_world_size(group)
        source = 0 if group is None else dist.get_global_rank(group, 0)
        if dist.get_backend(group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        else:
            device = torch.device("cpu")
        return cls(group, rank, world_size, source, device)

    def broadcast(self, tensor: Tensor) -> Tensor:
        """``tensor`` of the group's rank 0, on every rank (a copy; ``tensor`` is left as it was)."""
        import torch.distributed as dist

        buffer = tensor.to(self.device, copy=True)
        dist.broadcast(buffer, src=self.source, group=self.group)
        return buffer.to(tensor.device)

    def agree(self, ok: bool) -> bool:
        """Whether every rank says ``ok`` (one all-reduce of one integer): how the ranks of a
        sharded chain refuse a step together (:class:`~pyro_sgmcmc.functional._step.Ballot`)."""
        import torch.distributed as dist

        vote = torch.tensor([1 if ok else 0], dtype=torch.int32, device=self.device)
        dist.all_reduce(vote, op=dist.ReduceOp.MIN, group=self.group)
        return bool(vote.item())

    def gather(self, tensor: Tensor) -> list[Tensor]:
        """Every rank's ``tensor`` (same shape on all), in rank order, on every rank."""
        import torch.distributed as dist

        buffer = tensor.to(self.device)
        out = [torch.empty_like(buffer) for _ in range(self.world_size)]
        dist.all_gather(out, buffer, group=self.group)
        return [t.to(tensor.device) for t in out]


def check_process_group(process_group: Any, distributed: str | None,
                        spanning: tuple[str, ...] = ("replicated", "sharded")) -> None:
    """A ``process_group`` is a ``torch.distributed`` one (or ``None``), and is given only with a
    ``distributed`` mode in ``spanning`` (a chain that spans ranks)."""
    if process_group is None:
        return
    import torch.distributed as dist

    outside = getattr(getattr(dist, "GroupMember", None), "NON_GROUP_MEMBER", object())
    if process_group is outside or (isinstance(process_group, int) and process_group == outside):
        # what torch.distributed.new_group returns on the ranks it leaves out
        raise ValueError(f"Invalid process_group: this process (global rank {dist.get_rank()}) is not in it "
                         "(make the sampler only on the group's ranks)")
    if not (dist.is_available() and isinstance(process_group, dist.ProcessGroup)):
        raise TypeError(f"Invalid process_group: {process_group!r} (must be a torch.distributed ProcessGroup "
                        "or None)")
    if distributed not in spanning:
        accepted = " or ".join(repr(mode) for mode in spanning)
        raise ValueError(f"Invalid process_group: given with distributed={distributed!r} (only with "
                         f"distributed={accepted})")


def average(tensors: Sequence[Tensor], ranks: Ranks) -> None:
    """Replace each of ``tensors`` (in place) by its average over the ranks: one all-reduce of
    them all, flattened together (a collective)."""
    import torch.distributed as dist

    if not tensors:
        return
    flat = torch.cat([t.detach().reshape(-1) for t in tensors]).to(ranks.device)
    dist.all_reduce(flat, group=ranks.group)
    flat = flat.to(tensors[0].device) / ranks.world_size
    offset = 0
    with torch.no_grad():
        for t in tensors:
            t.copy_(flat[offset: offset + t.numel()].view_as(t))
            offset += t.numel()


def shared_generator(ranks: Ranks, device: torch.device | str = "cpu") -> torch.Generator:
    """A new generator on ``device`` in the same state on every rank of ``ranks``: seeded from
    rank 0's torch global CPU generator, which is read, not advanced (its state is broadcast and
    one seed drawn from a copy; a collective). For random draws that must be the same on every
    rank (warmup's curvature probes) where the global generators of the ranks may have drawn
    differently (minibatches of shards of different sizes)."""
    copy = torch.Generator()
    copy.set_state(ranks.broadcast(torch.get_rng_state()))
    seed = int(torch.randint(0, 2**62, (1,), generator=copy, dtype=torch.int64))
    # a stream apart from the global one: the copy's first draw seeds it, scrambled
    return torch.Generator(device=device).manual_seed(seed ^ 0x5DEECE66D)


def share_noise(noise: NoiseSource, mode: str, ranks: Ranks, devices: Sequence[torch.device] = ()) -> None:
    """Seed ``noise`` on every rank of ``ranks`` for ``mode`` (see the module docstring): every
    rank draws the streams' seeds from its root generator, one set of ``num_streams`` for
    ``"replicated"`` (what one process draws: on one rank, the single-process chain) or one set
    per rank for ``"sharded"`` (:math:`W` x ``num_streams``: more than one process draws, so
    the root generator afterwards is not the single-process one); for parameters off the CPU,
    one seed for the given root generator (which draws the noise there) per set. Every rank's
    root generator advances alike; rank 0's draw is broadcast, and each rank seeds with its own
    set. A collective.

    :param noise: the sampler's noise source.
    :param mode: ``"replicated"`` or ``"sharded"``.
    :param ranks: the group.
    :param devices: the devices of the parameters (a root generator off the CPU must be given).
    """
    if mode not in ("replicated", "sharded"):
        raise ValueError(f"Invalid mode: {mode!r} (must be 'replicated' or 'sharded')")
    off_cpu = sorted({torch.device(d).type for d in devices} - {"cpu"})
    if off_cpu and noise.generator is None:
        raise ValueError(
            f"Invalid generator: None with distributed={mode!r} and parameters on {off_cpu[0]} (pass a "
            "torch.Generator on the parameters' device: off the CPU it draws the noise, and is seeded from rank 0)")
    sets = ranks.world_size if mode == "sharded" else 1
    mine = ranks.rank if mode == "sharded" else 0
    # every rank draws (its root generator advances as rank 0's does); rank 0's seeds are kept
    if off_cpu:  # the given generator, on the parameters' device, draws the noise: reseed it
        generator = noise.generator
        seeds = torch.randint(0, 2**62, (sets,), generator=generator, device=generator.device, dtype=torch.int64)
        generator.manual_seed(int(ranks.broadcast(seeds.cpu())[mine]))
        return
    seeds = ranks.broadcast(noise.draw_seeds(sets * noise.num_streams))  # as many as one process draws
    noise.seed_streams(seeds.view(sets, noise.num_streams)[mine])


#: integer dtypes of each element size, to read a tensor's bits
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def fingerprints(tensors: Sequence[Tensor]) -> Tensor:
    """One int64 per tensor: the wrapping sum of its elements' bits (read as integers). Equal
    tensors have equal fingerprints on every machine (integer sums do not depend on their
    order); tensors that differ in one element differ in their fingerprint."""
    out = torch.empty(len(tensors), dtype=torch.int64)
    for i, t in enumerate(tensors):
        t = t.detach()
        bits = t.contiguous().view(_BITS[t.element_size()]) if t.is_floating_point() else t
        out[i] = bits.to(torch.int64).sum().cpu()
    return out


def check_replicas(tensors: Sequence[Tensor], ranks: Ranks, names: Sequence[str] | None = None,
                   what: str = "parameter") -> None:
    """Raise :class:`ReplicaMismatchError` on every rank, naming the first rank and tensor that
    differ from rank 0's, unless ``tensors`` are bit for bit the same on every rank of ``ranks`` (compared
    by :func:`fingerprints`). A collective; its cost is one all-gather of one integer per tensor.

    Replicas diverge when ranks add different noise, or start from different values (a model
    not wrapped in ``DistributedDataParallel``, which broadcasts rank 0's parameters, or wrapped
    after the sampler was made from other tensors)."""
    every = ranks.gather(fingerprints(tensors))
    for rank, theirs in enumerate(every):
        differ = (theirs != every[0]).nonzero()
        if len(differ):
            i = int(differ[0])
            label = f"{what} {names[i]!r}" if names is not None else f"{what} {i}"
            raise ReplicaMismatchError(
                f"the replicas of the chain differ: {label} of rank {rank} is not the one of rank 0 "
                "(every rank of a data-parallel chain must start from the same values, e.g. a model wrapped in "
                "DistributedDataParallel, and add the same noise: distributed='replicated')")
