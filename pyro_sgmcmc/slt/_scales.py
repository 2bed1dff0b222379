r"""The scales that set the LLC chain's step size, measured where the chains are, and the rule.

The chain samples :math:`\exp(-U)` with :math:`U(w) = n\beta L(w) + \frac{\gamma}{2}\|w - w^*\|^2` by
SGLD with step :math:`\epsilon`. On a quadratic :math:`L = \frac12\sum_i h_i w_i^2` (in the eigenbasis,
:math:`a_i = n\beta h_i + \gamma`) with gradient noise of variance :math:`B_i` along direction
:math:`i`, SGLD's stationary variance is :math:`(1 + \epsilon B_i/4)/(a_i(1 - \epsilon a_i/4))` (see
:meth:`pyro_sgmcmc.samplers.SGLD.suggest_lr`), and :math:`\hat\lambda = \frac12\sum_i n\beta h_i
\mathrm{Var}_i`, so the relative bias of :math:`\hat\lambda` is at most

.. math:: \frac{\epsilon\,(c + b)}{4\,(1 - \epsilon a_{max}/4)}, \qquad
          c = \frac{n\beta\,\mathrm{tr}\,\nabla^2 L}{2\lambda}, \quad
          b = \frac{\sum_j \mathrm{Var}(n\beta\,\hat g_j)}{2\lambda},

where :math:`c` and :math:`b` are the curvature and noise *averaged over the* :math:`2\lambda`
*directions that* :math:`\hat\lambda` *counts* (each direction :math:`i` weighs
:math:`n\beta h_i/a_i`: a well-determined direction counts fully, a flat or localized one hardly),
not their largest values. That is the difference from the kernels' rule, which bounds the bias of
every posterior variance by the largest curvature: the Hessian of a trained network has a few
large eigenvalues over a bulk of small ones, and the largest would set a step many times smaller
than :math:`\hat\lambda` needs. The step is then SGLD's own rule (``suggest_lr``) applied to
:math:`c + t\,a_{max}` and :math:`b` (the :math:`t\,a_{max}` term accounts for the denominator), capped at
:math:`\epsilon a_{max} \le 1/2` (stable, and where the first-order bound is within 15% of the exact one).

Measured at the chains' current points, on one minibatch per chain for the curvature:
:math:`a_{max}` by power iteration on Hessian-vector products (double backward), the trace by
Hutchinson's estimator (Rademacher probes), and the noise from the gradient estimate the chain
uses (with or without control variates) on fresh minibatches. Before :math:`\hat\lambda` is known
(at :math:`w^*`), the rule falls back to the largest curvature and the largest per-coordinate noise,
as the kernels do.

On non-quadratic losses the bound is the quadratic approximation around the points measured;
for :math:`L = w^4` at the chosen step the bias of :math:`E[n\beta L]` is about half the target
(computed from the exact stationary law of the discretised chain).

The second chain, underdamped Langevin with the BAOAB splitting
(:class:`pyro_sgmcmc.samplers.SGHMC` with ``splitting="baoab"``, step :math:`h`, friction
:math:`C`), samples a quadratic potential exactly with exact gradients, so its step is not
limited by the curvature's bias but by stability and the gradient noise: along a direction of
precision :math:`a` the noise :math:`B` heats the variance by
:math:`h^2 B (1 + f)/((1 - f)(4 - h^2 a))` (:math:`f = e^{-Ch}`), which averaged over the
:math:`2\hat\lambda` directions gives the relative bias

.. math:: \frac{h^2\,(1 + f)}{(1 - f)(4 - h^2 a_{max})}\; b.

The rule takes :math:`h^2` equal to SGLD's step :math:`\epsilon` for the same target (lower when
the noise needs it): the same reach per step and the same margin of stability (:math:`h^2 a < 4`,
:math:`\epsilon a < 4`) where the curvature grows beyond what the pilots measured, as it does on
a singular model's valleys (a larger :math:`h`, which the quadratic law would allow, made
chains diverge on devinterp's polynomial :math:`x w_1 w_2^2`). The friction :math:`Ch` is at
least ``_BAOAB_FRICTION``, at least :math:`2\sqrt\gamma` (critical damping of a direction held
only by the localization) and as large as the noise's bias needs. The gain is the relaxation of
flat directions: at :math:`C \ge 2\sqrt\gamma` their amplitude relaxes at
:math:`h(C - \sqrt{C^2 - 4\gamma})/2 \approx h\gamma/C` a step, against SGLD's
:math:`\epsilon\gamma/2`: :math:`2/(Ch)` = 20 times as fast at the floor (and :math:`1/(h\sqrt\gamma)`
at critical damping). What the quadratic law does not cover (a potential whose curvature changes
over the chain's reach) is not in this bias; the tests measure it against exact answers.

Control variates at :math:`w^*` remove the gradient's and the loss's minibatch noise there, and
keep a noise that grows with the distance from :math:`w^*` (the minibatch's Hessian varies); a
step with them evaluates the minibatch at :math:`w^*` too, twice the work of a plain one. Where
the chains reach far from :math:`w^*` (a network's flat directions held only by the
localization), the two noises are alike and the control variates only double the cost:
:func:`control_pays` compares both where the chains are.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..functional import control_variate_gradient_
from ..functional.sghmc import baoab_heat
from ..samplers import SGLD
from ._objective import ChainObjective

#: The largest :math:`\epsilon a_{max}`: stable (SGLD diverges at 4), and the first-order bias
#: bound is within 15% of the exact :math:`1/(1 - \epsilon a/4)` there.
_STABLE_FRACTION = 0.5
#: BAOAB's friction a step, at least: :math:`Ch = 0.1` lets the momentum forget itself in about
#: ten steps, so that the counted (underdamped) directions' energy decorrelates within some
#: twenty, while a flat direction still relaxes ten times as fast as under SGLD's largest step.
_BAOAB_FRICTION = 0.1
#: A control-variate step's work over a plain one's: the minibatch evaluated at :math:`w^*` too
#: (measured on the benchmark's MLP: 58 against 27 ms a step).
_CONTROL_COST = 2.0
#: The chains' samplers (:func:`~pyro_sgmcmc.slt.estimate_llc`'s ``sampler``; ``"auto"``: see
#: :func:`prefer_baoab`).
SAMPLERS = ("auto", "sgld", "baoab")


@dataclass(frozen=True)
class ChainStep:
    """The chains' step: SGLD's :math:`\\epsilon` (``friction`` None), or BAOAB's :math:`h` and
    friction :math:`C`."""

    size: float
    friction: float | None = None

    @property
    def baoab(self) -> bool:
        return self.friction is not None

    @property
    def scale(self) -> float:
        """SGLD's :math:`\\epsilon`, or BAOAB's :math:`h^2`: the same reach, and the same
        stability (:math:`\\epsilon a < 4`, :math:`h^2 a < 4`)."""
        return self.size if self.friction is None else self.size * self.size

    def shrunk(self, factor: float) -> "ChainStep":
        """The step with :attr:`scale` ``factor`` times smaller (BAOAB: the friction a step kept)."""
        if self.friction is None:
            return ChainStep(self.size / factor)
        root = math.sqrt(factor)
        return ChainStep(self.size / root, self.friction * root)

    def __str__(self) -> str:
        return f"{self.size:.3g}" if self.friction is None else f"{self.size:.3g} (friction {self.friction:.3g})"


@dataclass(frozen=True)
class Scales:
    """What sets the step size, measured at the chains' current points.

    :param curvature: :math:`a_{max}`, the largest curvature of the localized potential
        :math:`n\\beta L + \\frac{\\gamma}{2}\\|w - w^*\\|^2` (largest over chains).
    :param hessian_trace: :math:`n\\beta\\,\\mathrm{tr}\\,\\nabla^2 L` over the sampled coordinates
        (mean over chains).
    :param noise_trace: the summed variance of :math:`n\\beta` times the gradient estimate, over the
        sampled coordinates (mean over chains; 0 on full-data gradients).
    :param noise_max: the largest of those variances (largest over chains).
    :param loss_noise: the standard deviation of :math:`n\beta` times the loss estimate over
        minibatches (mean over chains).
    """

    curvature: float
    hessian_trace: float
    noise_trace: float
    noise_max: float
    loss_noise: float


@dataclass
class ControlVariates:
    """The anchor's exact loss and gradient, for the control-variate estimators."""

    init_loss: float
    full_gradient: list[Tensor]  # grad L_n(w*), broadcast over the chains


def gradient_estimate(objective: ChainObjective, batch, control: ControlVariates | None) -> tuple[list[Tensor], Tensor]:
    r"""The gradient of :math:`L` that each chain follows, and the estimate of :math:`L_n` at each
    chain's point (``[C]``), both unbiased. On the minibatch :math:`B`, or, with control variates,
    from the same minibatch at :math:`w^*` and the exact values there:

    .. math:: \hat g = \nabla L_B(w) - \nabla L_B(w^*) + \nabla L_n(w^*), \qquad
              \hat L = L_B(w) - L_B(w^*) - (w - w^*)^\top\big(\nabla L_B(w^*) - \nabla L_n(w^*)\big) + L_n(w^*).

    The gradient is Baker et al.'s (2019) estimator
    (:func:`~pyro_sgmcmc.functional.control_variate_gradient_`); the loss subtracts the first-order
    Taylor term too (a Taylor proxy, as in Quiroz et al. 2019), so its minibatch noise is of second
    order in :math:`w - w^*` (nil on a quadratic with a constant Hessian). That matters: the
    difference :math:`L_B(w) - L_B(w^*)` alone keeps a noise of order :math:`|w - w^*|` whose
    variance can be ten times that of :math:`n\beta L_n` along the chain, and which hides the slow
    part of the chain's autocorrelation from the effective-sample-size estimate (measured: standard
    errors 1.5 times too small). Both gradients at :math:`w^*` come from the same backward pass."""
    params = objective.params
    evaluated = objective.gradients(batch, anchored=control is not None)
    if control is None:
        return evaluated.grads, evaluated.losses
    own, anchor = evaluated.grads, evaluated.anchor_grads
    chains = objective.num_chains
    with torch.no_grad():
        taylor = _chain_dot([p - a for p, a in zip(params, objective.anchor_stack)],
                            [ga - g for ga, g in zip(anchor, control.full_gradient)], chains)
    control_variate_gradient_(own, anchor, control.full_gradient)
    return own, evaluated.losses - evaluated.anchor_losses - taylor + control.init_loss


def virial(objective: ChainObjective, grads: list[Tensor], nbeta: float, localization: float) -> Tensor:
    r"""The virial :math:`(w - w^*)\cdot\nabla\hat U(w)` of each chain (``[C]``, float64), with
    :math:`\nabla\hat U = n\beta\hat g + \gamma(w - w^*)` the gradient the chain follows.

    By equipartition (integration by parts against :math:`\pi \propto e^{-U}`:
    :math:`E_\pi[(w - w^*)\cdot\nabla U] = E_\pi[\nabla\cdot(w - w^*)]`), at equilibrium the virial's
    mean is :math:`d`, the number of sampled coordinates, for *any* potential; the gradient's
    minibatch noise, drawn after :math:`w`, adds nothing to the mean.
    Each direction contributes 1, stiff or flat, and a direction whose variance has not grown from
    its start at :math:`w^*` contributes less: a deficit counts the directions that have not
    relaxed, which the loss trace alone does not show when they are slow and carry little of its
    variance (see :func:`expected_virial` for SGLD's own offset)."""
    chains = objective.num_chains
    with torch.no_grad():  # (w - w*)·(g + (gamma / n beta)(w - w*))
        offsets = [p - a for p, a in zip(objective.params, objective.anchor_stack)]
        total = _chain_dot(offsets, grads, chains)
        if localization:
            total = total + localization / nbeta * _chain_dot(offsets, offsets, chains)
    return nbeta * total.double()


def expected_virial(step: ChainStep, scales: Scales, num_sampled: int, localization: float) -> float:
    r"""The virial's mean at the chain's own equilibrium. SGLD with step :math:`\epsilon`: along a
    direction of precision :math:`a` with gradient noise :math:`B` the stationary variance is
    :math:`(1 + \epsilon B/4)/(a(1 - \epsilon a/4))`, so each direction gives
    :math:`1 + \epsilon(a + B)/4` to first order, and all of them

    .. math:: d + \frac{\epsilon}{4}\big(n\beta\,\mathrm{tr}\,\nabla^2 L + \gamma d + \textstyle\sum_j B_j\big).

    The terms of higher order add up to at most :math:`x/(1 - x)`, :math:`x = \epsilon a_{max}/4`
    (1/7 at the step's cap), times the first-order offset on a quadratic, and more where the loss
    is not one: a deficit of that size can hide behind them, and a virial above this value says
    the chains are hotter than the first-order law, not that they are unrelaxed. BAOAB: each
    direction gives 1 plus the noise's heat, :math:`d + \frac{h^2(1 + f)}{4(1 - f)}\sum_j B_j` to
    first order in :math:`h^2 a`."""
    if step.baoab:
        return num_sampled + _baoab_heat(step, 0.0) * scales.noise_trace
    lr = step.size
    return num_sampled + lr / 4 * (scales.hessian_trace + localization * num_sampled + scales.noise_trace)


def _baoab_heat(step: ChainStep, curvature: float) -> float:
    """BAOAB's heat per unit of gradient noise variance along a direction of precision
    ``curvature``: :math:`h^2(1 + f)/((1 - f)(4 - h^2 a))` (``inf`` where unstable; see
    :func:`~pyro_sgmcmc.functional.sghmc.baoab_heat`)."""
    return baoab_heat(step.size, step.friction, curvature, 1.0)


def _chain_dot(a: list[Tensor], b: list[Tensor], chains: int) -> Tensor:
    """Each chain's dot product of ``a`` and ``b`` (leaves ``[C, *shape]``), summed over the leaves
    (``[C]``). Large leaves by one ``torch.dot`` a chain, which reads each pair once (a product and
    a sum write the product and read it again: 2.6 times as long for the benchmark MLP's 8 chains,
    out of cache); small ones by that product and sum (one call for all chains)."""
    total = None
    for x, y in zip(a, b):
        x, y = x.reshape(chains, -1), y.reshape(chains, -1)
        if x.shape[1] >= _DOT_SIZE:
            piece = torch.stack([torch.dot(x[c], y[c]) for c in range(chains)])
        else:
            piece = (x * y).sum(1)
        total = piece if total is None else total + piece
    return total


#: Entries a chain from which :func:`_chain_dot` calls one ``torch.dot`` a chain (below it the
#: calls' overhead, some microseconds each, outweighs the pass they save).
_DOT_SIZE = 1 << 16


def measure(objective: ChainObjective, nbeta: float, localization: float, control: ControlVariates | None, *,
            probes: int = 8, power_iterations: int = 8, noise_draws: int = 8) -> Scales:
    """The :class:`Scales` at the chains' current points (see the module docstring)."""
    chains, params = objective.num_chains, objective.params
    masks = objective.stacked_masks()
    masked = lambda vs: [v if m is None else v * m for v, m in zip(vs, masks)]  # noqa: E731
    with torch.enable_grad():
        losses, _ = objective.evaluate(objective.draw(), anchored=False)
        first = torch.autograd.grad(losses.sum(), params, create_graph=True, allow_unused=True)
    live = [i for i, g in enumerate(first) if g is not None and g.requires_grad]

    def hvp(v: list[Tensor]) -> list[Tensor]:
        out = [torch.zeros_like(p) for p in params]
        if live:
            pieces = torch.autograd.grad([first[i] for i in live], params, grad_outputs=[v[i] for i in live],
                                         retain_graph=True, allow_unused=True)
            out = [o if g is None else g for o, g in zip(out, pieces)]
        return masked([nbeta * h for h in out])

    v = masked([torch.randn_like(p) for p in params])
    largest = torch.zeros(chains, dtype=torch.float64, device=params[0].device)
    for _ in range(power_iterations):
        norm = _chain_dot(v, v, chains).sqrt().clamp(min=1e-30)
        v = [x / norm.view(-1, *[1] * (x.dim() - 1)) for x in v]
        w = [h + localization * x for h, x in zip(hvp(v), v)]
        largest = _chain_dot(w, w, chains).sqrt().double().detach()
        if not bool(torch.isfinite(largest).all()):
            break
        v = w
    trace = torch.zeros(chains, dtype=torch.float64, device=params[0].device)
    for _ in range(probes):
        r = masked([torch.randint(0, 2, p.shape, device=p.device).to(p.dtype) * 2 - 1 for p in params])
        trace += _chain_dot(r, hvp(r), chains).double().detach() / probes
    del first
    noise_trace, noise_max, loss_noise = _noise(objective, control, masked, nbeta, noise_draws)
    return Scales(float(largest.max()), float(trace.mean()), noise_trace, noise_max, loss_noise)


def _noise(objective: ChainObjective, control: ControlVariates | None, masked, nbeta: float,
           draws: int) -> tuple[float, float, float]:
    """Per-coordinate variance of the gradient estimate over fresh minibatches (Welford), summed
    and largest, times :math:`(n\beta)^2`; and the standard deviation of :math:`n\beta` times the
    loss estimate."""
    if objective.exact or draws < 2:
        return 0.0, 0.0, 0.0
    mean = m2 = None
    losses = []
    for k in range(1, draws + 1):
        grads, values = gradient_estimate(objective, objective.draw(), control)
        losses.append(values.double())
        grads = [g.detach().double() for g in masked(grads)]
        if mean is None:
            mean, m2 = grads, [torch.zeros_like(g) for g in grads]
            continue
        for mu, s, g in zip(mean, m2, grads):
            delta = g - mu
            mu += delta / k
            s += delta * (g - mu)
    chains = objective.num_chains
    variances = [s * (nbeta**2 / (draws - 1)) for s in m2]
    total = sum(v.reshape(chains, -1).sum(1) for v in variances)
    largest = max(float(v.max()) for v in variances)
    return float(total.mean()), largest, nbeta * float(torch.stack(losses).std(0).mean())


def step_bias(step: ChainStep, scales: Scales, llc: float | None) -> float:
    """The relative bias of :math:`\\hat\\lambda` from a step (the bounds of the module docstring;
    with ``llc`` unknown or not positive, the largest curvature and noise stand in for the averaged
    ones). ``inf`` where the step is unstable."""
    curvature, noise = _averaged(scales, llc)
    if step.baoab:
        return _baoab_heat(step, scales.curvature) * noise
    lr = step.size
    denominator = 1.0 - lr * scales.curvature / 4
    if denominator <= 0:
        return math.inf
    return lr * (curvature + noise) / (4 * denominator)


def choose_step(scales: Scales, llc: float | None, target_bias: float, *, baoab: bool = False,
                localization: float = 0.0, largest: float = math.inf) -> ChainStep:
    """The step whose :func:`step_bias` is ``target_bias``, at most ``largest``. SGLD: through
    ``SGLD.suggest_lr``, capped at :math:`\\epsilon a_{max} \\le 1/2`. BAOAB: :math:`h^2` that SGLD step
    (or less, so that the noise's bias fits with :math:`f \\ge 1/2`), and the friction the module
    docstring says."""
    curvature, noise = _averaged(scales, llc)
    lr = SGLD.suggest_lr(curvature + target_bias * scales.curvature, noise, target_bias)
    lr = min(lr, SGLD.suggest_lr(scales.curvature, 0.0, _STABLE_FRACTION / 4))
    if not baoab:
        return ChainStep(min(lr, largest))
    a_max = max(scales.curvature, 1e-30)
    # at f = 1/2, (1 + f)/(1 - f) = 3: h^2 * 3 * noise <= target * (4 - h^2 a_max)
    h = min(math.sqrt(min(lr, 4 * target_bias / (3 * noise + target_bias * a_max))), largest)
    friction = max(_BAOAB_FRICTION / h, 2 * math.sqrt(localization))
    if noise > 0:  # (1 + f)/(1 - f) <= ratio  <=>  f <= (ratio - 1)/(ratio + 1)
        ratio = target_bias * (4 - h * h * a_max) / (h * h * noise)
        friction = max(friction, -math.log((ratio - 1) / (ratio + 1)) / h)
    return ChainStep(h, friction)


def sampler_step(sampler: str, scales: Scales, llc: float | None, target_bias: float, *, localization: float = 0.0,
                 friction: float | None = None, largest: float = math.inf) -> ChainStep:
    """The step the chains run for ``sampler`` (one of :data:`SAMPLERS`) from ``scales``:
    :func:`choose_step`'s SGLD or BAOAB step (BAOAB's at ``friction`` if given), and under
    ``"auto"`` BAOAB's where :func:`prefer_baoab` picks it over SGLD's, SGLD's otherwise."""
    assert sampler in SAMPLERS, sampler  # validated by the callers' check_choice
    sgld = None
    if sampler != "baoab":
        sgld = choose_step(scales, llc, target_bias, largest=largest)
        if sampler == "sgld":
            return sgld
    baoab = choose_step(scales, llc, target_bias, baoab=True, localization=localization, largest=largest)
    if friction is not None:
        baoab = ChainStep(baoab.size, friction)
    if sampler == "auto" and not prefer_baoab(sgld, baoab, scales, llc, localization):
        return sgld
    return baoab


def control_pays(controlled: Scales, plain: Scales, llc: float | None, target_bias: float, *,
                 sampler: str = "sgld", localization: float = 0.0, friction: float | None = None) -> bool:
    """Whether control variates pay for their work (``_CONTROL_COST`` plain steps a step) where
    the chains are: whether, with them, the chains relax the slowest direction that many times
    faster (see :func:`prefer_baoab` for the direction), each with the step and chain that would
    run (``sampler``: ``"sgld"``, ``"baoab"`` at ``friction`` if given, or ``"auto"``: BAOAB where
    :func:`prefer_baoab` picks it from those scales), or the loss estimate's variance (white noise
    on the trace, which more draws must average away) is that many times smaller. For SGLD the
    first is the ratio of the steps; BAOAB's step is set by the gradient noise where SGLD's is
    set by the curvature, so less noise can pay through BAOAB only. ``controlled`` and ``plain``:
    the scales measured with and without them at the same points."""
    precision = _slowest_precision(controlled, llc, localization)

    def rate(scales: Scales) -> float:
        return _flat_rate(sampler_step(sampler, scales, llc, target_bias, localization=localization, friction=friction),
                          precision)

    with_them, without = rate(controlled), rate(plain)
    faster = with_them / without if without > 0 else (math.inf if with_them > 0 else 1.0)
    if controlled.loss_noise > 0:
        quieter_loss = (plain.loss_noise / controlled.loss_noise) ** 2
    else:
        quieter_loss = math.inf if plain.loss_noise > 0 else 1.0
    return max(faster, quieter_loss) >= _CONTROL_COST


def flat_variance_missing(step: ChainStep, localization: float, steps: int) -> float:
    """The fraction of its stationary variance that a direction of precision :math:`\\gamma` still
    lacks after ``steps`` from :math:`w^*`: SGLD :math:`e^{-\\epsilon\\gamma t}`, BAOAB at most
    :math:`(1 + rt)^2 e^{-2rt}` (see :func:`relaxation_steps`)."""
    if not step.baoab:
        return math.exp(-step.size * localization * steps)
    rate = _flat_rate(step, localization)
    return (1 + rate * steps) ** 2 * math.exp(-2 * rate * steps)


def relaxation_steps(step: ChainStep, localization: float) -> int:
    r"""The steps after which even the flattest direction the localization allows (precision
    :math:`\gamma`) is within about 5% of its stationary variance, from a start at :math:`w^*`.
    SGLD: its variance approaches as :math:`e^{-\epsilon\gamma t}`, so
    :math:`\lceil 3/(\epsilon\gamma)\rceil`. BAOAB: its amplitude decays at the slow rate
    :math:`r = h(C - \sqrt{C^2 - 4\gamma})/2` a step (:math:`hC/2` underdamped), so
    :math:`\lceil 3/r \rceil` (at critical damping the variance then lacks :math:`(1 + 3)^2 e^{-6}`, 4%)."""
    if not step.baoab:
        return math.ceil(3.0 / (step.size * localization))
    return math.ceil(3.0 / _flat_rate(step, localization))


def _flat_rate(step: ChainStep, precision: float) -> float:
    """The slow amplitude rate a step along a direction of ``precision``: SGLD's
    :math:`\\epsilon a/2`, BAOAB's :math:`h(C - \\sqrt{C^2 - 4a})/2` (:math:`hC/2` underdamped)."""
    if not step.baoab:
        return step.size * precision / 2
    c = step.friction
    if c * c <= 4 * precision:
        return step.size * c / 2
    return step.size * 2 * precision / (c + math.sqrt(c * c - 4 * precision))  # h(C - root)/2, without cancellation


def prefer_baoab(sgld: ChainStep, baoab: ChainStep, scales: Scales, llc: float | None, localization: float) -> bool:
    """Whether BAOAB's step relaxes the slowest direction at least twice as fast as SGLD's, both
    chosen for the same bias from the same scales: the direction of precision :math:`\\gamma`
    (without localization, a direction of the averaged curvature the estimate counts). Where the
    gradient noise dominates, BAOAB's friction must be high to keep its heat down, and it is then
    SGLD (overdamped Langevin) at the same rate: SGLD is kept; with exact gradients near a
    quadratic minimum the momentum wins by the square root of the condition number."""
    precision = _slowest_precision(scales, llc, localization)
    return _flat_rate(baoab, precision) >= 2 * _flat_rate(sgld, precision)


def _slowest_precision(scales: Scales, llc: float | None, localization: float) -> float:
    r"""The precision of the slowest direction the estimate counts: :math:`\gamma`, or without
    localization the averaged curvature."""
    return localization if localization > 0 else max(_averaged(scales, llc)[0], 1e-30)


def _averaged(scales: Scales, llc: float | None) -> tuple[float, float]:
    if llc is None or not llc > 0:
        return scales.curvature, scales.noise_max
    return max(scales.hessian_trace, 0.0) / (2 * llc), scales.noise_trace / (2 * llc)
