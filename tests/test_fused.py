"""The ``fused`` switch of SGLD on a machine without a GPU: validated at construction, refused
clearly where the fused step cannot run, the default path untouched; and the kernel's own tests
(``tests/test_fused_kernel.py``) run on the CPU in Triton's interpreter where Triton is installed."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import pyro_sgmcmc.functional._fused as fused_module
from pyro_sgmcmc.functional import sgld
from pyro_sgmcmc.samplers import SGLD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def param(*shape):
    return torch.nn.Parameter(torch.randn(*shape))


@pytest.mark.parametrize("value", ["yes", 1, 0.0, torch.tensor(True)])
def test_fused_is_checked(value):
    with pytest.raises(ValueError, match=r"Invalid fused: .* \(must be one of None, True, False\)"):
        SGLD([param(3)], lr=0.1, fused=value)


@pytest.mark.parametrize("option", [dict(foreach=True), dict(diagnostics=True), dict(diagnostics="mala"),
                                    dict(noise_ahead=True)])
def test_fused_refuses_what_it_does_not_do(option):
    (name, value), = option.items()
    with pytest.raises(ValueError, match=rf"Invalid fused: True with {name}={value!r} .*use fused=None"):
        SGLD([param(3)], lr=0.1, fused=True, **option)
    with pytest.raises(ValueError, match=rf"Invalid {name}: 'yes' \(must be one of"):  # its own check comes first
        SGLD([param(3)], lr=0.1, fused=True, **{name: "yes"})


def test_fused_refuses_cpu_parameters_naming_the_group_and_the_device(monkeypatch):
    monkeypatch.setattr(fused_module, "triton_installed", lambda: True)
    monkeypatch.setattr(fused_module, "triton_version", lambda: "3.1.0")
    monkeypatch.setattr(fused_module, "interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"Invalid fused: True \(in param_groups\[0\], parameter 0 is on cpu, the "
                                         r"fused step runs on CUDA devices; use fused=None\)"):
        SGLD([param(3), param(2)], lr=0.1, fused=True)
    monkeypatch.setattr(fused_module, "triton_installed", lambda: False)
    with pytest.raises(ValueError, match=r"Invalid fused: True \(in param_groups\[0\], Triton is not installed"):
        SGLD([param(3)], lr=0.1, fused=True)
    with torch.no_grad(), pytest.raises(ValueError, match=r"Invalid fused: True \(Triton is not installed"):
        sgld([param(3)], [torch.zeros(3)], lr=0.1, fused=True)
    with pytest.raises(ValueError, match=r"Invalid fused: True for a differentiable step"):
        sgld([param(3)], [torch.zeros(3)], lr=0.1, fused=True)


@pytest.mark.parametrize("version", ["2.3.1", "2.1.0+git1a2b3c"])
def test_fused_refuses_a_triton_older_than_the_kernel_needs(monkeypatch, version):
    monkeypatch.setattr(fused_module, "triton_installed", lambda: True)
    monkeypatch.setattr(fused_module, "triton_version", lambda: version)
    with pytest.raises(ValueError, match=rf"Invalid fused: True \(in param_groups\[0\], Triton {re.escape(version)} is "
                                         r"installed, the fused step needs Triton >= 3.0; use fused=None\)"):
        SGLD([param(3)], lr=0.1, fused=True)
    assert fused_module._release("3.0.0rc1") >= fused_module.MIN_TRITON > fused_module._release(version)


#: the chain below on main at 460b079, before the fused step existed (PYTHONPATH=<main checkout>)
MAIN_CHAIN = [
    [-0.5080224275588989, -1.3161872625350952, 0.10776828229427338, 0.46359434723854065, 0.1698809713125229,
     -1.0536165237426758, 0.3538288176059723, 1.4789339303970337, 0.4368850290775299, -0.15632480382919312,
     1.1835347414016724, -0.18302713334560394, 1.7361278533935547, 1.9116259813308716, 1.3306819200515747,
     -0.9197602272033691, 0.789875864982605, 1.1305372714996338, 1.813006043434143, -0.6596534848213196],
    [-0.8899942636489868, -1.0911332368850708, 0.03993988782167435],
]


@pytest.mark.parametrize("fused", [None, False])
def test_fused_false_is_the_default_step_bit_for_bit(fused):
    """Both are the eager step of before the fused one, bit for bit (values stored from main)."""
    torch.manual_seed(0)
    ps = [param(5, 4), param(3)]
    sampler = SGLD(ps, lr=0.05, weight_decay=0.1, fused=fused)
    for _ in range(3):
        for p in ps:
            p.grad = p.detach() * 2
        sampler.step()
    for p, stored in zip(ps, MAIN_CHAIN):
        assert torch.equal(p.detach().reshape(-1), torch.tensor(stored, dtype=torch.float32))


@pytest.mark.skipif(not fused_module.triton_installed(), reason="Triton is not installed")
def test_the_kernel_tests_pass_in_tritons_interpreter():
    """Triton's interpreter runs the kernel with NumPy on CPU tensors; it must be chosen before
    Triton is imported, hence a process of its own."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             os.path.join(ROOT, "tests", "test_fused_kernel.py")],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout.splitlines()[-1], result.stdout[-500:]


@pytest.mark.skipif(not fused_module.triton_installed() or fused_module.interpreting(),
                    reason="needs Triton, not in its interpreter")
@pytest.mark.parametrize("dtype, flags", [
    ("float32", dict(SCALE=False, DECAY=False, LOCALIZE=False, NOISE=True, MASK=False, BOXED=False, ALIGNED=True)),
    ("float32", dict(SCALE=True, DECAY=True, LOCALIZE=True, NOISE=True, MASK=True, BOXED=True, ALIGNED=False)),
    ("bfloat16", dict(SCALE=True, DECAY=False, LOCALIZE=False, NOISE=True, MASK=True, BOXED=False, ALIGNED=True)),
    ("float64", dict(SCALE=False, DECAY=True, LOCALIZE=False, NOISE=True, MASK=False, BOXED=True, ALIGNED=True)),
])
def test_the_kernel_compiles_for_a_gpu(dtype, flags):
    """Compiled for an H100/H200 (sm_90) without one, by Triton's own compiler and ptxas: what the
    interpreter does not check (types, the pointer casts, the constexpr branches); and whole,
    aligned blocks move 16 bytes per load and store."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from pyro_sgmcmc.functional._triton import BLOCK, NUM_WARPS, sgld_kernel

    signature = {"table": "*i64", "blocks": "*i64", "numels": "*i64", "counters": "*i64", "seed_ptr": "*i64",
                 "scalars": "*fp64", "num_tensors": "i32", "stream": "i32"}
    constants = dict(DTYPE=getattr(tl, dtype), COMPUTE=tl.float64 if dtype == "float64" else tl.float32, BLOCK=BLOCK,
                     **flags)
    source = ASTSource(sgld_kernel, {**signature, **{name: "constexpr" for name in constants}}, constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": NUM_WARPS})
    ptx = compiled.asm["ptx"]
    assert ("ld.global.v" in ptx and "st.global.v" in ptx) == flags["ALIGNED"]  # v4.b32, v2.b64...
