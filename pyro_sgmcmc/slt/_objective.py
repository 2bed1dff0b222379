"""What the LLC chains evaluate: ``C`` chains of the sampled weights, stacked along a leading
dimension, each with the mean per-datum loss :math:`L` on a minibatch of its own.

:class:`ChainObjective` is the interface the chain driver (``llc._Chains``) and the step-size
measurements (:mod:`._scales`) use; :class:`ModuleObjective` implements it for a torch module
and a loss (all chains in one call through ``torch.func.functional_call`` and ``vmap`` where the
module allows, one call per chain otherwise), :class:`~pyro_sgmcmc.slt._pyro.PyroObjective` for a
Pyro model.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad_and_value, vmap

from .._validation import check_callable, check_mask
from ._data import Minibatches, batch_size_of, detect_reduction, map_batch, per_datum, stack_batches


class ChainObjective:
    """``C`` chains of the weights :math:`w` (the sampled tensors, stacked: ``params[i]`` has shape
    ``[C, *shape_i]``), started at :math:`w^*` (``anchor``), with the per-datum loss :math:`L`.

    Subclasses set the attributes below and implement :meth:`draw`, :meth:`evaluate` and
    :meth:`full_loss`.
    """

    names: list[str]
    params: list[Tensor]  # leaves [C, *shape], the chains' current weights
    anchor: list[Tensor]  # w*, [*shape]
    anchor_stack: list[Tensor]  # w* repeated for each chain, leaves [C, *shape] (control variates)
    masks: list[Tensor | None]  # 0/1 tensors [*shape] (None: every entry is sampled)
    n: int
    num_chains: int
    exact: bool  # every evaluation uses the whole data set (no minibatch noise)
    vectorized: bool = False

    def _stack(self, anchor: list[Tensor]) -> None:
        self.anchor = [a.detach().clone() for a in anchor]
        repeat = lambda a: a.unsqueeze(0).repeat(self.num_chains, *([1] * a.dim())).requires_grad_(True)  # noqa: E731
        self.params = [repeat(a) for a in self.anchor]
        self.anchor_stack = [repeat(a) for a in self.anchor]

    @property
    def num_sampled(self) -> int:
        """How many coordinates the chains move (masked entries excluded)."""
        return sum(int(m.count_nonzero()) if m is not None else a.numel() for a, m in zip(self.anchor, self.masks))

    def stacked_masks(self) -> list[Tensor | None]:
        return [None if m is None else m.unsqueeze(0).expand(self.num_chains, *m.shape) for m in self.masks]

    def draw(self) -> Any:
        """Fresh, independent minibatches for every chain."""
        raise NotImplementedError

    def evaluate(self, batch: Any, anchored: bool) -> tuple[Tensor, Tensor | None]:
        """The loss of each chain on its minibatch (``[C]``, differentiable in :attr:`params`) and,
        if ``anchored``, the loss at :math:`w^*` on the same minibatches (``[C]``, differentiable in
        :attr:`anchor_stack`)."""
        raise NotImplementedError

    def full_loss(self, gradient: bool) -> tuple[float, list[Tensor] | None]:
        """:math:`L_n(w^*)` exactly, on the whole data set, and its gradient if asked."""
        raise NotImplementedError

    def gradients(self, batch: Any, anchored: bool) -> Gradients:
        """What :meth:`evaluate` gives, with the gradients (by reverse mode through it; subclasses
        may compute them another way)."""
        with torch.enable_grad():
            losses, at_anchor = self.evaluate(batch, anchored)
            if not anchored:
                return Gradients(losses.detach(), _contiguous(all_grads(losses.sum(), self.params)))
            grads = all_grads(losses.sum() + at_anchor.sum(), self.params + self.anchor_stack)
        tensors = len(self.params)
        return Gradients(losses.detach(), _contiguous(grads[:tensors]), at_anchor.detach(), grads[tensors:])


@dataclass(frozen=True)
class Gradients:
    """What :meth:`ChainObjective.gradients` returns: each chain's loss on its minibatch (``[C]``)
    and its gradient (leaves ``[C, *shape]``, contiguous), and, where asked, both at :math:`w^*` on
    the same minibatches."""

    losses: Tensor
    grads: list[Tensor]
    anchor_losses: Tensor | None = None
    anchor_grads: list[Tensor] | None = None


def all_grads(total: Tensor, inputs: list[Tensor], **options) -> list[Tensor]:
    """``torch.autograd.grad`` of ``total``, zeros for the inputs it does not depend on."""
    grads = torch.autograd.grad(total, inputs, allow_unused=True, **options)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(inputs, grads)]


def _contiguous(grads: list[Tensor]) -> list[Tensor]:
    """The gradients the sampler takes, contiguous: the sampler's chunked noise path would copy a
    strided one piece by piece."""
    return [g.contiguous() for g in grads]


def _training_layers(model: nn.Module) -> tuple[list[str], list[str]]:
    norms, dropouts = [], []
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.batchnorm._NormBase):
            norms.append(name or type(module).__name__)
        elif isinstance(module, nn.modules.dropout._DropoutNd):
            dropouts.append(name or type(module).__name__)
    return norms, dropouts


class _Evaluate(nn.Module):
    """Makes ``evaluate(model, batch)`` a module of ``model``'s parameters, for ``functional_call``."""

    def __init__(self, model: nn.Module, evaluate: Callable[[nn.Module, Any], Tensor]):
        super().__init__()
        self.model = model
        self.evaluate = evaluate

    def forward(self, batch: Any) -> Tensor:
        return self.evaluate(self.model, batch)


class ModuleObjective(ChainObjective):
    """A torch module's weights under a loss, on minibatches of a ``DataLoader``.

    :param model: the module; its current weights are :math:`w^*` (it is not modified).
    :param minibatches: the data (:class:`~._data.Minibatches`).
    :param loss_fn: ``loss_fn(model(inputs), target)`` for batches ``(inputs, target)``.
    :param evaluate: or ``evaluate(model, batch)`` for any other batch.
    :param reduction: the loss's reduction (``None``: detected, see :func:`~._data.detect_reduction`).
    :param params: names (or the tensors) of the parameters to sample (default: all); the others
        stay at their current values.
    :param mask: ``{name: 0/1 tensor}``: only the entries at 1 are sampled.
    :param vectorize: all chains in one ``vmap``-ed call (``None``: if the module allows it).
    """

    def __init__(self, model: nn.Module, minibatches: Minibatches, *, loss_fn: Callable | None,
                 evaluate: Callable | None, reduction: str | None, params: Iterable[str | Tensor] | None,
                 mask: dict[str, Tensor] | None, num_chains: int, vectorize: bool | None):
        if not isinstance(model, nn.Module):
            raise ValueError(f"Invalid model: {type(model).__name__} (must be a torch.nn.Module when loss_fn or "
                             "evaluate is given)")
        if (loss_fn is None) == (evaluate is None):
            raise ValueError("Give exactly one of loss_fn (called as loss_fn(model(inputs), target)) and evaluate "
                             "(called as evaluate(model, batch))")
        check_callable("loss_fn", loss_fn, none_ok=True)
        check_callable("evaluate", evaluate, none_ok=True)
        norms, dropouts = _training_layers(model)
        if norms:
            raise ValueError(f"Invalid model: batch normalisation {norms} in training mode (each evaluation would "
                             "update its running statistics and depend on the batch); call model.eval()")
        if dropouts:
            warnings.warn(f"the model is in training mode with dropout {dropouts}: the loss is random and the LLC "
                          "estimate is biased; call model.eval() for a deterministic loss", UserWarning, stacklevel=4)
        self.model = model
        self.minibatches = minibatches
        self.n = minibatches.n
        self.num_chains = num_chains
        self.exact = minibatches.full
        self.loss_fn = loss_fn
        self._module = _Evaluate(model, evaluate) if evaluate is not None else model
        self._prefix = "model." if evaluate is not None else ""
        named = dict(model.named_parameters())
        self.names = _parameter_names(named, params)
        mask = {} if mask is None else dict(mask)
        unknown = set(mask) - set(self.names)
        if unknown:
            raise ValueError(f"Invalid mask: {sorted(unknown)} are not sampled parameters (sampled: {self.names})")
        self.masks = _checked_masks(self.names, mask, named)
        self.device = named[self.names[0]].device
        self._stack([named[name] for name in self.names])
        batch = self._to_device(minibatches.everything() if self.exact else minibatches.draw(1, stacked=False)[0])
        self._everything = batch if self.exact else None
        self.reduction = detect_reduction(lambda b: self._raw(self.anchor, b), batch, reduction, loss_fn)
        self.vectorized = self._functional_gradients = False
        if vectorize is not False:
            batches = self._batches(batch) if not self.exact else batch
            try:
                with torch.no_grad():
                    self._vmapped(self.params, batches)
                self.vectorized = True
            except Exception:  # a module vmap cannot batch (data-dependent control flow, .item(), ...)
                if vectorize:
                    raise
            if self.vectorized:
                try:  # torch.func.grad needs every operation's functorch rule (a custom autograd.Function may lack one)
                    self._vmapped_gradients(self.params, batches)
                    self._functional_gradients = True
                except Exception:
                    pass

    def _to_device(self, batch: Any) -> Any:
        return map_batch(lambda t: t.to(self.device), batch)

    def _batches(self, batch: Any) -> Any:
        return stack_batches([batch] * self.num_chains)

    def _raw(self, values: list[Tensor], batch: Any) -> Tensor:
        """What the user's loss returns, with the sampled parameters set to ``values``."""
        named = {self._prefix + name: value for name, value in zip(self.names, values)}
        if self.loss_fn is None:
            return functional_call(self._module, named, (batch,))
        if not isinstance(batch, (tuple, list)) or len(batch) != 2:
            raise ValueError(f"Invalid batch: a {type(batch).__name__} (loss_fn needs (inputs, target) batches; for "
                             "any other batch give evaluate=fn(model, batch) instead)")
        inputs, target = batch
        return self.loss_fn(functional_call(self._module, named, (inputs,)), target)

    def _single(self, values: tuple[Tensor, ...], batch: Any) -> Tensor:
        return per_datum(self._raw(list(values), batch), self.reduction, batch_size_of(batch))

    def _vmapped(self, values: list[Tensor], batch: Any) -> Tensor:
        in_batch = None if self.exact else 0
        return vmap(self._single, in_dims=(0, in_batch), randomness="different")(tuple(values), batch)

    def _with_anchor(self, batch: Any) -> tuple[list[Tensor], Any]:
        """The chains' weights with :math:`w^*` stacked after them (``2C`` chains), and ``batch``
        doubled to match: one ``vmap``-ed call evaluates both on the same minibatches."""
        values = [torch.cat([w, a]) for w, a in zip(self.params, self.anchor_stack)]
        return values, map_batch(lambda t: torch.cat([t, t]), batch) if not self.exact else batch

    def _vmapped_gradients(self, values: list[Tensor], batch: Any) -> tuple[list[Tensor], Tensor]:
        """Each chain's gradient and loss by ``vmap(grad_and_value(...))``: each chain's backward is
        then an unbatched one, whose matrix products give the weights' gradients in the weights'
        own layout. Reverse mode through the ``vmap``-ed loss instead leaves a linear layer's weight
        gradient transposed (the backward of a batched matrix product), and the copy to a contiguous
        one cost a fifth of a step of the benchmark MLP (8 chains)."""
        in_batch = None if self.exact else 0
        detached = tuple(v.detach() for v in values)
        grads, losses = vmap(grad_and_value(self._single), in_dims=(0, in_batch), randomness="different")(detached,
                                                                                                           batch)
        return list(grads), losses

    def draw(self) -> Any:
        if self.exact:
            return self._everything
        return self._to_device(self.minibatches.draw(self.num_chains, stacked=self.vectorized))

    def evaluate(self, batch: Any, anchored: bool) -> tuple[Tensor, Tensor | None]:
        chains = self.num_chains
        if self.vectorized:
            if not anchored:
                return self._vmapped(self.params, batch), None
            losses = self._vmapped(*self._with_anchor(batch))
            return losses[:chains], losses[chains:]
        pick = (lambda c: batch) if self.exact else (lambda c: batch[c])
        losses = torch.stack([self._single(tuple(w[c] for w in self.params), pick(c)) for c in range(chains)])
        if not anchored:
            return losses, None
        at_anchor = torch.stack([self._single(tuple(a[c] for a in self.anchor_stack), pick(c)) for c in range(chains)])
        return losses, at_anchor

    def gradients(self, batch: Any, anchored: bool) -> Gradients:
        if not self._functional_gradients:
            return super().gradients(batch, anchored)
        if not anchored:
            grads, losses = self._vmapped_gradients(self.params, batch)
            return Gradients(losses.detach(), grads)
        chains = self.num_chains
        with torch.no_grad():
            values, both = self._with_anchor(batch)
        grads, losses = self._vmapped_gradients(values, both)
        return Gradients(losses[:chains].detach(), [g[:chains] for g in grads], losses[chains:].detach(),
                         [g[chains:] for g in grads])

    def full_loss(self, gradient: bool) -> tuple[float, list[Tensor] | None]:
        anchor = [a.detach().clone().requires_grad_(gradient) for a in self.anchor]
        total, grads = 0.0, [torch.zeros_like(a) for a in anchor] if gradient else None
        for batch, rows in self.minibatches.walk(chunk=max(self.minibatches.batch_size, 1024)):
            with torch.set_grad_enabled(gradient):
                value = self._single(tuple(anchor), self._to_device(batch)) * (rows / self.n)
            if gradient:
                for g, piece in zip(grads, torch.autograd.grad(value, anchor, allow_unused=True)):
                    if piece is not None:
                        g += piece
            total += float(value.detach())
        return total, grads


def _parameter_names(named: dict[str, Tensor], params: Iterable[str | Tensor] | None) -> list[str]:
    if params is None:
        names = list(named)
    else:
        by_id = {id(p): name for name, p in named.items()}
        names = []
        for p in params:
            name = p if isinstance(p, str) else by_id.get(id(p))
            if name not in named:
                raise ValueError(f"Invalid params: {p if isinstance(p, str) else 'a tensor'!r} is not a parameter of the "
                                 f"model (parameters: {list(named)})")
            names.append(name)
    if not names:
        raise ValueError("Invalid params: empty (no parameter to sample)")
    return names


def _checked_masks(names: list[str], mask: dict[str, Tensor], named: dict[str, Tensor]) -> list[Tensor | None]:
    """The masks of the sampled parameters, checked as the samplers check theirs
    (:func:`~pyro_sgmcmc._validation.check_mask`; ``None`` where none was given)."""
    try:
        checked = check_mask("mask", [mask.get(name) for name in names], [named[name] for name in names])
    except ValueError as error:
        raise ValueError(f"{error} (mask[i] belongs to the i-th sampled parameter of {names})") from None
    return [None if mask.get(name) is None else m for name, m in zip(names, checked)]
