r"""The Triton kernel of the fused SGLD step (:mod:`._fused`). Imported only when Triton is.

One program updates ``BLOCK`` consecutive entries of one tensor of a (device, dtype) bucket; a
block table says which (tensor, first entry) each program takes, and a pointer table holds the
addresses of the bucket's parameters, gradients, anchors and masks, so that one launch covers
every tensor of the bucket, as torch's multi-tensor (foreach) kernels do. Per entry, in the
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
#: program's ops with NumPy, so there few large programs (the numbers do not depend on it)
BLOCK = 1 << 16 if interpreting() else 1024
#: warps per program
NUM_WARPS = 4

#: positions of the step's scalars in the ``scalars`` tensor
STEP_SIZE, NOISE_STD, GRAD_SCALE, SHRINK, LOCALIZATION, BOX = range(6)


@triton.jit
def sgld_kernel(table, blocks, numels, counters, seed_ptr, scalars, num_tensors,
                DTYPE: tl.constexpr, COMPUTE: tl.constexpr, SCALE: tl.constexpr, DECAY: tl.constexpr,
                LOCALIZE: tl.constexpr, NOISE: tl.constexpr, MASK: tl.constexpr, BOXED: tl.constexpr,
                BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(blocks + 2 * pid)
    start = tl.load(blocks + 2 * pid + 1)
    n = tl.load(numels + t)
    offs = start + tl.arange(0, BLOCK)
    inside = offs < n
    p_ptr = tl.load(table + t).to(tl.pointer_type(DTYPE))
    g_ptr = tl.load(table + num_tensors + t).to(tl.pointer_type(DTYPE))
    h = tl.load(scalars + 0).to(COMPUTE)
    theta = tl.load(p_ptr + offs, mask=inside).to(COMPUTE)
    b = tl.load(g_ptr + offs, mask=inside).to(COMPUTE)
    if SCALE:
        b = b * tl.load(scalars + 2).to(COMPUTE)
    if DECAY:
        b = b + tl.load(scalars + 3).to(COMPUTE) * theta
    if LOCALIZE or BOXED:
        a_ptr = tl.load(table + 2 * num_tensors + t).to(tl.pointer_type(DTYPE))
        anchor = tl.load(a_ptr + offs, mask=inside).to(COMPUTE)
        if LOCALIZE:
            b = b + (-tl.load(scalars + 4).to(COMPUTE)) * anchor
    if NOISE:
        seed = tl.load(seed_ptr)
        counter = tl.load(counters + t) + start // 4 + tl.arange(0, BLOCK // 4)
        z1, z2, z3, z4 = tl.randn4x(seed, counter)
        z = tl.interleave(tl.interleave(z1, z3), tl.interleave(z2, z4))
        b = b + tl.load(scalars + 1).to(COMPUTE) * z.to(COMPUTE)
    if MASK:
        m_ptr = tl.load(table + 3 * num_tensors + t).to(tl.pointer_type(DTYPE))
        b = b * tl.load(m_ptr + offs, mask=inside).to(COMPUTE)
    theta = theta + (-h) * b
    if BOXED:
        box = tl.load(scalars + 5).to(COMPUTE)
        theta = tl.minimum(tl.maximum(theta, anchor - box), anchor + box)
    tl.store(p_ptr + offs, theta.to(DTYPE), mask=inside)
