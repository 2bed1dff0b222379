"""The Pyro optimizer wrapper: Pyro's optimizer test patterns, with our samplers."""

from __future__ import annotations

import copy

import pyro
import pyro.distributions as dist
import pyro.optim
import pytest
import torch
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.nn import PyroModule, PyroSample
from pyro.optim.multi import MixedMultiOptimizer, PyroMultiOptimizer

import pyro_sgmcmc.optim as optim
from pyro_sgmcmc.infer import AutoUnconstrainedDelta, SampleCollector, run_svi
from pyro_sgmcmc.optim.pyro_optim import SGMCMCPyroOptim
from pyro_sgmcmc.samplers import SGLD as TorchSGLD


def model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(loc, scale), obs=data)


DATA = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0, 1.2])


def make_svi(optimizer, seed=0):
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = AutoUnconstrainedDelta(model)
    return SVI(model, guide, optimizer, Trace_ELBO()), guide


def params():
    return {name: value.detach().clone() for name, value in pyro.get_param_store().named_parameters()}


@pytest.mark.parametrize("name", list(optim.PYRO_OPTIMIZERS))
def test_named_like_pyro_wrappers_and_accepted_by_svi(name):
    from pyro_sgmcmc.samplers import SAMPLERS

    wrapper = getattr(optim, name)
    assert wrapper.__name__ == name and f"pyro_sgmcmc.samplers.{name}" in wrapper.__doc__
    assert wrapper.sampler_class is SAMPLERS[name]
    opt = wrapper({"lr": 1e-3})
    assert isinstance(opt, pyro.optim.PyroOptim) and isinstance(opt, pyro.optim.multi.MultiOptimizer)
    svi, _ = make_svi(opt)
    for _ in range(3):
        svi.step(DATA)
    # one sampler, one group, parameters in param-store name order
    assert len(opt.sampler.param_groups) == 1
    names = opt.sampler.param_groups[0]["param_names"]
    assert names == sorted(names) == ["AutoUnconstrainedDelta.locs.loc", "AutoUnconstrainedDelta.locs.scale"]


@pytest.mark.parametrize("fused", [False, None])
@pytest.mark.parametrize("name", list(optim.PYRO_OPTIMIZERS))
def test_fused_false_or_none_runs_every_optimizer_as_without_it(name, fused):
    """fused=False and fused=None are every sampler's default step: accepted by each Pyro
    optimizer (only SGLD's sampler has the keyword) and the chain that of no keyword at all."""
    chains = []
    for options in ({}, {"fused": fused}):
        opt = getattr(optim, name)({"lr": 1e-3}, **options)
        svi, _ = make_svi(opt)
        for _ in range(3):
            svi.step(DATA)
        chains.append(params())
    assert chains[0].keys() == chains[1].keys()
    assert all(torch.equal(chains[0][key], chains[1][key]) for key in chains[0])


@pytest.mark.parametrize("name", list(optim.PYRO_OPTIMIZERS))
def test_save_load_continues_identically(name, tmp_path):
    opt = getattr(optim, name)({"lr": 1e-3, "localization": 0.1})
    svi, _ = make_svi(opt)
    for _ in range(5):
        svi.step(DATA)
    path = tmp_path / "optim.pt"
    opt.save(str(path))
    store_state = copy.deepcopy(pyro.get_param_store().get_state())  # get_state holds live tensors
    rng = torch.get_rng_state()
    for _ in range(5):
        svi.step(DATA)
    uninterrupted = params()

    opt2 = getattr(optim, name)({"lr": 1e-3, "localization": 0.1})
    svi2, _ = make_svi(opt2, seed=123)
    pyro.get_param_store().set_state(store_state)
    opt2.load(str(path))
    torch.set_rng_state(rng)
    for _ in range(5):
        svi2.step(DATA)
    resumed = params()
    for key in uninterrupted:
        assert torch.equal(uninterrupted[key], resumed[key]), key


def test_two_runs_with_the_same_seed_are_identical():
    out = []
    for _ in range(2):
        svi, _ = make_svi(optim.SGLD({"lr": 1e-3}))
        for _ in range(10):
            svi.step(DATA)
        out.append(params())
    assert all(torch.equal(out[0][k], out[1][k]) for k in out[0])


def test_per_param_callable_args_and_lr_zero_freezes():
    def per_param(param_name):
        return {"lr": 0.0} if param_name.endswith("scale") else {"lr": 1e-2, "temperature": 2.0}

    opt = optim.SGLD(per_param)
    svi, _ = make_svi(opt)
    svi.step(DATA)  # the first step creates the parameters at their initial values
    before = params()
    for _ in range(5):
        svi.step(DATA)
    after = params()
    assert torch.equal(after["AutoUnconstrainedDelta.locs.scale"], before["AutoUnconstrainedDelta.locs.scale"])
    assert not torch.equal(after["AutoUnconstrainedDelta.locs.loc"], before["AutoUnconstrainedDelta.locs.loc"])
    temps = {g["param_names"][0]: g["temperature"] for g in opt.sampler.param_groups}
    assert temps["AutoUnconstrainedDelta.locs.loc"] == 2.0

    # Pyro's two-argument form (module name, param name) works too
    seen = []
    two_args = optim.SGLD(lambda module_name, param_name: seen.append((module_name, param_name)) or {"lr": 1e-3})
    svi, _ = make_svi(two_args)
    svi.step(DATA)
    assert ("AutoUnconstrainedDelta", "locs.loc") in seen or any("loc" in p for _, p in seen)


def test_clip_args_clip_the_gradient():
    clipped = optim.SGLD({"lr": 1e-2, "noise_level": 0.0}, {"clip_value": 1e-3})
    svi, _ = make_svi(clipped)
    with pytest.warns(UserWarning, match="noise_level"):
        svi.step(DATA)  # creates the parameters (and the sampler)
    before = params()
    svi.step(DATA)
    after = params()
    for key in before:  # each entry moved by at most lr / 2 * clip_value
        assert float((after[key] - before[key]).abs().max()) <= 1e-2 / 2 * 1e-3 * (1 + 1e-5)


def test_params_created_later_join_and_resume():
    def growing(data, extra):
        loc = pyro.sample("loc", dist.Normal(0.0, 1.0))
        if extra:
            loc = loc + pyro.sample("b", dist.Normal(0.0, 1.0))
        with pyro.plate("data", len(data)):
            pyro.sample("x", dist.Normal(loc, 1.0), obs=data)

    def guide(data, extra):  # real-valued sites: a Delta needs no Jacobian
        pyro.sample("loc", dist.Delta(pyro.param("loc_u", torch.tensor(0.0))))
        if extra:
            pyro.sample("b", dist.Delta(pyro.param("b_u", torch.tensor(0.0))))

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    opt = optim.SGNHT({"lr": 1e-2})
    svi = SVI(growing, guide, opt, Trace_ELBO())
    svi.step(DATA, False)
    for _ in range(3):
        svi.step(DATA, True)
    assert [g["param_names"] for g in opt.sampler.param_groups] == [["loc_u"], ["b_u"]]  # "b_u" joined later
    state = copy.deepcopy(opt.get_state())
    store = copy.deepcopy(pyro.get_param_store().get_state())
    rng = torch.get_rng_state()
    svi.step(DATA, True)
    uninterrupted = params()

    fresh = optim.SGNHT({"lr": 1e-2})
    fresh.set_state(state)
    pyro.get_param_store().set_state(store)
    torch.set_rng_state(rng)
    # a fresh optimizer, seeing both parameters at once, rebuilds the saved layout and continues
    SVI(growing, guide, fresh, Trace_ELBO()).step(DATA, True)
    assert [g["param_names"] for g in fresh.sampler.param_groups] == [["loc_u"], ["b_u"]]
    resumed = params()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_pyro_lr_scheduler_drives_our_sampler():
    scheduler = pyro.optim.ExponentialLR({"optimizer": TorchSGLD, "optim_args": {"lr": 1e-2}, "gamma": 0.5})
    svi, _ = make_svi(scheduler)
    svi.step(DATA)
    scheduler.step()
    scheduler.step()
    lrs = {opt.optimizer.param_groups[0]["lr"] for opt in scheduler.optim_objs.values()}
    assert lrs == {2.5e-3}


def test_mixed_multi_optimizer_sgld_on_some_sites_adam_on_others():
    svi, guide = make_svi(optim.SGLD({"lr": 1e-3}))
    svi.step(DATA)  # creates the parameters
    names = sorted(pyro.get_param_store().keys())
    sgld_part = optim.SGLD({"lr": 1e-3})
    mixed = MixedMultiOptimizer([(names[:1], sgld_part), (names[1:], pyro.optim.Adam({"lr": 1e-2}))])
    elbo = Trace_ELBO()
    before = params()
    for _ in range(3):
        with pyro.poutine.trace(param_only=True) as tr:
            loss = elbo.differentiable_loss(model, guide, DATA)
        values = {name: site["value"].unconstrained() for name, site in tr.trace.nodes.items()}
        mixed.step(loss, values)
    after = params()
    assert all(not torch.equal(before[n], after[n]) for n in names)
    assert sgld_part.sampler.param_groups[0]["param_names"] == names[:1]


def test_get_step_is_differentiable_and_matches_the_sgld_formula():
    theta = torch.tensor([1.0, -2.0], requires_grad=True)
    precision = torch.tensor([3.0, 5.0])
    loss = 0.5 * (precision * theta**2).sum()
    opt = optim.SGLD({"lr": 0.1}, generator=torch.Generator().manual_seed(0))
    new = opt.get_step(loss, {"theta": theta})["theta"]
    assert new.requires_grad
    # d new / d theta = 1 - lr / 2 * precision (the noise is a reparameterised constant)
    jac = torch.autograd.grad(new.sum(), theta)[0]
    assert torch.allclose(jac, 1 - 0.1 / 2 * precision)
    assert torch.equal(theta.detach(), torch.tensor([1.0, -2.0]))  # the input is not changed


@pytest.mark.parametrize("name", list(optim.PYRO_OPTIMIZERS))
def test_get_step_is_differentiable_for_every_sampler_and_several_parameters(name):
    """Several parameters of different shapes, a temperature and weight decay: d new / d theta
    is the deterministic part of the update's derivative (1 - lr / 2 (1 / T + lambda) for SGLD
    with a unit-curvature loss)."""
    a = torch.tensor([1.0, -2.0], requires_grad=True)
    b = torch.ones(2, 3, requires_grad=True)
    loss = 0.5 * ((a**2).sum() + (b**2).sum())
    opt = getattr(optim, name)({"lr": 0.1, "weight_decay": 0.1, "temperature": 2.0})
    new = opt.get_step(loss, {"a": a, "b": b})
    grads = torch.autograd.grad(new["a"].sum() + new["b"].sum(), [a, b])
    assert all(bool(torch.isfinite(g).all()) and bool((g != 0).all()) for g in grads)
    if name == "SGLD":
        assert torch.allclose(grads[1], torch.full((2, 3), 1 - 0.1 / 2 * (1 / 2.0 + 0.1)))


def test_multi_optimizer_step_updates_in_place():
    theta = torch.zeros(3, requires_grad=True)
    opt = optim.SGNHT({"lr": 0.1})
    loss = (theta - 1).pow(2).sum()
    opt.step(loss, {"theta": theta})
    assert not torch.equal(theta.detach(), torch.zeros(3))


def test_pyro_multi_optimizer_facade_works_too():
    theta = torch.zeros(3, requires_grad=True)
    pyro.clear_param_store()
    theta = pyro.param("theta", torch.zeros(3))
    facade = PyroMultiOptimizer(optim.SGLD({"lr": 0.1}))
    facade.step((theta - 1).pow(2).sum(), {"theta": theta})
    assert not torch.equal(theta.detach(), torch.zeros(3))


def test_bad_arguments_are_rejected_clearly():
    with pytest.raises(TypeError, match="Invalid sampler_constructor"):
        SGMCMCPyroOptim(torch.optim.SGD, {"lr": 1.0})
    with pytest.raises(TypeError, match="Invalid optim_args"):
        optim.SGLD([1e-3])
    with pytest.raises(ValueError, match="Invalid lr: -1.0"):
        svi, _ = make_svi(optim.SGLD({"lr": -1.0}))
        svi.step(DATA)
    with pytest.raises(ValueError, match="Invalid state"):
        optim.SGLD({"lr": 1e-3}).set_state({"AutoDelta.loc": {}})


@pytest.mark.parametrize("key, value", [("distributed", "replicated"), ("process_group", None),
                                        ("noise_ahead", True), ("fused", True), ("generator", None)])
def test_optimizer_wide_options_are_not_group_options(key, value):
    """Options of the whole sampler given in optim_args are refused, naming the keyword to use
    (they used to become a group's key, and the sampler ran without them)."""
    with pytest.raises(ValueError, match=f"Invalid option '{key}' .*{key}=\\.\\.\\."):
        optim.SGLD({"lr": 1e-3, key: value})
    with pytest.raises(ValueError, match=f"Invalid option '{key}'"):
        svi, _ = make_svi(optim.SGLD(lambda name: {"lr": 1e-3, key: value}))
        svi.step(DATA)


def test_optimizer_wide_options_reach_the_sampler():
    opt = optim.SGLD({"lr": 1e-3}, noise_ahead=True, distributed="independent")
    svi, _ = make_svi(opt)
    svi.step(DATA)
    assert opt.sampler.noise_ahead is True and opt.sampler.distributed == "independent"
    assert all(set(group) >= {"lr"} and "noise_ahead" not in group and "distributed" not in group
               for group in opt.sampler.param_groups)
    with pytest.raises(ValueError, match="Invalid noise_ahead: True, but SGHMC"):
        optim.SGHMC({"lr": 1e-3}, noise_ahead=True)
    with pytest.raises(ValueError, match="Invalid fused: True, but SGNHT has no fused step"):
        optim.SGNHT({"lr": 1e-3}, fused=True)
    opt = optim.SGLD({"lr": 1e-3}, fused=True)  # refused by the sampler, made at the first step, off CUDA
    with pytest.raises(ValueError, match=r"Invalid fused: True \(in param_groups\[0\]"):
        make_svi(opt)[0].step(DATA)
    with pytest.raises(ValueError, match="Invalid distributed: 'sharded'"):
        optim.SGLD({"lr": 1e-3}, distributed="sharded")


def test_bayesian_nn_with_pyro_sample_priors():
    class BNN(PyroModule):
        def __init__(self):
            super().__init__()
            self.layer = PyroModule[torch.nn.Linear](2, 8)
            self.layer.weight = PyroSample(dist.Normal(0.0, 1.0).expand([8, 2]).to_event(2))
            self.layer.bias = PyroSample(dist.Normal(0.0, 1.0).expand([8]).to_event(1))
            self.out = PyroModule[torch.nn.Linear](8, 1)
            self.out.weight = PyroSample(dist.Normal(0.0, 1.0).expand([1, 8]).to_event(2))
            self.out.bias = PyroSample(dist.Normal(0.0, 1.0).expand([1]).to_event(1))

        def forward(self, x, y=None):
            mean = self.out(torch.tanh(self.layer(x))).squeeze(-1)
            sigma = pyro.sample("sigma", dist.HalfNormal(1.0))
            with pyro.plate("data", x.shape[0]):
                pyro.sample("y", dist.Normal(mean, sigma), obs=y)
            return mean

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    x = torch.randn(50, 2)
    y = x[:, 0] - x[:, 1] ** 2
    bnn = BNN()
    guide = AutoUnconstrainedDelta(bnn)
    svi = SVI(bnn, guide, optim.SGLD({"lr": 1e-4}), Trace_ELBO())
    collector = run_svi(svi, 60, SampleCollector(burn_in=20, thin=2), x, y, progress_bar=False)
    samples = collector.samples
    assert samples["layer.weight"].shape == (20, 8, 2) and bool((samples["sigma"] > 0).all())
    predictive = Predictive(bnn, posterior_samples=samples, return_sites=["y"])
    assert predictive(x)["y"].shape == (20, 50)


def test_our_scheduler_wrapper_drives_one_sampler_and_resumes(tmp_path):
    def make():
        return optim.ExponentialLR({"optimizer": TorchSGLD, "optim_args": {"lr": 1e-2}, "gamma": 0.5})

    scheduler = make()
    assert optim.ExponentialLR.__name__ == "ExponentialLR"
    svi, _ = make_svi(scheduler)
    for _ in range(2):
        svi.step(DATA)
        scheduler.step()
    assert scheduler.sampler.param_groups[0]["lr"] == 2.5e-3  # one sampler, one scheduler
    path = tmp_path / "sched.pt"
    scheduler.save(str(path))
    store = copy.deepcopy(pyro.get_param_store().get_state())
    for _ in range(2):
        svi.step(DATA)
        scheduler.step()
    uninterrupted = params()

    resumed_scheduler = make()
    svi2, _ = make_svi(resumed_scheduler, seed=5)
    pyro.get_param_store().set_state(store)
    resumed_scheduler.load(str(path))
    for _ in range(2):
        svi2.step(DATA)
        resumed_scheduler.step()
    assert resumed_scheduler.sampler.param_groups[0]["lr"] == scheduler.sampler.param_groups[0]["lr"] == 6.25e-4
    resumed = params()
    assert all(torch.equal(uninterrupted[k], resumed[k]) for k in uninterrupted)


def test_reduce_on_plateau_takes_the_loss():
    scheduler = optim.ReduceLROnPlateau({"optimizer": TorchSGLD, "optim_args": {"lr": 1e-2}, "patience": 0})
    svi, _ = make_svi(scheduler)
    svi.step(DATA)
    for _ in range(3):
        scheduler.step(1.0)  # no improvement: the lr drops
    assert scheduler.sampler.param_groups[0]["lr"] < 1e-2


def test_our_scheduler_refuses_parameters_appearing_later():
    def growing(extra):
        pyro.sample("a", dist.Delta(pyro.param("a_u", torch.tensor(0.0))))
        if extra:
            pyro.sample("b", dist.Delta(pyro.param("b_u", torch.tensor(0.0))))

    def model(extra):
        pyro.sample("a", dist.Normal(0.0, 1.0))
        if extra:
            pyro.sample("b", dist.Normal(0.0, 1.0))

    pyro.clear_param_store()
    scheduler = optim.StepLR({"optimizer": TorchSGLD, "optim_args": {"lr": 1e-2}, "step_size": 1})
    svi = SVI(model, growing, scheduler, Trace_ELBO())
    svi.step(False)
    with pytest.raises(NotImplementedError, match="appeared after the lr scheduler was built"):
        svi.step(True)
