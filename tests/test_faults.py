"""Faults injected into every layer: each test breaks one promise the package makes on bad
input, a refused step, an interrupt or a checkpoint, and checks that the promise holds.

The promises (one line each, as in the README's "What is guaranteed"):

* bad values are refused where they enter (constructor, ``param_groups`` written by a
  scheduler or by hand, ``load_state_dict``, the Pyro wrapper's options), naming the argument;
* a refused step (NaN or Inf gradient, or an update that would not be finite) changes nothing:
  parameters, sampler state, step counters, noise streams and torch's global RNG;
* SVI goes on after a refused step (the Pyro wrapper zeroes the step's gradients);
* Ctrl-C during a threaded step leaves the step applied whole, bookkeeping included;
* a state that does not fit is refused by ``load_state_dict`` / ``set_state``; ``load()`` runs
  no code from the file; a checkpoint taken before the first step resumes exactly; the SVI
  recipe (guide, param store, optimizer, RNG) resumes bit for bit;
* silent misuse warns: a non-point guide, AutoDelta with constrained sites, low-precision
  parameters whose noise rounds away, a fork after threaded steps; a model whose global
  weights first appear inside a subsampled plate gets an error that says what to do.
"""

from __future__ import annotations

import copy
import os
import pickle
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoDiagonalNormal, AutoNormal
from pyro.nn import PyroModule, PyroSample

import pyro_sgmcmc.optim as optim
from pyro_sgmcmc.functional import NoisePlanCache, NonFiniteError
from pyro_sgmcmc.infer import AutoUnconstrainedDelta
from pyro_sgmcmc.samplers import SAMPLERS, SGLD

ALL = list(SAMPLERS)
LR = {"SGLD": 1e-3, "PSGLD": 1e-3, "SGNHT": 1e-2, "SGHMC": 1e-2}


def small(name, n=3, **options):
    theta = torch.nn.Parameter(torch.linspace(-1.0, 1.0, n))
    return theta, SAMPLERS[name]([theta], **{"lr": LR[name], **options})


def noise_state(sampler):
    state = sampler.state_dict()["noise_state"]
    return None if state["streams"] is None else [s.clone() for s in state["streams"]]


def same_streams(a, b):
    return (a is None and b is None) or (a is not None and b is not None and all(map(torch.equal, a, b)))


# ------------------------------------------------------------------------ bad values enter


@pytest.mark.parametrize("name", ALL)
def test_a_scheduler_writing_a_bad_lr_is_refused_before_any_parameter_moves(name):
    theta, sampler = small(name)
    scheduler = torch.optim.lr_scheduler.LambdaLR(sampler, lambda step: 1.0 if step < 2 else float("inf"))
    theta.grad = torch.ones(3)
    sampler.step()
    scheduler.step()
    before = theta.detach().clone()
    with pytest.raises(ValueError, match="Invalid lr: inf"):
        scheduler.step()
        theta.grad = torch.ones(3)
        sampler.step()
    assert torch.isfinite(theta).all() and torch.equal(theta.detach(), before)


@pytest.mark.parametrize("key, value", [("temperature", -1.0), ("lr", -0.5), ("localization", float("nan")),
                                        ("noise_level", "loud"), ("nbeta", 2.0)])
def test_values_written_into_param_groups_by_hand_are_checked(key, value):
    theta, sampler = small("SGLD", temperature=1.0)
    theta.grad = torch.ones(3)
    with pytest.raises(ValueError, match=f"Invalid {key}|either temperature or nbeta"):
        sampler.param_groups[0][key] = value
        sampler.step()
    assert torch.equal(theta.detach(), torch.linspace(-1.0, 1.0, 3))


@pytest.mark.parametrize("value", [np.float32(0.01), np.float64(0.01), torch.tensor(0.01), 1, np.int64(1)])
def test_numpy_and_0d_tensor_scalars_are_accepted_and_stored_as_floats(value):
    theta, sampler = small("SGLD", lr=value, temperature=value, localization=value)
    group = sampler.param_groups[0]
    assert all(type(group[k]) is float for k in ("lr", "temperature", "localization"))
    theta.grad = torch.ones(3)
    sampler.step()


@pytest.mark.parametrize("name", ALL)
def test_overflowing_values_are_refused_up_front(name):
    with pytest.raises(ValueError, match="Invalid lr: .*overflows"):
        small(name, lr=10**400)
    with pytest.raises(ValueError, match="Invalid temperature: .*overflows.*schedule"):
        small(name, temperature=lambda step: 10**400)


# -------------------------------------------------------------------------- refused steps


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("layout", ["one chunk", "many chunks"])
def test_a_refused_step_changes_nothing_not_even_the_noise_streams(name, layout):
    theta, sampler = small(name, n=4000)
    if layout == "many chunks":
        sampler._noise_plans = NoisePlanCache(500)
    for _ in range(2):
        theta.grad = torch.ones(4000)
        sampler.step()
    before, streams, rng = copy.deepcopy(sampler.state_dict()), noise_state(sampler), torch.get_rng_state()
    values = theta.detach().clone()
    theta.grad = torch.ones(4000)
    theta.grad[3000] = float("nan")
    with pytest.raises(NonFiniteError):
        sampler.step()
    assert torch.equal(theta.detach(), values)
    assert same_streams(noise_state(sampler), streams)
    assert torch.equal(torch.get_rng_state(), rng)
    assert sampler.param_groups[0]["step"] == before["param_groups"][0]["step"] == 2


@pytest.mark.parametrize("name", ALL)
def test_a_refused_first_step_neither_seeds_the_streams_nor_draws_from_the_global_rng(name):
    theta, sampler = small(name)
    rng = torch.get_rng_state()
    theta.grad = torch.tensor([0.0, float("inf"), 0.0])
    with pytest.raises(NonFiniteError):
        sampler.step()
    assert torch.equal(torch.get_rng_state(), rng)
    assert sampler._noise._streams is None and not any(sampler.state.values())


#: per sampler, a start, gradient and step size whose update overflows float32 (PSGLD's
#: preconditioned step is at most lr / 2 per entry: it needs a parameter near the largest float)
OVERFLOWS = {"SGLD": (1.0, 1e10, 1e30), "SGNHT": (1.0, 1e10, 1e15), "SGHMC": (1.0, 1e10, 1e15),
             "PSGLD": (3e38, -1.0, 1e38)}


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("layout", ["one chunk", "many chunks"])
@pytest.mark.parametrize("case", ["overflowing step", "lr beyond the dtype"])
def test_a_step_that_would_write_a_nonfinite_parameter_from_finite_gradients_is_refused(name, layout, case):
    start, grad, lr = OVERFLOWS[name] if case == "overflowing step" else (1.0, 1.0, 1e39)
    theta = torch.nn.Parameter(torch.full((4000,), start))
    sampler = SAMPLERS[name]([theta], lr=lr)
    if layout == "many chunks":
        sampler._noise_plans = NoisePlanCache(500)
    theta.grad = torch.full((4000,), grad)
    rng = torch.get_rng_state()
    with pytest.raises(NonFiniteError, match="would not be finite"):
        sampler.step()
    assert torch.equal(theta.detach(), torch.full((4000,), start))
    assert sampler.param_groups[0]["step"] == 0 and not any(sampler.state.values())
    assert sampler._noise._streams is None and torch.equal(torch.get_rng_state(), rng)


def poisoned_model(data, poison=False):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    if poison:  # a finite value with an infinite gradient
        pyro.factor("poison", torch.sqrt(loc - loc.detach()))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(loc, 1.0), obs=data)


DATA = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0, 1.2])


@pytest.mark.parametrize("name", ALL)
def test_svi_goes_on_after_a_refused_step(name):
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    opt = getattr(optim, name)({"lr": LR[name]})
    svi = SVI(poisoned_model, AutoUnconstrainedDelta(poisoned_model), opt, Trace_ELBO())
    svi.step(DATA)
    with pytest.raises(NonFiniteError):
        svi.step(DATA, True)
    for _ in range(3):
        assert np.isfinite(svi.step(DATA))
    assert all(bool(torch.isfinite(v).all()) for _, v in pyro.get_param_store().named_parameters())


@pytest.mark.parametrize("name", ["SGLD", "SGNHT"])
def test_ctrl_c_during_a_threaded_step_leaves_the_step_whole(name, monkeypatch):
    """A real SIGINT, sent while the main thread waits for the noise threads: the step is
    applied whole and so is its bookkeeping (step counter, thermostat), then Ctrl-C is raised."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    # Python's own Ctrl-C handler, whatever this process inherited (a job started in the
    # background by a non-interactive shell ignores SIGINT, and the signal would do nothing)
    handler = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        theta, sampler = small(name, n=4000)
        sampler._noise_plans = NoisePlanCache(500)
        normal_ = torch.Tensor.normal_
        inside, sent = threading.Event(), threading.Event()

        def slow_normal_(self, *args, **kwargs):
            # only our noise threads: a thread another test left behind must not trigger the signal
            if threading.current_thread().name.startswith("pyro_sgmcmc-noise") and not inside.is_set():
                inside.set()
                sent.wait(30)  # the step cannot end before Ctrl-C is sent, however loaded the machine
                time.sleep(0.1)
            return normal_(self, *args, **kwargs)

        def interrupt():
            if inside.wait(30):
                os.kill(os.getpid(), signal.SIGINT)
                sent.set()

        monkeypatch.setattr(torch.Tensor, "normal_", slow_normal_)
        threading.Thread(target=interrupt, daemon=True).start()
        thermostat = sampler.param_groups[0].get("thermostat", torch.tensor(0.0)).clone()
        theta.grad = torch.ones(4000)
        with pytest.raises(KeyboardInterrupt):
            sampler.step()
        moved = not torch.equal(theta.detach(), torch.linspace(-1.0, 1.0, 4000))
        assert moved and sampler.param_groups[0]["step"] == 1
        if name == "SGNHT":
            assert not torch.equal(sampler.param_groups[0]["thermostat"], thermostat)
    finally:
        signal.signal(signal.SIGINT, handler)
        torch.set_num_threads(threads)


# ----------------------------------------------------------------------------- safe state


def state_of(name, **options):
    theta, sampler = small(name, **options)
    theta.grad = torch.ones(3)
    sampler.step()
    return sampler.state_dict()


@pytest.mark.parametrize(
    "tamper, match",
    [
        (lambda s: s["param_groups"][0].update(temperature=-1.0), "Invalid temperature"),
        (lambda s: s["param_groups"][0].update(temperature=1.0, nbeta=2.0), "either temperature or nbeta"),
        (lambda s: s["param_groups"][0].update(mask=[torch.full((3,), 0.5)]), r"Invalid mask\[0\]"),
        (lambda s: s["param_groups"][0].update(lr="fast"), "Invalid lr"),
        (lambda s: s["state"][0].update(momentum=torch.zeros(5)), "momentum.*shape"),
        (lambda s: s["noise_state"].update(streams=s["noise_state"]["streams"][:2]), "stream"),
        (lambda s: s["noise_state"].update(streams=[torch.zeros(7, dtype=torch.uint8)] * 4), "stream"),
    ],
)
def test_load_state_dict_refuses_a_state_that_does_not_fit(tamper, match):
    state = state_of("SGHMC")
    tamper(state)
    theta, sampler = small("SGHMC")
    before = copy.deepcopy(sampler.state_dict())
    with pytest.raises(ValueError, match=match):
        sampler.load_state_dict(state)
    assert sampler.state_dict()["param_groups"] == before["param_groups"]


def test_load_state_dict_refuses_another_samplers_state():
    state = state_of("SGNHT")
    _, sampler = small("SGLD")
    with pytest.raises(ValueError, match="SGNHT.*SGLD|SGLD.*SGNHT"):
        sampler.load_state_dict(state)


def test_a_state_without_noise_state_warns_that_the_resume_is_not_exact():
    state = state_of("SGLD")
    del state["noise_state"]
    _, sampler = small("SGLD")
    with pytest.warns(UserWarning, match="noise"):
        sampler.load_state_dict(state)


@pytest.mark.parametrize("name", ALL)
def test_a_checkpoint_before_the_first_step_resumes_exactly(name):
    theta, sampler = small(name)
    saved = copy.deepcopy(sampler.state_dict())
    torch.manual_seed(1)
    for _ in range(3):
        theta.grad = theta.detach().clone()
        sampler.step()
    uninterrupted = theta.detach().clone()
    theta2, sampler2 = small(name)
    sampler2.load_state_dict(saved)
    torch.manual_seed(2)  # the global RNG is elsewhere: the checkpoint alone must suffice
    for _ in range(3):
        theta2.grad = theta2.detach().clone()
        sampler2.step()
    assert torch.equal(theta2.detach(), uninterrupted)


class Payload:
    ran = False

    def __reduce__(self):
        return (setattr, (Payload, "ran", True))


def test_pyro_load_runs_no_code_from_the_file(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"layout": [], "sampler": Payload()}, f, protocol=2)
    with pytest.raises(pickle.UnpicklingError):
        optim.SGLD({"lr": 1e-3}).load(str(path))
    assert not Payload.ran


def test_pyro_set_state_refuses_a_state_that_does_not_fit_at_once():
    pyro.clear_param_store()
    opt = optim.SGNHT({"lr": 1e-2})
    svi = SVI(poisoned_model, AutoUnconstrainedDelta(poisoned_model), opt, Trace_ELBO())
    svi.step(DATA)
    state = opt.get_state()
    with pytest.raises(ValueError, match="SGNHT"):
        optim.SGLD({"lr": 1e-3}).set_state(state)
    state["sampler"]["param_groups"][0]["temperature"] = -1.0
    with pytest.raises(ValueError, match="Invalid temperature"):
        optim.SGNHT({"lr": 1e-2}).set_state(state)


def test_a_pending_set_state_that_never_applies_warns():
    pyro.clear_param_store()
    opt = optim.SGLD({"lr": 1e-3})
    SVI(poisoned_model, AutoUnconstrainedDelta(poisoned_model), opt, Trace_ELBO()).step(DATA)
    state = opt.get_state()
    state["layout"] = [["another_model.w"]]
    fresh = optim.SGLD({"lr": 1e-3})
    fresh.set_state(state)
    with pytest.warns(UserWarning, match="another_model.w"):
        SVI(poisoned_model, AutoUnconstrainedDelta(poisoned_model), fresh, Trace_ELBO()).step(DATA)


def subsampled_model(data):
    loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data), subsample_size=3) as idx:
        pyro.sample("x", dist.Normal(loc, scale), obs=data[idx])


@pytest.mark.parametrize("name", ALL)
def test_the_svi_recipe_resumes_bit_for_bit_in_the_order_a_user_writes_it(name, tmp_path):
    def run(steps, svi):
        for _ in range(steps):
            svi.step(DATA)

    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    opt = getattr(optim, name)({"lr": LR[name]})
    svi = SVI(subsampled_model, AutoUnconstrainedDelta(subsampled_model), opt, Trace_ELBO())
    run(5, svi)
    torch.save({"params": pyro.get_param_store().get_state(), "optim": opt.get_state(),
                "rng": pyro.util.get_rng_state()}, tmp_path / "ckpt.pt")
    run(20, svi)
    uninterrupted = {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}

    pyro.clear_param_store()
    pyro.set_rng_seed(123)
    guide = AutoUnconstrainedDelta(subsampled_model)
    opt2 = getattr(optim, name)({"lr": LR[name]})
    svi = SVI(subsampled_model, guide, opt2, Trace_ELBO())
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    pyro.get_param_store().set_state(saved["params"])
    opt2.set_state(saved["optim"])
    pyro.util.set_rng_state(saved["rng"])
    run(20, svi)
    for key, value in pyro.get_param_store().named_parameters():
        assert torch.equal(value.detach(), uninterrupted[key]), key


# ------------------------------------------------------------------------ the Pyro wrapper


@pytest.mark.parametrize("key, hint", [("temprature", "temperature"), ("weight_deacy", "weight_decay"),
                                       ("localisation", "localization"), ("Lr", "lr")])
def test_misspelt_options_of_the_pyro_wrapper_are_refused_with_the_closest(key, hint):
    with pytest.raises(ValueError, match=f"Invalid option '{key}'.*did you mean '{hint}'"):
        optim.SGLD({"lr": 0.01, key: 2.0})


def test_misspelt_options_returned_by_a_callable_are_refused_at_the_first_step():
    pyro.clear_param_store()
    opt = optim.SGNHT(lambda name: {"lr": 0.01, "diffusion_facter": 2.0})
    svi = SVI(poisoned_model, AutoUnconstrainedDelta(poisoned_model), opt, Trace_ELBO())
    with pytest.raises(ValueError, match="did you mean 'diffusion_factor'"):
        svi.step(DATA)


def vector_model(data):
    w = pyro.sample("w", dist.Normal(torch.zeros(3), 1.0).to_event(1))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(w.sum(), 1.0), obs=data)


def test_a_mask_can_be_given_through_the_pyro_wrapper():
    pyro.clear_param_store()
    opt = optim.SGLD({"lr": 1e-2, "mask": [1.0, 0.0, 1.0]})
    svi = SVI(vector_model, AutoUnconstrainedDelta(vector_model), opt, Trace_ELBO())
    svi.step(DATA)
    before = pyro.get_param_store()["AutoUnconstrainedDelta.locs.w"].detach().clone()
    for _ in range(5):
        svi.step(DATA)
    after = pyro.get_param_store()["AutoUnconstrainedDelta.locs.w"].detach()
    assert after[1] == before[1] and after[0] != before[0] and after[2] != before[2]


def test_tensors_outside_the_param_store_are_all_stepped_and_clipped():
    a = torch.zeros(3, requires_grad=True)
    b = torch.zeros(3, requires_grad=True)
    with pytest.warns(UserWarning, match="noise_level"):
        opt = optim.SGLD({"lr": 1e-2, "noise_level": 0.0}, {"clip_value": 1e-3})
        a.grad, b.grad = torch.ones(3), torch.full((3,), 2.0)
        opt([a, b])
    for t in (a, b):
        assert torch.allclose(t.detach(), torch.full((3,), -1e-2 / 2 * 1e-3))


# ------------------------------------------------------------------------------- warnings


@pytest.mark.parametrize("guide_class", [AutoNormal, AutoDiagonalNormal])
def test_a_non_point_guide_under_a_sampler_warns(guide_class):
    pyro.clear_param_store()
    svi = SVI(poisoned_model, guide_class(poisoned_model), optim.SGLD({"lr": 1e-3}), Trace_ELBO())
    with pytest.warns(UserWarning, match="not a point"):
        svi.step(DATA)


def constrained_model(data):
    scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
    with pyro.plate("data", len(data)):
        pyro.sample("x", dist.Normal(0.0, scale), obs=data)


def test_autodelta_with_a_constrained_site_warns_and_ours_does_not():
    pyro.clear_param_store()
    svi = SVI(constrained_model, AutoDelta(constrained_model), optim.SGLD({"lr": 1e-3}), Trace_ELBO())
    with pytest.warns(UserWarning, match="AutoUnconstrainedDelta"):
        svi.step(DATA)
    pyro.clear_param_store()
    svi = SVI(constrained_model, AutoUnconstrainedDelta(constrained_model), optim.SGLD({"lr": 1e-3}), Trace_ELBO())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        svi.step(DATA)


@pytest.mark.parametrize("dtype, lr", [(torch.bfloat16, 1e-6), (torch.float16, 1e-8)])
def test_low_precision_parameters_whose_noise_rounds_away_warn(dtype, lr):
    theta = torch.nn.Parameter(torch.ones(100, dtype=dtype))
    sampler = SGLD([theta], lr=lr)
    theta.grad = torch.zeros_like(theta)
    with pytest.warns(UserWarning, match="resolution"):
        sampler.step()
    assert (theta.detach() == 1).float().mean() > 0.5  # most entries did not move: what it warns of


def test_no_precision_warning_for_float32():
    theta = torch.nn.Parameter(torch.ones(100))
    sampler = SGLD([theta], lr=1e-6)
    theta.grad = torch.zeros_like(theta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler.step()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_stepping_in_a_child_forked_after_threaded_steps_warns():
    script = textwrap.dedent("""
        import os, sys, warnings, torch
        from pyro_sgmcmc.functional import NoisePlanCache
        from pyro_sgmcmc.samplers import SGLD
        torch.set_num_threads(2)
        theta = torch.nn.Parameter(torch.zeros(4000))
        sampler = SGLD([theta], lr=1e-3)
        sampler._noise_plans = NoisePlanCache(500)
        theta.grad = torch.ones(4000)
        sampler.step()
        pid = os.fork()
        if pid == 0:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                try:
                    sampler.step()
                except UserWarning as w:
                    os._exit(0 if "fork" in str(w) else 2)
            os._exit(1)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
    """)
    result = subprocess.run([sys.executable, "-c", script], timeout=120, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


class BNN(PyroModule):
    def __init__(self):
        super().__init__()
        self.fc = PyroModule[torch.nn.Linear](3, 4)
        self.fc.weight = PyroSample(dist.Normal(0.0, 1.0).expand([4, 3]).to_event(2))
        self.fc.bias = PyroSample(dist.Normal(0.0, 1.0).expand([4]).to_event(1))

    def forward(self, x, y=None):
        with pyro.plate("data", len(x), subsample_size=5) as idx:
            mu = self.fc(x[idx]).sum(-1)
            pyro.sample("y", dist.Normal(mu, 0.1), obs=None if y is None else y[idx])
        return mu


def test_global_weights_first_sampled_inside_a_subsampled_plate_get_a_clear_error():
    pyro.clear_param_store()
    x, y = torch.randn(20, 3), torch.randn(20)
    model = BNN()
    with pytest.raises(ValueError, match=r"'fc.weight'.*subsampled plate 'data'.*before"):
        SVI(model, AutoUnconstrainedDelta(model), optim.SGLD({"lr": 1e-4}), Trace_ELBO()).step(x, y)
    from pyro_sgmcmc.infer.sites import trace_model

    with pytest.raises(ValueError, match=r"'fc.weight'.*before"):
        trace_model(model, x, y)
    from pyro_sgmcmc.infer import SGLD as SGLDKernel  # the kernels trace the model through the same check

    with pytest.raises(ValueError, match=r"'fc.weight'.*subsampled plate 'data'.*before"):
        pyro.infer.MCMC(SGLDKernel(model), num_samples=2, warmup_steps=2, disable_progbar=True).run(x, y)


# ------------------------------------------------------------- the resume matrix, fresh process

RESUME = textwrap.dedent('''
    import copy, sys, torch, pyro, pyro.distributions as dist
    from pyro.infer import SVI, Trace_ELBO
    import pyro_sgmcmc.optim as optim
    from pyro_sgmcmc.infer import AutoUnconstrainedDelta
    from pyro_sgmcmc.samplers import SAMPLERS

    LR = {"SGLD": 1e-3, "PSGLD": 1e-3, "SGNHT": 1e-2, "SGHMC": 1e-2}
    DATA = torch.tensor([0.5, 1.5, 1.0, 2.0, 0.0, 1.2])
    STEPS = 6

    def model(data):
        loc = pyro.sample("loc", dist.Normal(0.0, 10.0))
        scale = pyro.sample("scale", dist.LogNormal(0.0, 1.0))
        with pyro.plate("data", len(data), subsample_size=3) as idx:
            pyro.sample("x", dist.Normal(loc, scale), obs=data[idx])

    def torch_case(name, own, theta=None):
        theta = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 5)) if theta is None else theta
        generator = torch.Generator().manual_seed(7) if own else None
        return theta, SAMPLERS[name]([theta], lr=LR[name], localization=0.1, generator=generator)

    def torch_steps(theta, sampler, steps):
        for _ in range(steps):
            theta.grad = 2.0 * theta.detach()
            sampler.step()
        return theta.detach().clone()

    def pyro_case(name):
        pyro.clear_param_store()
        opt = getattr(optim, name)({"lr": LR[name]})
        return SVI(model, AutoUnconstrainedDelta(model), opt, Trace_ELBO()), opt

    def params():
        return {k: v.detach().clone() for k, v in pyro.get_param_store().named_parameters()}

    def save(path):
        out = {}
        for at, name in [(at, name) for at in (0, 3) for name in SAMPLERS]:
            for own in (False, True):
                torch.manual_seed(3)
                theta, sampler = torch_case(name, own)
                torch_steps(theta, sampler, at)
                out[f"torch {name} {own} {at}"] = {"theta": theta.detach().clone(),
                                                   "state": copy.deepcopy(sampler.state_dict())}  # it holds live tensors
                out[f"torch {name} {own} {at}"]["expected"] = torch_steps(theta, sampler, STEPS)
            pyro.set_rng_seed(3)
            svi, opt = pyro_case(name)
            for _ in range(at):
                svi.step(DATA)
            pyro.get_param_store().save(f"{path}.{name}.{at}.params")
            opt.save(f"{path}.{name}.{at}.optim")
            out[f"pyro {name} {at}"] = {"rng": torch.get_rng_state()}
            for _ in range(STEPS):
                svi.step(DATA)
            out[f"pyro {name} {at}"]["expected"] = params()
        torch.save(out, path)

    def resume(path):
        saved = torch.load(path, weights_only=True)
        torch.manual_seed(999)  # elsewhere: only the checkpoint may decide what follows
        failures = []
        for at, name in [(at, name) for at in (0, 3) for name in SAMPLERS]:
            for own in (False, True):
                case = saved[f"torch {name} {own} {at}"]
                theta, sampler = torch_case(name, own, torch.nn.Parameter(case["theta"].clone()))
                sampler.load_state_dict(case["state"])
                if not torch.equal(torch_steps(theta, sampler, STEPS), case["expected"]):
                    failures.append(f"torch {name} own_generator={own} after {at} steps")
            case = saved[f"pyro {name} {at}"]
            pyro.set_rng_seed(999)
            svi, opt = pyro_case(name)  # the order a user writes: guide and optimizer, then the state
            pyro.get_param_store().load(f"{path}.{name}.{at}.params")
            opt.load(f"{path}.{name}.{at}.optim")
            torch.set_rng_state(case["rng"])
            for _ in range(STEPS):
                svi.step(DATA)
            if any(not torch.equal(value, case["expected"][key]) for key, value in params().items()):
                failures.append(f"pyro {name} after {at} steps")
        print("FAILURES", failures)
        sys.exit(1 if failures else 0)

    {"save": save, "resume": resume}[sys.argv[1]](sys.argv[2])
''')


def test_checkpoints_resume_bit_for_bit_in_a_fresh_process(tmp_path):
    """Every sampler, as a torch optimizer (global RNG or its own generator) and through SVI
    (subsampled model: param store, optimizer file and RNG restored in the order a user writes
    them), checkpointed before the first step and after three: resumed in a new process, each
    continues exactly as the run that made the checkpoint."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root + os.pathsep + os.environ.get("PYTHONPATH", "")}
    path = str(tmp_path / "checkpoint.pt")
    for command in ("save", "resume"):
        result = subprocess.run([sys.executable, "-c", RESUME, command, path], env=env, timeout=300,
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
