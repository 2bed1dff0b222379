"""The fused SGLD step (``SGLD(fused=True)``): its noise's law, independence, reproducibility and
resume, its drift against the eager step, and its refusal of non-finite steps.

Runs on a CUDA device where there is one (with Triton), else on the CPU in Triton's interpreter
when ``TRITON_INTERPRET=1`` was set before Triton was imported (``tests/test_fused.py`` runs this
file that way where Triton is installed); skipped otherwise. On a GPU:
``python benchmarks/gpu_step.py`` runs it and then times the step.

Statistical checks are at 4 standard errors, on 2^16 + 4181 draws per step: a 10% error in the
variance is 4.5 of them.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch

from pyro_sgmcmc.functional import NonFiniteError
from pyro_sgmcmc.functional._fused import interpreting, triton_installed
from pyro_sgmcmc.samplers import SGLD

if triton_installed() and interpreting():  # Triton's interpreter: CPU tensors, even where there is a GPU
    DEVICE = torch.device("cpu")
elif triton_installed() and torch.cuda.is_available():
    DEVICE = torch.device("cuda")
else:
    pytestmark = pytest.mark.skip(reason="needs Triton and a CUDA device, or Triton's interpreter (TRITON_INTERPRET=1)")
    DEVICE = torch.device("cpu")

SHAPES = [(1 << 16,), (37, 113)]  # a tensor of whole blocks, and one that ends inside a block and a counter


def params(dtype=torch.float32, fill=None):
    if fill is None:
        return [torch.nn.Parameter(torch.zeros(s, device=DEVICE, dtype=dtype)) for s in SHAPES]
    return [torch.nn.Parameter(fill(s).to(device=DEVICE, dtype=dtype)) for s in SHAPES]


def increments(ps, sampler, steps, grads=None):
    """Each step's change of every parameter, flattened and joined: ``[steps, numel]``."""
    out = []
    for k in range(steps):
        before = torch.cat([p.detach().reshape(-1).double() for p in ps])
        for i, p in enumerate(ps):
            p.grad = torch.zeros_like(p) if grads is None else grads[k][i].clone()
        sampler.step()
        out.append(torch.cat([p.detach().reshape(-1).double() for p in ps]) - before)
    return torch.stack(out).cpu()


def se_bound(n):
    return 4 / math.sqrt(n)


@pytest.mark.parametrize("lr, noise_level", [(0.25, 1.0), (1e-3, 0.5)])
def test_noise_has_mean_zero_and_variance_noise_level_squared_times_lr(lr, noise_level):
    torch.manual_seed(0)
    ps = params()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_level != 1
        sampler = SGLD(ps, lr=lr, noise_level=noise_level, fused=True)
    z = increments(ps, sampler, 1)[0] / (noise_level * math.sqrt(lr))
    n = z.numel()
    assert abs(float(z.mean())) < se_bound(n)
    assert abs(float(z.var()) - 1) < 4 * math.sqrt(2 / n)
    assert abs(float((z**4).mean()) - 3) < 4 * math.sqrt(96 / n)  # Gaussian tails, not just two moments
    tail = float((z.abs() > 2).double().mean())
    p = math.erfc(2 / math.sqrt(2))
    assert abs(tail - p) < 4 * math.sqrt(p * (1 - p) / n)


def test_noise_is_independent_across_steps_entries_and_tensors():
    torch.manual_seed(1)
    ps = params()
    sampler = SGLD(ps, lr=1.0, fused=True)
    z1, z2 = increments(ps, sampler, 2)
    n = z1.numel()

    def corr(a, b):
        return float(torch.corrcoef(torch.stack([a, b]))[0, 1])

    assert abs(corr(z1, z2)) < se_bound(n)  # the same counters, the next step's seed
    assert abs(corr(z1**2, z2**2)) < se_bound(n)
    for lag in (1, 2, 3, 4, 1024):  # neighbours share a Philox call (lags 1-3) or a block
        assert abs(corr(z1[:-lag], z1[lag:])) < se_bound(n - lag), lag
        assert abs(corr(z1[:-lag] ** 2, z1[lag:] ** 2)) < se_bound(n - lag), lag
    first, second = z1[: 1 << 16], z1[1 << 16 :]
    m = second.numel()
    assert abs(corr(first[:m], second)) < se_bound(m)  # two tensors of one step


def test_noise_is_reproducible_from_the_seed():
    def run(seed):
        torch.manual_seed(seed)  # seeds the CUDA generators too
        ps = params()
        return increments(ps, SGLD(ps, lr=0.5, fused=True), 3)

    a, b, c = run(3), run(3), run(4)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_state_dict_resumes_the_fused_chain_exactly():
    def make(ps):
        return SGLD(ps, lr=0.1, weight_decay=0.5, generator=torch.Generator(DEVICE).manual_seed(5), fused=True)

    torch.manual_seed(6)
    grads = [[torch.randn(s, device=DEVICE) for s in SHAPES] for _ in range(4)]
    ps = params()
    sampler = make(ps)
    increments(ps, sampler, 2, grads[:2])
    saved_params = [p.detach().clone() for p in ps]
    saved = copy.deepcopy(sampler.state_dict())
    expected = increments(ps, sampler, 2, grads[2:])

    resumed = [torch.nn.Parameter(p.clone()) for p in saved_params]
    other = make(resumed)
    other.load_state_dict(saved)
    assert torch.equal(increments(resumed, other, 2, grads[2:]), expected)


OPTIONS = {
    "plain": {},
    "temperature and weight decay": dict(temperature=2.0, weight_decay=0.3),
    "nbeta": dict(nbeta=7.0),
    "localization and box": dict(localization=0.5, bounding_box_size=0.05),
    "box alone": dict(bounding_box_size=0.02),
    "mask": dict(mask=[torch.tensor([1.0, 0.0]).repeat(s[0] // 2) if len(s) == 1 else (torch.rand(s) < 0.5)
                       for s in SHAPES]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", list(OPTIONS))
def test_without_noise_the_fused_step_is_the_eager_step(name, dtype):
    """The drift, the weight decay, the pull to the anchor, the mask and the box: the eager
    step's arithmetic, in the same order, a few roundings apart (a fused multiply-add here or
    there); a term missing or mis-scaled would be off by ~1e-2."""
    torch.manual_seed(7)
    fused = params(dtype, torch.randn)
    eager = [torch.nn.Parameter(p.detach().clone()) for p in fused]
    grads = [[torch.randn(s, device=DEVICE, dtype=dtype) for s in SHAPES] for _ in range(3)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # noise_level=0
        a = SGLD(fused, lr=0.1, noise_level=0.0, fused=True, **OPTIONS[name])
        b = SGLD(eager, lr=0.1, noise_level=0.0, **OPTIONS[name])
    da, db = increments(fused, a, 3, grads), increments(eager, b, 3, grads)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(da, db, rtol=0, atol=64 * eps)
    assert da.abs().max() > 0


def test_groups_and_dtypes_each_get_their_own_noise():
    torch.manual_seed(8)
    first = torch.nn.Parameter(torch.zeros(1 << 15, device=DEVICE))
    second = torch.nn.Parameter(torch.zeros(1 << 15, device=DEVICE, dtype=torch.float64))
    third = torch.nn.Parameter(torch.zeros(1 << 15, device=DEVICE, dtype=torch.bfloat16))
    sampler = SGLD([{"params": [first, second]}, {"params": [third], "lr": 0.25}], lr=1.0, fused=True)
    z = increments([first, second, third], sampler, 1)[0]
    a, b, c = z[: 1 << 15], z[1 << 15 : 2 << 15], z[2 << 15 :] / 0.5
    n = a.numel()
    for x in (a, b):
        assert abs(float(x.var()) - 1) < 4 * math.sqrt(2 / n)
    assert abs(float(c.var()) - 1) < 0.05  # bfloat16 rounds each value to 8 bits
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < se_bound(n)


def test_a_non_finite_gradient_refuses_the_step_and_changes_nothing():
    torch.manual_seed(9)
    ps = params(fill=torch.randn)
    twin = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    generator, twin_generator = (torch.Generator(DEVICE).manual_seed(10) for _ in range(2))
    sampler = SGLD(ps, lr=0.1, generator=generator, fused=True)
    reference = SGLD(twin, lr=0.1, generator=twin_generator, fused=True)
    before = [p.detach().clone() for p in ps]
    for p in ps:
        p.grad = torch.zeros_like(p)
    ps[1].grad[3, 4] = float("nan")
    with pytest.raises(NonFiniteError, match=r"param_groups\[0\]\['params'\]\[1\].*holds NaN or Inf"):
        sampler.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    # the refused step drew nothing: the next step is the twin's first
    assert torch.equal(increments(ps, sampler, 1), increments(twin, reference, 1))


def test_an_update_that_would_overflow_is_refused_and_changes_nothing():
    torch.manual_seed(11)
    ps = params(fill=torch.randn)
    before = [p.detach().clone() for p in ps]
    generator = torch.Generator(DEVICE).manual_seed(12)
    state = generator.get_state()
    sampler = SGLD(ps, lr=1e38, generator=generator, fused=True)
    for p in ps:
        p.grad = torch.full_like(p, 1e3)
    with pytest.raises(NonFiniteError, match="would not be finite"):
        sampler.step()
    assert all(torch.equal(p, q) for p, q in zip(ps, before))
    assert torch.equal(generator.get_state(), state)


def test_groups_added_later_are_checked():
    sampler = SGLD(params(), lr=0.1, fused=True)
    with pytest.raises(ValueError, match=r"Invalid fused: True \(in param_groups\[1\], parameter 0 is not contiguous"):
        sampler.add_param_group({"params": [torch.nn.Parameter(torch.zeros(4, 3, device=DEVICE).t())]})
    with pytest.raises(ValueError, match=r"Invalid fused: True for a differentiable step"):
        p = sampler.param_groups[0]["params"][0]
        sampler.step_tensors({p: p.detach().clone()}, {p: torch.zeros_like(p)})


def _lists(dtype=torch.float32):
    torch.manual_seed(13)
    ps = params(dtype, torch.randn)
    return ps, [torch.randn(s, device=DEVICE, dtype=dtype) for s in SHAPES], [p.detach().clone() for p in ps]


@pytest.mark.parametrize("case, match", [
    ("float64 grads", r"Invalid grads\[1\]: torch.float64 on .*, the fused step takes the bucket's torch.float32"),
    ("short grad", r"Invalid grads\[1\]: shape \(4180,\) does not match its parameter's shape \(37, 113\)"),
    ("missing grad", r"Invalid grads: 1 tensors for 2 parameters"),
    ("bool masks", r"Invalid masks\[0\]: torch.bool on .*, the fused step takes the bucket's torch.float32"),
    ("None mask", r"Invalid masks\[1\]: None, the fused step takes a tensor for every parameter \(an all-ones mask"),
    ("short anchor", r"Invalid anchors\[0\]: shape \(65535,\) does not match"),
    ("None anchor", r"Invalid anchors\[1\]: None, the fused step takes a tensor for every parameter"),
])
@pytest.mark.parametrize("when", ["first step", "later step"])
def test_the_functional_fused_step_checks_its_lists_before_any_launch(case, match, when):
    """What the kernel reads through the pointer table must be the bucket's dtype and device and
    its parameter's shape: checked when the layout is made and whenever an address changes (a
    later step with other tensors), before anything is written; a ValueError names the list."""
    from pyro_sgmcmc.functional import NoisePlanCache, sgld

    ps, grads, anchors = _lists()
    masks = [torch.ones_like(p) for p in ps]
    cache = NoisePlanCache()
    if when == "later step":
        with torch.no_grad():
            sgld(ps, grads, lr=1e-3, localization=0.5, anchors=anchors, masks=masks, noise_plans=cache, fused=True)
    if case == "float64 grads":
        grads[1] = grads[1].double()
    elif case == "short grad":
        grads[1] = grads[1].reshape(-1)[1:]
    elif case == "missing grad":
        grads = grads[:1]
    elif case == "bool masks":
        masks = [m.bool() for m in masks]
    elif case == "None mask":
        masks[1] = None
    elif case == "short anchor":
        anchors[0] = anchors[0][1:]
    elif case == "None anchor":
        anchors[1] = None
    before = [p.detach().clone() for p in ps]
    with torch.no_grad(), pytest.raises(ValueError, match=match):
        sgld(ps, grads, lr=1e-3, localization=0.5, anchors=anchors, masks=masks, noise_plans=cache, fused=True)
    assert all(torch.equal(p, q) for p, q in zip(ps, before))


def test_non_contiguous_anchors_grads_and_masks_are_read_as_their_values():
    """Copied contiguous for the kernel (as the eager step reads them by value): the same step as
    with contiguous ones, bit for bit."""
    from pyro_sgmcmc.functional import sgld

    results = []
    for contiguous in (True, False):
        ps, grads, anchors = _lists()
        masks = [(torch.rand(s, device=DEVICE) < 0.5).float() for s in SHAPES]
        if not contiguous:
            anchors[1], grads[1], masks[1] = (t.t().contiguous().t() for t in (anchors[1], grads[1], masks[1]))
            assert not anchors[1].is_contiguous()
        torch.manual_seed(14)
        with torch.no_grad():
            sgld(ps, grads, lr=1e-2, localization=0.5, anchors=anchors, masks=masks, bounding_box_size=0.1, fused=True)
        results.append([p.detach().clone() for p in ps])
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_a_parameter_changed_in_place_after_the_first_step_is_refused():
    """``module.to(dtype)`` swaps a parameter's data under the same Parameter object, which is
    what the cached layout is keyed by: the next step sees the new address and refuses."""
    ps = params(fill=torch.randn)
    sampler = SGLD(ps, lr=1e-3, fused=True)
    increments(ps, sampler, 1)
    ps[0].data = ps[0].data.double()
    for p in ps:
        p.grad = torch.zeros_like(p)
    with pytest.raises(ValueError, match=r"Invalid params\[0\]: torch.float64 .* \(was the parameter moved since "):
        sampler.step()


def philox_normals(seed, counters, stream=0):
    """NumPy's reading of the kernel's noise (:func:`pyro_sgmcmc.functional._triton._normals4`):
    Philox-4x32-10 (Salmon et al. 2011) keyed by the seed's two words on the counters (low word,
    high word, ``stream``, 0), each output to a float32 uniform, two Box-Muller pairs: ``[n, 4]``."""
    import numpy as np

    mask = 0xFFFFFFFF
    counters = np.asarray(counters, dtype=np.uint64)
    c0, c1 = counters & mask, counters >> 32
    c2, c3 = np.full_like(c0, stream), np.zeros_like(c0)
    k0, k1 = seed & mask, (seed >> 32) & mask
    for _ in range(10):
        a, b = c0 * 0xD2511F53, c2 * 0xCD9E8D57  # 32 x 32 bits: exact in uint64
        c0, c1, c2, c3 = ((b >> 32) ^ c1 ^ k0) & mask, b & mask, ((a >> 32) ^ c3 ^ k1) & mask, a & mask
        k0, k1 = (k0 + 0x9E3779B9) & mask, (k1 + 0xBB67AE85) & mask
    out = []
    for x in (c0, c1, c2, c3):
        x = x.astype(np.uint32).view(np.int32)
        x = np.where(x < 0, ~x, x)
        out.append(x.astype(np.float32) * np.float32(4.6566127342e-10))
    z = []
    for u1, u2 in ((out[0], out[1]), (out[2], out[3])):
        r = np.sqrt(np.float32(-2.0) * np.log(np.maximum(np.float32(1e-7), u1)))
        th = np.float32(6.283185307179586) * u2
        z += [r * np.cos(th), r * np.sin(th)]
    return np.stack(z, axis=1)


def fused_noise(seed, stream=None, shapes=SHAPES):
    """The noise of one fused step at ``lr=1`` (the increment is minus the noise), from a
    generator seeded with ``seed``, and that step's Philox seed; ``stream`` replaces the
    device's index in the counters."""
    import pyro_sgmcmc.functional._fused as fused_module
    from pyro_sgmcmc.functional import sgld

    made = []
    make = fused_module.FusedPlan.__init__

    def recorded(self, *args, **kwargs):
        make(self, *args, **kwargs)
        if stream is not None:
            self.stream = stream
        made.append(self)

    ps = [torch.zeros(s, device=DEVICE) for s in shapes]
    with pytest.MonkeyPatch.context() as patch, torch.no_grad():
        patch.setattr(fused_module.FusedPlan, "__init__", recorded)
        sgld(ps, [torch.zeros_like(p) for p in ps], lr=1.0, generator=torch.Generator(DEVICE).manual_seed(seed),
             fused=True)
    (plan,) = made
    return [-p.cpu() for p in ps], int(plan.seed)


@pytest.mark.parametrize("stream", [0, 1])
def test_the_noise_is_philox_4x32_10_with_box_muller(stream):
    """Entry ``4k + j`` of each tensor takes the ``j``-th normal of counter (start + k, stream),
    tensors starting at fresh counters: the numbers do not depend on Triton's version (before
    3.4 ``tl.randn4x`` on 64-bit counters ran another Philox); ``stream`` (the device's index)
    gives other numbers from the same seed."""
    noise, seed = fused_noise(15, stream)
    start = 0
    for z in noise:
        n = z.numel()
        reference = philox_normals(seed, range(start, start + (n + 3) // 4), stream).reshape(-1)[:n]
        torch.testing.assert_close(z.reshape(-1), torch.from_numpy(reference), rtol=1e-5, atol=1e-5)
        start += (n + 3) // 4
    other, other_seed = fused_noise(15, 1 - stream)
    assert other_seed == seed
    assert all(abs(float(torch.corrcoef(torch.stack([a.reshape(-1), b.reshape(-1)]))[0, 1])) < se_bound(a.numel())
               for a, b in zip(noise, other))


@pytest.mark.parametrize("block", [256, 1 << 16])
def test_the_noise_does_not_depend_on_the_block_size(monkeypatch, block):
    """A tensor spanning several blocks draws what it draws in one (the docstring's claim; the
    interpreter's default block holds these tensors whole)."""
    import pyro_sgmcmc.functional._triton as triton_module

    reference, _ = fused_noise(16)
    monkeypatch.setattr(triton_module, "BLOCK", block)
    noise, _ = fused_noise(16)
    assert all(torch.equal(a, b) for a, b in zip(noise, reference))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_at_a_small_lr_is_not_guarded(monkeypatch, dtype):
    """At lr=1e-7 the noise's scale in the buffer, 2/sqrt(lr) = 6325 times 9 standard deviations,
    is beyond a quarter of float16's range: a float16 buffer would need the guarded (slow) path
    on every step; the kernel's buffer is float32, so the step passes the check at once."""
    import pyro_sgmcmc.functional._step as step_module
    from pyro_sgmcmc.functional.sgld import sgld_step

    ps = params(dtype, torch.randn)
    grads = [torch.randn(s, device=DEVICE, dtype=dtype) for s in SHAPES]
    with torch.no_grad():
        (task,), _ = sgld_step(ps, grads, lr=1e-7, fused=True)
        (eager,), _ = sgld_step(ps, grads, lr=1e-7)
    assert task.limit > 0
    if dtype is torch.float16:
        assert eager.limit < 0  # the eager step's float16 buffer is guarded
    monkeypatch.setattr(step_module, "_guarded", lambda *args, **kwargs: pytest.fail("guarded path taken"))
    sampler = SGLD(ps, lr=1e-7, fused=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # bfloat16's resolution: most of the noise rounds away
        z = increments(ps, sampler, 1, [grads])[0]
    assert z.abs().max() > 0 and z.isfinite().all()


def test_a_refused_step_drops_what_it_staged(monkeypatch):
    """The staged launch holds copies of non-contiguous gradients: a refused step lets them go."""
    import pyro_sgmcmc.functional._fused as fused_module
    from pyro_sgmcmc.functional import sgld

    made = []
    make = fused_module.FusedPlan.__init__

    def recorded(self, *args):
        make(self, *args)
        made.append(self)

    monkeypatch.setattr(fused_module.FusedPlan, "__init__", recorded)
    ps, grads, _ = _lists()
    grads[1] = grads[1].t().contiguous().t()
    grads[1][3, 4] = float("nan")
    with torch.no_grad(), pytest.raises(NonFiniteError):
        sgld(ps, grads, lr=0.1, fused=True)
    (plan,) = made
    assert plan._staged is None
