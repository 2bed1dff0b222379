"""Evaluating a kernel's potential at flat points, in Python or through ``torch.jit.trace``.

Running a Pyro model costs Python time for every ``pyro.sample`` and handler, however small the
model: a minibatch potential of a 20-coefficient logistic regression costs about 0.34 ms of which
the arithmetic is a few percent. With ``jit_compile=True`` (as for Pyro's HMC) the potential is
traced once per kind of call into a TorchScript graph of its tensor operations, which replays
them without the Python (measured: a control-variate evaluation, the minibatch at the point and
at the anchor with both gradients, 0.90 -> 0.40 ms). The minibatch indices, the row weights of a
full-data walk and the points are inputs of the graph, so one trace serves every minibatch; the
data, the model's structure and its constants are frozen into it. As with HMC, that is only
correct for a model whose operations do not depend on the values of its latent sites or on its
minibatch (Python control flow on them is recorded once).
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Sequence

import pyro
import torch
from pyro.util import ignore_jit_warnings
from torch import Tensor

from .subsample import SubsampleControl

__all__ = ["PotentialEvaluator"]


class PotentialEvaluator:
    """``U`` at flat points under one minibatch control, traced per kind of call if asked.

    :param potential: ``(params, control, jacobian) -> U`` for a model (the kernel's
        ``ModelPotential``) or ``params -> U`` (a user's ``potential_fn``, never under a control).
    :param unflatten: flat tensor -> ``{site: tensor}``.
    :param jit_compile: trace the evaluations with ``torch.jit.trace``.
    :param jit_options: keyword arguments of ``torch.jit.trace`` (default ``{"check_trace": False}``,
        as Pyro's HMC).
    :param ignore_jit_warnings: silence the tracer's warnings while tracing.
    """

    def __init__(self, potential: Callable, unflatten: Callable[[Tensor], dict[str, Tensor]], *, is_model: bool,
                 jit_compile: bool = False, jit_options: dict[str, Any] | None = None,
                 ignore_jit_warnings: bool = False):
        self.potential = potential
        self.unflatten = unflatten
        self.is_model = is_model
        self.jit_compile = jit_compile
        self.jit_options = {"check_trace": False} if jit_options is None else dict(jit_options)
        self.ignore_jit_warnings = ignore_jit_warnings
        self._traced: dict[tuple, Callable] = {}

    def __call__(self, points: Sequence[Tensor], control: SubsampleControl | None = None,
                 jacobian: bool = True) -> list[Tensor]:
        """``[U(point) for point in points]``, every one under ``control`` (the same minibatch)."""
        # the model's first evaluation runs in Python: it is the one Pyro validates
        if not self.jit_compile or (self.is_model and not getattr(self.potential, "_validated", True)):
            return [self._python(point, control, jacobian) for point in points]
        indices = sorted(control.indices.items()) if control is not None else []
        weights = sorted(control.weights.items()) if control is not None else []
        keep_outside = control.keep_outside if control is not None else True
        key = (len(points), tuple(n for n, _ in indices), tuple(n for n, _ in weights), keep_outside, jacobian,
               control is None)
        inputs = (*points, *(v for _, v in indices), *(v for _, v in weights))
        traced = self._traced.get(key)
        if traced is None:
            traced = self._trace(key, inputs)
        out = traced(*inputs)
        return list(out) if isinstance(out, (tuple, list)) else [out]

    def _python(self, point: Tensor, control: SubsampleControl | None, jacobian: bool) -> Tensor:
        params = self.unflatten(point)
        if not self.is_model:
            return self.potential(params)
        return self.potential(params, control, jacobian)

    def _trace(self, key: tuple, inputs: tuple) -> Callable:
        count, index_names, weight_names, keep_outside, jacobian, no_control = key

        def evaluate(*args: Tensor) -> tuple[Tensor, ...]:
            points = args[:count]
            indices = dict(zip(index_names, args[count : count + len(index_names)]))
            weights = dict(zip(weight_names, args[count + len(index_names) :]))
            results = []
            # Pyro's filter acts only inside a trace, so it is entered here
            with ignore_jit_warnings() if self.ignore_jit_warnings else contextlib.nullcontext():
                for point in points:
                    control = None if no_control else SubsampleControl(indices, weights, keep_outside)
                    results.append(self._python(point, control, jacobian))
            return tuple(results)

        with pyro.validation_enabled(False), warnings.catch_warnings():
            if self.ignore_jit_warnings:  # torch 2.9+ deprecates torch.jit.trace (Pyro's HMC uses it too)
                warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*torch.jit.trace.*")
            traced = torch.jit.trace(evaluate, tuple(t.detach() for t in inputs), **self.jit_options)
        self._traced[key] = traced
        return traced
