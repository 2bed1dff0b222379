"""Models for the MCMC kernel tests, in an importable module (parallel chains pickle them)."""

import pyro
import pyro.distributions as dist
import torch

BERNOULLI = torch.cat([torch.ones(40), torch.zeros(20)])  # Beta(1, 1) prior -> Beta(41, 21)


def beta_bernoulli(data, chains, batch=None):
    with pyro.plate("chains", chains):
        p = pyro.sample("p", dist.Beta(1.0, 1.0))
        with pyro.plate("data", len(data), subsample_size=batch, dim=-2) as idx:
            pyro.sample("x", dist.Bernoulli(p), obs=data[idx, None].expand(len(idx), chains))


def linear_regression(x, y, chains, batch=None, noise=1.0, prior=10.0):
    with pyro.plate("chains", chains, dim=-1):
        w = pyro.sample("w", dist.Normal(0.0, prior).expand([chains, x.shape[1]]).to_event(1))  # [chains, d]
        with pyro.plate("data", len(y), subsample_size=batch, dim=-2) as idx:
            mean = x[idx] @ w.T  # [m, chains]
            pyro.sample("y", dist.Normal(mean, noise), obs=y[idx, None].expand(len(idx), chains))


def gaussian_chain(obs, chains, length=3):
    """mu_0 ~ N(0, 1), mu_k ~ N(mu_{k-1}, 1), y ~ N(mu_{length-1}, 1): a Gaussian posterior."""
    with pyro.plate("chains", chains):
        mu = pyro.sample("mu_0", dist.Normal(0.0, 1.0))
        for k in range(1, length):
            mu = pyro.sample(f"mu_{k}", dist.Normal(mu, 1.0))
        pyro.sample("y", dist.Normal(mu, 1.0), obs=obs.expand(chains))


def scalar_normal(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(loc, scale), obs=data)


def logistic_regression(x, y, batch=None):
    w = pyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    with pyro.plate("data", len(y), subsample_size=batch) as idx:
        pyro.sample("y", dist.Bernoulli(logits=x[idx] @ w), obs=y[idx])


def hierarchical_normal(y, chains, batch=None, sigma=1.0, tau=1.0, prior=3.0):
    """mu ~ N(0, prior^2); per group i, theta_i ~ N(mu, tau^2) (local to the subsampled plate
    "groups"), y_ji ~ N(theta_i, sigma^2) for the n rows j of y [n, groups]."""
    n, groups = y.shape
    with pyro.plate("chains", chains, dim=-1):
        mu = pyro.sample("mu", dist.Normal(0.0, prior))
        with pyro.plate("groups", groups, subsample_size=batch, dim=-2) as idx:
            theta = pyro.sample("theta", dist.Normal(mu, tau))  # [m, chains]
            with pyro.plate("obs", n, dim=-3):
                pyro.sample("y", dist.Normal(theta, sigma), obs=y[:, idx, None].expand(n, len(idx), chains))


def crossed_effects(r, chains, users_batch=None, items_batch=None, prior=3.0):
    """Crossed random effects: mu ~ N(0, prior^2); a_i ~ N(0, 1) per user (local to the subsampled
    plate "users"), b_j ~ N(0, 1) per item (local to the subsampled plate "items"), and every
    rating r_ij ~ N(mu + a_i + b_j, 1) of ``r [users, items]``, inside both plates."""
    num_users, num_items = r.shape
    with pyro.plate("chains", chains, dim=-1):
        mu = pyro.sample("mu", dist.Normal(0.0, prior))
        users = pyro.plate("users", num_users, subsample_size=users_batch, dim=-2)
        items = pyro.plate("items", num_items, subsample_size=items_batch, dim=-3)
        with users as iu:
            a = pyro.sample("a", dist.Normal(0.0, 1.0))  # [m_u, chains]
        with items as ii:
            b = pyro.sample("b", dist.Normal(0.0, 1.0))  # [m_i, 1, chains]
        with users, items:
            obs = r[iu][:, ii].T[..., None].expand(len(ii), len(iu), chains)
            pyro.sample("r", dist.Normal(mu + a + b, 1.0), obs=obs)


def hierarchical_logistic_data(groups=20, n=20, seed=0):
    """``(x [groups, n, 2], y [groups, n])`` drawn from :func:`hierarchical_logistic` with
    beta = (1, -0.5), sigma = 0.8."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(groups, n, 2, generator=gen)
    eta = torch.randn(groups, 1, generator=gen)
    y = torch.bernoulli(torch.sigmoid(x @ torch.tensor([1.0, -0.5]) + 0.8 * eta), generator=gen)
    return x, y


def hierarchical_logistic_draws(samples):
    """``[num_samples, 3 + groups]``: beta, sigma, then eta of every group."""
    eta = samples["eta"].reshape(samples["eta"].shape[0], -1)
    return torch.cat([samples["beta"], samples["sigma"].reshape(-1, 1), eta], 1).double()


def hierarchical_logistic(x, y, groups, batch=None):
    """Logistic regression with a random intercept per group, non-centred: beta ~ N(0, 2^2 I),
    sigma ~ HalfNormal(1), eta_g ~ N(0, 1) (local to the subsampled plate of groups), and
    y_gj ~ Bernoulli(logit = x_gj . beta + sigma eta_g). x [groups, n, d], y [groups, n]."""
    beta = pyro.sample("beta", dist.Normal(0.0, 2.0).expand([x.shape[-1]]).to_event(1))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("groups", groups, subsample_size=batch, dim=-2) as idx:
        eta = pyro.sample("eta", dist.Normal(0.0, 1.0))  # [m, 1]
        with pyro.plate("obs", x.shape[1], dim=-1):
            pyro.sample("y", dist.Bernoulli(logits=x[idx] @ beta + sigma * eta), obs=y[idx])


#: The (user, item) pairs whose predicted rating u_i . v_j the PMF tests compare (rotation- and
#: sign-invariant, unlike the factors themselves).
PMF_PAIRS = ((0, 0), (1, 3), (7, 5), (12, 9), (25, 2), (39, 7))


def pmf_data(users=40, items=10, rank=2, noise=0.5, seed=0):
    """``ratings [users, items]`` drawn from :func:`pmf` with factors N(0, I) and noise sd 0.5."""
    gen = torch.Generator().manual_seed(seed)
    u = torch.randn(users, rank, generator=gen)
    v = torch.randn(items, rank, generator=gen)
    return u @ v.T + noise * torch.randn(users, items, generator=gen)


def pmf(ratings, batch=None, rank=2):
    """Probabilistic matrix factorisation: item factors v_j ~ N(0, I) (global), noise sd sigma ~
    HalfNormal(1) (global), user factors u_i ~ N(0, I) (local to the subsampled plate of users),
    r_ij ~ N(u_i . v_j, sigma^2), every rating observed."""
    users, items = ratings.shape
    v = pyro.sample("v", dist.Normal(0.0, 1.0).expand([items, rank]).to_event(2))
    sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
    with pyro.plate("users", users, subsample_size=batch, dim=-1) as idx:
        u = pyro.sample("u", dist.Normal(0.0, 1.0).expand([rank]).to_event(1))  # [m, rank]
        pyro.sample("r", dist.Normal(u @ v.T, sigma).to_event(1), obs=ratings[idx])


def pmf_draws(v, sigma, u):
    """``[num_samples, len(PMF_PAIRS) + 1]``: the predicted ratings u_i . v_j of PMF_PAIRS, then sigma,
    from ``v [samples, items, rank]``, ``sigma [samples]``, ``u [samples, users, rank]``."""
    pairs = [(u[:, i] * v[:, j]).sum(-1) for i, j in PMF_PAIRS]
    return torch.stack([*pairs, sigma.reshape(-1)], 1).double()
