"""Where the LLC chains run: the low-level operations of the chain driver (``llc._Chains``), in this
process (:class:`LocalEngine`) or in worker processes (:class:`ProcessEngine`).

The driver keeps what decides (the pilot runs, the step, restarts, the records and the progress
bar); an engine runs steps and measures. Both engines offer the same operations: :meth:`run` a
number of steps (stopping at a divergence), :meth:`measure` the :class:`~._scales.Scales` where
the chains are, :meth:`restore` the older of the last two snapshots (taken every ``SNAPSHOT``
steps), :meth:`reset` to :math:`w^*`, :meth:`use` a sampler, :meth:`set_step`,
:meth:`drop_control_variates`.

Worker processes are for models whose chains cannot be stacked into one ``vmap``-ed call (a Pyro
model, a module that ``vmap`` cannot batch), which the local engine evaluates one chain after
another. The chains are shared out among as many workers as there are CPUs (at most one worker
a chain: more would only contend for the cores), each with its own objective and its own seed;
the driver's calls go to all of them at once and return when all have answered, so the chains
stay in lockstep at the driver's granularity (it runs ``SNAPSHOT`` steps a call), and a
divergence anywhere stops the phase for all, as in one process. Scales merge as
:func:`~._scales.measure` reduces over chains: curvature and largest noise by their maximum,
traces and loss noise by their mean over chains.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import os
import pickle
import traceback
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import Tensor

from ..functional import NonFiniteError
from ..samplers import SGHMC, SGLD
from ._objective import ChainObjective
from ._scales import ChainStep, ControlVariates, Scales, gradient_estimate, measure, virial

#: Steps between snapshots of the chains (the driver runs this many steps a call).
SNAPSHOT = 25


@dataclass(frozen=True)
class ChainChunk:
    """What :meth:`LocalEngine.run` returns: the loss estimates and virials of each chain at each
    step run (``[C, k]``, float64; the virials NaN where not computed) and, if the chains diverged
    at step ``k``, why (the steps before it only)."""

    values: Tensor
    virials: Tensor
    reason: str | None


class LocalEngine:
    """The chains of ``objective``, stacked, in this process: SGLD (or BAOAB) steps on its
    parameters with the gradient of :func:`~._scales.gradient_estimate`.

    :param objective: the chains' objective.
    :param nbeta: :math:`n\\beta`.
    :param localization: :math:`\\gamma`.
    :param control: the control variates at :math:`w^*` (``None``: plain minibatch estimates).
    :param init_loss: :math:`L_n(w^*)`.
    """

    def __init__(self, objective: ChainObjective, nbeta: float, localization: float, control: ControlVariates | None,
                 init_loss: float):
        self.objective, self.nbeta, self.localization = objective, nbeta, localization
        self.control, self.init_loss = control, init_loss
        self.num_chains, self.num_sampled, self.exact = objective.num_chains, objective.num_sampled, objective.exact
        self.limit = math.inf  # a step whose n beta (L - L*) exceeds this diverged
        self.snapshots = [[p.detach().clone() for p in objective.params]] * 2
        self.use(baoab=False)

    def use(self, baoab: bool) -> None:
        """The chains' sampler: SGLD, or SGHMC with the BAOAB splitting (momenta drawn at its first
        step), localized at :math:`w^*`."""
        self.baoab = baoab
        masks = self.objective.stacked_masks()
        group = {"params": self.objective.params, "mask": None if all(m is None for m in masks) else masks}
        options = dict(nbeta=self.nbeta, localization=self.localization)
        self.sampler = (SGHMC([group], lr=0.0, friction=1.0, splitting="baoab", **options) if baoab else
                        SGLD([group], lr=0.0, **options))
        # localized at w*, not where the chains are when the sampler is made (after the pilots)
        self.sampler.set_anchors(a.unsqueeze(0).expand_as(p) for a, p in zip(self.objective.anchor,
                                                                              self.objective.params))

    def set_step(self, step: ChainStep) -> None:
        for group in self.sampler.param_groups:
            group["lr"] = step.size
            if step.baoab:
                group["friction"] = step.friction

    def set_limit(self, limit: float) -> None:
        self.limit = limit

    def measure(self, plain: bool = False) -> Scales:
        """The :class:`~._scales.Scales` where the chains are; ``plain``: their noise that of the
        plain minibatch estimates, also where the chains use control variates."""
        return measure(self.objective, self.nbeta, self.localization, None if plain else self.control)

    def drop_control_variates(self) -> None:
        """From here on, plain minibatch estimates."""
        self.control = None

    def _step(self, virials: bool) -> tuple[Tensor, Tensor | None]:
        """One step: the loss estimates and (``virials``) the virials at the point it left."""
        grads, values = gradient_estimate(self.objective, self.objective.draw(), self.control)
        point_virial = virial(self.objective, grads, self.nbeta, self.localization) if virials else None
        for p, g in zip(self.objective.params, grads):
            p.grad = g
        self.sampler.step()
        return values, point_virial

    def _diverged(self, values: Tensor) -> bool:
        if values.dtype.itemsize < 4:  # half precision: n beta (L - L*) overflows to inf below the limit
            values = values.float()
        excess = self.nbeta * (values - self.init_loss)
        return bool((~torch.isfinite(values) | (excess > self.limit)).any())

    def run(self, steps: int, virials: bool = True) -> ChainChunk:
        """``steps`` steps; at a divergence, stop and say why. Every ``SNAPSHOT`` steps (from the
        call's first) the chains' points are kept, the two latest of them in :attr:`snapshots`.
        ``virials=False``: the chunk's virials are NaN, not computed (they cost two passes over the
        weights and one over the gradients a step)."""
        values: list[Tensor] = []
        point_virials: list[Tensor] = []
        reason = None
        for k in range(steps):
            if k % SNAPSHOT == 0:
                self.snapshots = [self.snapshots[-1], [p.detach().clone() for p in self.objective.params]]
            try:
                step_values, point_virial = self._step(virials)
            except NonFiniteError as error:
                reason = f"step {k}: {error}"
                break
            if self._diverged(step_values):
                reason = f"step {k}: the loss left every plausible range"
                break
            values.append(step_values)
            if point_virial is not None:
                point_virials.append(point_virial)

        def stacked(points: list[Tensor], fill: float) -> Tensor:  # on the host: the records are statistics
            if points:
                return torch.stack(points, 1).double().cpu()
            return torch.full((self.num_chains, len(values)), fill, dtype=torch.float64)

        return ChainChunk(stacked(values, 0.0), stacked(point_virials, math.nan), reason)

    def _move_to(self, points: list[Tensor]) -> None:
        """The chains to ``points`` (broadcast), their momenta (BAOAB) drawn afresh."""
        with torch.no_grad():
            for p, kept in zip(self.objective.params, points):
                p.copy_(kept.expand_as(p))
        self.sampler.reset_auxiliary()

    def restore(self) -> None:
        """The chains back to the older of the last two snapshots."""
        self._move_to(self.snapshots[0])

    def reset(self) -> None:
        """The chains back to :math:`w^*`."""
        self._move_to([a.unsqueeze(0) for a in self.objective.anchor])

    def close(self) -> None:
        pass


@dataclass(frozen=True)
class WorkerSetup:
    """What a worker needs: ``build(num_chains=chains)`` makes its objective (a picklable callable:
    a function at module level and its arguments), the control variates at :math:`w^*`
    (``full_gradient`` unbroadcast; ``None``: none), and for a Pyro model the parent's param store
    (``param_store``, :meth:`pyro.params.param_store.ParamStoreDict.get_state`: a spawned worker
    starts with an empty one, and a model's ``pyro.param`` values are part of its likelihood)."""

    build: Callable[..., ChainObjective]
    chains: int
    nbeta: float
    localization: float
    init_loss: float
    full_gradient: list[Tensor] | None
    seed: int
    threads: int
    param_store: dict[str, Any] | None = None


def _serve(connection: Any, setup: WorkerSetup) -> None:
    """A worker: builds its chains' :class:`LocalEngine`, then answers the driver's calls
    ``(method, args)`` with ``("ok", result)`` or ``("error", traceback)`` until ``"close"``."""
    try:
        torch.set_num_threads(setup.threads)
        torch.manual_seed(setup.seed)
        if setup.param_store is not None:
            import pyro

            pyro.get_param_store().set_state(setup.param_store)
        objective = setup.build(num_chains=setup.chains)
        control = None
        if setup.full_gradient is not None:
            control = ControlVariates(setup.init_loss, [g.unsqueeze(0).expand(setup.chains, *g.shape)
                                                        for g in setup.full_gradient])
        engine = LocalEngine(objective, setup.nbeta, setup.localization, control, setup.init_loss)
        connection.send(("ok", None))
    except BaseException:
        connection.send(("error", traceback.format_exc()))
        return
    while True:
        try:
            method, args = connection.recv()
        except EOFError:  # the driver is gone
            return
        if method == "close":
            return
        try:
            connection.send(("ok", getattr(engine, method)(*args)))
        except BaseException:
            connection.send(("error", traceback.format_exc()))


def worker_count(num_chains: int) -> int:
    """Workers for ``num_chains`` chains: one a chain, at most one a CPU this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(num_chains, cpus))


class ProcessEngine:
    """``num_chains`` chains shared out among ``num_workers`` worker processes of the
    multiprocessing context ``mp_context`` (the first ``num_chains % num_workers`` take one more),
    each with its own objective from ``setup.build`` and the seed ``setup.seed + worker``; the
    calls of :class:`LocalEngine`, answered by all workers at once.

    :param setup: the workers' :class:`WorkerSetup` (``seed`` the first worker's; ``chains`` and
        ``threads`` set here).
    :param num_chains: chains.
    :param num_workers: worker processes (default :func:`worker_count`).
    :param num_sampled: sampled coordinates of one chain.
    :param exact: whether every evaluation uses the whole data set.
    :param mp_context: ``"spawn"``, ``"forkserver"`` or ``"fork"``.
    """

    def __init__(self, setup: WorkerSetup, num_chains: int, num_sampled: int, exact: bool, mp_context: str,
                 num_workers: int | None = None):
        self.num_chains, self.num_sampled, self.exact = num_chains, num_sampled, exact
        workers = worker_count(num_chains) if num_workers is None else num_workers
        self.shares = [num_chains // workers + (k < num_chains % workers) for k in range(workers)]
        threads = max(1, torch.get_num_threads() // workers)
        context = multiprocessing.get_context(mp_context)
        self._connections, self._processes = [], []
        try:
            for k, chains in enumerate(self.shares):
                ours, theirs = context.Pipe()
                worker = dataclasses.replace(setup, seed=setup.seed + k, chains=chains, threads=threads)
                process = context.Process(target=_serve, args=(theirs, worker), daemon=True,
                                          name=f"llc-worker-{k}")
                try:
                    process.start()
                except (pickle.PicklingError, AttributeError, TypeError) as error:
                    raise ValueError(
                        f"Invalid mp_context: {mp_context!r} needs the model, its data and the loss to be picklable "
                        f"(defined at module level, not in a function or a notebook cell); pickling failed: {error}. "
                        "Give mp_context=None to run the chains in this process") from error
                theirs.close()
                self._connections.append(ours)
                self._processes.append(process)
            self._gather()
        except BaseException:
            self.close()
            raise

    def _gather(self) -> list[Any]:
        results, failures = [], []
        for k, connection in enumerate(self._connections):
            try:
                status, payload = connection.recv()
            except EOFError:
                status, payload = "error", "the worker process ended without answering"
            if status == "error":
                failures.append(f"worker {k}: {payload}")
            results.append(payload)
        if failures:
            raise RuntimeError("An LLC chain's worker process failed:\n" + "\n".join(failures))
        return results

    def _call(self, method: str, *args: Any) -> list[Any]:
        for connection in self._connections:
            connection.send((method, args))
        return self._gather()

    def use(self, baoab: bool) -> None:
        self._call("use", baoab)

    def set_step(self, step: ChainStep) -> None:
        self._call("set_step", step)

    def set_limit(self, limit: float) -> None:
        self._call("set_limit", limit)

    def run(self, steps: int, virials: bool = True) -> ChainChunk:
        """Every chain runs ``steps`` steps; the chunk keeps the steps that all of them ran, and the
        first divergence's reason."""
        chunks = self._call("run", steps, virials)
        kept = min(chunk.values.shape[1] for chunk in chunks)
        reason = next((f"worker {k}, {chunk.reason}" for k, chunk in enumerate(chunks) if chunk.reason), None)
        return ChainChunk(torch.cat([chunk.values[:, :kept] for chunk in chunks]),
                          torch.cat([chunk.virials[:, :kept] for chunk in chunks]), reason)

    def measure(self, plain: bool = False) -> Scales:
        found = self._call("measure", plain)
        mean = lambda field: sum(c * getattr(s, field) for c, s in zip(self.shares, found)) / self.num_chains  # noqa: E731
        return Scales(max(s.curvature for s in found), mean("hessian_trace"), mean("noise_trace"),
                      max(s.noise_max for s in found), mean("loss_noise"))

    def drop_control_variates(self) -> None:
        self._call("drop_control_variates")

    def restore(self) -> None:
        self._call("restore")

    def reset(self) -> None:
        self._call("reset")

    def close(self) -> None:
        for connection in self._connections:
            try:
                connection.send(("close", ()))
            except (BrokenPipeError, OSError):
                pass
        for process in self._processes:
            process.join(timeout=5)
            if process.is_alive():
                process.terminate()
        for connection in self._connections:
            connection.close()
        self._connections, self._processes = [], []
