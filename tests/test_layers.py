"""The three layers have distinct import paths, and the torch one loads no Pyro."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch


def test_the_torch_layer_imports_no_pyro():
    code = (
        "import sys, pyro_sgmcmc.samplers as s, pyro_sgmcmc.functional, pyro_sgmcmc.schedules\n"
        "loaded = sorted(m for m in sys.modules if m == 'pyro' or m.startswith('pyro.'))\n"
        "assert not loaded, loaded\n"
        "import torch\n"
        "p = torch.nn.Parameter(torch.zeros(3)); opt = s.SGLD([p], lr=1e-2); p.grad = torch.ones(3); opt.step()\n"
        "assert not any(m == 'pyro' or m.startswith('pyro.') for m in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_each_layer_has_its_own_name():
    import pyro.optim
    import pyro.infer.mcmc.mcmc_kernel

    import pyro_sgmcmc.infer as infer
    import pyro_sgmcmc.optim as optim
    import pyro_sgmcmc.samplers as samplers

    for name, sampler in samplers.SAMPLERS.items():
        assert issubclass(sampler, torch.optim.Optimizer)
        assert issubclass(getattr(optim, name), pyro.optim.PyroOptim)
        assert issubclass(getattr(infer, name), pyro.infer.mcmc.mcmc_kernel.MCMCKernel)
        assert getattr(optim, name).sampler_class is sampler and getattr(infer, name).sampler_class is sampler


@pytest.mark.parametrize("old, new, name", [
    ("pyro_sgmcmc.optim.sgld", "pyro_sgmcmc.samplers", "SGLD"),
    ("pyro_sgmcmc.optim.sgnht", "pyro_sgmcmc.samplers", "SGNHT"),
    ("pyro_sgmcmc.optim.sghmc", "pyro_sgmcmc.samplers", "SGHMC"),
    ("pyro_sgmcmc.optim.psgld", "pyro_sgmcmc.samplers", "PSGLD"),
    ("pyro_sgmcmc.optim.base", "pyro_sgmcmc.samplers", "SGMCMCOptimizer"),
    ("pyro_sgmcmc.optim.control_variates", "pyro_sgmcmc.samplers", "ControlVariate"),
    ("pyro_sgmcmc.optim", "pyro_sgmcmc.samplers", "SAMPLERS"),
])
def test_old_import_paths_still_work_with_a_deprecation_warning(old, new, name):
    import importlib

    module = importlib.import_module(old)
    with pytest.warns(DeprecationWarning, match=f"use {new}"):
        value = getattr(module, name)
    assert value is getattr(importlib.import_module(new), name)


def test_schedulers_take_the_sampler_class_or_its_pyro_optimizer():
    import pyro_sgmcmc.optim as optim
    import pyro_sgmcmc.samplers as samplers

    for given in (samplers.SGLD, optim.SGLD):
        scheduler = optim.ExponentialLR({"optimizer": given, "optim_args": {"lr": 1e-2}, "gamma": 0.5})
        assert scheduler.pt_optim_constructor is samplers.SGLD
