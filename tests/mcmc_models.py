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
