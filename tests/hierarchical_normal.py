r"""The conjugate hierarchical normal model of :func:`mcmc_models.hierarchical_normal`: its exact
posterior, and the exact stationary law of the blocked random-scan SGLD chain that the kernels run
on it (:mod:`pyro_sgmcmc.infer.local`) at given step sizes.

With :math:`x = (\mu, \theta_1, \dots, \theta_N)` the posterior is Gaussian with precision
:math:`P` (``P[0, 0] = 1/s^2 + N/\tau^2``, ``P[i, i] = 1/\tau^2 + n/\sigma^2``,
``P[0, i] = -1/\tau^2``) and ``P mean = c`` (``c_i = \sum_j y_{ji}/\sigma^2``).

One step of the chain on the minibatch :math:`S` (drawn independently of the state) is
:math:`x' = A_S x + b_S + D_S^{1/2}\xi` with :math:`D_S` the diagonal of step sizes
(:math:`\epsilon` for :math:`\mu`, :math:`\epsilon_l` for :math:`\theta_i, i \in S`, 0 else),
:math:`A_S = I - \frac12 D_S H_S`, :math:`b_S = \frac12 D_S c`, and :math:`H_S` the rows of
:math:`P` with :math:`\mu`'s replaced by its ``N/m``-scaled minibatch estimate. Its stationary
mean solves :math:`m = E[A_S] m + E[b_S]` (the posterior mean: each block's drift is unbiased),
and its second moment :math:`M = E[A_S M A_S^T + A_S m b_S^T + b_S m^T A_S^T + b_S b_S^T + D_S]`,
a linear system in :math:`M` solved exactly over all minibatches.
"""

from __future__ import annotations

import itertools

import torch


def posterior(y, sigma=1.0, tau=1.0, prior=3.0):
    """``(precision, c)`` of the exact Gaussian posterior of ``(mu, theta_1..N)`` (float64)."""
    n, groups = y.shape
    d = groups + 1
    precision = torch.zeros(d, d, dtype=torch.float64)
    precision[0, 0] = 1 / prior**2 + groups / tau**2
    for i in range(1, d):
        precision[i, i] = 1 / tau**2 + n / sigma**2
        precision[0, i] = precision[i, 0] = -1 / tau**2
    c = torch.zeros(d, dtype=torch.float64)
    c[1:] = y.double().sum(0) / sigma**2
    return precision, c


def exact_moments(y, **model):
    """The posterior mean and covariance of ``(mu, theta_1..N)``."""
    precision, c = posterior(y, **model)
    cov = torch.linalg.inv(precision)
    return cov @ c, cov


def blocked_sgld_moments(y, batch, step, local_step, local_scale=None, local_noise=1.0, exact_globals=False,
                         **model):
    """The stationary mean and covariance of the blocked random-scan SGLD chain (module docstring)
    with global step ``step`` and local step ``local_step``; ``local_scale`` multiplies the rows'
    gradient (1 is the right scheme; ``N/m`` the wrong one that keeps the plate's scaling);
    ``local_noise`` multiplies the variance of the rows' noise (``1 - local_step c / 4`` for steps
    exact on a Gaussian of curvature ``c``); ``exact_globals``: mu's gradient is the full-data one at
    the table (what local control variates give on this model, where it is linear)."""
    precision, c = posterior(y, **model)
    groups = y.shape[1]
    d = groups + 1
    scale = groups / batch
    local_scale = 1.0 if local_scale is None else local_scale
    eye = torch.eye(d, dtype=torch.float64)
    subsets = list(itertools.combinations(range(1, d), batch))
    mats, shifts, diagonals = [], [], []
    for subset in subsets:
        h = torch.zeros(d, d, dtype=torch.float64)
        h[0, 0] = precision[0, 0]
        if exact_globals:
            h[0] = precision[0]
        for i in subset:
            if not exact_globals:
                h[0, i] = scale * precision[0, i]
            h[i] = local_scale * precision[i]
        steps = torch.zeros(d, dtype=torch.float64)
        steps[0] = step
        steps[list(subset)] = local_step
        rhs = c.clone()
        rhs[1:] = rhs[1:] * local_scale
        mats.append(eye - 0.5 * steps[:, None] * h)
        shifts.append(0.5 * steps * rhs)
        noise = steps.clone()
        noise[list(subset)] = local_step * local_noise
        diagonals.append(torch.diag(noise))
    return linear_chain_moments(mats, shifts, diagonals)


def linear_chain_moments(mats, shifts, diagonals):
    """The stationary mean and covariance of the chain :math:`x' = A_S x + b_S + D_S^{1/2}\\xi`
    whose minibatch :math:`S` is drawn uniformly from ``len(mats)`` equally likely ones, each
    given by ``mats[k]`` (:math:`A_S`), ``shifts[k]`` (:math:`b_S`) and ``diagonals[k]``
    (:math:`D_S`, the noise's covariance): the linear systems of the module docstring."""
    d = mats[0].shape[0]
    eye = torch.eye(d, dtype=torch.float64)
    a_mean = torch.stack(mats).mean(0)
    b_mean = torch.stack(shifts).mean(0)
    mean = torch.linalg.solve(eye - a_mean, b_mean)
    kron = torch.stack([torch.kron(a, a) for a in mats]).mean(0)
    rest = sum(a @ mean[:, None] @ b[None] + b[:, None] @ mean[None] @ a.T + torch.outer(b, b) + dg
               for a, b, dg in zip(mats, shifts, diagonals)) / len(mats)
    second = torch.linalg.solve(torch.eye(d * d, dtype=torch.float64) - kron, rest.reshape(-1)).reshape(d, d)
    return mean, second - torch.outer(mean, mean)


def crossed_potential(r, users, items, prior=3.0):
    r"""``(H, c)``: the minibatch potential :math:`\hat U_S(x) = \frac12 x^T H x - c^T x + const` of
    :func:`mcmc_models.crossed_effects` at :math:`x = (\mu, a_1..a_U, b_1..b_I)`, for the users
    ``users`` and items ``items`` of the minibatch (all of them: the full-data potential, whose
    ``H`` is the posterior precision), with Pyro's plate scaling: ``U/m_u`` on the users' terms,
    ``I/m_i`` on the items', their product on the ratings'."""
    num_users, num_items = r.shape
    d = 1 + num_users + num_items
    scale_u, scale_i = num_users / len(users), num_items / len(items)
    h = torch.zeros(d, d, dtype=torch.float64)
    c = torch.zeros(d, dtype=torch.float64)
    h[0, 0] = 1 / prior**2
    for i in users:
        h[1 + i, 1 + i] += scale_u
    for j in items:
        h[1 + num_users + j, 1 + num_users + j] += scale_i
    for i in users:
        for j in items:
            e = torch.zeros(d, dtype=torch.float64)
            e[[0, 1 + i, 1 + num_users + j]] = 1.0
            h += scale_u * scale_i * torch.outer(e, e)
            c += scale_u * scale_i * float(r[i, j]) * e
    return h, c


def crossed_sgld_moments(r, users_batch, items_batch, step, local_step):
    r"""The stationary mean and covariance of the blocked random-scan SGLD chain on
    :func:`mcmc_models.crossed_effects` with both plates subsampled (``users_batch`` of the
    users, ``items_batch`` of the items, drawn independently): one step moves :math:`\mu` with
    :math:`\nabla_\mu \hat U_S` and step ``step``, the minibatch's rows of each local site
    with their plate's scaling undone (:math:`\frac{m_u}{U}\nabla_{a_i}\hat U_S`, which keeps
    the items' ``I/m_i`` on the ratings: an unbiased estimate of the row's conditional gradient)
    and step ``local_step``, the other rows not at all."""
    num_users, num_items = r.shape
    d = 1 + num_users + num_items
    eye = torch.eye(d, dtype=torch.float64)
    mats, shifts, diagonals = [], [], []
    for users in itertools.combinations(range(num_users), users_batch):
        for items in itertools.combinations(range(num_items), items_batch):
            h, c = crossed_potential(r, users, items)
            steps = torch.zeros(d, dtype=torch.float64)
            steps[0] = step
            steps[[1 + i for i in users]] = local_step * users_batch / num_users
            steps[[1 + num_users + j for j in items]] = local_step * items_batch / num_items
            noise = torch.zeros(d, dtype=torch.float64)
            noise[0] = step
            noise[[1 + i for i in users]] = local_step
            noise[[1 + num_users + j for j in items]] = local_step
            mats.append(eye - 0.5 * steps[:, None] * h)
            shifts.append(0.5 * steps * c)
            diagonals.append(torch.diag(noise))
    return linear_chain_moments(mats, shifts, diagonals)
