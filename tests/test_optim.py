"""Exact behaviour of the torch samplers: equivalences, resumption, options, bad input."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch

from pyro_sgmcmc.functional import DEVICE_CHUNK_NUMEL, NUM_STREAMS, NoisePlan, NoisePlanCache, NonFiniteError, sgld
from pyro_sgmcmc.samplers import SAMPLERS
from pyro_sgmcmc.samplers import SGLD
from pyro_sgmcmc.samplers import SGNHT


ALL_SAMPLERS = list(SAMPLERS)
MOMENTUM_SAMPLERS = ("SGNHT", "SGHMC")


def make_model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(5, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))


def make_data(seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 5, generator=gen)
    y = x.sum(-1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=gen)
    return x, y


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).sum() / 2


def run_steps(model, sampler, steps, data=None):
    x, y = data or make_data()
    for _ in range(steps):
        sampler.zero_grad()
        loss_fn(model, x, y).backward()
        sampler.step()
    return [p.detach().clone() for p in model.parameters()]


def assert_same(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---------------------------------------------------------------------------- equivalences


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sgld_without_noise_is_sgd_with_half_lr(weight_decay):
    m1, m2 = make_model(), make_model()
    with pytest.warns(UserWarning, match="noise_level"):
        ours = SGLD(m1.parameters(), lr=0.02, noise_level=0.0, weight_decay=weight_decay)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.01, weight_decay=weight_decay, foreach=True)
    assert_same(run_steps(m1, ours, 20), run_steps(m2, sgd, 20))


def configure(name, params_groups, generator=None, foreach=None, **extra):
    cls = SAMPLERS[name]
    options = dict(lr=1e-3, localization=0.5, weight_decay=0.1, bounding_box_size=0.05)
    if name == "SGNHT":
        options.update(lr=0.01, diffusion_factor=0.5)
    if name == "SGHMC":
        options.update(lr=0.01, friction=0.5, gradient_noise_variance=1.0)
    if name == "PSGLD":
        options.update(alpha=0.9)
    options.update(extra)
    return cls(params_groups, generator=generator, foreach=foreach, **options)


def groups_of(model):
    """Two groups with different options, one with a mask, so that every code path runs."""
    first, second = model[0], model[2]
    mask = (torch.arange(first.weight.numel()).reshape(first.weight.shape) % 3 != 0)
    return [
        {"params": [first.weight, first.bias], "mask": [mask, None], "temperature": 0.5},
        {"params": [second.weight, second.bias], "nbeta": 2.0, "localization": 0.0},
    ]


@pytest.mark.parametrize("name", ALL_SAMPLERS)
@pytest.mark.parametrize("chunk_numel", [1 << 20, 7])  # one chunk / many chunks, split tensors
def test_foreach_and_per_tensor_paths_agree_bit_for_bit(name, chunk_numel):
    results = []
    for foreach in (True, False):
        model = make_model()
        sampler = configure(name, groups_of(model), generator=torch.Generator().manual_seed(5), foreach=foreach)
        sampler._noise_plans = NoisePlanCache(chunk_numel)
        results.append(run_steps(model, sampler, 15))
    assert_same(*results)


def small_vectors(sizes=(1, 7, 33, 100, 129, 16)):
    """A model of small 1-d tensors only: the multi-tensor path gathers their gradients."""
    torch.manual_seed(3)
    return [torch.nn.Parameter(torch.randn(n)) for n in sizes]


def set_strided_grads(params, step):
    """Gradients as the user may leave them: some of them non-contiguous views."""
    gen = torch.Generator().manual_seed(100 + step)
    for i, p in enumerate(params):
        g = torch.randn(2 * p.numel(), generator=gen)
        p.grad = g[::2] if i % 2 else g[: p.numel()]


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_gathered_small_gradients_give_the_same_numbers(name):
    """Small 1-d gradients are gathered with one ``torch.cat`` on the multi-tensor path; that
    path, the per-tensor loop and the functional update without the gather agree bit for bit."""
    results = []
    for foreach in (True, False):
        params = small_vectors()
        mask = [None, (torch.arange(7) % 2).bool(), None, None, None, None]
        sampler = configure(name, [{"params": params, "mask": mask, "temperature": 0.7}],
                            generator=torch.Generator().manual_seed(5), foreach=foreach)
        for step in range(12):
            set_strided_grads(params, step)
            sampler.step()
        if foreach:
            (chunk,) = next(iter(sampler._noise_plans._plans.values())).chunks
            assert chunk.gathers, "the gradients were not gathered"
        results.append([p.detach().clone() for p in params])
    assert_same(*results)

    # the functional update of SGLD, gathered or not
    outs = []
    for checked in (True, False):
        params, plans, noise = small_vectors(), NoisePlanCache(), None
        from pyro_sgmcmc.functional import NoiseSource

        noise = NoiseSource(torch.Generator().manual_seed(1))
        with torch.no_grad():
            for step in range(5):
                set_strided_grads(params, step)
                sgld(params, [p.grad for p in params], lr=1e-2, grad_scale=0.5, weight_decay=0.1,
                     noise=noise, noise_plans=plans, grads_checked=checked)
        outs.append([p.detach().clone() for p in params])
    assert_same(*outs)


def test_only_small_1d_chunks_gather():
    """The gather pays only where per-op dispatch dominates (see ``GATHER_MEAN_NUMEL``)."""
    def gathers(shapes):
        return NoisePlan([torch.empty(s) for s in shapes]).chunks[0].gathers

    assert gathers([(100,)] * 20) and gathers([(1,), (2000,)])
    assert not gathers([(100,)])  # one tensor: nothing to gather
    assert not gathers([(100,), (10, 10)])  # not all 1-d
    assert not gathers([(3000,), (3000,)])  # large on average
    assert not gathers([(2000,)] * 20)  # beyond GRAIN elements in all


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_a_small_step_leaves_no_inference_tensors_and_autograd_sees_it(name):
    """The single-chunk step runs in inference mode: the parameters must stay normal tensors
    whose versions bump (so a graph that saved them refuses to backpropagate), and nothing the
    sampler keeps (state, diagnostics) may be an inference tensor."""
    params = small_vectors()
    sampler = configure(name, params, diagnostics=True)
    for step in range(3):
        set_strided_grads(params, step)
        sampler.step()
    loss = sum((p * p).sum() for p in params)
    versions = [p._version for p in params]
    set_strided_grads(params, 3)
    sampler.step()
    assert all(p._version > v for p, v in zip(params, versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    kept = [p for p in params]
    kept += [t for state in sampler.state.values() for t in state.values() if isinstance(t, torch.Tensor)]
    kept += [t for group in sampler.param_groups for t in group.values() if isinstance(t, torch.Tensor)]
    kept += list(sampler.step_diagnostics.values())
    assert len(kept) > len(params) + 2
    assert not any(t.is_inference() for t in kept)
    sampler.reset_auxiliary()  # in-place on the state, outside inference mode
    set_strided_grads(params, 4)
    sampler.step()
    assert all(bool(torch.isfinite(p).all()) for p in params)


def test_the_noise_plan_cache_follows_a_new_parameter_list():
    """The last layout is found by identity without hashing; a different list gets its own."""
    plans = NoisePlanCache()
    first = [torch.zeros(3), torch.zeros(4)]
    second = [torch.zeros(5), torch.zeros(2, 2)]
    with torch.no_grad():
        for params in (first, list(first), second, first):
            sgld(params, [torch.ones_like(p) for p in params], lr=0.1, noise_level=0.0, noise_plans=plans)
    assert torch.allclose(first[0], torch.full((3,), -0.15)) and torch.allclose(second[1], torch.full((2, 2), -0.05))
    assert len(plans._layouts) == 2


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_nbeta_path_equals_temperature_path(name):
    out = []
    for option in (dict(temperature=4.0), dict(nbeta=0.25)):
        model = make_model()
        sampler = configure(name, model.parameters(), generator=torch.Generator().manual_seed(2), **option)
        out.append(run_steps(model, sampler, 10))
    assert_same(*out)


# ------------------------------------------------------------------------------- resumption


@pytest.mark.parametrize("name", ALL_SAMPLERS)
@pytest.mark.parametrize("own_generator", [True, False])
def test_resume_from_state_dict_is_bit_exact(name, own_generator):
    schedule = lambda step: 0.01 * 0.99**step if name in MOMENTUM_SAMPLERS else 1e-3 * 0.99**step  # noqa: E731
    def build(model):
        gen = torch.Generator().manual_seed(11) if own_generator else None
        return configure(name, groups_of(model), generator=gen, lr=schedule)

    torch.manual_seed(123)
    model = make_model()
    sampler = build(model)
    run_steps(model, sampler, 7)
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "sampler": sampler.state_dict(), "rng": torch.get_rng_state()}, buffer)
    uninterrupted = run_steps(model, sampler, 9)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=False)
    torch.manual_seed(999)  # anything: the saved state must win
    model2 = make_model(seed=42)
    model2.load_state_dict(saved["model"])
    sampler2 = build(model2)
    sampler2.load_state_dict(saved["sampler"])
    torch.set_rng_state(saved["rng"])
    resumed = run_steps(model2, sampler2, 9)
    assert_same(uninterrupted, resumed)
    assert sampler2.param_groups[0]["step"] == 16


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_loading_a_state_into_the_same_sampler_rewinds_it(name):
    """The same sampler object, rewound with ``load_state_dict``: nothing it remembers between
    steps (noise layouts, the list of momenta) may outlive the state it was made for."""
    model = make_model()
    sampler = configure(name, groups_of(model), generator=torch.Generator().manual_seed(3))
    run_steps(model, sampler, 4)
    saved_model, saved = copy.deepcopy(model.state_dict()), copy.deepcopy(sampler.state_dict())
    first = run_steps(model, sampler, 5)
    model.load_state_dict(saved_model)
    sampler.load_state_dict(saved)
    assert_same(first, run_steps(model, sampler, 5))


def test_state_holds_no_anchor_unless_an_option_needs_it():
    model = make_model()
    sampler = SGLD(model.parameters(), lr=1e-3)
    run_steps(model, sampler, 2)
    assert all("anchor" not in sampler.state[p] for p in model.parameters())
    sampler = SGLD(model.parameters(), lr=1e-3, localization=1.0)
    start = [p.detach().clone() for p in model.parameters()]
    run_steps(model, sampler, 2)
    assert_same([sampler.state[p]["anchor"] for p in model.parameters()], start)


# ---------------------------------------------------------------------------------- options


def test_lr_scheduler_drives_lr():
    m1, m2 = make_model(), make_model()
    with pytest.warns(UserWarning):
        ours = SGLD(m1.parameters(), lr=0.02, noise_level=0.0)
    sgd = torch.optim.SGD(m2.parameters(), lr=0.01, foreach=True)
    s1 = torch.optim.lr_scheduler.StepLR(ours, step_size=3, gamma=0.5)
    s2 = torch.optim.lr_scheduler.StepLR(sgd, step_size=3, gamma=0.5)
    x, y = make_data()
    for _ in range(10):
        a = run_steps(m1, ours, 1, (x, y))
        b = run_steps(m2, sgd, 1, (x, y))
        s1.step(), s2.step()
        assert_same(a, b)
    assert ours.param_groups[0]["lr"] == 2 * sgd.param_groups[0]["lr"]


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_callable_lr_and_temperature(name):
    lrs, temps = [], []
    lr = lambda step: (lrs.append(step), 1e-3 / (1 + step))[1]  # noqa: E731
    temperature = lambda step: (temps.append(step), 1.0 + step)[1]  # noqa: E731
    model = make_model()
    sampler = SAMPLERS[name](model.parameters(), lr=lr, temperature=temperature)
    run_steps(model, sampler, 4)
    assert sampler.param_groups[0]["lr"] == pytest.approx(1e-3 / 4)
    assert sampler.param_groups[0]["temperature"] == 4.0
    assert lrs[-4:] == [0, 1, 2, 3] and temps[-4:] == [0, 1, 2, 3]
    # a schedule means the same as its values given step by step
    out = []
    for options in (dict(lr=1e-3, temperature=2.0), dict(lr=lambda s: 1e-3, temperature=lambda s: 2.0)):
        model = make_model()
        torch.manual_seed(0)
        out.append(run_steps(model, SAMPLERS[name](model.parameters(), **options), 3))
    assert_same(*out)


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_bounding_box_holds(name):
    model = make_model()
    start = [p.detach().clone() for p in model.parameters()]
    lr = 0.3 if name in MOMENTUM_SAMPLERS else 0.05  # large steps, so the walls are hit often
    sampler = SAMPLERS[name](model.parameters(), lr=lr, bounding_box_size=0.01)
    x, y = make_data()
    hit = False
    for _ in range(30):
        now = run_steps(model, sampler, 1, (x, y))
        for p, p0 in zip(now, start):
            assert float((p - p0).abs().max()) <= 0.01 + 1e-7
            hit |= bool(((p - p0).abs() > 0.0099).any())
    assert hit


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_mask_freezes_entries(name):
    model = make_model()
    weight = model[0].weight
    mask = torch.rand(weight.shape, generator=torch.Generator().manual_seed(0)) > 0.5
    before = weight.detach().clone()
    sampler = SAMPLERS[name]([{"params": [weight], "mask": [mask]}, {"params": list(model[2].parameters())}], lr=1e-2)
    after = run_steps(model, sampler, 10)[0]
    assert torch.equal(after[~mask], before[~mask])
    assert bool((after[mask] != before[mask]).all())


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_lr_zero_freezes_group_noise_included(name):
    model = make_model()
    before = [p.detach().clone() for p in model.parameters()]
    sampler = SAMPLERS[name]([{"params": list(model[0].parameters()), "lr": 0.0},
                              {"params": list(model[2].parameters())}], lr=1e-3)
    after = run_steps(model, sampler, 3)
    assert_same(after[:2], before[:2])
    assert not torch.equal(after[2], before[2])


def test_params_without_grad_are_skipped():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3))
    sampler = SGLD([a, b], lr=0.1)
    a.grad = torch.ones(3)
    sampler.step()
    assert torch.equal(b.detach(), torch.zeros(3)) and not torch.equal(a.detach(), torch.zeros(3))


def test_generator_and_global_seed_make_runs_reproducible():
    out = []
    for _ in range(2):
        model = make_model()
        torch.manual_seed(7)
        out.append(run_steps(model, SGLD(model.parameters(), lr=1e-3), 3))
    assert_same(*out)
    out = []
    for seed in (1, 1, 2):
        model = make_model()
        out.append(run_steps(model, SGLD(model.parameters(), lr=1e-3, generator=torch.Generator().manual_seed(seed)), 3))
    assert_same(out[0], out[1])
    assert not torch.equal(out[0][0], out[2][0])


# ------------------------------------------------------------------------------ diagnostics


def test_diagnostics_report_the_parts_of_the_update():
    torch.manual_seed(0)
    theta = torch.nn.Parameter(torch.randn(50))
    grad = torch.randn(50)
    lr, T, gamma, lam = 0.01, 2.0, 0.3, 0.2
    sampler = SGLD([theta], lr=lr, temperature=T, localization=gamma, weight_decay=lam, diagnostics=True,
                   generator=torch.Generator().manual_seed(1))
    theta0 = theta.detach().clone()
    theta.grad = grad
    sampler.step()  # theta == theta0 at the first step: localization part 0
    d = sampler.step_diagnostics
    noise = theta.detach() - theta0 + lr / 2 * (grad / T + lam * theta0)
    assert float(d["grad_norm"]) == pytest.approx(float(grad.norm()), rel=1e-6)
    assert float(d["drift_norm"]) == pytest.approx(lr / 2 / T * float(grad.norm()), rel=1e-6)
    assert float(d["weight_decay_norm"]) == pytest.approx(lr / 2 * lam * float(theta0.norm()), rel=1e-6)
    assert float(d["localization_norm"]) == 0.0
    assert float(d["noise_norm"]) == pytest.approx(float(noise.norm()), rel=1e-4)
    assert float(d["distance"]) == pytest.approx(float((theta.detach() - theta0).norm()), rel=1e-6)
    # the noise has the size the formula says: sqrt(lr) per entry
    assert float(d["noise_norm"]) == pytest.approx(math.sqrt(lr * 50), rel=0.3)

    quiet = SGLD([theta], lr=lr)
    theta.grad = grad
    quiet.step()
    assert quiet.step_diagnostics == {}


def test_sgnht_diagnostics_include_thermostat():
    theta = torch.nn.Parameter(torch.randn(20))
    sampler = SGNHT([theta], lr=0.01, diagnostics=True)
    theta.grad = theta.detach().clone()
    sampler.step()
    d = sampler.step_diagnostics
    assert set(d) >= {"thermostat", "kinetic_temperature", "noise_norm", "grad_norm", "distance"}
    assert float(d["thermostat"]) == float(sampler.param_groups[0]["thermostat"])


# -------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", ALL_SAMPLERS)
@pytest.mark.parametrize(
    "options, match",
    [
        (dict(lr=-1.0), "Invalid lr: -1.0"),
        (dict(lr=float("nan")), "Invalid lr: nan"),
        (dict(lr=float("inf")), "Invalid lr: inf"),
        (dict(lr="fast"), "Invalid lr"),
        (dict(lr=1e-3, temperature=0.0), "Invalid temperature: 0.0 .*> 0"),
        (dict(lr=1e-3, temperature=-1.0), "Invalid temperature"),
        (dict(lr=1e-3, temperature=float("inf")), "Invalid temperature"),
        (dict(lr=1e-3, nbeta=0.0), "Invalid nbeta"),
        (dict(lr=1e-3, temperature=1.0, nbeta=2.0), "either temperature or nbeta, not both"),
        (dict(lr=1e-3, localization=-1.0), "Invalid localization"),
        (dict(lr=1e-3, weight_decay=float("nan")), "Invalid weight_decay"),
        (dict(lr=1e-3, bounding_box_size=0.0), "Invalid bounding_box_size"),
        (dict(lr=1e-3, noise_level=-1.0), "Invalid noise_level"),
        (dict(lr=1e-3, mask=[torch.ones(2, 2)]), r"Invalid mask\[0\]: shape \(2, 2\) does not match .* \(3,\)"),
        (dict(lr=1e-3, mask=[torch.full((3,), 0.5)]), r"Invalid mask\[0\]: entries must be 0/1"),
        (dict(lr=1e-3, mask=[None, None]), "Invalid mask: expected a list of 1"),
        (dict(lr=1e-3, generator="seed"), "Invalid generator"),
    ],
)
def test_bad_options_are_rejected_clearly(name, options, match):
    with pytest.raises((ValueError, TypeError), match=match):
        SAMPLERS[name]([torch.nn.Parameter(torch.zeros(3))], **options)


@pytest.mark.parametrize(
    "name, options, match",
    [
        ("SGHMC", dict(friction=0.0), "Invalid friction: 0.0"),
        ("SGHMC", dict(friction=float("nan")), "Invalid friction"),
        ("SGHMC", dict(gradient_noise_variance=-1.0), "Invalid gradient_noise_variance: -1.0"),
        ("SGHMC", dict(splitting="leapfrog"), r"Invalid splitting: 'leapfrog' \(must be one of 'euler', 'baoab'\)"),
        ("PSGLD", dict(alpha=1.0), r"Invalid alpha: 1.0 \(must be a finite number >= 0 and < 1\)"),
        ("PSGLD", dict(alpha=-0.1), "Invalid alpha"),
        ("PSGLD", dict(eps=0.0), "Invalid eps: 0.0"),
        ("PSGLD", dict(adapt_preconditioner="yes"), "Invalid adapt_preconditioner"),
    ],
)
def test_bad_sampler_specific_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        SAMPLERS[name]([torch.nn.Parameter(torch.zeros(3))], lr=0.1, **options)


def test_sghmc_noise_estimate_must_stay_below_the_friction():
    theta = torch.nn.Parameter(torch.zeros(3))
    sampler = SAMPLERS["SGHMC"]([theta], lr=0.1, friction=1.0, gradient_noise_variance=30.0)
    theta.grad = torch.ones(3)
    with pytest.raises(ValueError, match="Invalid gradient_noise_variance: 30.0 gives B = .* 1.5 .* below friction=1.0"):
        sampler.step()
    assert torch.equal(theta.detach(), torch.zeros(3))


def test_bad_diffusion_factor():
    for value in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="Invalid diffusion_factor"):
            SGNHT([torch.nn.Parameter(torch.zeros(3))], lr=0.1, diffusion_factor=value)


def test_bad_schedule_value_is_rejected_at_step():
    theta = torch.nn.Parameter(torch.zeros(3))
    sampler = SGLD([theta], lr=lambda step: 1e-3 if step < 2 else -1.0)
    theta.grad = torch.ones(3)
    sampler.step(), sampler.step()
    with pytest.raises(ValueError, match="Invalid lr: -1.0"):
        sampler.step()


@pytest.mark.parametrize("name", ALL_SAMPLERS)
@pytest.mark.parametrize("layout", ["one group", "two groups", "many chunks"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_gradient_is_refused_and_nothing_changes(name, layout, bad):
    model = make_model()
    params = list(model.parameters())
    named = [{"params": params, "param_names": [n for n, _ in model.named_parameters()]}]
    groups = named if layout != "two groups" else [{"params": params[:2]}, {"params": params[2:]}]
    sampler = SAMPLERS[name](groups, lr=1e-3, localization=0.1)
    if layout == "many chunks":
        sampler._noise_plans = NoisePlanCache(5)
    run_steps(model, sampler, 2)
    before = copy.deepcopy(sampler.state_dict())
    values = [p.detach().clone() for p in params]
    sampler.zero_grad()
    loss_fn(model, *make_data()).backward()
    params[2].grad[0, 3] = bad
    with pytest.raises(NonFiniteError, match=r"\['params'\]\[(2|0)\].*shape \(1, 16\).*NaN or Inf") as info:
        sampler.step()
    if layout == "one group":
        assert "'2.weight'" in str(info.value)
    assert_same([p.detach() for p in params], values)
    after = sampler.state_dict()
    for g_after, g_before in zip(after["param_groups"], before["param_groups"]):
        assert g_after["step"] == g_before["step"] == 2
        if name == "SGNHT":
            assert torch.equal(g_after["thermostat"], g_before["thermostat"])
    for key, state in before["state"].items():
        for k, v in state.items():
            assert torch.equal(after["state"][key][k], v)


def test_the_first_bad_gradient_is_named_whatever_the_timing():
    """The gradient checks are shared out among the noise threads as they come free; with two
    bad gradients in different chunks the error must still name the first, every time."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        params = [torch.zeros(300) for _ in range(12)]
        grads = [torch.ones(300) for _ in range(12)]
        grads[4][7] = float("nan")
        grads[9][0] = float("inf")
        plans = NoisePlanCache(600)  # 6 chunks of 2 tensors: 6 checks for 2 threads
        for _ in range(30):
            with pytest.raises(NonFiniteError) as info:
                sgld(params, grads, lr=1e-2, noise_plans=plans)
            assert info.value.index == 4
        assert all(bool((p == 0).all()) for p in params)
    finally:
        torch.set_num_threads(threads)


def test_a_step_finishes_while_the_shared_noise_threads_are_busy():
    """The noise threads are a pool shared by every sampler in the process. With one of its two
    threads held by someone else, the lanes of a step run one after another, so a lane waiting
    for the gradient checks must run the unclaimed ones itself, never wait on a lane queued
    behind it (that would hang here)."""
    import threading

    from pyro_sgmcmc.functional._noise import _thread_pool

    threads = torch.get_num_threads()
    release, held = threading.Event(), threading.Event()
    try:
        torch.set_num_threads(2)
        _thread_pool(2).submit(lambda: (held.set(), release.wait(120)))
        assert held.wait(60)
        theta = torch.nn.Parameter(torch.zeros(4000))
        sampler = SGLD([theta], lr=1e-2)
        sampler._noise_plans = NoisePlanCache(500)  # 8 chunks in 4 lanes, 8 checks
        theta.grad = torch.ones(4000)
        stepper = threading.Thread(target=sampler.step, daemon=True)
        stepper.start()
        stepper.join(timeout=60)
        assert not stepper.is_alive(), "the step hung waiting for gradient checks"
        assert not torch.equal(theta.detach(), torch.zeros(4000))
    finally:
        release.set()
        torch.set_num_threads(threads)


def test_overflowing_sum_is_not_mistaken_for_nonfinite():
    theta = torch.nn.Parameter(torch.zeros(4))
    sampler = SGLD([theta], lr=1e-40)
    theta.grad = torch.full((4,), 3e38)  # finite entries whose sum overflows float32
    sampler.step()
    assert bool(torch.isfinite(theta).all())


# ------------------------------------------------------------------------------ noise plan


def test_noise_plan_packs_whole_tensors_and_splits_only_large_ones():
    tensors = [torch.empty(3), torch.empty(4), torch.empty(2, 2), torch.empty(25), torch.empty(2)]
    plan = NoisePlan(tensors, chunk_numel=10)
    layout = [(c.start, c.stop, c.span, c.flat.numel()) for c in plan]
    assert layout == [(0, 2, None, 7), (2, 3, None, 4), (3, 4, (0, 10), 10), (3, 4, (10, 20), 10),
                      (3, 4, (20, 25), 5), (4, 5, None, 2)]
    # the only temporaries, however large the tensors: one chunk-sized buffer per noise stream
    assert [b.numel() for b in plan.buffers] == [10] * NUM_STREAMS


def test_noise_buffer_is_bounded_for_large_models():
    big = torch.nn.Parameter(torch.zeros(3_000_000))
    sampler = SGLD([big], lr=1e-4)
    big.grad = torch.zeros_like(big)
    sampler.step()
    (plan,) = sampler._noise_plans._plans.values()
    assert [b.numel() for b in plan.buffers] == [1 << 20] * 3
    # and the noise has the right size: sqrt(lr) per entry
    assert float(big.detach().std()) == pytest.approx(1e-2, rel=1e-2)


def test_noise_chunks_off_the_cpu_are_large_and_still_bounded():
    """Off the CPU (a meta device stands in for a GPU: its tensors have shapes, no storage), a
    chunk holds up to ``DEVICE_CHUNK_NUMEL`` elements in one pair of buffers; the CPU's stay small."""
    sizes = [3 << 20, 5]
    plan = NoisePlan([torch.empty(n, device="meta") for n in sizes])
    assert len(plan.chunks) == 1 and [b.numel() for b in plan.buffers] == [(3 << 20) + 5]
    assert len(NoisePlan([torch.empty(n) for n in sizes]).chunks) == 4  # 1 << 20 on the CPU
    plan = NoisePlan([torch.empty(DEVICE_CHUNK_NUMEL + 1, device="meta")])
    assert [c.span for c in plan.chunks] == [(0, DEVICE_CHUNK_NUMEL), (DEVICE_CHUNK_NUMEL, DEVICE_CHUNK_NUMEL + 1)]
    assert [b.numel() for b in plan.buffers] == [DEVICE_CHUNK_NUMEL]


def test_functional_sgld_runs_without_an_optimizer():
    theta = [torch.zeros(4), torch.zeros(2, 3)]
    grads = [torch.ones(4), torch.ones(2, 3)]
    sgld(theta, grads, lr=0.1, noise_level=0.0)
    assert torch.allclose(theta[0], torch.full((4,), -0.05))


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_noise_does_not_depend_on_the_thread_count(name):
    """The CPU noise streams are tied to chunks, not threads: 1 or 2 threads, same chain."""
    threads = torch.get_num_threads()
    out = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            theta = torch.nn.Parameter(torch.zeros(3 * 1000 + 7))
            sampler = SAMPLERS[name]([theta], lr=1e-2, generator=torch.Generator().manual_seed(0))
            sampler._noise_plans = NoisePlanCache(1000)  # 4 chunks: all streams busy
            for _ in range(3):
                theta.grad = theta.detach().clone()
                sampler.step()
            out.append(theta.detach().clone())
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(*out)


def test_sparse_gradients_are_refused_clearly():
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    sampler = SGLD(embedding.parameters(), lr=1e-3)
    embedding(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="Sparse gradients are not supported"):
        sampler.step()


def test_step_hooks_and_closure_work_like_torch():
    theta = torch.nn.Parameter(torch.zeros(3))
    sampler = SGLD([theta], lr=1e-2)
    calls = []
    sampler.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre"))
    sampler.register_step_post_hook(lambda opt, args, kwargs: calls.append("post"))
    from torch.optim.optimizer import register_optimizer_step_post_hook

    handle = register_optimizer_step_post_hook(lambda opt, a, k: calls.append("global"))
    try:
        def closure():
            sampler.zero_grad()
            loss = (theta**2).sum()
            loss.backward()
            return loss
        assert float(sampler.step(closure).detach()) == 0.0
    finally:
        handle.remove()
    assert calls == ["pre", "post", "global"]
    assert not torch.equal(theta.detach(), torch.zeros(3))


@pytest.mark.parametrize("name", ALL_SAMPLERS)
def test_mixed_dtypes_in_one_group(name):
    """Parameters of several dtypes in one group are updated in per-dtype buckets, each with
    noise of its own dtype, and both paths still agree."""
    out = []
    for foreach in (True, False):
        params = [torch.nn.Parameter(torch.zeros(50, dtype=dtype)) for dtype in (torch.float32, torch.float64, torch.bfloat16)]
        sampler = SAMPLERS[name](params, lr=1e-2, generator=torch.Generator().manual_seed(0), foreach=foreach)
        for _ in range(3):
            for p in params:
                p.grad = p.detach() + 1
            sampler.step()
        assert [p.dtype for p in params] == [torch.float32, torch.float64, torch.bfloat16]
        assert all(bool(torch.isfinite(p).all()) and float(p.detach().float().std()) > 0 for p in params)
        out.append([p.detach().clone() for p in params])
    assert_same(*out)


def test_worker_threads_follow_the_callers_grad_mode():
    """Large steps run in the noise threads; the update must not be recorded by autograd."""
    theta = torch.nn.Parameter(torch.zeros(5000))
    sampler = SGLD([theta], lr=1e-2)
    sampler._noise_plans = NoisePlanCache(1000)
    theta.grad = torch.ones(5000)
    sampler.step()
    assert theta.grad_fn is None and theta.is_leaf


def test_sgnht_friction_is_stable_when_the_thermostat_runs_hot():
    """The paper's friction factor 1 - xi h flips and grows the momentum once xi h > 2 (a thermostat
    heated by a far start); the exact exp(-xi h) used here only ever damps it."""
    theta = torch.nn.Parameter(torch.zeros(1000))
    sampler = SGNHT([theta], lr=0.1, diffusion_factor=1.0, generator=torch.Generator().manual_seed(0))
    theta.grad = torch.zeros(1000)
    sampler.step()
    sampler.param_groups[0]["thermostat"].fill_(100.0)  # xi h = 10
    momentum = sampler.state[theta]["momentum"]
    for _ in range(20):
        theta.grad = torch.zeros(1000)
        sampler.step()
        # damped to the injected noise's scale, sqrt(2 A h) ~ 0.45, never growing
        assert float(momentum.abs().max()) < 3.0
