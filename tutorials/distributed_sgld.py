"""Data-parallel SGLD: one chain over the ranks of torch.distributed, each rank with a shard of the data.

    torchrun --nproc_per_node 2 tutorials/distributed_sgld.py
    python tutorials/distributed_sgld.py            # one rank: the same posterior, not the same chain

(Each rank draws BATCH rows a step: W ranks estimate each step from W x BATCH rows, one rank from
BATCH; the chain is the one-process chain only for the same global batch.)

A Bayesian linear regression (exact posterior known) whose 2,000 rows are split across the ranks.
The model is wrapped in ``DistributedDataParallel``; every step, each rank draws a minibatch of its
own shard, computes the potential it estimates from it, and DDP averages the ranks' gradients.
The sampler is told that the ranks hold replicas of one chain (``distributed="replicated"``): its
noise is seeded from rank 0, so every rank adds the same noise and the replicas stay bit for bit
identical, though each rank's own RNG (here the minibatch draws) is seeded apart. Rank 0 keeps the
samples and compares them with the exact posterior; at the end the replicas are checked equal.

Why each rank's loss is ``N / m`` times its minibatch sum: DDP *averages* the gradients of the
ranks, so each rank's loss must be a whole estimate of the potential ``U`` (here from its shard),
and their average is the estimate from all ``W * m`` rows.
"""

from __future__ import annotations

import os
import socket

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

from pyro_sgmcmc.functional.distributed import check_replicas
from pyro_sgmcmc.samplers import SGLD

N, D, BATCH = 2_000, 4, 50
NOISE_SD, PRIOR_SD = 1.0, 10.0
QUICK = os.environ.get("PYRO_SGMCMC_QUICK") == "1"
STEPS, BURN_IN = (1500, 300) if QUICK else (6000, 1000)


def make_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0]) + NOISE_SD * torch.randn(N, generator=gen)
    return x, y


def exact_posterior(x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    precision = x.T @ x / NOISE_SD**2 + torch.eye(D) / PRIOR_SD**2
    cov = torch.linalg.inv(precision)
    return cov @ (x.T @ y) / NOISE_SD**2, cov.diagonal().sqrt()


def init_distributed() -> None:
    """torchrun sets these; a plain ``python`` run is one rank of its own."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo")


def main() -> None:
    torch.set_num_threads(1)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    x, y = make_data()
    shard_x, shard_y = x[rank::world], y[rank::world]  # this rank's rows only

    torch.manual_seed(0)  # the same initial weights everywhere (DDP broadcasts rank 0's anyway)
    model = DDP(torch.nn.Linear(D, 1, bias=False))
    sampler = SGLD(model.parameters(), lr=1e-4, distributed="replicated")
    batches = torch.Generator().manual_seed(1000 + rank)  # minibatches: independent per rank

    draws = []
    for step in range(STEPS):
        idx = torch.randint(0, len(shard_y), (BATCH,), generator=batches)
        residual = shard_y[idx] - model(shard_x[idx]).squeeze(-1)
        weights = model.module.weight
        potential = N / BATCH * 0.5 * (residual**2).sum() / NOISE_SD**2 + 0.5 * (weights**2).sum() / PRIOR_SD**2
        sampler.zero_grad()
        potential.backward()  # DDP averages the ranks' gradients here
        sampler.step()
        if step >= BURN_IN and rank == 0:
            draws.append(weights.detach().clone().squeeze(0))

    check_replicas(list(model.parameters()), sampler.ranks)  # raises if a replica drifted
    if rank == 0:
        mean, sd = exact_posterior(x, y)
        error = ((torch.stack(draws).mean(0) - mean) / sd).abs().max()
        print(f"{world} rank(s), {STEPS} SGLD steps, minibatches of {BATCH} per rank; replicas identical")
        print(f"largest error of a posterior mean: {float(error):.2f} posterior sds")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
