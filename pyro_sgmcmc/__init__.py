"""pyro_sgmcmc: stochastic-gradient MCMC samplers for PyTorch and Pyro.

Layers, one way down:

* :mod:`pyro_sgmcmc.functional` -- the update math (pure torch, multi-tensor fast path);
* :mod:`pyro_sgmcmc.optim` -- ``torch.optim.Optimizer`` samplers (``optim.sgld.SGLD``,
  ``optim.sgnht.SGNHT``) usable in a plain PyTorch loop;
* :mod:`pyro_sgmcmc.slt` -- the local learning coefficient, WBIC and marginal-likelihood
  hyperparameters, from the chains.
"""

__version__ = "0.1.0"
