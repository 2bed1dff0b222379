"""Chunked Gaussian noise: one fixed way of drawing the noise of a list of tensors.

On a CPU, drawing the Gaussian noise costs more than everything else in an SG-MCMC step put
together (``normal_`` runs at ~3.4 ns per float32 on one core, an ``axpy`` at ~0.1 ns). So the
noise is drawn once per step into one small reusable buffer, chunk by chunk, and each chunk is
used while it is still in cache:

* tensors are walked in order and packed whole into chunks of at most ``chunk_numel`` elements
  (a tensor is never split unless it alone is larger than a chunk);
* a contiguous tensor larger than a chunk is cut into consecutive pieces of ``chunk_numel``;
* each chunk is filled by exactly one ``normal_`` call.

Because this plan, not the execution path, decides which ``normal_`` calls are made, the
multi-tensor and per-tensor paths draw identical noise from the same generator. Each buffer is
at most ``chunk_numel`` elements (4 MiB of float32), however large the model: no full-size
temporary is ever allocated for the noise.

Where the numbers come from (:class:`NoiseSource`): torch's CPU generator is a Mersenne twister
that one thread steps through, so one generator cannot fill a buffer faster than ~3 ns per
number. On the CPU the noise therefore comes from :data:`NUM_STREAMS` generators ("streams"),
seeded from the root generator (torch's global one, or the one the caller passed) when first
used: chunk ``i`` of a plan is drawn from stream ``i % NUM_STREAMS``, so the numbers do not
depend on how many threads draw them. The streams fill their buffers in a thread pool (torch
ops release the GIL) and each chunk's update is applied right there, while the noise is still
in cache. The streams' states are part of the sampler's state, so a saved chain resumes exactly. On other devices the
root generator fills the chunks in order: there, drawing noise is cheap.
"""

from __future__ import annotations

import operator
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import Tensor

#: Elements per noise chunk. Large enough that ``normal_`` call overhead vanishes, small enough to
#: stay in the L2/L3 cache between drawing the noise and adding it to the parameters.
DEFAULT_CHUNK_NUMEL = 1 << 20

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
    :param flat: the chunk's 1-d view of its noise buffer.
    :param cut: per tensor of the chunk, whether it is handed out as ``GRAIN``-sized flat
        pieces; ``None`` when every tensor is handed out whole.
    """

    __slots__ = ("start", "stop", "span", "flat", "cut", "noise", "owners", "gather", "whole")

    def __init__(self, start: int, stop: int, span: tuple[int, int] | None, flat: Tensor, cut: list[bool] | None,
                 shapes: list[torch.Size], gather: Tensor | None = None, whole: bool = False):
        self.start, self.stop, self.span, self.flat, self.cut = start, stop, span, flat, cut
        #: the chunk holds every tensor of its plan, uncut: :meth:`pieces` are the tensors themselves
        self.whole = whole and span is None and cut is None
        #: flat scratch the chunk's 1-d gradients are gathered into (see ``GATHER_MEAN_NUMEL``), or ``None``
        self.gather = gather
        #: views of ``flat`` matching :meth:`pieces`, and the tensor index each piece belongs to
        self.noise: list[Tensor] = []
        self.owners: list[int] = []
        if span is not None:
            pieces = flat.split(GRAIN) if cut else [flat]
            self.noise, self.owners = list(pieces), [start] * len(pieces)
            return
        offset = 0
        for k, shape in enumerate(shapes):
            n = shape.numel()
            view = flat[offset : offset + n]
            offset += n
            pieces = view.split(GRAIN) if cut and cut[k] else [view.view(shape)]
            self.noise.extend(pieces)
            self.owners.extend([start + k] * len(pieces))

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
    :param chunk_numel: the most elements one chunk (one ``normal_`` call) holds.
    """

    def __init__(self, tensors: Sequence[Tensor], chunk_numel: int = DEFAULT_CHUNK_NUMEL):
        if chunk_numel < 1:
            raise ValueError(f"Invalid chunk_numel: {chunk_numel} (must be a positive integer)")
        first = tensors[0]
        self.device = first.device
        self.dtype = first.dtype
        layout = _layout(tensors, chunk_numel)
        buffer_numel = max((numel for _, _, _, numel in layout), default=0)
        self.on_cpu = on_cpu = self.device.type == "cpu"
        # one buffer per stream that can be drawing at once (CPU), else a single one
        slots = min(NUM_STREAMS if on_cpu else 1, max(len(layout), 1))
        self.buffers = [torch.empty(buffer_numel, device=self.device, dtype=self.dtype) for _ in range(slots)]
        threaded = on_cpu and len(layout) > 1  # chunks will be worked on in the noise threads
        gathers = [_gathers(tensors[start:stop]) and span is None for start, stop, span, _ in layout]
        scratch = [torch.empty(buffer_numel, device=self.device, dtype=self.dtype) for _ in range(slots)] if any(gathers) else []
        self.chunks: list[Chunk] = []
        for index, (start, stop, span, numel) in enumerate(layout):
            flat = self.buffers[index % slots][:numel]
            gather = scratch[index % slots][:numel] if gathers[index] else None
            shapes = [t.shape for t in tensors[start:stop]]
            if span is not None:
                cut = threaded
            else:
                cut = [threaded and t.numel() > GRAIN and t.is_contiguous() for t in tensors[start:stop]]
                cut = cut if any(cut) else None
            whole = start == 0 and stop == len(tensors)
            self.chunks.append(Chunk(start, stop, span, flat, cut, shapes, gather, whole))

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


def _fill(chunk: Chunk, std: float, generator: torch.Generator | None) -> None:
    """Fill ``chunk``'s noise with ``N(0, std^2)`` draws (zeros, drawing nothing, when ``std == 0``)."""
    if std == 0.0:
        chunk.flat.zero_()
    else:
        chunk.flat.normal_(0.0, std, generator=generator)


class NoiseSource:
    """Where a sampler's noise comes from (see the module docstring).

    :param generator: the root generator; ``None`` for torch's global generator of each device.
    :param num_streams: CPU streams (fixes the numbers drawn, whatever the thread count).
    """

    def __init__(self, generator: torch.Generator | None = None, num_streams: int = NUM_STREAMS):
        self.generator = generator
        self.num_streams = num_streams
        self._streams: list[torch.Generator] | None = None

    def streams(self) -> list[torch.Generator]:
        """The CPU streams, seeded from the root generator on first use."""
        if self._streams is None:
            seeds = torch.randint(0, 2**32, (self.num_streams,), generator=self._root("cpu"), dtype=torch.int64)
            self._streams = [torch.Generator().manual_seed(int(s)) for s in seeds]
        return self._streams

    def _root(self, device_type: str) -> torch.Generator | None:
        if self.generator is not None and self.generator.device.type != device_type:
            raise ValueError(
                f"Invalid generator: it is on device {self.generator.device} but the parameters are on "
                f"{device_type} (must be on the parameters' device)"
            )
        return self.generator

    def run(
        self,
        plan: NoisePlan,
        std: float,
        body: Callable[[Chunk], Any],
        gates: Sequence[Callable[[], None]] = (),
    ) -> list[Any]:
        """Draw each chunk's noise (``N(0, std^2)``) and call ``body(chunk)`` on it; return the
        results in chunk order. ``gates`` (e.g. finiteness checks) must all pass before any
        ``body`` runs; if some raise, no ``body`` runs and the exception of the first failing
        gate (in list order) is raised here, whatever the timing.

        On the CPU, with more than one chunk and more than one torch thread, chunks are drawn
        and worked on in the noise threads: one "lane" per buffer takes chunks ``slot,
        slot + slots, ...`` in order, so a stream and its buffer are never used by two threads
        at once. ``body`` must then only touch its own chunk's pieces (chunks are disjoint), and
        anything it sums is returned, to be added up in chunk order, so the result does not
        depend on timing. The gates are shared out among the lanes (see :class:`_Gates`), so
        that checking overlaps drawing and no core idles while another checks. If the calling
        thread is interrupted while it waits, the lanes still finish the step: a step is
        applied whole or not at all.
        """
        chunks = plan.chunks
        if len(chunks) == 1:  # the small case, in this thread: stream 0 on the CPU
            # Outside autograd, in inference mode: the same in-place ops (versions still bump)
            # skip the autograd dispatch, ~0.1 us each, a twentieth of a small model's step.
            # Anything the body makes is a temporary; plans and buffers were made before.
            guard = None if torch.is_grad_enabled() else torch._C._InferenceMode(True)
            try:
                for gate in gates:
                    gate()
                chunk = chunks[0]
                _fill(chunk, std, self.streams()[0] if plan.on_cpu else self._root(plan.device.type))
                return [body(chunk)]
            finally:
                del guard
        slots = len(plan.buffers)
        if plan.device.type == "cpu":
            streams = self.streams()
            generators = [streams[i % self.num_streams] for i in range(len(chunks))]
            workers = min(slots, torch.get_num_threads())
        else:  # drawing noise is cheap there: the root generator, in order, in this thread
            generators = [self._root(plan.device.type)] * len(chunks)
            workers = 1
        if len(chunks) == 1 or workers <= 1:
            for gate in gates:
                gate()
            results = []
            for chunk, generator in zip(chunks, generators):
                _fill(chunk, std, generator)
                results.append(body(chunk))
            return results
        pool = _thread_pool(workers)
        grad_mode = torch.is_grad_enabled()  # thread-local: carry the caller's into the workers
        checks = _Gates(gates, shares=workers)

        def lane(slot: int) -> list[tuple[int, Any]]:
            """Chunks slot, slot + slots, ... in order: one stream and one buffer, no hand-offs."""
            done = []
            if slot == 0:
                checks.run_share()
            for index in range(slot, len(chunks), slots):
                chunk = chunks[index]
                _fill(chunk, std, generators[index])
                if index == slot and 0 < slot < workers:
                    checks.run_share()
                if not checks.passed():
                    break
                with torch.set_grad_enabled(grad_mode):
                    done.append((index, body(chunk)))
            return done

        lanes = [pool.submit(lane, slot) for slot in range(slots)]
        results: list[Any] = [None] * len(chunks)
        try:
            checks.raise_first()
            for finished in lanes:
                for index, value in finished.result():
                    results[index] = value
        finally:  # an abandoned step: let the streams finish before anyone uses them again
            for finished in lanes:
                finished.exception()
        return results

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"streams": None if self._streams is None else [g.get_state() for g in self._streams]}
        if self.generator is not None:
            state["generator"] = self.generator.get_state()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
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


class _Gates:
    """The gates of one :meth:`NoiseSource.run`, claimed one at a time by the lanes.

    Checking gradients is bound by memory bandwidth and drawing noise by arithmetic, so the
    two are best overlapped rather than run side by side on every core: the first lane checks
    its share before it draws, the other lanes after their first draw. A lane about to wait
    first claims whatever is still unclaimed, so it only ever waits for gates that a running
    thread holds: however busy the shared pool, nothing can deadlock. Every gate runs even
    after one has failed, so which exception is raised (the first failing gate's, in list
    order) does not depend on timing.

    :param gates: the callables; each raises to refuse the step.
    :param shares: into how many equal shares (one per running lane) the gates are cut.
    """

    def __init__(self, gates: Sequence[Callable[[], None]], shares: int):
        self.gates = list(gates)
        self.share = -(-len(self.gates) // max(shares, 1))
        self.errors: list[BaseException | None] = [None] * len(self.gates)
        self.unclaimed = iter(range(len(self.gates)))  # next() on it is atomic under the GIL
        self.pending = len(self.gates)
        self.lock = threading.Lock()
        self.done = threading.Event()
        if not self.gates:
            self.done.set()

    def run_share(self) -> None:
        """Run up to one share of the unclaimed gates."""
        for _, index in zip(range(self.share), self.unclaimed):
            self._run(index)

    def _run(self, index: int) -> None:
        try:
            self.gates[index]()
        except BaseException as error:  # noqa: BLE001 -- raised by raise_first, in gate order
            self.errors[index] = error
        with self.lock:
            self.pending -= 1
            if self.pending == 0:
                self.done.set()

    def passed(self) -> bool:
        """Run every unclaimed gate, wait for the rest; whether all passed."""
        for index in self.unclaimed:
            self._run(index)
        self.done.wait()
        return all(error is None for error in self.errors)

    def raise_first(self) -> None:
        """Wait for every gate (without running any); raise the first failing one's exception."""
        self.done.wait()
        for error in self.errors:
            if error is not None:
                raise error


_POOLS: dict[int, ThreadPoolExecutor] = {}
_POOL_LOCK = threading.Lock()


def _thread_pool(workers: int) -> ThreadPoolExecutor:
    """A shared pool of ``workers`` threads (one per core torch may use: more only contend)."""
    with _POOL_LOCK:
        pool = _POOLS.get(workers)
        if pool is None:
            pool = _POOLS[workers] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="pyro_sgmcmc-noise")
        return pool


def _forget_pools_after_fork() -> None:  # threads do not survive fork(); the child makes its own
    global _POOL_LOCK
    _POOLS.clear()
    _POOL_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_pools_after_fork)


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
    and whether the multi-tensor path supports it."""

    __slots__ = ("buckets", "foreach_ok", "single_chunk", "single_work")

    def __init__(self, buckets: list[tuple[list[int], NoisePlan]], foreach_ok: bool):
        self.buckets = buckets
        self.foreach_ok = foreach_ok
        self.single_chunk = len(buckets) == 1 and len(buckets[0][1]) == 1
        #: for a single chunk, the work list of ``plan_buckets`` with and without checking
        self.single_work = {check: [(*buckets[0], check, [])] for check in (False, True)} if self.single_chunk else None


class NoisePlanCache:
    """Reuses noise plans (and their buffers) and layouts between steps.

    A layout is remembered by the identity of the tensors it was made for, as a torch optimizer
    remembers its state: like there, a parameter's shape, dtype and device must not change
    between steps (if they do, the next elementwise op fails loudly).

    :param chunk_numel: passed to every plan.
    :param max_plans: how many distinct plans (and layouts) to keep before starting afresh.
    """

    def __init__(self, chunk_numel: int = DEFAULT_CHUNK_NUMEL, max_plans: int = 16):
        self.chunk_numel = chunk_numel
        self.max_plans = max_plans
        self._plans: dict[tuple, NoisePlan] = {}
        self._layouts: dict[tuple, Layout] = {}
        self._last: tuple[tuple[Tensor, ...], Layout] | None = None

    def layout(self, tensors: Sequence[Tensor], make: Callable[..., Layout], *args: Any) -> Layout:
        """The cached layout of ``tensors`` (by identity), made by ``make(*args)`` on first sight.
        The last one is held with its tensors and found without hashing: the usual case, a
        sampler stepping the same parameters."""
        last = self._last
        if last is not None and len(last[0]) == len(tensors) and all(map(operator.is_, last[0], tensors)):
            return last[1]
        key = tuple(map(id, tensors))
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) >= self.max_plans:
                self._layouts.clear()
            layout = self._layouts[key] = make(*args)
        self._last = (tuple(tensors), layout)
        return layout

    def plan(self, tensors: Sequence[Tensor]) -> NoisePlan:
        """The plan for ``tensors`` (all of one device and dtype)."""
        first = tensors[0]
        key = (first.device, first.dtype, tuple((t.shape, t.is_contiguous()) for t in tensors))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.max_plans:
                self._plans.clear()
            plan = self._plans[key] = NoisePlan(tensors, self.chunk_numel)
        return plan
