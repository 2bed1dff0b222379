r"""The Triton kernel of the fused SGLD step (:mod:`._fused`). Imported only when Triton is.

One program updates ``BLOCK`` consecutive entries of one tensor of a (device, dtype) bucket; a
block table says which (tensor, first entry) each program takes, and a pointer table holds the
addresses of the bucket's parameters, gradients, anchors and masks, so that one launch covers
every tensor of the bucket, as torch's multi-tensor (foreach) kernels do. A program whose block
lies inside its tensor loads and stores without bounds, 16 bytes at a time where every address is
16-byte aligned (``ALIGNED``); the last block of a tensor checks its bounds. Per entry, in the
order of the eager path (:func:`~pyro_sgmcmc.functional._common.fill_drift`, then
:func:`~pyro_sgmcmc.functional._common.apply_buffer`):

.. math::

    b = s\,g + (\gamma + \lambda)\,\theta - \gamma\,\theta_0 + c\,\xi, \qquad
    \theta \leftarrow \mathrm{clamp}_{\theta_0 \pm B}(\theta - h\,m\,b),

with :math:`h = \epsilon/2`, :math:`c = 2\sigma/\sqrt\epsilon` and :math:`\xi` standard normal,
computed in float32 (float64 for float64 parameters).

The noise: Triton's Philox-4x32-10 keyed by the step's seed, counter = the entry's index in the
bucket divided by 4 (tensors start at multiples of 4), four normals per counter by two Box-Muller
pairs (``tl.randn4x``), entry ``4k + j`` taking the ``j``-th. So each (seed, entry) has its own
numbers, whatever the block size or the order in which programs run.
"""

from __future__ import annotations

import triton
import triton.language as tl

from ._fused import interpreting

#: entries per program (a multiple of 4: see the module docstring); Triton's interpreter runs each
#: program's ops with NumPy, so it gets few large programs (the numbers do not depend on it)
BLOCK = 1 << 16 if interpreting() else 1024
#: warps per program
NUM_WARPS = 4


@triton.jit
def sgld_kernel(table, blocks, numels, counters, seed_ptr, scalars, num_tensors,
                DTYPE: tl.constexpr, COMPUTE: tl.constexpr, SCALE: tl.constexpr, DECAY: tl.constexpr,
                LOCALIZE: tl.constexpr, NOISE: tl.constexpr, MASK: tl.constexpr, BOXED: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """``scalars``: h, c, s, gamma + lambda, gamma, B of the module docstring (float64);
    ``table``: the addresses of the parameters, gradients, anchors and masks, ``num_tensors``
    each; ``blocks``: (tensor, first entry) per program; ``counters``: each tensor's first
    Philox counter; ``seed_ptr``: the step's seed."""
    pid = tl.program_id(0)
    t = tl.load(blocks + 2 * pid)
    start = tl.multiple_of(tl.load(blocks + 2 * pid + 1), BLOCK)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # a whole block: no bounds on the loads and stores, so they can be vectorised
        _update(table, t, offs, None, counters, seed_ptr, scalars, num_tensors, start, DTYPE, COMPUTE, SCALE, DECAY,
                LOCALIZE, NOISE, MASK, BOXED, ALIGNED, BLOCK)
    else:
        _update(table, t, offs, offs < n, counters, seed_ptr, scalars, num_tensors, start, DTYPE, COMPUTE, SCALE,
                DECAY, LOCALIZE, NOISE, MASK, BOXED, ALIGNED, BLOCK)


@triton.jit
def _address(table, row, t, num_tensors, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The address of tensor ``t`` in row ``row`` of the pointer table; with ``ALIGNED`` (every
    address of the table is a multiple of 16 bytes: :meth:`~._fused.FusedPlan.table`), said to be
    so, which lets whole blocks load and store 16 bytes at a time."""
    address = tl.load(table + row * num_tensors + t).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        address = tl.multiple_of(address, 16)
    return address


@triton.jit
def _update(table, t, offs, inside, counters, seed_ptr, scalars, num_tensors, start, DTYPE: tl.constexpr,
            COMPUTE: tl.constexpr, SCALE: tl.constexpr, DECAY: tl.constexpr, LOCALIZE: tl.constexpr,
            NOISE: tl.constexpr, MASK: tl.constexpr, BOXED: tl.constexpr, ALIGNED: tl.constexpr,
            BLOCK: tl.constexpr):
    p_ptr = _address(table, 0, t, num_tensors, DTYPE, ALIGNED)
    h = tl.load(scalars + 0).to(COMPUTE)
    theta = tl.load(p_ptr + offs, mask=inside).to(COMPUTE)
    b = tl.load(_address(table, 1, t, num_tensors, DTYPE, ALIGNED) + offs, mask=inside).to(COMPUTE)
    if SCALE:
        b = b * tl.load(scalars + 2).to(COMPUTE)
    if DECAY:
        b = b + tl.load(scalars + 3).to(COMPUTE) * theta
    if LOCALIZE or BOXED:
        anchor = tl.load(_address(table, 2, t, num_tensors, DTYPE, ALIGNED) + offs, mask=inside).to(COMPUTE)
        if LOCALIZE:
            b = b + (-tl.load(scalars + 4).to(COMPUTE)) * anchor
    if NOISE:
        seed = tl.load(seed_ptr)
        counter = tl.load(counters + t) + start // 4 + tl.arange(0, BLOCK // 4)
        z1, z2, z3, z4 = tl.randn4x(seed, counter)
        z = tl.interleave(tl.interleave(z1, z3), tl.interleave(z2, z4))
        b = b + tl.load(scalars + 1).to(COMPUTE) * z.to(COMPUTE)
    if MASK:
        b = b * tl.load(_address(table, 3, t, num_tensors, DTYPE, ALIGNED) + offs, mask=inside).to(COMPUTE)
    theta = theta + (-h) * b
    if BOXED:
        box = tl.load(scalars + 5).to(COMPUTE)
        theta = tl.minimum(tl.maximum(theta, anchor - box), anchor + box)
    tl.store(p_ptr + offs, theta.to(DTYPE), mask=inside)
