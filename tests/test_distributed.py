"""Data-parallel sampling on torch.distributed (gloo ranks in spawned processes): one chain over
DDP replicas that stay bit for bit identical, does not depend on the number of ranks beyond the
order of the gradients' reduction, and resumes exactly per rank; ZeroRedundancyOptimizer over a
sampler ("sharded"), with independent noise across shards; the warnings and errors for what
would otherwise break silently."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.distributed as dist

import distributed_ranks as ranks

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="needs torch.distributed with gloo")

#: float64 chains: the ranks' gradients are averaged in another order than one process sums
#: them, a difference of a few ulps (~1e-16 relative) per step; 12 steps of lr 1e-3 on an O(1)
#: model cannot grow it past ~1e-14. The noise (~0.03 a step) or a wrong gradient scale would
#: be off by many orders more.
WORLD_SIZE_TOLERANCE = 1e-12

NAMES = ("SGLD", "SGHMC", ranks.AHEAD)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    return ranks.run_ranks(ranks.replicated, 2, tmp_path_factory.mktemp("two"), NAMES, True)


@pytest.fixture(scope="module")
def four_ranks(tmp_path_factory):
    return ranks.run_ranks(ranks.replicated, 4, tmp_path_factory.mktemp("four"), ("SGLD",))


@pytest.mark.parametrize("name", NAMES)
def test_replicas_stay_bit_identical(two_ranks, name):
    for rank_result in two_ranks[1:]:
        for mine, theirs in zip(two_ranks[0][name]["path"], rank_result[name]["path"]):
            assert torch.equal(mine, theirs)


@pytest.mark.parametrize("name", NAMES)
def test_two_ranks_are_one_process(two_ranks, name):
    reference = ranks.reference("SGLD" if name == ranks.AHEAD else name)  # drawn ahead: the same chain
    for step, (mine, single) in enumerate(zip(two_ranks[0][name]["path"], reference)):
        assert (mine - single).abs().max() < WORLD_SIZE_TOLERANCE, f"step {step}"
    # and it is a chain that moves (not a trivial agreement)
    assert (reference[-1] - reference[0]).abs().max() > 1e-3


def test_four_ranks_are_one_process(four_ranks):
    reference = ranks.reference("SGLD")
    for rank_result in four_ranks:
        for step, (mine, single) in enumerate(zip(rank_result["SGLD"]["path"], reference)):
            assert (mine - single).abs().max() < WORLD_SIZE_TOLERANCE, f"step {step}"
    for rank_result in four_ranks[1:]:
        assert torch.equal(rank_result["SGLD"]["path"][-1], four_ranks[0]["SGLD"]["path"][-1])


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_resumes_exactly_per_rank(two_ranks, name):
    half = ranks.STEPS // 2
    for rank_result in two_ranks:
        for resumed, original in zip(rank_result[name]["resumed"], rank_result[name]["path"][half:]):
            assert torch.equal(resumed, original)


def test_unsaid_mode_drifts_and_warns(two_ranks):
    """What distributed='replicated' prevents: replicas seeded per rank drift apart, and the
    sampler says so at its first step."""
    paths = [rank_result["unsaid"]["path"][-1] for rank_result in two_ranks]
    assert (paths[0] - paths[1]).abs().max() > 1e-3
    for rank_result in two_ranks:
        assert any("distributed='replicated'" in text for text in rank_result["unsaid"]["warnings"])
        assert not any("distributed=" in text for text in rank_result["independent_warnings"])


def test_replicas_that_differ_are_refused(two_ranks):
    for rank_result in two_ranks:
        assert "replicas of the chain differ" in rank_result["mismatch"] and "rank 1" in rank_result["mismatch"]


@pytest.fixture(scope="module")
def zero(two_ranks):
    return [rank_result["zero"] for rank_result in two_ranks]


def test_zero_redundancy_keeps_replicas_identical(zero):
    for mine, theirs in zip(zero[0]["path"], zero[1]["path"]):
        assert torch.equal(mine, theirs)
    assert (zero[0]["path"][-1] - zero[0]["path"][0]).abs().max() > 1e-3


def test_zero_redundancy_draws_independent_noise_per_shard(zero):
    """Each rank draws its share's noise from streams of its own: two same-shaped parameters
    owned by two ranks seeded alike get different noise (sharded), the same without it."""
    a, b = zero[0]["pair_sharded"]
    assert not torch.equal(a, b)
    assert abs(float(torch.corrcoef(torch.stack([a, b]))[0, 1])) < 0.5
    a, b = zero[0]["pair_None"]
    assert torch.equal(a, b)


def test_zero_redundancy_resumes_exactly_per_rank(zero):
    half = ranks.STEPS // 2
    for rank_result in zero:
        assert rank_result["steps"] == ranks.STEPS
        for resumed, original in zip(rank_result["resumed"], rank_result["path"][half:]):
            assert torch.equal(resumed, original)


def test_zero_redundancy_refuses_a_step_on_every_rank(zero):
    """A NaN in one rank's share: that rank refuses (naming the parameter), the others refuse
    with it instead of waiting in ZeRO's broadcast; nothing moves, and the chain goes on."""
    assert "holds NaN or Inf" in zero[0]["refused"]["error"]
    assert "another process refused" in zero[1]["refused"]["error"]
    for rank_result in zero:
        assert rank_result["refused"]["unmoved"]
    assert torch.equal(zero[0]["refused"]["after"], zero[1]["refused"]["after"])


def test_zero_redundancy_consolidated_state_warns(zero):
    for rank_result in zero:
        assert any("sharded_state_dict" in text for text in rank_result["consolidated_warnings"])


def test_options_need_an_initialized_group():
    from pyro_sgmcmc.samplers import SGLD

    theta = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid distributed: .*init_process_group"):
        SGLD([theta], lr=1e-3, distributed="replicated")
    with pytest.raises(ValueError, match="Invalid distributed: 'zero'"):
        SGLD([theta], lr=1e-3, distributed="zero")
    with pytest.raises(TypeError, match="Invalid process_group"):
        SGLD([theta], lr=1e-3, distributed="replicated", process_group="world")


def test_kernel_refuses_parallel_chains_and_takes_independent():
    import pyro_sgmcmc.infer
    from pyro_sgmcmc.infer import MCMC

    def model():
        import pyro
        import pyro.distributions as pdist

        pyro.sample("w", pdist.Normal(0.0, 1.0))

    kernel = pyro_sgmcmc.infer.SGLD(model, distributed="replicated")
    with pytest.raises(ValueError, match="Invalid num_chains: 2"), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # pyro's: more chains than CPUs
        MCMC(kernel, num_samples=2, num_chains=2)
    kernel._made_in = -1  # as in a child process of pyro's parallel chains
    with pytest.raises(ValueError, match="Invalid num_chains"):
        kernel.setup(0)
    kernel = pyro_sgmcmc.infer.SGLD(model, distributed="independent", step_size=1e-2, adapt_step_size=False)
    mcmc = MCMC(kernel, num_samples=2, warmup_steps=0, disable_progbar=True)
    mcmc.run()
    assert kernel._sampler.distributed == "independent"


def in_float64(fn):
    """``fn()`` with float64 as torch's default dtype (as in the ranks)."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        return fn()
    finally:
        torch.set_default_dtype(default)


@pytest.fixture(scope="module")
def kernels(two_ranks):
    return [rank_result["kernels"] for rank_result in two_ranks]


def test_kernel_on_sharded_data_is_the_one_process_chain(kernels):
    """The SGLD kernel with each rank's shard (its likelihood scaled by 2): the chain is the
    one-process chain on all the data, up to the order in which the ranks' potentials add."""
    single = in_float64(ranks.kernel_chain)
    assert torch.equal(kernels[0]["exact"], kernels[1]["exact"])
    assert (kernels[0]["exact"] - single).abs().max() < WORLD_SIZE_TOLERANCE
    assert (single[-1] - single[0]).abs().max() > 1e-3


def test_kernel_on_sharded_minibatches_keeps_ranks_identical(kernels):
    """Minibatches of each rank's shard and warmup's adaptation: every rank holds the same
    samples (the kernel compares the ranks' chains after each sample)."""
    assert torch.equal(kernels[0]["minibatch"], kernels[1]["minibatch"])
    assert bool(torch.isfinite(kernels[0]["minibatch"]).all())


def test_kernel_curvature_on_sharded_minibatches_is_the_one_process_one(kernels):
    """The Hessian-vector product the kernel's warmup uses, on 2 ranks' shards (each likelihood
    scaled by 2), is the one-process one: the ranks' products are averaged, not summed (which
    would double the likelihood's part)."""
    _, single = in_float64(lambda: ranks.kernel_chain(batch=8, adapt=True, with_kernel=True))
    expected = in_float64(lambda: ranks.curvature(single))
    for rank_result in kernels:
        assert (rank_result["curvature"] - expected).abs().max() < WORLD_SIZE_TOLERANCE * expected.abs().max()


def test_kernel_probes_are_the_same_on_ranks_with_uneven_shards(kernels):
    """A diagonal mass on 20 coordinates (Hutchinson's random probes) over shards of 40 and 24
    rows: the ranks' minibatches draw differently from their global generators, the probes
    (from a generator seeded from rank 0's) do not: one preconditioner, one chain."""
    for rank_result in kernels:
        assert not isinstance(rank_result["uneven_probes"], str), rank_result["uneven_probes"]
    assert torch.equal(kernels[0]["uneven_probes"], kernels[1]["uneven_probes"])
    assert bool(torch.isfinite(kernels[0]["uneven_probes"]).all())


def test_kernel_detects_a_self_subsampling_potential_fn_on_ranks(kernels):
    """A potential_fn drawing its own minibatch of each rank's shard, not said: detected on the
    rank's own potential as in one process (it used to be hidden behind the ranks' average)."""
    for rank_result in kernels:
        found = rank_result["self_subsampled"]
        assert found["inner"] == "SelfSubsampledPotential"
        assert any("stochastic_potential=True" in text for text in found["warnings"])
    assert torch.equal(kernels[0]["self_subsampled"]["samples"], kernels[1]["self_subsampled"]["samples"])


def test_kernel_stops_every_rank_when_one_rank_model_raises(kernels):
    """The model raises on rank 1: rank 1 raises its error, rank 0 a RuntimeError saying so, at
    once (the ranks vote in the potential's all-reduce) rather than at the collectives' timeout."""
    assert kernels[1]["one_rank_raises"].startswith("ValueError: the model of rank 1 failed")
    assert kernels[0]["one_rank_raises"].startswith("RuntimeError: another rank failed")
    for rank_result in kernels:
        seconds = float(rank_result["one_rank_raises"].rsplit(" after ", 1)[1].split()[0])
        assert seconds < ranks.COLLECTIVE_TIMEOUT_S / 2


def test_groups_a_sampler_cannot_span_are_refused(kernels):
    """A process outside the given process_group, and ZeRO over a subgroup (ZeRO keeps its
    process_group: the sampler inside spans the default group), are refused with a ValueError."""
    assert kernels[0]["groups"]["outside"] == "no error"
    assert "Invalid process_group: this process (global rank 1) is not in it" in kernels[1]["groups"]["outside"]
    for rank_result in kernels:
        assert "ZeRO over a subgroup is not supported" in rank_result["groups"]["zero_subgroup"]


def test_svi_on_sharded_data_is_the_one_process_chain(kernels):
    """SVI with pyro_sgmcmc.optim.SGLD(distributed='replicated'), each rank on its shard: the
    gradients averaged over the ranks; the one-process chain. Guides that start apart are refused."""
    single = in_float64(ranks.svi_chain)
    assert torch.equal(kernels[0]["svi"], kernels[1]["svi"])
    assert (kernels[0]["svi"] - single).abs().max() < WORLD_SIZE_TOLERANCE
    assert (single[-1] - single[0]).abs().max() > 1e-3
    for rank_result in kernels:
        assert "replicas of the chain differ" in rank_result["svi_apart"]


FSDP2_REFUSED = """
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from pyro_sgmcmc.samplers import SAMPLERS
dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
try:
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 1))
    fully_shard(model, mesh=init_device_mesh("cpu", (1,)))
    for name, sampler in SAMPLERS.items():
        try:
            sampler(model.parameters(), lr=1e-3)
        except ValueError as error:
            print(name, error)
        else:
            print(name, "accepted")
finally:
    dist.destroy_process_group()
"""


def test_fsdp2_parameters_are_refused_at_construction():
    """FSDP2's ``fully_shard`` (DTensor parameters) on a 1-rank gloo group, in a process of its
    own (the group must not outlive the test); ``torch.distributed.fsdp.fully_shard`` is public
    from torch 2.6."""
    import subprocess
    import sys

    pytest.importorskip("torch.distributed.fsdp", reason="no torch.distributed")
    import torch.distributed.fsdp as fsdp

    if not hasattr(fsdp, "fully_shard"):
        pytest.skip(f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (torch >= 2.6)")

    result = subprocess.run([sys.executable, "-c", FSDP2_REFUSED], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    from pyro_sgmcmc.samplers import SAMPLERS

    lines = result.stdout.strip().splitlines()
    assert len(lines) == len(SAMPLERS), result.stdout
    for line in lines:
        assert ("Invalid params: parameter 0 of param_groups[0] is a DTensor: DTensor parameters are not supported "
                "(FSDP2, tensor parallelism)") in line, line
        assert "distributed='replicated'" in line, line


@pytest.mark.parametrize("marked", ["flattened", "FlatParameter"])
def test_fsdp1_parameters_are_refused_by_fsdps_own_marks(marked):
    """FSDP1 needs an accelerator, so its marks are set by hand here: the ``FlatParameter`` it
    hands the optimizer, or ``_fsdp_flattened`` on the original parameters it views
    (``use_orig_params=True``)."""
    from pyro_sgmcmc.samplers import SGLD

    if marked == "flattened":
        p = torch.nn.Parameter(torch.zeros(3))
        p._fsdp_flattened = True
    else:
        FlatParameter = type("FlatParameter", (torch.nn.Parameter,), {})
        p = FlatParameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"parameter 1 of param_groups\[0\] is a parameter flattened by FSDP "
                       r"\(FullyShardedDataParallel\): FSDP is not supported"):
        SGLD([torch.nn.Parameter(torch.zeros(2)), p], lr=1e-3)


@pytest.mark.parametrize("found", ["public", "private", "none"])
def test_fsdp_dtensor_class_is_found_on_every_supported_torch(monkeypatch, found):
    """DTensor is public (torch.distributed.tensor) from torch 2.5 only, private
    (torch.distributed._tensor) before, and absent without torch.distributed: the refusal looks
    in both and treats a torch without it as having no DTensor parameters."""
    import builtins

    from pyro_sgmcmc.samplers import SGLD
    from pyro_sgmcmc.samplers.base import _dtensor_class

    real_import = builtins.__import__
    missing = {"public": (), "private": ("torch.distributed.tensor",),
               "none": ("torch.distributed.tensor", "torch.distributed._tensor")}[found]

    def fake_import(name, globals=None, *args, **kwargs):  # only ours fails: torch's own shims import the public one
        if name in missing and (globals or {}).get("__name__") == "pyro_sgmcmc.samplers.base":
            raise ImportError(f"No module named {name!r}")
        return real_import(name, globals, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    cls = _dtensor_class()
    if found == "none":
        assert cls is None
    else:
        assert cls is not None and cls.__name__ == "DTensor"
    SGLD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3).zero_grad()  # plain parameters are accepted either way
