"""pyro_sgmcmc: stochastic-gradient MCMC samplers for PyTorch and Pyro.

Layers, one way down:

* :mod:`pyro_sgmcmc.functional` -- the update math (pure torch, multi-tensor fast path);
* :mod:`pyro_sgmcmc.samplers` -- the samplers as ``torch.optim.Optimizer`` classes (``SGLD``,
  ``SGNHT``, ``SGHMC``, ``PSGLD``), for a plain PyTorch loop; no Pyro import;
* :mod:`pyro_sgmcmc.optim` -- the same samplers as Pyro optimizers, for ``SVI``;
* :mod:`pyro_sgmcmc.infer` -- kernels for ``pyro.infer.MCMC`` on minibatches, the SVI autoguide and
  sample collection;
* :mod:`pyro_sgmcmc.slt` -- the local learning coefficient, WBIC and marginal-likelihood
  hyperparameters, from the chains (above the kernels: it uses them).
"""

__version__ = "0.2.0.dev0"
