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
multi-tensor and per-tensor paths draw identical noise from the same generator. The buffer is
at most ``chunk_numel`` elements (4 MiB of float32), however large the model: no full-size
temporary is ever allocated for the noise.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
from torch import Tensor

#: Elements per noise chunk. Large enough that ``normal_`` call overhead vanishes, small enough to
#: stay in the L2/L3 cache between drawing the noise and adding it to the parameters.
DEFAULT_CHUNK_NUMEL = 1 << 20


class Chunk:
    """A run of tensors (or a slice of one large tensor) that shares one ``normal_`` draw.

    :param start: index of the first tensor of the chunk.
    :param stop: one past the index of the last tensor.
    :param span: ``(lo, hi)`` flat element range when the chunk is a slice of tensor ``start``,
        else ``None`` (the chunk holds tensors ``start:stop`` whole).
    :param flat: the chunk's 1-d view of the noise buffer.
    :param noise: views of ``flat`` shaped like the chunk's pieces.
    """

    __slots__ = ("start", "stop", "span", "flat", "noise")

    def __init__(self, start: int, stop: int, span: tuple[int, int] | None, flat: Tensor, noise: list[Tensor]):
        self.start = start
        self.stop = stop
        self.span = span
        self.flat = flat
        self.noise = noise

    def pieces(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The parts of ``tensors`` (aligned with the planned list) that this chunk covers."""
        if self.span is None:
            return list(tensors[self.start : self.stop])
        lo, hi = self.span
        return [tensors[self.start].view(-1)[lo:hi]]


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
        self.buffer = torch.empty(buffer_numel, device=self.device, dtype=self.dtype)
        self.chunks: list[Chunk] = []
        for start, stop, span, numel in layout:
            flat = self.buffer[:numel]
            if span is None:
                shapes = [t.shape for t in tensors[start:stop]]
                views = flat.split([t.numel() for t in tensors[start:stop]])
                noise = [v.view(shape) for v, shape in zip(views, shapes)]
            else:
                noise = [flat]
            self.chunks.append(Chunk(start, stop, span, flat, noise))

    def __iter__(self) -> Iterator[Chunk]:
        return iter(self.chunks)

    def __len__(self) -> int:
        return len(self.chunks)

    @staticmethod
    def fill(chunk: Chunk, std: float, generator: torch.Generator | None) -> None:
        """Fill ``chunk``'s noise with ``N(0, std^2)`` draws (zeros when ``std == 0``)."""
        if std == 0.0:
            chunk.flat.zero_()
        else:
            chunk.flat.normal_(0.0, std, generator=generator)


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


class NoisePlanCache:
    """Reuses a :class:`NoisePlan` (and its buffer) while the shapes it was built for recur.

    :param chunk_numel: passed to every plan.
    :param max_plans: how many distinct layouts to keep before starting afresh.
    """

    def __init__(self, chunk_numel: int = DEFAULT_CHUNK_NUMEL, max_plans: int = 16):
        self.chunk_numel = chunk_numel
        self.max_plans = max_plans
        self._plans: dict[tuple, NoisePlan] = {}

    def plan(self, tensors: Sequence[Tensor]) -> NoisePlan:
        """The plan for ``tensors`` (all of one device and dtype)."""
        first = tensors[0]
        key = (first.device, first.dtype, tuple(t.shape for t in tensors))
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.max_plans:
                self._plans.clear()
            plan = self._plans[key] = NoisePlan(tensors, self.chunk_numel)
        return plan
