"""The fused SGLD step on a GPU: its tests, then the time of one step at 10^8 float32 parameters
against torch's SGD, in one interleaved run.

    python benchmarks/gpu_step.py             # tests on the GPU, then 10^8 parameters
    python benchmarks/gpu_step.py --quick     # fewer rounds, for a smoke run

Without a CUDA device it says so and exits 0 (the kernel's tests then run on the CPU in Triton's
interpreter: ``TRITON_INTERPRET=1 python -m pytest tests/test_fused_kernel.py``).

The tests are ``tests/test_fused_kernel.py`` (the noise's mean, variance and tails, independence
across steps, entries and tensors, reproducibility from the seed, exact resume from
``state_dict``, the drift against the eager step, refusal of non-finite steps), run on the GPU.

Methods, each on its own parameters (``--tensors`` tensors of ``--numel`` entries in all, with
fixed random gradients), timed ``--steps`` steps at a time between two synchronisations, in
rounds of a shuffled order; figures are medians over rounds, ratios are medians of the ratio to
foreach SGD within a round:

* torch SGD foreach        -- ``torch.optim.SGD(foreach=True)``: 12 bytes per parameter;
* torch SGD fused          -- ``torch.optim.SGD(fused=True)``: 12 bytes per parameter;
* ours SGLD eager          -- ``SGLD(...)``: noise drawn by ``normal_`` into 4 MiB chunks, added by
                              foreach ops (the chunk buffers stay in the L2 cache);
* ours SGLD fused          -- ``SGLD(..., fused=True)``: 16 bytes per parameter (the finite check
                              reads the gradients, the kernel reads parameters and gradients and
                              writes parameters), one synchronisation per step (the check's verdict);
* ours fused, no check     -- ``pyro_sgmcmc.functional.sgld(..., fused=True, check_finite=False)``:
                              12 bytes per parameter, no synchronisation (the scalars and the
                              pointer table, when they change, go up by non-blocking copies from
                              pinned memory); what the check costs.

The issue's goal is an SGLD step at most 1.05x foreach SGD; the fused step with its check moves
16/12 = 1.33x SGD's bytes, so at the bandwidth limit it is about 1.33x (see
``pyro_sgmcmc.functional._fused``); the unchecked one shows how close the kernel itself comes.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys

import torch

from _rounds import interleaved, prepare, timing_parser
from pyro_sgmcmc.functional import NoisePlanCache, NoiseSource, sgld
from pyro_sgmcmc.samplers import SGLD

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 1e-8


def run_tests() -> bool:
    print("tests/test_fused_kernel.py on the GPU:", flush=True)
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             os.path.join(ROOT, "tests", "test_fused_kernel.py")], cwd=ROOT)
    return result.returncode == 0


def model(numel: int, tensors: int, device: torch.device) -> list[torch.nn.Parameter]:
    sizes = [numel // tensors + (i < numel % tensors) for i in range(tensors)]
    return [torch.nn.Parameter(torch.randn(n, device=device)) for n in sizes]


def methods(numel: int, tensors: int, device: torch.device, steps: int) -> dict:
    """name -> a callable running ``steps`` steps of the method and synchronising."""
    grads = [g.detach() for g in model(numel, tensors, device)]

    def with_grads(ps: list[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
        for p, g in zip(ps, grads):
            p.grad = g
        return ps

    def timed(step) -> callable:
        def run() -> None:
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)

        return run

    out = {}
    sgd = torch.optim.SGD(with_grads(model(numel, tensors, device)), lr=LR, foreach=True)
    out["torch SGD foreach"] = timed(sgd.step)
    sgd_fused = torch.optim.SGD(with_grads(model(numel, tensors, device)), lr=LR, fused=True)
    out["torch SGD fused"] = timed(sgd_fused.step)
    eager = SGLD(with_grads(model(numel, tensors, device)), lr=LR)
    out["ours SGLD eager"] = timed(eager.step)
    fused = SGLD(with_grads(model(numel, tensors, device)), lr=LR, fused=True)
    out["ours SGLD fused"] = timed(fused.step)
    bare = model(numel, tensors, device)
    noise, plans = NoiseSource(), NoisePlanCache()

    def unchecked() -> None:
        with torch.no_grad():
            sgld(bare, grads, lr=LR, fused=True, check_finite=False, noise=noise, noise_plans=plans,
                 grads_checked=True)

    out["ours fused, no check"] = timed(unchecked)
    return out


def main() -> None:
    parser = timing_parser(__doc__)
    parser.add_argument("--numel", type=float, default=1e8, help="parameters in all (float32)")
    parser.add_argument("--tensors", type=int, default=16, help="how many tensors they are split into")
    parser.add_argument("--steps", type=int, default=10, help="steps between two synchronisations")
    parser.add_argument("--no-tests", action="store_true", help="time only")
    parser.add_argument("--device", default="cuda",
                        help="cpu: a smoke run of this script in Triton's interpreter (TRITON_INTERPRET=1), not a "
                             "measurement")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: nothing to time here (the fused step runs on CUDA; its tests run on the CPU in "
              "Triton's interpreter: TRITON_INTERPRET=1 python -m pytest tests/test_fused_kernel.py)")
        return
    prepare(args)
    tests_ok = True if args.no_tests else run_tests()
    numel = int(args.numel)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)
    print(f"\n{name}, torch {torch.__version__}; {numel:.3g} float32 parameters in "
          f"{args.tensors} tensors, {args.steps} steps per timing", flush=True)
    runs = methods(numel, args.tensors, device, args.steps)
    for run in runs.values():  # compile, allocate, warm up
        run()
    rounds = 3 if args.quick else 15
    times = interleaved(runs, rounds, 1)
    base = times["torch SGD foreach"]
    for name, values in times.items():
        per_step = statistics.median(values) / args.steps
        ratio = statistics.median(v / b for v, b in zip(values, base))
        print(f"{name:24s} {per_step * 1e3:8.3f} ms/step  {ratio:5.2f}x foreach SGD  "
              f"({12 * numel / per_step / 1e9:6.0f} GB/s at 12 bytes per parameter)")
    if not tests_ok:
        print("\nthe fused step's tests FAILED (above)")
        sys.exit(1)


if __name__ == "__main__":
    main()
