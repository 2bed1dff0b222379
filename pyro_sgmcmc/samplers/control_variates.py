"""Control variates in a plain PyTorch loop, for any sampler."""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from ..functional import control_variate_gradient_
from .._validation import check_callable

__all__ = ["ControlVariate"]


class ControlVariate:
    r"""Replaces the minibatch gradients in ``p.grad`` by the control-variate estimator of Baker
    et al. (2019) (:mod:`pyro_sgmcmc.functional.control_variates`):

    .. math:: g \leftarrow \nabla U(\hat\theta) + \nabla\hat U(\theta) - \nabla\hat U(\hat\theta).

    The anchor :math:`\hat\theta` is the parameters' value when this object is made (find the
    mode first, e.g. with a few hundred steps of Adam or L-BFGS), and :math:`\nabla U(\hat\theta)`
    the gradient of ``full_loss()`` there. Sampler-agnostic: it only rewrites ``p.grad`` before
    ``sampler.step()``. Example::

        >>> cv = ControlVariate(model.parameters(), full_loss=lambda: loss_fn(model, x_all, y_all))
        >>> for xb, yb in batches:                                       # doctest: +SKIP
        ...     sampler.zero_grad()
        ...     loss_fn(model, xb, yb).backward()                        # N/m-scaled minibatch loss
        ...     cv.correct(lambda: loss_fn(model, xb, yb))               # the same minibatch
        ...     sampler.step()

    :param params: the parameters (as given to the sampler).
    :param full_loss: returns the full-data potential :math:`U` at the parameters' current
        values (for a data set too large for one pass, a sum of minibatch losses, each scaled
        by 1 rather than N/m, works the same).
    """

    def __init__(self, params: Iterable[Tensor], full_loss: Callable[[], Tensor]):
        self.params = [p for p in params]
        if not self.params:
            raise ValueError("Invalid params: empty (give the parameters the sampler updates)")
        check_callable("full_loss", full_loss, what="a callable returning the full-data loss")
        self.anchor = [p.detach().clone() for p in self.params]
        with torch.enable_grad():
            loss = full_loss()
            if not (isinstance(loss, Tensor) and loss.numel() == 1 and loss.requires_grad):
                raise ValueError(f"Invalid full_loss: it returned {loss!r} (must return the loss as a one-element "
                                 "tensor that depends on the parameters)")
            self.full_gradient = [g.detach() for g in torch.autograd.grad(loss, self.params)]
        self._scratch = [torch.empty_like(p) for p in self.params]

    def correct(self, minibatch_loss: Callable[[], Tensor]) -> None:
        """Rewrite each ``p.grad`` (the minibatch gradient at the current point) into the
        control-variate estimator, evaluating ``minibatch_loss()`` (the same minibatch) at the
        anchor: the parameters are swapped to the anchor for that evaluation and back."""
        missing = [i for i, p in enumerate(self.params) if p.grad is None]
        if missing:
            raise RuntimeError(f"correct() needs the minibatch gradient in p.grad first (missing for params {missing})")
        with torch.no_grad():
            torch._foreach_copy_(self._scratch, [p.detach() for p in self.params])
            torch._foreach_copy_([p.data for p in self.params], self.anchor)
        try:
            with torch.enable_grad():
                anchor_grads = torch.autograd.grad(minibatch_loss(), self.params)
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self.params], self._scratch)
        control_variate_gradient_([p.grad for p in self.params], anchor_grads, self.full_gradient)
