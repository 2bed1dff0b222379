r"""Where the fused SGLD step runs, and the plans it runs with (the kernel: :mod:`._triton`).

The eager step (:mod:`._noise`, :mod:`._step`) draws each chunk's noise into a buffer with
``normal_`` and adds it with foreach ops. On a GPU the noise can instead be generated inside the
update kernel by a counter-based generator, so a step reads each parameter and gradient once and
writes each parameter once, with no noise in memory at all.

**Bytes per parameter** (float32, plain SGLD): the step first checks the gradients (one
multi-tensor norm, reading each gradient: 4 bytes), then the kernel reads the parameter and the
gradient and writes the parameter (12): **16 bytes**, against 12 for torch's foreach SGD. The
check is what lets a step that would write a NaN or Inf be refused with nothing changed
(:mod:`._step`): a kernel that wrote as it checked could not take back the entries written before
it met the bad one. At the memory-bandwidth limit the fused step therefore costs about 16/12 =
1.33 SGD steps. Weight decay or localization read the parameter in the check too (+4 each for
the parameter and the anchor), an anchor in the update +4, a mask +4. The functional
:func:`~pyro_sgmcmc.functional.sgld` with ``check_finite=False`` skips the check: 12 bytes, as
SGD, and a NaN gradient is then written into the parameters.

The per-step seed is drawn from the generator the eager step draws from: the device's root
generator (torch's default one, or the sampler's ``generator``), so ``torch.manual_seed`` /
``pyro.set_rng_seed`` reproduce a run and a saved generator state resumes it exactly; a refused
step gives the draw back with the rest (:mod:`._step`). The device's index is a word of every
Philox counter, so that two devices whose generators were seeded alike (``torch.manual_seed``
seeds all of them alike) draw different numbers. The same numbers on every Triton >= 3.0, up to
the rounding of ``log``, ``sqrt``, ``cos`` and ``sin`` (:mod:`._triton`).

**Where the law is approximate** (the eager step's is torch's ``normal_``): the normals come
from float32 uniforms by Box-Muller, so ``|z| <= 5.68`` (the clamp of the uniform at 1e-7; the
normal's tail beyond it has probability 1.3e-8) and float64 parameters get float32-resolution
noise; float16 and bfloat16 parameters are updated in float32 and rounded once when written,
box clamp included (the eager step's buffer of drift plus noise is in the parameter's dtype, so
it is rounded before the update and the clamp).

**Where it runs**: CUDA tensors, with Triton >= 3.0 installed (it comes with the CUDA builds of torch);
float16, bfloat16, float32 and float64; dense, contiguous, plain tensors (not a DTensor or other
subclass). Anywhere else :func:`fused_problem` says why not. Triton's interpreter
(``TRITON_INTERPRET=1`` set before Triton is first imported) runs the same kernel with NumPy on
CPU tensors: far too slow to sample with, it is how the kernel is tested without a GPU.
"""

from __future__ import annotations

import functools
import importlib.metadata
import importlib.util
import os
import re
from itertools import chain
from typing import Any, Sequence

import torch
from torch import Tensor

from ._common import buckets, check_dense_grads, take
from ._noise import Layout, NoisePlanCache

#: parameter dtypes the kernel takes
FUSED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def triton_installed() -> bool:
    """Whether Triton can be imported (without importing it)."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether Triton runs kernels in its interpreter (``TRITON_INTERPRET=1``), on any device."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


#: the oldest Triton the kernel runs on (``tl.interleave`` came in 3.0)
MIN_TRITON = (3, 0)


@functools.cache
def triton_version() -> str:
    """The installed Triton's version (imported only where its package metadata is missing)."""
    for name in ("triton", "pytorch-triton"):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    import triton

    return triton.__version__


def fused_problem(tensors: Sequence[Tensor]) -> str | None:
    """Why the fused step cannot update ``tensors`` (``None``: it can); see the module docstring."""
    if not triton_installed():
        return "Triton is not installed (pip install triton; it comes with the CUDA builds of torch)"
    try:
        version = triton_version()
    except ImportError as error:
        return f"Triton cannot be imported ({error})"
    if _release(version) < MIN_TRITON:
        return f"Triton {version} is installed, the fused step needs Triton >= {'.'.join(map(str, MIN_TRITON))}"
    for i, t in enumerate(tensors):
        if type(t) not in (Tensor, torch.nn.Parameter) or t.layout != torch.strided:
            return f"parameter {i} is a {type(t).__name__} of layout {t.layout}, the fused step takes plain dense ones"
        if t.device.type != "cuda" and not interpreting():
            return f"parameter {i} is on {t.device}, the fused step runs on CUDA devices"
        if t.dtype not in FUSED_DTYPES:
            return f"parameter {i} is {t.dtype}, the fused step takes float16, bfloat16, float32 and float64"
        if not t.is_contiguous():
            return f"parameter {i} is not contiguous"
    return None


class FusedChunk:
    """The one "chunk" of a fused plan: all of its tensors, whole (what :mod:`._step` asks of a
    chunk when it names a non-finite tensor). ``inputs`` are the tensors read besides the
    gradients (the parameters), for a task's ``candidate``."""

    __slots__ = ("owners", "inputs")

    whole = True

    def __init__(self, count: int):
        self.owners = list(range(count))
        self.inputs: Sequence[Tensor] = ()

    def pieces(self, tensors: Sequence[Tensor], readonly: bool = False) -> Sequence[Tensor]:
        return tensors


class FusedPlan:
    """A (device, dtype) bucket of a fused step: one chunk, no noise buffers, and the kernel's
    tables (see :mod:`._triton`): which tensor and first entry each program takes, the tensors'
    sizes, and where each tensor's noise counters start. Made once per list of tensors."""

    threaded = False
    buffers = (None,)

    def __init__(self, tensors: Sequence[Tensor], indices: Sequence[int] | None = None):
        from ._triton import BLOCK

        first = tensors[0]
        self.device, self.dtype = first.device, first.dtype
        #: the tensors' indices in the lists handed to the step (for error messages)
        self.indices = list(range(len(tensors))) if indices is None else list(indices)
        self.shapes = [t.shape for t in tensors]
        self.on_cpu = self.device.type == "cpu"
        #: what the kernel computes in
        self.compute_dtype = torch.float64 if self.dtype is torch.float64 else torch.float32
        #: the third Philox counter word: the device's index, so that buckets on two devices whose
        #: generators were seeded alike (``torch.manual_seed`` seeds every device's alike) draw apart
        self.stream = self.device.index or 0
        self.chunks = [FusedChunk(len(tensors))]
        blocks, counters, counter = [], [], 0
        for index, t in enumerate(tensors):
            n = t.numel()
            blocks.extend((index, start) for start in range(0, n, BLOCK))
            counters.append(counter)
            counter += (n + 3) // 4  # four normals per Philox counter; each tensor starts a fresh one
        self.num_blocks = len(blocks)
        self.blocks = _upload(blocks, torch.int64, self.device).view(-1)
        self.numels = _upload([t.numel() for t in tensors], torch.int64, self.device)
        self.counters = _upload(counters, torch.int64, self.device)
        self.seed = torch.zeros(1, dtype=torch.int64, device=self.device)
        self._pointers: tuple[int, ...] | None = None
        #: every address of the table is a multiple of 16 bytes (whole blocks then move 16 bytes at a time)
        self.aligned = False
        self._table: Tensor | None = None
        self._values: tuple[float, ...] | None = None
        self._scalars: Tensor | None = None
        self._staged: tuple | None = None

    def __len__(self) -> int:
        return 1

    def __iter__(self):
        return iter(self.chunks)

    def table(self, params: Sequence[Tensor], grads: Sequence[Tensor], anchors: Sequence[Tensor] | None,
              masks: Sequence[Tensor] | None) -> Tensor:
        """The pointer table of these lists of tensors (``None``: a row of zeros), uploaded
        only when an address changed since the last step; the lists are then checked against
        the bucket (:meth:`check`) first, so that a step costs no check otherwise."""
        none = (0,) * len(self.shapes)
        try:
            pointers = tuple(chain.from_iterable(none if tensors is None else map(Tensor.data_ptr, tensors)
                                                 for tensors in (params, grads, anchors, masks)))
        except TypeError:  # None (or not a tensor) in a list
            pointers = None
        if pointers is None or pointers != self._pointers:
            self.check(params, grads, anchors, masks)
            self._pointers = pointers
            self._table = _upload(pointers, torch.int64, self.device)
            self.aligned = all(p % 16 == 0 for p in pointers)
        return self._table

    def check(self, params: Sequence[Tensor], grads: Sequence[Tensor] | None = None,
              anchors: Sequence[Tensor] | None = None, masks: Sequence[Tensor] | None = None) -> None:
        """Raise a ``ValueError`` naming the argument if a tensor of these lists (the bucket's
        entries) is not what the kernel reads: the bucket's dtype and device, its parameter's
        shape, a plain dense tensor; parameters contiguous too (the others are copied so)."""
        count = len(self.shapes)
        for name, tensors in (("params", params), ("grads", grads), ("anchors", anchors), ("masks", masks)):
            if tensors is None:
                continue
            if len(tensors) != count:
                raise ValueError(f"Invalid {name}: {len(tensors)} tensors for {count} parameters")
            for i, (t, shape) in enumerate(zip(tensors, self.shapes)):
                where = f"Invalid {name}[{self.indices[i]}]"
                if not isinstance(t, Tensor):
                    hint = " (an all-ones mask leaves a parameter unmasked)" if name == "masks" else ""
                    raise ValueError(f"{where}: {_describe(t)}, the fused step takes a tensor for every "
                                     f"parameter{hint}")
                if t.dtype != self.dtype or t.device != self.device:
                    moved = " (was the parameter moved since the first step? make a new sampler)" \
                        if name == "params" else ""
                    raise ValueError(f"{where}: {t.dtype} on {t.device}, the fused step takes the bucket's "
                                     f"{self.dtype} on {self.device}{moved}")
                if t.shape != shape:
                    raise ValueError(f"{where}: shape {tuple(t.shape)} does not match its parameter's shape "
                                     f"{tuple(shape)}")
                if t.layout != torch.strided:
                    raise ValueError(f"{where}: layout {t.layout}, the fused step takes dense tensors")
                if name == "params" and not t.is_contiguous():
                    raise ValueError(f"{where}: not contiguous, the fused step writes contiguous parameters")

    def stage(self, params: Sequence[Tensor], grads: Sequence[Tensor], anchors: Sequence[Tensor] | None,
              masks: Sequence[Tensor] | None, values: tuple[float, ...], localize: bool, boxed: bool) -> None:
        """Prepare an update of the bucket (:mod:`._triton`) but for its seed: the pointer table,
        the scalars ``values`` = (step size, noise scale, gradient scale, localization + weight
        decay, localization, box size) and the kernel's switches; done while the device runs the
        check, so that little is left between the check's verdict and the launch."""
        anchors = anchors if (localize or boxed) else None
        grads, anchors, masks = (_contiguous(tensors) for tensors in (grads, anchors, masks))
        table = self.table(params, grads, anchors, masks)
        switches = dict(SCALE=values[2] != 1.0, DECAY=values[3] != 0.0, LOCALIZE=localize, NOISE=values[1] != 0.0,
                        MASK=masks is not None, BOXED=boxed, ALIGNED=self.aligned)
        self._staged = (table, self.scalars(values), switches, grads, anchors, masks)  # copies kept until the launch

    def discard(self) -> None:
        """Drop a staged update (a refused step): its copies of gradients, anchors and masks."""
        self._staged = None

    def launch(self, generator: torch.Generator | None) -> None:
        """Draw the step's seed from ``generator`` if there is noise, and launch the update
        :meth:`stage` prepared."""
        from ._triton import BLOCK, NUM_WARPS, sgld_kernel

        device = self.device
        if device.type == "cuda" and device.index is not None and device.index != torch.cuda.current_device():
            with torch.cuda.device(device):  # Triton launches on the current device
                self.launch(generator)
            return
        table, scalars, switches, *_ = self._staged
        self._staged = None
        if not self.num_blocks:
            return
        if switches["NOISE"]:
            torch.randint(0, 2**62, (1,), generator=generator, out=self.seed)
        sgld_kernel[(self.num_blocks,)](
            table, self.blocks, self.numels, self.counters, self.seed, scalars, len(self.shapes), self.stream,
            DTYPE=_tl_dtype(self.dtype), COMPUTE=_tl_dtype(self.compute_dtype),
            BLOCK=BLOCK, num_warps=NUM_WARPS, **switches,
        )

    def scalars(self, values: tuple[float, ...]) -> Tensor:
        """The step's scalars as a float64 tensor on the device (exact for float64 parameters,
        where a Python float argument of a Triton kernel would be rounded to float32), uploaded
        only when one changed (every step under a scheduler), without blocking the host
        (:func:`_upload`)."""
        if values != self._values:
            self._values = values
            self._scalars = _upload(values, torch.float64, self.device)
        return self._scalars


def fused_layout(params: Sequence[Tensor], grads: Sequence[Tensor], plans: NoisePlanCache | None) -> Layout:
    """The (device, dtype) buckets of ``params`` with their :class:`FusedPlan`; refused with a
    ``ValueError`` where the fused step cannot run (:func:`fused_problem`), or for a
    differentiable step (the kernel has no derivative)."""
    if torch.is_grad_enabled():
        raise ValueError("Invalid fused: True for a differentiable step (the fused kernel has no derivative; "
                         "use fused=None)")
    if plans is None:
        plans = NoisePlanCache()
    return plans.layout(params, _make_fused_layout, params, grads, kind="fused")


def _make_fused_layout(params: Sequence[Tensor], grads: Sequence[Tensor]) -> Layout:
    check_dense_grads(grads)
    problem = fused_problem(params)
    if problem is not None:
        raise ValueError(f"Invalid fused: True ({problem}; use fused=None)")
    if len(grads) != len(params):
        raise ValueError(f"Invalid grads: {len(grads)} tensors for {len(params)} parameters")
    plans = []
    for indices in buckets(params):
        plan = FusedPlan(take(indices, params), indices)
        plan.check(take(indices, params), take(indices, grads))  # the others when the step is staged (table)
        plans.append((indices, plan))
    return Layout(plans, False)


def _upload(values: Sequence[Any], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``values`` as a tensor on ``device``; on CUDA through pinned memory by a copy that does not
    block the host (``torch.tensor(..., device="cuda")`` copies synchronously). Each upload gets
    its own pinned block, which torch's caching host allocator keeps until the copy is done."""
    if device.type != "cuda":
        return torch.tensor(values, dtype=dtype, device=device)
    return torch.tensor(values, dtype=dtype, pin_memory=True).to(device, non_blocking=True)


def _contiguous(tensors: Sequence[Tensor] | None) -> Sequence[Tensor] | None:
    """``tensors`` with contiguous copies of those that are not (anything else left for :meth:`FusedPlan.check`)."""
    if tensors is None:
        return None
    return [t.contiguous() if isinstance(t, Tensor) and not t.is_contiguous() else t for t in tensors]


def _release(version: str) -> tuple[int, ...]:
    """The leading numbers of a version string: ``"3.1.0+git1"`` -> ``(3, 1, 0)``."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


def _describe(value: Any) -> str:
    return "None" if value is None else f"a {type(value).__name__}"


def _tl_dtype(dtype: torch.dtype) -> Any:
    """Triton's name of a torch floating dtype."""
    import triton.language as tl

    return getattr(tl, str(dtype).removeprefix("torch."))
