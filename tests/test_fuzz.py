"""Property tests over every public constructor and option of the samplers and the Pyro
optimizers: whatever is given, the result is a valid run (finite parameters) or a clear error,
a ``ValueError``/``TypeError`` whose message names the argument (or, for an ``lr`` too large
for the parameters' dtype, a refused step that says the update would not be finite).
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyro_sgmcmc.optim as optim
from pyro_sgmcmc.functional import NonFiniteError
from pyro_sgmcmc.samplers import SAMPLERS, ControlVariate
from pyro_sgmcmc.schedules import CyclicalSchedule

SETTINGS = settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
OPTIMIZER_WIDE = ("generator", "foreach", "diagnostics", "distributed", "process_group", "noise_ahead", "fused")


def options_of(cls) -> list[str]:
    return [name for name in inspect.signature(cls.__init__).parameters if name not in ("self", "params")]


plain = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-3.0, max_value=3.0),
    st.sampled_from([0.0, -0.0, 1.0, 0.5, 2.0, 1e-300, 1e-30, 1e30, 1e300, -1.0]),
    st.integers(min_value=-(10**400), max_value=10**400),
    st.integers(min_value=-3, max_value=3),
    st.booleans(),
    st.none(),
    st.text(max_size=4),
    st.floats(min_value=-1e3, max_value=1e3).map(np.float32),
    st.floats(allow_nan=True, allow_infinity=True).map(np.float64),
    st.integers(min_value=-3, max_value=3).map(np.int64),
    st.booleans().map(np.bool_),
    st.floats(min_value=-10.0, max_value=10.0).map(torch.tensor),
    st.lists(st.floats(min_value=-1.0, max_value=1.0), max_size=3).map(torch.tensor),
    st.lists(st.sampled_from([0, 1, 0.5, True, -1]), max_size=4),
    st.just(object()),
    st.just(torch.Generator()),
)
#: a value, or a schedule returning one (a callable is also what a non-schedulable option refuses)
values = st.one_of(plain, plain.map(lambda value: (lambda step: value)))


def clear(option: str, attempt) -> None:
    """Run ``attempt``: it must succeed, or fail with an error that names ``option``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            attempt()
        except (ValueError, TypeError) as error:
            assert option in str(error), f"{option}: {type(error).__name__}: {error}"
        except NonFiniteError as error:
            assert "would not be finite" in str(error), f"{option}: {error}"


def step_once(sampler, theta) -> None:
    theta.grad = torch.ones_like(theta)
    sampler.step()
    assert bool(torch.isfinite(theta).all())


@pytest.mark.parametrize("name", list(SAMPLERS))
@SETTINGS
@given(data=st.data())
def test_every_sampler_option(name, data):
    cls = SAMPLERS[name]
    option = data.draw(st.sampled_from(options_of(cls)), label="option")
    value = data.draw(values, label="value")

    def attempt():
        theta = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 3))
        options = {"lr": 1e-3, option: value}
        step_once(cls([theta], **options), theta)

    clear(option, attempt)


@pytest.mark.parametrize("name", list(SAMPLERS))
@SETTINGS
@given(data=st.data())
def test_every_value_written_into_param_groups(name, data):
    cls = SAMPLERS[name]
    option = data.draw(st.sampled_from([o for o in options_of(cls) if o not in OPTIMIZER_WIDE]), label="option")
    value = data.draw(values, label="value")
    theta = torch.nn.Parameter(torch.linspace(-1.0, 1.0, 3))
    sampler = cls([theta], lr=1e-3)

    def attempt():
        sampler.param_groups[0][option] = value
        step_once(sampler, theta)

    clear(option, attempt)
    # the sampler goes on with what it holds: a value refused on writing never got in, and one
    # that fits only with other options (e.g. SGLD's reference curvature with lr) is refused
    # again at the next step, with the same clear error
    clear(option, lambda: step_once(sampler, theta))


@pytest.mark.parametrize("name", list(optim.PYRO_OPTIMIZERS))
@SETTINGS
@given(data=st.data())
def test_every_pyro_optimizer_option(name, data):
    cls = getattr(optim, name)
    option = data.draw(st.sampled_from(options_of(cls.sampler_class) + ["clip_norm", "clip_value"]), label="option")
    value = data.draw(values, label="value")

    def attempt():
        theta = torch.linspace(-1.0, 1.0, 3).requires_grad_()
        if option.startswith("clip_"):
            opt = cls({"lr": 1e-3}, {option: value})
        elif option in OPTIMIZER_WIDE:
            opt = cls({"lr": 1e-3}, **{option: value})
        else:
            opt = cls({"lr": 1e-3, option: value})
        theta.grad = torch.ones(3)
        opt([theta])
        assert bool(torch.isfinite(theta).all())

    clear(option, attempt)


@SETTINGS
@given(key=st.text(min_size=1, max_size=12), value=plain)
def test_unknown_option_names_are_refused_with_their_name(key, value):
    accepted = options_of(SAMPLERS["SGLD"])
    if key in accepted:
        return
    with pytest.raises(ValueError) as info:
        optim.SGLD({"lr": 1e-3, key: value})
    assert repr(key) in str(info.value)


@SETTINGS
@given(key=st.sampled_from(["optimizer", "optim_args", "gama"]), value=plain)
def test_scheduler_wrappers(key, value):
    """Our part of a scheduler wrapper: the sampler and its options (a misspelt option of the
    torch scheduler is refused by torch, naming it; its values are torch's to check, and what
    they make of ``lr`` is checked when written)."""
    args = {"optimizer": SAMPLERS["SGLD"], "optim_args": {"lr": 1e-3}, "gamma": 0.9, key: value}

    def attempt():
        theta = torch.linspace(-1.0, 1.0, 3).requires_grad_()
        scheduler = optim.ExponentialLR(args)
        theta.grad = torch.ones(3)
        scheduler([theta])
        scheduler.step()

    clear(key, attempt)


@SETTINGS
@given(full_loss=st.one_of(plain, plain.map(lambda value: (lambda: value))))
def test_control_variate(full_loss):
    theta = torch.nn.Parameter(torch.ones(3))
    clear("full_loss", lambda: ControlVariate([theta], full_loss))


@SETTINGS
@given(option=st.sampled_from(["initial", "num_steps", "num_cycles", "exploration_fraction"]), value=plain)
def test_cyclical_schedule(option, value):
    options = {"initial": 1e-3, "num_steps": 10, "num_cycles": 2, option: value}

    def attempt():
        schedule = CyclicalSchedule(**options)
        assert all(0 <= schedule(step) <= schedule.initial for step in range(12))

    clear(option, attempt)


@pytest.mark.parametrize("name", ["SGLD", "SGNHT", "SGHMC", "PSGLD"])
@SETTINGS
@given(data=st.data())
def test_every_kernel_option_is_checked_at_construction(name, data):
    """The kernels check everything when made (a run would only find out seconds later); the
    sampler options they pass on are checked there too."""
    from pyro_sgmcmc.infer import KERNELS

    cls = KERNELS[name]
    kernel_options = [o for o in options_of(cls) if o not in ("model", "potential_fn", "sampler_options")]
    option = data.draw(st.sampled_from(kernel_options + ["lr", "temperatur", "max_plate_nesting"]), label="option")
    value = data.draw(values, label="value")

    def model():
        import pyro
        import pyro.distributions as dist

        pyro.sample("x", dist.Normal(0.0, 1.0))

    clear(option, lambda: cls(model, **{option: value}))


@SETTINGS
@given(option=st.sampled_from(["burn_in", "thin", "keep", "sites", "keep_if"]), value=values)
def test_sample_collector_options(option, value):
    from pyro_sgmcmc.infer import SampleCollector

    def attempt():
        collector = SampleCollector(**{option: value})
        for _ in range(3):
            collector({"x": torch.zeros(2)})

    clear(option, attempt)
