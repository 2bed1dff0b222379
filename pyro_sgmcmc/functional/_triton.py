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

The noise: Philox-4x32-10 (Triton's ``tl.philox``) keyed by the step's seed, counter = (the
entry's index in the bucket divided by 4, split into two 32-bit words; the device's index; 0),
tensors starting at multiples of 4; four normals per counter by two Box-Muller pairs (as
``tl.randn4x`` on Triton >= 3.4, written out so that every supported Triton draws the same
numbers: :func:`_normals4`), entry ``4k + j`` taking the ``j``-th. So each (seed, device, entry)
has its own numbers, whatever the block size or the order in which programs run. The law is
the normal one up to float32 resolution (float64 parameters too) and the Box-Muller clamp
``|z| <= 5.68`` (a tail of probability 1.3e-8 missing).
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
def sgld_kernel(table, blocks, numels, counters, seed_ptr, scalars, num_tensors, stream,
                DTYPE: tl.constexpr, COMPUTE: tl.constexpr, SCALE: tl.constexpr, DECAY: tl.constexpr,
                LOCALIZE: tl.constexpr, NOISE: tl.constexpr, MASK: tl.constexpr, BOXED: tl.constexpr,
                ALIGNED: tl.constexpr, BLOCK: tl.constexpr):
    """``scalars``: h, c, s, gamma + lambda, gamma, B of the module docstring (float64);
    ``table``: the addresses of the parameters, gradients, anchors and masks, ``num_tensors``
    each; ``blocks``: (tensor, first entry) per program; ``counters``: each tensor's first
    Philox counter; ``seed_ptr``: the step's seed; ``stream``: the third Philox counter word (the
    device's index, so that devices whose generators were seeded alike draw apart)."""
    pid = tl.program_id(0)
    t = tl.load(blocks + 2 * pid)
    start = tl.multiple_of(tl.load(blocks + 2 * pid + 1), BLOCK)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:  # a whole block: no bounds on the loads and stores, so they can be vectorised
        _update(table, t, offs, None, counters, seed_ptr, scalars, num_tensors, stream, start, DTYPE, COMPUTE, SCALE,
                DECAY, LOCALIZE, NOISE, MASK, BOXED, ALIGNED, BLOCK)
    else:
        _update(table, t, offs, offs < n, counters, seed_ptr, scalars, num_tensors, stream, start, DTYPE, COMPUTE,
                SCALE, DECAY, LOCALIZE, NOISE, MASK, BOXED, ALIGNED, BLOCK)


@triton.jit
def _normals4(seed, counter, stream):
    """Four standard normals per 64-bit ``counter``: Philox-4x32-10 keyed by ``seed`` on the
    counter words (low and high 32 bits of ``counter``, ``stream``, 0), each 32-bit output to a
    uniform and two Box-Muller pairs, as ``tl.randn4x`` does from Triton 3.4 on. Written out
    because before 3.4 ``tl.randn4x`` ran a 64-bit Philox on 64-bit counters
    (triton-lang/triton#6832): other numbers, at another speed."""
    lo = (counter & 0xFFFFFFFF).to(tl.uint32)
    hi = (counter >> 32).to(tl.uint32)
    zero = lo * 0
    i1, i2, i3, i4 = tl.philox(seed, lo, hi, (zero + stream).to(tl.uint32), zero)
    z1, z2 = _box_muller(_uniform(i1), _uniform(i2))
    z3, z4 = _box_muller(_uniform(i3), _uniform(i4))
    return z1, z2, z3, z4


@triton.jit
def _uniform(x):
    """A 32-bit Philox output to a float32 in [0, 1), as Triton's ``uint_to_uniform_float``."""
    x = x.to(tl.int32, bitcast=True)
    x = tl.where(x < 0, ~x, x)
    return x.to(tl.float32) * 4.6566127342e-10  # (2^23 - 1) / 2^23 * 2^-31: below 1 after rounding


@triton.jit
def _box_muller(u1, u2):
    """Two standard normals from two uniforms, as Triton's ``pair_uniform_to_normal``: ``u1``
    is clamped to 1e-7, so ``|z| <= sqrt(-2 log 1e-7) = 5.68``."""
    u1 = tl.maximum(1.0e-7, u1)
    th = 6.283185307179586 * u2
    r = tl.sqrt(-2.0 * tl.log(u1))
    return r * tl.cos(th), r * tl.sin(th)


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
def _update(table, t, offs, inside, counters, seed_ptr, scalars, num_tensors, stream, start, DTYPE: tl.constexpr,
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
        counter = tl.load(counters + t) + start // 4 + tl.arange(0, BLOCK // 4)
        z1, z2, z3, z4 = _normals4(tl.load(seed_ptr), counter, stream)
        z = tl.interleave(tl.interleave(z1, z3), tl.interleave(z2, z4))
        b = b + tl.load(scalars + 1).to(COMPUTE) * z.to(COMPUTE)
    if MASK:
        b = b * tl.load(_address(table, 3, t, num_tensors, DTYPE, ALIGNED) + offs, mask=inside).to(COMPUTE)
    theta = theta + (-h) * b
    if BOXED:
        box = tl.load(scalars + 5).to(COMPUTE)
        theta = tl.minimum(tl.maximum(theta, anchor - box), anchor + box)
    tl.store(p_ptr + offs, theta.to(DTYPE), mask=inside)
