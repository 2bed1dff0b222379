"""Helpers of tests/test_distributed.py: run a function on several gloo ranks in spawned
processes (a free port, short timeouts: a hang fails the test instead of blocking CI), and the
functions the ranks run. Kept apart from the test module so that a spawned rank imports no pytest."""

from __future__ import annotations

import copy
import datetime
import os
import socket
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

#: The longest a collective may wait for the other ranks before it raises.
COLLECTIVE_TIMEOUT_S = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn: Callable[..., Any], world: int, port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        result = fn(rank, world, *args)
    except BaseException:
        result = {"error": traceback.format_exc()}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def run_ranks(fn: Callable[..., Any], world: int, out: Path, *args: Any, timeout: float = 240) -> list[Any]:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; their results, in rank order. A rank
    that raised, or ranks still running after ``timeout`` seconds (killed then), fail."""
    context = mp.start_processes(_entry, args=(fn, world, free_port(), str(out), args), nprocs=world, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
        if time.monotonic() > deadline:
            for process in context.processes:
                if process.is_alive():
                    process.kill()
            raise TimeoutError(f"{world} ranks still running after {timeout} s (a collective hangs?)")
    results = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]
    for rank, result in enumerate(results):
        if isinstance(result, dict) and "error" in result:
            raise AssertionError(f"rank {rank} failed:\n{result['error']}")
    return results


# ------------------------------------------------------------------------------- the model

N_DATA = 16
STEPS = 12


def data() -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch (the same on every rank; each rank takes its rows)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_DATA, 3, generator=g, dtype=torch.float64)
    return x, torch.sin(x.sum(1, keepdim=True))


def net() -> torch.nn.Module:
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()


def chain(model: torch.nn.Module, sampler: torch.optim.Optimizer, rows: slice, steps: int) -> list[torch.Tensor]:
    """``steps`` steps on the rows ``rows`` of the global batch, the loss averaged over them (so
    that DDP's average over ranks is the average over the global batch: ``nbeta`` scales it);
    the flat parameters after each step."""
    x, y = data()
    path = []
    for _ in range(steps):
        sampler.zero_grad()
        ((model(x[rows]) - y[rows]) ** 2).mean().backward()
        sampler.step()
        path.append(flat(model))
    return path


def flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).clone()


def rows_of(rank: int, world: int) -> slice:
    share = N_DATA // world
    return slice(rank * share, (rank + 1) * share)


SAMPLER_OPTIONS = {"SGLD": dict(lr=1e-3, nbeta=float(N_DATA)),
                   "SGHMC": dict(lr=1e-3, nbeta=float(N_DATA), friction=1.0)}


#: a sampler drawing its noise ahead of the step: the same chain as "SGLD"
AHEAD = "SGLD, noise ahead"


def make(name: str, params: Any, **options: Any) -> torch.optim.Optimizer:
    from pyro_sgmcmc.samplers import SAMPLERS

    if name == AHEAD:
        return SAMPLERS["SGLD"](params, **SAMPLER_OPTIONS["SGLD"], noise_ahead=True, **options)
    return SAMPLERS[name](params, **SAMPLER_OPTIONS[name], **options)


def reference(name: str, steps: int = STEPS) -> list[torch.Tensor]:
    """The single-process chain of :func:`replicated` (global batch, rank 0's seed)."""
    torch.manual_seed(100)
    model = net()
    return chain(model, make(name, model.parameters()), slice(None), steps)


# ------------------------------------------------------------------------------ the ranks

def replicated(rank: int, world: int, names: tuple[str, ...], everything: bool = False) -> dict[str, Any]:
    """Per sampler: the DDP chain with distributed='replicated' (each rank seeded apart); its
    resumption from a state saved halfway; and the chain with distributed=None, which drifts.
    With ``everything``, also :func:`mismatch` and :func:`sharded` (one set of processes for all)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    out: dict[str, Any] = {}
    for name in names:
        torch.manual_seed(100 + rank)  # as for per-rank dropout: the noise must not follow it
        model = DDP(net())
        sampler = make(name, model.parameters(), distributed="replicated")
        half = chain(model, sampler, rows_of(rank, world), STEPS // 2)
        saved, at_half = copy.deepcopy(sampler.state_dict()), [p.detach().clone() for p in model.parameters()]
        rest = chain(model, sampler, rows_of(rank, world), STEPS - STEPS // 2)
        with torch.no_grad():
            for p, value in zip(model.parameters(), at_half):
                p.copy_(value)
        resumed = make(name, model.parameters(), distributed="replicated")
        resumed.load_state_dict(saved)
        again = chain(model, resumed, rows_of(rank, world), STEPS - STEPS // 2)
        out[name] = {"path": half + rest, "resumed": again}
    torch.manual_seed(100 + rank)
    model = DDP(net())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        drift = chain(model, make("SGLD", model.parameters()), rows_of(rank, world), STEPS)
    out["unsaid"] = {"path": drift, "warnings": [str(w.message) for w in caught]}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chain(model, make("SGLD", model.parameters(), distributed="independent"), rows_of(rank, world), 1)
    out["independent_warnings"] = [str(w.message) for w in caught]
    if everything:
        out["mismatch"] = mismatch(rank, world)
        out["zero"] = sharded(rank, world)
        out["kernels"] = kernels(rank, world)
    return out


def mismatch(rank: int, world: int) -> str:
    """distributed='replicated' over parameters that differ between ranks (no DDP to broadcast
    them): the first step's error."""
    from pyro_sgmcmc.functional.distributed import ReplicaMismatchError

    torch.manual_seed(rank)
    model = net()
    sampler = make("SGLD", model.parameters(), distributed="replicated")
    try:
        chain(model, sampler, rows_of(rank, world), 1)
    except ReplicaMismatchError as error:
        return str(error)
    return "no error"


def refuse_together(model: torch.nn.Module, zero: Any, rank: int, world: int) -> dict[str, Any]:
    """A NaN in the gradient of the first parameter (one rank's share): every rank refuses the
    step and nothing moves; the next step goes on."""
    from pyro_sgmcmc.functional import NonFiniteError

    x, y = data()
    rows = rows_of(rank, world)
    before = flat(model)
    zero.zero_grad()
    ((model(x[rows]) - y[rows]) ** 2).mean().backward()
    next(iter(model.parameters())).grad[0, 0] = float("nan")
    try:
        zero.step()
        error = "stepped"
    except NonFiniteError as refusal:
        error = str(refusal)
    unmoved = torch.equal(before, flat(model))
    after = chain(model, zero, rows, 1)[-1]
    return {"error": error, "unmoved": unmoved, "after": after}


class Pair(torch.nn.Module):
    """Two parameters of one shape: on two ranks ZeRO gives each rank one."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))
        self.b = torch.nn.Parameter(torch.zeros(64, dtype=torch.float64))


def sharded(rank: int, world: int) -> dict[str, Any]:
    """ZeroRedundancyOptimizer over SGLD: the chain on every rank; the noise of two same-shaped
    parameters owned by two ranks seeded alike (sharded, and unsaid for contrast); an exact
    resumption from each rank's state; the warning for a consolidated state."""
    from torch.distributed.optim import ZeroRedundancyOptimizer
    from torch.nn.parallel import DistributedDataParallel as DDP

    from pyro_sgmcmc.samplers import SGLD
    from pyro_sgmcmc.samplers.distributed import load_sharded_state_dict, sharded_state_dict

    out: dict[str, Any] = {}
    torch.manual_seed(100)  # the same seed on every rank: the sharded mode must still draw apart
    model = DDP(net())
    zero = ZeroRedundancyOptimizer(model.parameters(), optimizer_class=SGLD, **SAMPLER_OPTIONS["SGLD"],
                                   distributed="sharded")
    half = chain(model, zero, rows_of(rank, world), STEPS // 2)
    saved, at_half = copy.deepcopy(sharded_state_dict(zero)), [p.detach().clone() for p in model.parameters()]
    zero.consolidate_state_dict(to=0)
    consolidated = zero.state_dict() if rank == 0 else None
    rest = chain(model, zero, rows_of(rank, world), STEPS - STEPS // 2)
    out["path"] = half + rest

    def restart() -> ZeroRedundancyOptimizer:
        with torch.no_grad():
            for p, value in zip(model.parameters(), at_half):
                p.copy_(value)
        return ZeroRedundancyOptimizer(model.parameters(), optimizer_class=SGLD, **SAMPLER_OPTIONS["SGLD"],
                                       distributed="sharded")

    resumed = restart()
    load_sharded_state_dict(resumed, saved)
    out["resumed"] = chain(model, resumed, rows_of(rank, world), STEPS - STEPS // 2)
    out["steps"] = resumed.optim.param_groups[0]["step"]
    out["refused"] = refuse_together(model, resumed, rank, world)

    objects = [consolidated]
    dist.broadcast_object_list(objects, src=0)
    rough = restart()
    rough.load_state_dict(objects[0])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        chain(model, rough, rows_of(rank, world), 1)
    out["consolidated_warnings"] = [str(w.message) for w in caught]

    for mode in ("sharded", None):
        torch.manual_seed(7)  # alike on every rank, as for DDP
        pair = Pair()
        zero = ZeroRedundancyOptimizer(pair.parameters(), optimizer_class=SGLD, lr=1.0, distributed=mode)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for p in pair.parameters():
                p.grad = torch.zeros_like(p)
            zero.step()  # pure noise
        out[f"pair_{mode}"] = (pair.a.detach().clone(), pair.b.detach().clone())
    return out


# ------------------------------------------------------------------- the MCMC kernels, sharded data

N_ROWS, N_FEATURES = 64, 2


def regression_data(features: int = N_FEATURES) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_ROWS, features, generator=g, dtype=torch.float64)
    coefficients = torch.tensor([1.0, -0.5], dtype=torch.float64).repeat(features)[:features]
    return x, x @ coefficients + torch.randn(N_ROWS, generator=g, dtype=torch.float64)


def regression(x: torch.Tensor, y: torch.Tensor, world: int = 1, batch: int | None = None) -> None:
    """A rank's model: the prior once, its shard's likelihood scaled by the number of ranks."""
    import pyro
    import pyro.distributions as pdist

    w = pyro.sample("w", pdist.Normal(torch.zeros(x.shape[1], dtype=torch.float64), 3.0).to_event(1))
    with pyro.poutine.scale(scale=float(world)), pyro.plate("data", len(y), subsample_size=batch) as idx:
        pyro.sample("y", pdist.Normal(x[idx] @ w, 1.0), obs=y[idx])


def kernel_chain(world: int = 1, rank: int = 0, batch: int | None = None, adapt: bool = False,
                 samples: int = 10, with_kernel: bool = False, **options: Any) -> Any:
    """An SGLD kernel's samples on this rank's shard (all the data on one process); with
    ``with_kernel``, the kernel too."""
    import pyro
    from pyro.infer import MCMC

    import pyro_sgmcmc.infer

    pyro.set_rng_seed(3)
    x, y = regression_data()
    if not adapt:
        options = dict(step_size=2e-3, adapt_step_size=False, adapt_mass_matrix=False, **options)
    kernel = pyro_sgmcmc.infer.SGLD(regression, distributed="replicated" if world > 1 else None, **options)
    mcmc = MCMC(kernel, num_samples=samples, warmup_steps=10 if adapt else 0, disable_progbar=True)
    mcmc.run(x[rank::world], y[rank::world], world, batch)
    return (mcmc.get_samples()["w"], kernel) if with_kernel else mcmc.get_samples()["w"]


def curvature(kernel: Any) -> torch.Tensor:
    """The kernel's Hessian-vector product (of the full potential: small data) at a fixed point,
    along a fixed direction."""
    point = torch.tensor([0.3, -0.2], dtype=torch.float64)
    return kernel._estimator.hessian_vector_product(point, averaged=True)(torch.tensor([1.0, 2.0],
                                                                                       dtype=torch.float64))


def uneven_probes(rank: int, world: int) -> Any:
    """Warmup with a diagonal mass on 20 coordinates (Hutchinson's random probes) over minibatches
    of shards of different sizes (40 and 24 rows: each rank's minibatches draw a different amount
    from its global generator): the samples, or the error."""
    import pyro
    from pyro.infer import MCMC

    import pyro_sgmcmc.infer
    from pyro_sgmcmc.functional.distributed import ReplicaMismatchError

    pyro.set_rng_seed(3)
    x, y = regression_data(20)
    rows = slice(0, 40) if rank == 0 else slice(40, None)
    kernel = pyro_sgmcmc.infer.SGLD(regression, distributed="replicated", full_mass=False)
    mcmc = MCMC(kernel, num_samples=3, warmup_steps=6, disable_progbar=True)
    try:
        mcmc.run(x[rows], y[rows], world, 8)
    except ReplicaMismatchError as error:
        return str(error)
    return mcmc.get_samples()["w"]


def one_rank_raises(rank: int, world: int) -> str:
    """A potential_fn that raises on rank 1 at its 5th call: the error on each rank (at once,
    not after the collectives' timeout)."""
    import pyro_sgmcmc.infer
    from pyro.infer import MCMC

    x, y = regression_data()
    x, y = x[rank::world], y[rank::world]
    calls = [0]

    def potential_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
        calls[0] += 1
        if rank == 1 and calls[0] == 5:
            raise ValueError("the model of rank 1 failed")
        w = params["w"]
        return 0.5 * world * ((y - x @ w) ** 2).sum() + 0.5 * (w ** 2).sum() / 9.0

    kernel = pyro_sgmcmc.infer.SGLD(potential_fn=potential_fn, distributed="replicated", step_size=1e-3,
                                    adapt_step_size=False, adapt_mass_matrix=False)
    mcmc = MCMC(kernel, num_samples=10, warmup_steps=0, disable_progbar=True,
                initial_params={"w": torch.zeros(N_FEATURES, dtype=torch.float64)})
    start = time.monotonic()
    try:
        mcmc.run()
    except Exception as error:
        return f"{type(error).__name__}: {error} after {time.monotonic() - start:.1f} s"
    return "no error"


def groups(rank: int, world: int) -> dict[str, str]:
    """A sampler made on a rank outside its process_group, and ZeRO over a subgroup (the sampler
    it makes spans the default group): the errors."""
    from torch.distributed.optim import ZeroRedundancyOptimizer

    from pyro_sgmcmc.samplers import SGLD
    from pyro_sgmcmc.samplers.distributed import sharded_state_dict

    first, every = dist.new_group([0]), dist.new_group(list(range(world)))  # collectives: every rank
    out = {"outside": "no error", "zero_subgroup": "no error"}
    if rank != 0:
        try:
            SGLD([torch.nn.Parameter(torch.zeros(3))], lr=1e-3, distributed="replicated", process_group=first)
        except ValueError as error:
            out["outside"] = str(error)
    torch.manual_seed(0)
    zero = ZeroRedundancyOptimizer(net().parameters(), optimizer_class=SGLD, process_group=every, lr=1e-3,
                                   distributed="sharded")
    try:
        sharded_state_dict(zero)
    except ValueError as error:
        out["zero_subgroup"] = str(error)
    return out


def self_subsampled(rank: int, world: int) -> dict[str, Any]:
    """A potential_fn that draws its own minibatch of the rank's shard, not said: the kernel
    detects it (on the rank's own potential) as in one process."""
    import pyro
    from pyro.infer import MCMC

    import pyro_sgmcmc.infer

    pyro.set_rng_seed(4 + rank)
    x, y = regression_data()
    x, y = x[rank::world], y[rank::world]

    def potential_fn(params: dict[str, torch.Tensor]) -> torch.Tensor:
        w = params["w"]
        idx = torch.randint(len(y), (8,))
        likelihood = -0.5 * ((y[idx] - x[idx] @ w) ** 2).sum() * len(y) / 8
        return -(world * likelihood - 0.5 * (w ** 2).sum() / 9.0)

    kernel = pyro_sgmcmc.infer.SGLD(potential_fn=potential_fn, distributed="replicated", step_size=1e-3,
                                    adapt_step_size=False, adapt_mass_matrix=False)
    mcmc = MCMC(kernel, num_samples=3, warmup_steps=0, disable_progbar=True,
                initial_params={"w": torch.zeros(N_FEATURES, dtype=torch.float64)})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mcmc.run()
    return {"warnings": [str(w.message) for w in caught], "inner": type(kernel._estimator.inner).__name__,
            "samples": mcmc.get_samples()["w"]}


def kernels(rank: int, world: int) -> dict[str, torch.Tensor]:
    """The exact-potential chain (to compare with one process), and one on minibatches of each
    rank's shard with warmup's adaptation (to compare across ranks)."""
    torch.set_default_dtype(torch.float64)
    minibatch, kernel = kernel_chain(world, rank, batch=8, adapt=True, with_kernel=True)
    return {"exact": kernel_chain(world, rank), "minibatch": minibatch, "curvature": curvature(kernel),
            "uneven_probes": uneven_probes(rank, world), "self_subsampled": self_subsampled(rank, world),
            "one_rank_raises": one_rank_raises(rank, world), "groups": groups(rank, world),
            "svi": svi_chain(world, rank), "svi_apart": svi_apart(rank, world)}


def svi_apart(rank: int, world: int) -> str:
    """SVI with the ranks seeded apart: their guides start at different points, refused."""
    from pyro_sgmcmc.functional.distributed import ReplicaMismatchError

    try:
        svi_chain(world, rank, steps=1, seed=5 + rank)
    except ReplicaMismatchError as error:
        return str(error)
    return "no error"


def svi_chain(world: int = 1, rank: int = 0, steps: int = 10, seed: int = 5) -> torch.Tensor:
    """SVI with the SGLD Pyro optimizer on this rank's shard (seeded alike: the guide's
    initialisation draws); the flat parameters after each step."""
    import pyro
    from pyro.infer import SVI, Trace_ELBO

    import pyro_sgmcmc.optim
    from pyro_sgmcmc.infer import AutoUnconstrainedDelta

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    x, y = regression_data()
    optimizer = pyro_sgmcmc.optim.SGLD({"lr": 2e-3}, distributed="replicated" if world > 1 else None)
    svi = SVI(regression, AutoUnconstrainedDelta(regression), optimizer, Trace_ELBO())
    path = []
    for _ in range(steps):
        svi.step(x[rank::world], y[rank::world], world)
        store = pyro.get_param_store()
        path.append(torch.cat([store[name].detach().reshape(-1) for name in sorted(store.keys())]).clone())
    return torch.stack(path)
