"""Elementwise list operations with a multi-tensor (``torch._foreach_*``) and a per-tensor path.

Every update rule in :mod:`pyro_sgmcmc.functional` is written once against this small table of
operations, so the two execution paths cannot drift apart: :data:`FOREACH` hands each list to
one ``torch._foreach_*`` call, :data:`PER_TENSOR` loops over the tensors in Python. On the CPU
both end in the same ATen kernels, so they give the same numbers bit for bit.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

TensorList = Sequence[Tensor]
Scalar = float | Tensor


#: this torch's ``torch._foreach_norm`` takes ``dtype=`` (read from its schema; older ones do not)
FOREACH_NORM_DTYPE = any("dtype" in str(schema)
                         for schema in torch._C._jit_get_schemas_for_operator("aten::_foreach_norm"))


class PerTensorOps:
    """The per-tensor fallback: a Python loop of in-place tensor methods."""

    #: whether small 1-d gradients may be gathered with one ``torch.cat`` (see :class:`GatheringOps`)
    gathers = False

    @staticmethod
    def add_(selves: TensorList, others: TensorList, alpha: float = 1.0) -> None:
        for self, other in zip(selves, others):
            self.add_(other, alpha=alpha)

    @staticmethod
    def mul_(selves: TensorList, factor: Scalar) -> None:
        for self in selves:
            self.mul_(factor)

    @staticmethod
    def addcmul_(selves: TensorList, t1: TensorList, t2: TensorList, value: float = 1.0) -> None:
        for self, a, b in zip(selves, t1, t2):
            self.addcmul_(a, b, value=value)

    @staticmethod
    def copy_(selves: TensorList, others: TensorList) -> None:
        for self, other in zip(selves, others):
            self.copy_(other)

    @staticmethod
    def maximum_(selves: TensorList, others: TensorList) -> None:
        for self, other in zip(selves, others):
            torch.maximum(self, other, out=self)

    @staticmethod
    def minimum_(selves: TensorList, others: TensorList) -> None:
        for self, other in zip(selves, others):
            torch.minimum(self, other, out=self)

    @staticmethod
    def mul_each_(selves: TensorList, others: TensorList) -> None:
        for self, other in zip(selves, others):
            self.mul_(other)

    @staticmethod
    def div_each_(selves: TensorList, others: TensorList) -> None:
        for self, other in zip(selves, others):
            self.div_(other)

    @staticmethod
    def rsqrt(tensors: TensorList) -> list[Tensor]:
        return [t.rsqrt() for t in tensors]

    @staticmethod
    def reciprocal_(tensors: TensorList) -> None:
        for t in tensors:
            t.reciprocal_()

    @staticmethod
    def scaled(tensors: TensorList, factor: float) -> list[Tensor]:
        return [t * factor for t in tensors]

    @staticmethod
    def add_scalar_(selves: TensorList, value: float) -> None:
        for self in selves:
            self.add_(value)

    @staticmethod
    def norms(tensors: TensorList) -> list[Tensor]:
        """The 2-norm of each tensor, computed in at least float32."""
        return [torch.linalg.vector_norm(t, dtype=_acc_dtype(t)) for t in tensors]

    @classmethod
    def sum_of_squares(cls, tensors: TensorList) -> Tensor:
        """``sum_i ||t_i||^2`` as a 0-dim tensor, accumulated in at least float32."""
        return torch.stack(cls.norms(tensors)).square().sum()


class ForeachOps:
    """The multi-tensor fast path: one ``torch._foreach_*`` call per list."""

    gathers = False

    @staticmethod
    def add_(selves: TensorList, others: TensorList, alpha: float = 1.0) -> None:
        torch._foreach_add_(selves, others, alpha=alpha)

    @staticmethod
    def mul_(selves: TensorList, factor: Scalar) -> None:
        torch._foreach_mul_(selves, factor)

    @staticmethod
    def addcmul_(selves: TensorList, t1: TensorList, t2: TensorList, value: float = 1.0) -> None:
        torch._foreach_addcmul_(selves, t1, t2, value=value)

    @staticmethod
    def copy_(selves: TensorList, others: TensorList) -> None:
        torch._foreach_copy_(selves, others)

    @staticmethod
    def maximum_(selves: TensorList, others: TensorList) -> None:
        torch._foreach_maximum_(selves, others)

    @staticmethod
    def minimum_(selves: TensorList, others: TensorList) -> None:
        torch._foreach_minimum_(selves, others)

    @staticmethod
    def mul_each_(selves: TensorList, others: TensorList) -> None:
        torch._foreach_mul_(selves, others)

    @staticmethod
    def div_each_(selves: TensorList, others: TensorList) -> None:
        torch._foreach_div_(selves, others)

    @staticmethod
    def rsqrt(tensors: TensorList) -> list[Tensor]:
        return list(torch._foreach_rsqrt(tensors))

    @staticmethod
    def reciprocal_(tensors: TensorList) -> None:
        torch._foreach_reciprocal_(tensors)

    @staticmethod
    def scaled(tensors: TensorList, factor: float) -> list[Tensor]:
        return list(torch._foreach_mul(tensors, factor))

    @staticmethod
    def add_scalar_(selves: TensorList, value: float) -> None:
        torch._foreach_add_(selves, value)

    @staticmethod
    def norms(tensors: TensorList) -> list[Tensor]:
        if all(t.dtype in (torch.float32, torch.float64) for t in tensors):
            return list(torch._foreach_norm(tensors))
        return PerTensorOps.norms(tensors)  # half precisions: accumulate in float32

    @classmethod
    def sum_of_squares(cls, tensors: TensorList) -> Tensor:
        return torch.stack(cls.norms(tensors)).square().sum()


class GatheringOps(ForeachOps):
    """The multi-tensor path for gradients the caller vouches for (shaped, typed and placed like
    their parameters, as torch guarantees of ``p.grad``), outside autograd: a noise chunk of
    small 1-d tensors then gathers their gradients with one ``torch.cat`` (see
    :func:`~pyro_sgmcmc.functional._common.fill_drift`). The flat and the per-tensor adds run
    the same ATen kernel on the same elements, so the numbers are the same."""

    gathers = True


PER_TENSOR = PerTensorOps()
FOREACH = ForeachOps()
GATHERING = GatheringOps()


def _acc_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def select_ops(foreach: bool, gather: bool = False) -> PerTensorOps | ForeachOps:
    """The operation table for ``foreach`` (True: multi-tensor, False: per-tensor); with
    ``gather`` (vouched-for gradients, autograd off), the multi-tensor one that gathers."""
    if not foreach:
        return PER_TENSOR
    return GATHERING if gather else FOREACH


def supports_foreach(tensors: TensorList) -> bool:
    """Whether the multi-tensor path applies: plain dense tensors, no subclasses."""
    return all(type(t) in (Tensor, torch.nn.Parameter) and t.layout == torch.strided for t in tensors)
