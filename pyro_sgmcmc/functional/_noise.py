"""Chunked Gaussian noise: one fixed way of drawing the noise of a list of tensors.

On a CPU, drawing the Gaussian noise costs more than everything else in an SG-MCMC step put
together (``normal_`` runs at ~3.4 ns per float32 on one core, an ``axpy`` at ~0.1 ns). So the
noise is drawn once per step into small reusable buffers, chunk by chunk, and each chunk is used
while it is still in cache:

* tensors are walked in order and packed whole into chunks of at most ``chunk_numel`` elements
  (:data:`DEFAULT_CHUNK_NUMEL` on the CPU, :data:`DEVICE_CHUNK_NUMEL` on other devices)
  (a tensor is never split unless it alone is larger than a chunk);
* a contiguous tensor larger than a chunk is cut into consecutive pieces of ``chunk_numel``;
* each chunk's noise is drawn by exactly one ``normal_`` call.

Because this plan, not the execution path, decides which ``normal_`` calls are made, the
multi-tensor and per-tensor paths draw identical noise from the same generator. A chunk has two
buffers of at most ``chunk_numel`` elements each (4 MiB of float32), however large the model: the
update is assembled in one (the drift, checked before any noise is drawn) while the noise goes
into the other; no full-size temporary is ever allocated.

Where the numbers come from (:class:`NoiseSource`): torch's CPU generator is a Mersenne twister
that one thread steps through, so one generator cannot fill a buffer faster than ~3 ns per
number. On the CPU the noise therefore comes from :data:`NUM_STREAMS` generators ("streams"),
seeded from the root generator (torch's global one, or the one the caller passed) when first
drawn from (or saved): chunk ``i`` of a plan is drawn from stream ``i % NUM_STREAMS``, so the
numbers do not depend on how many threads draw them. The streams fill their buffers in a thread
pool (torch ops release the GIL) and each chunk's update is applied right there, while the noise
is still in cache. The streams' states are part of the sampler's state, so a saved chain resumes
exactly. On other devices the root generator fills the chunks in order: there, drawing noise is
cheap, and the chunks are large (each chunk on a GPU costs kernel launches and a host
synchronisation for its finite check, and no cache is to be kept warm). How a step uses all this
(checked first, drawn and applied after) is :func:`pyro_sgmcmc.functional._step.execute`.

Noise drawn ahead (:meth:`NoiseSource.draw_ahead`): the noise of a step does not depend on the
gradient, so right after a step the noise threads can draw the next step's, while the caller runs
forward and backward. The draws are the very ``normal_`` calls the next step would make (same
buffers, streams and scale), so the numbers are the same bit for bit; the streams' states from
before those draws are kept, and whatever else touches the streams first (a step whose scale
changed, another plan, a refused step, ``state_dict``, a snapshot) puts them back and forgets the
draws, so that nothing differs from drawing in the step but when the work is done.
"""

from __future__ import annotations

import operator
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

#: Elements per noise chunk. Large enough that ``normal_`` call overhead vanishes, small enough to
#: stay in the L2/L3 cache between drawing the noise and adding it to the parameters.
DEFAULT_CHUNK_NUMEL = 1 << 20

#: Elements per noise chunk on devices other than the CPU: a GPU gains nothing from cache-sized
#: chunks and pays each chunk's launches and the host synchronisation of its check (1M chunks
#: made a step 2.5x slower: ``benchmarks/llc_chain_step.py``). Its two buffers take at most
#: 128 MiB of float32.
DEVICE_CHUNK_NUMEL = 1 << 24

#: Independent CPU noise streams: the most threads that can draw noise at once.
NUM_STREAMS = 4


#: Pieces handed to one elementwise op on the CPU while noise streams run are cut to torch's
#: own parallel grain (32768), so that each op runs on its own thread instead of waking an
#: OpenMP team that would fight the noise threads for the cores.
GRAIN = 32768

#: A chunk of at least two whole 1-d tensors, at most ``GRAIN`` elements in all (beyond, the flat
#: ops would wake an OpenMP team: 51 us instead of 13 for 20 x 2000) and at most this many on
#: average, gathers their gradients with one ``torch.cat`` into a flat scratch buffer and adds them
#: with one flat op, instead of one op per tensor: a small tensor costs more in per-op dispatch
#: (~0.5 us) than in memory traffic. Measured (foreach add -> cat + add): 20 x 100: 10.4 -> 4.6 us;
#: 16 x 2000: 10.9 -> 8.6 us; 2 x 4000: 3.1 -> 3.5 us.
GATHER_MEAN_NUMEL = 2048


class Chunk:
    """A run of tensors (or a slice of one large tensor) that shares one ``normal_`` draw.

    :param start: index of the first tensor of the chunk.
    :param stop: one past the index of the last tensor.
    :param span: ``(lo, hi)`` flat element range when the chunk is a slice of tensor ``start``,
        else ``None`` (the chunk holds tensors ``start:stop`` whole).
    :param flat: the chunk's 1-d view of its first buffer (where the update is assembled).
    :param spare: the chunk's 1-d view of its second buffer, of the same size (the noise, or a
        second candidate such as a new momentum).
    :param cut: per tensor of the chunk, whether it is handed out as ``GRAIN``-sized flat
        pieces; ``None`` when every tensor is handed out whole.
    :param gathers: the chunk's tensors are small and 1-d: their gradients (and momenta) are
        gathered into the flat buffers with one ``torch.cat`` (see ``GATHER_MEAN_NUMEL``).
    """

    __slots__ = ("start", "stop", "span", "flat", "spare", "cut", "noise", "spares", "owners", "gathers", "whole",
                 "ahead")

    def __init__(self, start: int, stop: int, span: tuple[int, int] | None, flat: Tensor, spare: Tensor,
                 cut: list[bool] | None, shapes: list[torch.Size], gathers: bool = False, whole: bool = False):
        self.start, self.stop, self.span, self.flat, self.spare, self.cut = start, stop, span, flat, spare, cut
        #: ``spare`` already holds this step's noise (drawn ahead): :func:`draw` draws nothing
        self.ahead = False
        #: the chunk holds every tensor of its plan, uncut: :meth:`pieces` are the tensors themselves
        self.whole = whole and span is None and cut is None
        self.gathers = gathers
        #: views of ``flat`` (and of ``spare``) matching :meth:`pieces`, and the tensor index of each piece
        self.noise, self.owners = self._views(flat, shapes)
        self.spares, _ = self._views(spare, shapes)

    def _views(self, flat: Tensor, shapes: list[torch.Size]) -> tuple[list[Tensor], list[int]]:
        if self.span is not None:
            pieces = list(flat.split(GRAIN)) if self.cut else [flat]
            return pieces, [self.start] * len(pieces)
        views, owners, offset = [], [], 0
        for k, shape in enumerate(shapes):
            n = shape.numel()
            view = flat[offset : offset + n]
            offset += n
            pieces = view.split(GRAIN) if self.cut and self.cut[k] else [view.view(shape)]
            views.extend(pieces)
            owners.extend([self.start + k] * len(pieces))
        return views, owners

    def pieces(self, tensors: Sequence[Tensor], readonly: bool = False) -> list[Tensor]:
        """The parts of ``tensors`` (aligned with the planned list) that this chunk covers, as
        views (flattened where the plan cuts), matching :attr:`noise` one to one.

        :param readonly: the pieces are only read, so a non-contiguous tensor may be copied
            to flatten it; pieces that are written to are always views (or an error).
        """
        if self.whole:
            return tensors
        flatten = _flat_copy_ok if readonly else _flat_view
        if self.span is not None:
            lo, hi = self.span
            flat = flatten(tensors[self.start])[lo:hi]
            return list(flat.split(GRAIN)) if self.cut else [flat]
        if self.cut is None:
            return list(tensors[self.start : self.stop])
        out: list[Tensor] = []
        for t, cut in zip(tensors[self.start : self.stop], self.cut):
            if cut:
                out.extend(flatten(t).split(GRAIN))
            else:
                out.append(t)
        return out


def _flat_view(t: Tensor) -> Tensor:
    return t.view(-1)


def _flat_copy_ok(t: Tensor) -> Tensor:
    return t.reshape(-1)


class NoisePlan:
    """The chunking of the noise for a list of tensors of one device and dtype.

    :param tensors: the tensors the noise is for (their shapes, device and dtype matter).
    :param chunk_numel: the most elements one chunk (one ``normal_`` call) holds (default
        :data:`DEFAULT_CHUNK_NUMEL` on the CPU, :data:`DEVICE_CHUNK_NUMEL` on other devices).
    :param private: one chunk per tensor, each with buffers of its own, worked on in order: for
        a differentiable step, where autograd cannot follow in-place writes into several views
        of one buffer.
    """

    def __init__(self, tensors: Sequence[Tensor], chunk_numel: int | None = None, private: bool = False):
        if chunk_numel is not None and chunk_numel < 1:
            raise ValueError(f"Invalid chunk_numel: {chunk_numel} (must be a positive integer or None)")
        first = tensors[0]
        self.device = first.device
        self.dtype = first.dtype
        self.on_cpu = on_cpu = self.device.type == "cpu"
        if chunk_numel is None:
            chunk_numel = DEFAULT_CHUNK_NUMEL if on_cpu else DEVICE_CHUNK_NUMEL
        self.threaded = not private
        if private:  # buffers shaped like their tensor, which are their own (only) views
            self.buffers = [torch.empty(t.shape, device=self.device, dtype=self.dtype) for t in tensors]
            self.spares = [torch.empty(t.shape, device=self.device, dtype=self.dtype) for t in tensors]
            self.chunks = []
            for i, (t, flat, spare) in enumerate(zip(tensors, self.buffers, self.spares)):
                chunk = Chunk(i, i + 1, None, flat.view(-1), spare.view(-1), None, [t.shape], whole=len(tensors) == 1)
                chunk.flat, chunk.spare, chunk.noise, chunk.spares = flat, spare, [flat], [spare]
                self.chunks.append(chunk)
            return
        layout = _layout(tensors, chunk_numel)
        buffer_numel = max((numel for _, _, _, numel in layout), default=0)
        # two buffers per stream that can be drawing at once (CPU), else a single pair
        slots = min(NUM_STREAMS if on_cpu else 1, max(len(layout), 1))
        self.buffers = [torch.empty(buffer_numel, device=self.device, dtype=self.dtype) for _ in range(slots)]
        self.spares = [torch.empty(buffer_numel, device=self.device, dtype=self.dtype) for _ in range(slots)]
        threaded = on_cpu and len(layout) > 1  # chunks will be worked on in the noise threads
        self.chunks: list[Chunk] = []
        for index, (start, stop, span, numel) in enumerate(layout):
            flat = self.buffers[index % slots][:numel]
            spare = self.spares[index % slots][:numel]
            shapes = [t.shape for t in tensors[start:stop]]
            if span is not None:
                cut = threaded
            else:
                cut = [threaded and t.numel() > GRAIN and t.is_contiguous() for t in tensors[start:stop]]
                cut = cut if any(cut) else None
            gathers = span is None and _gathers(tensors[start:stop])
            whole = start == 0 and stop == len(tensors)
            self.chunks.append(Chunk(start, stop, span, flat, spare, cut, shapes, gathers, whole))

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)


def _gathers(tensors: Sequence[Tensor]) -> bool:
    """Whether a chunk of these whole tensors gathers their gradients (``GATHER_MEAN_NUMEL``)."""
    if len(tensors) < 2 or any(t.dim() != 1 for t in tensors):
        return False
    numel = sum(t.numel() for t in tensors)
    return numel <= GRAIN and numel <= GATHER_MEAN_NUMEL * len(tensors)


def fill(flat: Tensor, std: float, generator: torch.Generator | None) -> None:
    """Fill ``flat`` with ``N(0, std^2)`` draws (one ``normal_`` call)."""
    flat.normal_(0.0, std, generator=generator)


def draw(chunk: Chunk, std: float, generator: torch.Generator | None) -> None:
    """The chunk's noise into ``chunk.spare``: :func:`fill`, unless it was drawn ahead (with this
    ``std``, from this generator: :meth:`NoiseSource.settle` checked it)."""
    if chunk.ahead:
        chunk.ahead = False
        return
    fill(chunk.spare, std, generator)


class Ahead:
    """Noise drawn ahead for the next step of one plan (see the module docstring).

    :param plan: the plan whose chunks' ``spare`` buffers are being filled.
    :param std: the scale they are drawn with.
    :param states: the streams' states from before the draws.
    :param futures: the draws, one per chunk, in the noise threads.
    """

    __slots__ = ("plan", "std", "states", "futures", "settled", "pid")

    def __init__(self, plan: NoisePlan, std: float, states: list[Tensor], futures: list[Any]):
        self.plan, self.std, self.states, self.futures = plan, std, states, futures
        self.settled = False  # the draws are done and their chunks marked for the coming step
        self.pid = os.getpid()  # a forked child has the buffers but not the threads that fill them

    @property
    def here(self) -> bool:
        """Whether the draws run in this process (not in the parent of a forked child)."""
        return self.pid == os.getpid()

    def wait(self) -> bool:
        """Wait for the draws (an error of one is raised here); a Ctrl-C meanwhile is held back
        until they are all done (whoever waits must not act on draws still running): ``True``
        if one came, for the caller to raise once its state is consistent."""
        if not self.here:
            return False
        interrupted = False
        pending = list(self.futures)
        while pending:
            try:
                for future in pending:
                    future.exception()
                pending = []
            except KeyboardInterrupt:
                interrupted = True
                pending = [future for future in pending if not future.done()]
        for future in self.futures:
            future.result()
        return interrupted


class NoiseSource:
    """Where a sampler's noise comes from (see the module docstring).

    :param generator: the root generator; ``None`` for torch's global generator of each device.
    :param num_streams: CPU streams (fixes the numbers drawn, whatever the thread count).
    """

    def __init__(self, generator: torch.Generator | None = None, num_streams: int = NUM_STREAMS):
        self.generator = generator
        self.num_streams = num_streams
        self._streams: list[torch.Generator] | None = None
        #: the next step's noise being drawn, or drawn (:meth:`draw_ahead`)
        self.ahead: Ahead | None = None
        #: a Ctrl-C that arrived while the calling thread waited for the noise threads: the step
        #: was finished first; whoever owns the step raises it once its bookkeeping is done too
        self.interrupted = False

    def streams(self) -> list[torch.Generator]:
        """The CPU streams, seeded from the root generator on first use (noise drawn ahead and
        not yet claimed by a step is given back first: see :meth:`cancel_ahead`)."""
        if self.ahead is not None and not self.ahead.settled:
            self.cancel_ahead()
        if self._streams is None:
            self.seed_streams(self.draw_seeds(self.num_streams))
        return self._streams

    def draw_seeds(self, count: int) -> Tensor:
        """``count`` stream seeds, uniform on ``[0, 2^32)``, drawn from the CPU root generator
        (the first :attr:`num_streams` of them are what :meth:`streams` seeds the streams with)."""
        return torch.randint(0, 2**32, (count,), generator=self._root("cpu"), dtype=torch.int64)

    def seed_streams(self, seeds: Sequence[int] | Tensor) -> None:
        """(Re)seed the CPU streams, one per seed: how noise drawn on several processes is made
        identical, or independent (:mod:`pyro_sgmcmc.functional.distributed`)."""
        self.cancel_ahead()
        self._streams = [torch.Generator().manual_seed(int(s)) for s in seeds]
        self.num_streams = len(self._streams)

    def _root(self, device_type: str) -> torch.Generator | None:
        if self.generator is not None and self.generator.device.type != device_type:
            raise ValueError(
                f"Invalid generator: it is on device {self.generator.device} but the parameters are on "
                f"{device_type} (must be on the parameters' device)"
            )
        return self.generator

    def draw_ahead(self, plan: NoisePlan, std: float) -> bool:
        """Start drawing the next step's noise of ``plan`` at scale ``std`` in the noise threads
        (see the module docstring); ``False`` (nothing started) where a plan's chunks share
        buffers (more chunks than streams), off the CPU, or for a differentiable step's plan."""
        if not plan.on_cpu or not plan.threaded or len(plan.chunks) > len(plan.spares):
            return False
        streams = self.streams()
        states = [g.get_state() for g in streams]
        warn_if_forked()
        pool = _thread_pool(max(1, min(len(plan.chunks), torch.get_num_threads())))
        futures = [pool.submit(fill, chunk.spare, std, streams[index % self.num_streams])
                   for index, chunk in enumerate(plan.chunks)]
        self.ahead = Ahead(plan, std, states, futures)
        return True

    def settle(self, plan: NoisePlan | None, std: float | None) -> None:
        """Before a step of ``plan`` that draws at scale ``std``: wait for the noise drawn ahead;
        if it is this step's (same plan and scale), mark its chunks so that :func:`draw` uses it,
        else give it back (:meth:`cancel_ahead`)."""
        ahead = self.ahead
        if ahead is None:
            return
        if ahead.wait():
            self.interrupted = True  # raised after the step, as a Ctrl-C while the step's lanes run
        if ahead.here and plan is ahead.plan and std == ahead.std:
            for chunk in plan.chunks:
                chunk.ahead = True
            ahead.settled = True
        else:
            self.cancel_ahead()

    def cancel_ahead(self) -> None:
        """Forget noise drawn ahead: the streams go back to their states from before it, as if it
        had never been drawn. A Ctrl-C while waiting for the draws is raised once the streams
        are back (it used to leave them where the draws had taken them: other noise after)."""
        ahead = self.ahead
        if ahead is None:
            return
        interrupted = ahead.wait()
        self.ahead = None
        for chunk in ahead.plan.chunks:
            chunk.ahead = False
        for generator, state in zip(self._streams or (), ahead.states):
            generator.set_state(state)
        if interrupted:
            raise KeyboardInterrupt

    def claimed(self) -> None:
        """A step used the noise drawn ahead (or there was none)."""
        self.ahead = None

    def generators(self, plan: NoisePlan) -> list[torch.Generator | None]:
        """The generator of each chunk of ``plan`` (see :meth:`chunk_generator`)."""
        return [self.chunk_generator(plan, index) for index in range(len(plan))]

    def chunk_generator(self, plan: NoisePlan, index: int) -> torch.Generator | None:
        """The generator of chunk ``index`` of ``plan``: stream ``index % num_streams`` on the
        CPU (the streams are seeded here, on first use), else the root generator."""
        if plan.on_cpu:
            return self.streams()[index % self.num_streams]
        return self._root(plan.device.type)

    def snapshot(self, devices: Sequence[torch.device] = ()) -> tuple:
        """What :meth:`restore` needs to undo every draw made after this call: the streams'
        states (or that they are not seeded yet) and the states of the root generators of the
        CPU and of ``devices``."""
        self.cancel_ahead()
        streams = None if self._streams is None else [g.get_state() for g in self._streams]
        roots = {}
        for device in (torch.device("cpu"), *devices):
            generator = self.root_generator(torch.device(device))
            if generator is not None:
                roots[id(generator)] = (generator, generator.get_state())
        return streams, list(roots.values())

    def restore(self, snapshot: tuple) -> None:
        """Undo every draw made since :meth:`snapshot`."""
        self.cancel_ahead()
        streams, roots = snapshot
        if streams is None:
            self._streams = None
        else:
            for generator, state in zip(self._streams, streams):
                generator.set_state(state)
        for generator, state in roots:
            generator.set_state(state)

    def root_generator(self, device: torch.device) -> torch.Generator | None:
        """The generator that draws on ``device`` when no stream does: the one given, else
        torch's default generator of that device (``None`` where torch has no handle on it)."""
        if self.generator is not None:
            return self.generator if self.generator.device.type == device.type else None
        return default_generator(device)

    def raise_if_interrupted(self) -> None:
        """Raise the ``KeyboardInterrupt`` held back during the last step, if any."""
        if self.interrupted:
            self.interrupted = False
            raise KeyboardInterrupt

    def __getstate__(self) -> dict[str, Any]:
        self.cancel_ahead()  # the draws' futures do not copy; the streams go back to before them
        return dict(self.__dict__)

    def state_dict(self) -> dict[str, Any]:
        self.cancel_ahead()
        state: dict[str, Any] = {"streams": None if self._streams is None else [g.get_state() for g in self._streams]}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.cancel_ahead()
        streams = state.get("streams")
        if streams is None:
            self._streams = None
        else:
            self._streams = [torch.Generator() for _ in streams]
            for g, s in zip(self._streams, streams):
                g.set_state(s)
            self.num_streams = len(streams)
        if state.get("generator") is not None and self.generator is not None:
            self.generator.set_state(state["generator"])


def default_generator(device: torch.device) -> torch.Generator | None:
    """torch's default generator of ``device`` (the CPU's, or a CUDA device's), ``None`` elsewhere."""
    if device.type == "cpu":
        return torch.default_generator
    if device.type == "cuda":
        return torch.cuda.default_generators[device.index if device.index is not None else torch.cuda.current_device()]
    return None


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A shared pool of ``workers`` threads (one per core torch may use: more only contend)."""
    with _POOL_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pyro_sgmcmc-noise")
        return pool


#: Whether this process was forked from one whose noise threads had run (see :func:`warn_if_forked`).
FORKED_AFTER_THREADS = False


def _forget_pools_after_fork() -> None:  # threads do not survive fork(); the child makes its own
    global _POOL_LOCK, FORKED_AFTER_THREADS
    FORKED_AFTER_THREADS = FORKED_AFTER_THREADS or bool(_POOLS)
    _POOLS.clear()
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


def warn_if_forked() -> None:
    """Warn, once, when a threaded step runs in a process forked after the parent's threaded
    steps: torch's OpenMP and the parent's noise threads do not survive ``fork``, and a child
    that steps can hang or crash there (``torch.optim.SGD`` too). Use the ``spawn`` start method
    (``multiprocessing.get_context("spawn")``) for processes that sample."""
    global FORKED_AFTER_THREADS
    if FORKED_AFTER_THREADS:
        FORKED_AFTER_THREADS = False
        warnings.warn(
            "this process was forked after the parent ran threaded sampler steps: torch's thread pools do "
            "not survive fork(), and stepping here can hang or crash; start sampling processes with the "
            "'spawn' method (multiprocessing.get_context('spawn'))",
            UserWarning,
            stacklevel=4,
        )


def _layout(tensors: Sequence[Tensor], chunk_numel: int) -> list[tuple[int, int, tuple[int, int] | None, int]]:
    """``(start, stop, span, numel)`` for each chunk, per the packing rule of the module docstring."""
    layout = []
    start, filled = 0, 0
    for i, t in enumerate(tensors):
        n = t.numel()
        if n > chunk_numel:
            if filled:
                layout.append((start, i, None, filled))
            if t.is_contiguous():
                layout.extend((i, i + 1, (lo, min(n, lo + chunk_numel)), min(n, lo + chunk_numel) - lo)
                              for lo in range(0, n, chunk_numel))
            else:  # cannot be sliced flat: one oversized chunk of its own
                layout.append((i, i + 1, None, n))
            start, filled = i + 1, 0
        elif filled + n > chunk_numel:
            layout.append((start, i, None, filled))
            start, filled = i, n
        else:
            filled += n
    if start < len(tensors):
        layout.append((start, len(tensors), None, filled))
    return layout


class Layout:
    """How one list of tensors is worked on: its (device, dtype) buckets with their noise plans,
    whether the multi-tensor path supports it, and the update rules' tasks for its buckets
    (made once, their per-step values refreshed at each step: see :mod:`._step`)."""

    __slots__ = ("buckets", "foreach_ok", "tasks")

    def __init__(self, buckets: list[tuple[list[int], NoisePlan]], foreach_ok: bool):
        self.buckets = buckets
        self.foreach_ok = foreach_ok
        self.tasks: dict[type, list] = {}

    def tasks_of(self, kind: type) -> list:
        """The tasks of update rule ``kind`` (a :class:`~._step.Task` subclass), one per bucket."""
        tasks = self.tasks.get(kind)
        if tasks is None:
            tasks = self.tasks[kind] = [kind(plan, indices) for indices, plan in self.buckets]
        return tasks


class NoisePlanCache:
    """Reuses noise plans (and their buffers) and layouts between steps.

    A layout is remembered by the identity of the tensors it was made for, as a torch optimizer
    remembers its state: like there, a parameter's shape, dtype and device must not change
    between steps (if they do, the next elementwise op fails loudly).

    :param chunk_numel: passed to every plan (``None``: each device's default).
    :param max_plans: how many distinct plans (and layouts) to keep before starting afresh.
    :param private: passed to every plan (see :class:`NoisePlan`).
    """

    def __init__(self, chunk_numel: int | None = None, max_plans: int = 16, private: bool = False):
        self.chunk_numel = chunk_numel
        self.private = private
        self.max_plans = max_plans
        self._plans: dict[tuple, NoisePlan] = {}
        self._layouts: dict[tuple, Layout] = {}
        self._last: tuple[tuple[Tensor, ...], Layout, str] | None = None

    def layout(self, tensors: Sequence[Tensor], make: Callable[..., Layout], *args: Any, kind: str = "") -> Layout:
        """The cached layout of ``tensors`` (by identity) for steps of this ``kind`` (the eager
        step's is ``""``, the fused step's ``"fused"``), made by ``make(*args)`` on first sight.
        The last one is held with its tensors and found without hashing: the usual case, a
        sampler stepping the same parameters."""
        last = self._last
        if last is not None and last[2] == kind and len(last[0]) == len(tensors) \
                and all(map(operator.is_, last[0], tensors)):
            return last[1]
        key = (kind, *map(id, tensors))
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= self.max_plans:
                self._layouts.clear()
            layout = self._layouts[key] = make(*args)
        self._last = (tuple(tensors), layout, kind)
        return layout

    def plan(self, tensors: Sequence[Tensor]) -> NoisePlan:
        """The plan for ``tensors`` (all of one device and dtype)."""
        first = tensors[0]
        key = (first.device, first.dtype, tuple((t.shape, t.is_contiguous()) for t in tensors))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.max_plans:
                self._plans.clear()
            plan = self._plans[key] = NoisePlan(tensors, self.chunk_numel, self.private)
        return plan
