r"""How one sampling step runs: checked whole before anything is drawn or written, then applied
whole.

Every update rule hands :func:`execute` one :class:`Task` per (device, dtype) bucket of its
tensors. A task says how to *prepare* a chunk (write the noise-free part of the update, the
"candidate", into the chunk's buffer and return its sum of squares) and how to *finish* it (draw
the chunk's noise, add it, write the parameters).

A step of one chunk (a small model: the common case) prepares it, checks the candidate's sum of
squares :math:`C`, and only then draws the noise and writes. A step of several chunks (a large
model, or several buckets) first checks every chunk against a bound computed from the norms of
its inputs (:meth:`Task.bound`: the gradients, and the parameters, anchors or momenta where they
enter the candidate), reading them only, then prepares and finishes each chunk in the noise
threads. Either way, before anything is drawn or written:

* a NaN or Inf refuses the step (:class:`~pyro_sgmcmc.functional.NonFiniteError`, naming the
  first NaN or Inf gradient, or else the first tensor whose update would not be finite), and
  nothing has changed: the noise streams, torch's global generator (which seeds the streams and
  draws first momenta) and every tensor are as they were;
* a bound decides whether the write is surely finite: with the noise at most :math:`N` per entry
  (``|z| <= Z_MAX``) and the update ``factor`` times :math:`\sqrt C + N`, every written value
  stays finite if the parameter was finite and ``factor * (sqrt(C) + N)`` is below half the
  spacing of floats at the dtype's largest value (:func:`update_limit`). That holds for any sane
  step (for float32, unless an update exceeds 1e30). When it does not, the step runs guarded:
  the tensors it writes and the generators' states are copied first, and restored if a written
  value is not finite (the step is then refused as above).

Where several processes each step a share of one chain (``distributed="sharded"``), they must
refuse a step together: a :class:`Ballot` given to :func:`execute` is cast once per step, when
this process's decision is final (before the noise is drawn, or after a guarded step's check),
and a step that another process refused is refused here too (``kind="elsewhere"``), restored if
it was already written.

On the CPU, the chunks of a plan are worked on in the noise threads (one lane per buffer, see
:mod:`._noise`). A ``KeyboardInterrupt`` that reaches the calling thread while it waits for them
is held back: the lanes finish the step, and :attr:`NoiseSource.interrupted` says that the step's
owner must raise it once its own bookkeeping (step counts, thermostats) is done too.
"""

from __future__ import annotations

import math
from concurrent.futures import Future
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from ._common import NonFiniteError, first_bad_piece, first_nonfinite
from ._noise import Chunk, NoisePlan, NoiseSource, _thread_pool, warn_if_forked

#: The largest ``|z|`` torch's ``normal_`` returns: it is Box-Muller on uniforms of at most 53
#: bits, so ``|z| <= sqrt(-2 log 2^-53) = 8.6``.
Z_MAX = 9.0


class Task:
    """One bucket of one update, as :func:`execute` runs it (see the module docstring). Each
    update rule subclasses it; a layout keeps one per bucket (:meth:`Layout.tasks_of
    <pyro_sgmcmc.functional._noise.Layout.tasks_of>`) and the rule refreshes its per-step values
    (gradients, step size...) before each step, so a step makes no new objects.

    :param plan: the bucket's noise plan.
    :param indices: the bucket's tensors' indices in the lists handed to the update rule.

    Attributes a step uses: ``grads`` (the bucket's gradients, to name a non-finite one),
    ``limit`` (the largest sum of squares that passes without a closer look, see
    :func:`update_limit`; ``-inf``: the step is refused at once; ``None``: no check at all),
    :attr:`candidate` and :attr:`written`.
    """

    __slots__ = ("plan", "indices", "ops", "grads", "limit", "_bound")

    #: which of a chunk's views hold the candidate: ``"noise"`` (its first buffer) or ``"spares"``
    candidate = "noise"

    @property
    def ahead_std(self) -> float | None:
        """The scale of the noise :meth:`finish` draws into each chunk's ``spare`` buffer with
        :func:`~pyro_sgmcmc.functional._noise.draw` (so that it can be drawn ahead), or ``None``
        where it draws otherwise (then nothing is drawn ahead)."""
        return None

    def __init__(self, plan: NoisePlan, indices: list[int]):
        self.plan, self.indices = plan, indices
        self.ops = self.grads = self.limit = self._bound = None

    @property
    def written(self) -> list[Sequence[Tensor]]:
        """The lists of the bucket's tensors a step writes (parameters, momenta...)."""
        raise NotImplementedError

    def prepare(self, chunk: Chunk, measure: bool = True) -> tuple[Tensor | None, Any]:
        """Write the chunk's candidate into its buffers; return its sum of squares (a 0-dim
        tensor; ``None`` unless ``measure``) and whatever :meth:`finish` needs."""
        raise NotImplementedError

    def bound(self, chunk: Chunk) -> float:
        """An upper bound on the norm of the chunk's candidate, from its inputs, reading them
        only (NaN or Inf if an input is not finite)."""
        raise NotImplementedError

    def finish(self, chunk: Chunk, context: Any, generator: torch.Generator | None) -> Any:
        """Draw the chunk's noise from ``generator``, complete and write the update; the result
        is handed back by :func:`execute`."""
        raise NotImplementedError

    def set_limit(self, check: bool, factor: float, noise_bound: float, *scalars: float) -> None:
        """``limit`` for these numbers (:func:`update_limit`), recomputed only when they change."""
        bound = (check, factor, noise_bound, scalars)
        if bound != self._bound:
            self._bound = bound
            self.limit = update_limit(self.plan.dtype, factor, noise_bound, scalars, self.buffer_dtype) if check \
                else None

    def discard(self) -> None:
        """Drop what :meth:`prepare` kept for :meth:`finish` when the step is refused."""

    @property
    def buffer_dtype(self) -> torch.dtype:
        """The dtype the update is computed in (:func:`update_limit`): the eager step's buffers
        are in the parameters' dtype."""
        return self.plan.dtype


#: An update rule's step: ``(tasks, post)``, its :class:`Task` objects and what to do with their
#: results once they ran (``post(results)``, e.g. update a thermostat, add diagnostics; or ``None``).
#: A plain tuple: a step makes it anew each time.
Step = tuple

#: ``limit`` of a task whose update torch cannot compute (a factor beyond the dtype's range)
REFUSED = -math.inf


_FLOATS: dict[torch.dtype, tuple[float, float]] = {}


def update_limit(dtype: torch.dtype, factor: float, noise_bound: float, scalars: Sequence[float] = (),
                 buffer_dtype: torch.dtype | None = None) -> float:
    """The largest sum of squares :math:`C` of a chunk's candidate for which an update of at
    most ``factor * (sqrt(C) + noise_bound)`` per entry surely leaves a finite parameter finite:
    the update stays below an eighth of the float spacing at the dtype's largest value (half of
    it, with room for rounding), and the buffer itself below a quarter of that value.

    ``scalars`` are the factors the update hands torch as ``alpha`` or ``value``, which torch
    refuses to convert beyond the dtype's range: then :data:`REFUSED` (the step is refused at once).
    ``buffer_dtype``: where the update is computed in another dtype than the parameters' (the
    fused kernel's float32), the buffer's and the scalars' range is that dtype's; the spacing
    stays the parameters'."""
    largest, spacing = _floats(dtype)
    if buffer_dtype is not None and buffer_dtype != dtype:
        largest = _floats(buffer_dtype)[0]
    for scalar in scalars:
        if not -largest <= scalar <= largest:
            return REFUSED
    room = min(spacing / factor, largest / 4) - noise_bound
    return room * room if room > 0 else -1.0


def _floats(dtype: torch.dtype) -> tuple[float, float]:
    """The dtype's largest value and an eighth of the float spacing there."""
    floats = _FLOATS.get(dtype)
    if floats is None:
        info = torch.finfo(dtype)
        floats = _FLOATS[dtype] = (info.max, info.max * info.eps / 8)
    return floats


class Ballot:
    """One vote per step on whether every process may apply it (see the module docstring).

    :param vote: ``vote(ok)`` sends this process's verdict and returns whether every process
        said ``True`` (a collective: every process calls it once per step).
    """

    __slots__ = ("vote", "cast")

    def __init__(self, vote: Callable[[bool], bool]):
        self.vote = vote
        self.cast = False

    def __call__(self, ok: bool) -> bool:
        self.cast = True
        return self.vote(ok)

    def approve(self) -> None:
        """Vote ``True``; raise the refusal of the step if another process voted ``False``."""
        if not self(True):
            raise NonFiniteError(-1, "step() refused: another process refused its share of this step (see its "
                                     "error); no parameter was changed", kind="elsewhere")


def run(step: Step, noise: NoiseSource) -> list[list[Any]]:
    """Execute one update rule's step and its ``post``, then raise a held-back Ctrl-C."""
    tasks, post = step
    results = execute(tasks, noise)
    if post is not None:
        post(results)
    noise.raise_if_interrupted()
    return results


def execute(tasks: Sequence[Task], noise: NoiseSource, ballot: Ballot | None = None) -> list[list[Any]]:
    """Run ``tasks`` as one step, all or nothing (see the module docstring); return each task's
    chunk results in chunk order. With a ``ballot``, the step is applied only if every process
    approves it; the ballot is cast exactly once, also when this process refuses. Noise drawn
    ahead (:meth:`NoiseSource.draw_ahead <pyro_sgmcmc.functional.NoiseSource.draw_ahead>`) is
    used if it is this step's, else given back; a refused step gives it back too."""
    if noise.ahead is not None:
        task = tasks[0] if len(tasks) == 1 else None
        noise.settle(None if task is None else task.plan, None if task is None else task.ahead_std)
    if ballot is None and noise.ahead is None:
        try:
            return _execute(tasks, noise, None)
        except BaseException:
            _discard(tasks)
            raise
    try:
        results = _execute(tasks, noise, ballot)
    except BaseException:
        _discard(tasks)
        noise.cancel_ahead()
        if ballot is not None and not ballot.cast:
            ballot(False)
        raise
    noise.claimed()
    return results


def _discard(tasks: Sequence[Task]) -> None:
    """Drop what a refused step's tasks prepared for it (:meth:`Task.discard`)."""
    for task in tasks:
        task.discard()


def _execute(tasks: Sequence[Task], noise: NoiseSource, ballot: Ballot | None) -> list[list[Any]]:
    if not tasks:
        if ballot is not None:
            ballot.approve()
        return []
    for task in tasks:
        if task.limit == REFUSED:
            raise NonFiniteError(task.indices[0], kind="update", task=task)
    task = tasks[0]
    plan = task.plan
    if len(tasks) == 1 and len(plan.chunks) == 1:  # the small case, in this thread
        # Outside autograd, in inference mode: the same in-place ops (versions still bump) skip
        # the autograd dispatch, ~0.1 us each, a twentieth of a small model's step. Anything
        # made here is a temporary; plans and buffers were made before.
        chunk = plan.chunks[0]
        guard = None if torch.is_grad_enabled() else torch._C._InferenceMode(True)
        try:
            total, context = task.prepare(chunk)
            limit = task.limit
            if limit is None or float(total) < limit:
                if ballot is not None:
                    ballot.approve()
                generator = noise.streams()[0] if plan.on_cpu else noise.chunk_generator(plan, 0)
                return [[task.finish(chunk, context, generator)]]
            _judge(task, chunk, float(total))
        finally:
            del guard
        return _guarded(tasks, noise, [[context]], ballot)
    bounds = [_map_chunks(task, _bound(task), noise) for task in tasks]
    guarded = False
    for task, task_bounds in zip(tasks, bounds):
        if task.limit is None:
            continue
        for chunk, bound in zip(task.plan.chunks, task_bounds):
            if not bound * bound < task.limit:
                total = float(task.prepare(chunk)[0])
                if not total < task.limit:
                    _judge(task, chunk, total)
                    guarded = True
    if guarded:
        return _guarded(tasks, noise, None, ballot)
    if ballot is not None:
        ballot.approve()
    return _apply(tasks, noise)


def _bound(task: Task) -> Callable[[int, Chunk], float]:
    def bound(index: int, chunk: Chunk) -> float:
        return task.bound(chunk)

    return bound


def _judge(task: Task, chunk: Chunk, total: float) -> None:
    """A chunk whose candidate failed the quick test: raise for a non-finite gradient or
    candidate entry; return if only the bound failed (the step must run guarded)."""
    if math.isfinite(total):
        return
    bad = first_bad_piece(chunk.pieces(task.grads, readonly=True))
    if bad is not None:
        raise NonFiniteError(task.indices[chunk.owners[bad]], task=task)
    pieces = getattr(chunk, task.candidate)
    bad = first_nonfinite(pieces)
    if bad is not None:
        raise NonFiniteError(task.indices[chunk.owners[bad]], kind="update", task=task)


def _apply(tasks: Sequence[Task], noise: NoiseSource, contexts: list[list[Any]] | None = None) -> list[list[Any]]:
    """The second phase: each chunk prepared (unless ``contexts`` holds the single chunk's, still
    in its buffers), its noise drawn and its update written."""
    results = []
    for i, task in enumerate(tasks):
        generators = noise.generators(task.plan)
        known = None if contexts is None else contexts[i]

        def finish(index: int, chunk: Chunk, task: Task = task, generators: list = generators,
                   known: list[Any] | None = known) -> Any:
            context = known[index] if known is not None else task.prepare(chunk, False)[1]
            return task.finish(chunk, context, generators[index])

        results.append(_map_chunks(task, finish, noise))
    return results


def _guarded(tasks: Sequence[Task], noise: NoiseSource, contexts: list[list[Any]] | None = None,
             ballot: Ballot | None = None) -> list[list[Any]]:
    """The step, with everything it writes copied first and restored if a written value is not
    finite (then refused with ``kind="update"``), or if another process refused the step."""
    snapshot = noise.snapshot([task.plan.device for task in tasks])
    saved = [[[t.detach().clone() for t in tensors] for tensors in task.written] for task in tasks]
    results = _apply(tasks, noise, contexts)

    def restore() -> None:
        with torch.no_grad():
            for task_saved, restoring in zip(saved, tasks):
                for copies, originals in zip(task_saved, restoring.written):
                    for copy, original in zip(copies, originals):
                        original.detach().copy_(copy)
        noise.restore(snapshot)

    for task in tasks:
        for tensors in task.written:
            bad = first_nonfinite(tensors)
            if bad is not None:
                restore()
                raise NonFiniteError(task.indices[bad], kind="update", task=task)
    if ballot is not None:
        try:
            ballot.approve()
        except NonFiniteError:
            restore()
            raise
    return results


def norm(ops: Any, pieces: Sequence[Tensor]) -> float:
    """The 2-norm of ``pieces`` together, as a float (NaN or Inf if one holds NaN or Inf)."""
    with torch.no_grad():  # a bound: no graph, even in a differentiable step
        return math.sqrt(float(ops.sum_of_squares(pieces)))


def drift_bound(ops: Any, chunk: Chunk, grads: Sequence[Tensor], params: Sequence[Tensor],
                anchors: Sequence[Tensor] | None, grad_scale: float, localization: float, weight_decay: float
                ) -> float:
    r"""A bound on the norm of the chunk's drift :math:`s\nabla U + (\gamma + \lambda)\theta -
    \gamma\theta_0` (:func:`~._common.fill_drift`), by the triangle inequality."""
    return drift_norm_bound(grad_scale, localization, weight_decay, norm(ops, chunk.pieces(grads, readonly=True)),
                            norm(ops, chunk.pieces(params, readonly=True)) if localization + weight_decay else 0.0,
                            norm(ops, chunk.pieces(anchors, readonly=True)) if localization else 0.0)


def drift_norm_bound(grad_scale: float, localization: float, weight_decay: float, grad_norm: float,
                     param_norm: float = 0.0, anchor_norm: float = 0.0) -> float:
    r""":math:`|s|\,\|g\| + (\gamma + \lambda)\|\theta\| + \gamma\|\theta_0\|`, the bound of
    :func:`drift_bound` from the norms of the inputs (those a zero factor multiplies may be left 0)."""
    return abs(grad_scale) * grad_norm + (localization + weight_decay) * param_norm + localization * anchor_norm


def _map_chunks(task: Task, fn: Callable[[int, Chunk], Any], noise: NoiseSource) -> list[Any]:
    """``fn(index, chunk)`` for every chunk of the task's plan, in the noise threads where there
    are several (one lane per buffer: chunks ``slot, slot + slots, ...`` in order, so a buffer
    and a stream are never used by two threads at once); results in chunk order."""
    plan = task.plan
    chunks = plan.chunks
    slots = len(plan.buffers)
    workers = min(slots, torch.get_num_threads()) if plan.on_cpu and plan.threaded else 1
    if len(chunks) == 1 or workers <= 1:
        return [fn(index, chunk) for index, chunk in enumerate(chunks)]
    warn_if_forked()
    pool = _thread_pool(workers)
    grad_mode = torch.is_grad_enabled()  # thread-local: carry the caller's into the workers

    def lane(slot: int) -> list[tuple[int, Any]]:
        with torch.set_grad_enabled(grad_mode):
            return [(index, fn(index, chunks[index])) for index in range(slot, len(chunks), slots)]

    lanes = [pool.submit(lane, slot) for slot in range(slots)]
    _wait(lanes, noise)
    results: list[Any] = [None] * len(chunks)
    for finished in lanes:
        for index, value in finished.result():
            results[index] = value
    return results


def _wait(lanes: list[Future], noise: NoiseSource) -> None:
    """Wait for every lane; a Ctrl-C meanwhile is held back (``noise.interrupted``) so that the
    step is never left half done."""
    pending = lanes
    while pending:
        try:
            for finished in pending:
                finished.exception()
            return
        except KeyboardInterrupt:
            noise.interrupted = True
            pending = [finished for finished in pending if not finished.done()]


def gathered(results: list[list[Any]]) -> list[Any]:
    """The chunk results of every task, in order (for an update's ``post``)."""
    return [value for task_results in results for value in task_results]


