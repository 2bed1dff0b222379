"""LLC estimates side by side with devinterp, in one run: accuracy, error bar and wall time.

    python benchmarks/llc.py                          # every case (about 18 min of CPU, one thread)
    python benchmarks/llc.py --cases polynomial rrr   # some of them
    python benchmarks/llc.py --quick                  # fewer draws, for a smoke run
    python benchmarks/llc.py --cases mlp-same-step    # the MLP, ours at devinterp's step (like for like)
    python benchmarks/llc.py --cases mlp-relaxed      # the MLP, both relaxed, one chain each
    python benchmarks/llc.py --cases mlp-steps        # the MLP, one chain at a large then a small step
    python benchmarks/llc.py --cases mlp-arrival --mlp-lr 1.58e-6 --mlp-chains 4  # from w*: when the loss arrives
    python benchmarks/llc.py --cases mlp-relaxed --mlp-chains 8 --device cuda  # the MLP on a GPU
    python benchmarks/llc.py --cases mlp-relaxed --mlp-chains 8 --devinterp-chains 2 --device cuda  # devinterp's time from 2
    python benchmarks/llc.py --cases rrr --reference  # with a long run's finite-n beta value for each
    python benchmarks/llc.py --cases rrr --repeats 5  # each case five times, other seeds: mean error bars
    python benchmarks/llc.py --cases rrr --rrr-ours-chains 12  # ours with 12 batched chains, devinterp its 3

Cases:

* ``polynomial`` -- devinterp's accuracy test (``tests/slt/sampler_accuracy_test.py``):
  ``f(x) = x * prod_i w_i^p_i`` at ``w* = 0``, ``x ~ N(0, 2^2)``, ``y ~ N(0, 0.25^2)``, ``n = 1000``, full
  batches, with a localizer; the true learning coefficient is ``1 / (2 max_i p_i)``. Since both
  samplers target the same finite-``n beta`` law, its exact expectation (2-d quadrature) is shown
  too: the gap between it and the true coefficient is the asymptotics, not the sampler.
* ``rrr`` -- devinterp's reduced-rank regression test (``tests/slt/rrr_test.py``): ``x ~ N(0, I_M)``,
  ``y ~ N(0, I_N)`` independent of it, ``n = 1000``, a rank-``H`` linear network trained by Adam (5000
  steps), localization 1, ``n beta = n / log n``; the true coefficient from Aoyagi & Watanabe (2005).
* ``mlp`` -- a 784-1024-256-10 network (1,068,810 parameters) trained on 10,000 rows labelled by a
  random teacher network, cross-entropy, minibatches of 256, ``n beta = n / log n``, localization
  100. No exact answer; devinterp's step is 1e-5 (1e-4, common in its examples, is unstable here:
  the largest curvature of ``n beta L`` at ``w*`` is about 4.5e4, and SGLD diverges above ``4 / 4.5e4``).
* ``mlp-same-step`` -- the same, ours run as devinterp runs: its step, no burn-in, no control
  variates, so that the estimates and times compare like for like.
* ``mlp-relaxed`` -- the same, one chain each (``--mlp-chains``), relaxed: ours with ``num_burnin=--mlp-burnin``
  (1500: the relaxation its default run's warning names at the pilots' step; its step is chosen
  again at the burn-in's end where the chains have gone, and the burn-in runs on at the new step
  until the loss stops drifting), devinterp at the step ours ended with, given
  ``3 / (lr * localization)`` more steps that its estimate leaves out (the relaxation from
  ``w*`` at that step).
* ``mlp-arrival`` -- ours' SGLD at the fixed step ``--mlp-lr`` from ``w*``, as devinterp's chain runs
  (no burn-in, no control variates), ``--mlp-chains`` chains of ``--arrival-steps`` steps: the mean
  of ``n beta (L_B - L_n(w*))`` over windows of 500 steps, and the first window from which every
  later one is within 1% (2%) of the last quarter's mean: the burn-in a chain started at ``w*`` needs at
  that step, which devinterp's relaxed run is given as ``3 / (lr * localization)`` in ``mlp-relaxed``.
* ``mlp-steps`` -- one SGLD chain (``pyro_sgmcmc.samplers.SGLD``, plain minibatch gradients) at
  step 2.26e-5 for 1500 steps, then 6000 at 2.26e-6: the mean of ``n beta (L_B - L_n(w*))`` over
  windows of 250 steps shows how much of the estimate at the larger step was its heat.

devinterp is run as its 2.x sampler loop runs a chain (``devinterp.slt.sampler.sample_single_chain``
with ``SGMCMC.sgld``, the default method), each chain after the other, with the settings of its
tests: learning rates 2e-4 (polynomial) and 6e-4 (rrr: the test's older value; the newer 6e-5
underestimates by 21-36% in 2000 draws), the same ``n beta`` and localization as ours, and its init
loss as it computes it (the mean over 32 batches). Its estimate is computed as ``compute_llc`` does
(every step averaged; these tests have no burn-in); its error bar is the Monte Carlo standard
error of its loss trace computed by our code (its own ``llc_std`` is the spread of per-chain
values, shown in brackets, ours' too). Ours: ``pyro_sgmcmc.slt.estimate_llc`` with nothing tuned (step size
from the target bias 0.02, ``sampler="auto"``: SGLD pilots, then BAOAB where it relaxes faster;
``--sampler sgld`` for SGLD throughout), the same number of chains and draws, its adaptation and
burn-in included in its time. "speed-up" is devinterp's time over ours for the same draws; "at equal
error" scales it by the ratio of the squared standard errors (the time each would need for the
same error bar, both unbiased and past their burn-in). One run's standard errors are themselves
estimates (from 3 chains on reduced-rank regression, off by 10-20% each), and the ratio of their
squares more so: ``--repeats K`` runs each case K times with other seeds (both samplers) and
reports the mean estimate, the spread of the K estimates (which the mean standard error should
match), mean times, and the ratio at equal error from the mean squared standard errors and the
mean times. Times are wall-clock, in one process, one thread (on a shared machine, two
threads contended for the cores and made every time 2-30x noisier; --threads changes it).
``--device cuda`` runs the MLP cases' network and both samplers on that device (ours' chains
batched in one call, devinterp's one after the other, as on the CPU); ours' ``TensorDataset`` holds
the rows on the device (estimate_llc indexes them there), devinterp's loader reads them a row at a
time from host memory, as its loop expects (it moves each batch's inputs to the device; a row read
on the device would be a device operation a row). ``--devinterp-chains K`` runs K of devinterp's
chains and scales its time to ``--mlp-chains`` (they run one after the other, each the same number
of steps); its estimate and error bar are then its K chains'.
"""

from __future__ import annotations

import argparse
import math
import os
import time
import warnings

os.environ.setdefault("TQDM_DISABLE", "1")  # devinterp's per-chain progress bars

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

from pyro_sgmcmc.slt import estimate_llc
from pyro_sgmcmc.slt._stats import chain_mean

# --------------------------------------------------------------------------------- devinterp


class _Rows(Dataset):
    """Rows as devinterp's loop reads them: dicts with an ``input_ids`` entry (moved to the device)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.x[i], "target": self.y[i]}


def devinterp_data(x, y, loss_fn):
    """devinterp's data set and ``evaluate`` for ``(x, y)``: its loader reads a row at a time, from
    host memory; its loop moves each batch's inputs to the model's device, ``evaluate`` the targets."""

    def evaluate(m, data):
        device = next(m.parameters()).device
        return loss_fn(m(data["input_ids"].to(device)), data["target"].to(device)), {}

    return _Rows(x.cpu(), y.cpu()), evaluate


def run_devinterp(model, x, y, loss_fn, *, lr, nbeta, localization, num_chains, num_draws, batch_size, seed=100,
                  burn_in=0, device="cpu"):
    """devinterp's own chain loop; returns (estimate, standard error, spread of chain values,
    seconds, the standard error's sources). ``burn_in``: leading steps of each chain's ``num_draws``
    left out of the estimate (devinterp 2.x averages every step; its time includes them)."""
    from devinterp.optim import SGMCMC
    from devinterp.slt.sampler import sample_single_chain

    dataset, evaluate = devinterp_data(x, y, loss_fn)

    start = time.perf_counter()
    # init loss as devinterp computes it: the mean loss over 32 batches of a shuffled loader
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator, drop_last=True)
    losses, batches = [], iter(loader)
    with torch.no_grad():
        while len(losses) < 32:
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            losses.append(float(evaluate(model, batch)[0]))
    init_loss = sum(losses) / len(losses)
    traces = [[] for _ in range(num_chains)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for chain in range(num_chains):
            chain_start = time.perf_counter()
            sample_single_chain(
                model, dataset, evaluate, {name: None for name, _ in model.named_parameters()}, num_draws=num_draws,
                sampling_method=SGMCMC.sgld,
                sampling_method_kwargs=dict(lr=lr, nbeta=nbeta, localization=localization),
                chain=chain, seed=seed + chain, dataloader_seed=seed + chain, batch_size=batch_size, device=device,
                micro_callback=lambda loss, chain, **_: traces[chain].append(float(loss.mean())))
            value = nbeta * (sum(traces[chain][burn_in:]) / max(len(traces[chain]) - burn_in, 1) - init_loss)
            print(f"devinterp chain {chain}: {time.perf_counter() - chain_start:.1f} s, {len(traces[chain])} steps, "
                  f"lambda-hat {value:.4g}", flush=True)
    seconds = time.perf_counter() - start
    trace = torch.tensor(traces, dtype=torch.float64)[:, burn_in:]
    per_chain = nbeta * (trace.mean(1) - init_loss)
    summary = chain_mean(trace)
    spread = float(per_chain.std()) if num_chains > 1 else math.nan
    return (nbeta * (summary.mean - init_loss), nbeta * summary.std_error, spread, seconds,
            _error_sources(nbeta * summary.autocorrelation_std_error, nbeta * summary.spread_std_error,
                           summary.spread_p))


def _error_sources(autocorrelation: float, spread: float, p: float) -> str:
    """The standard error's two estimates (``ChainMean``), in units of lambda, and the spread's p-value."""
    return (f"standard error from the autocorrelation {autocorrelation:.3g}, from the chains' spread {spread:.3g} "
            f"(p = {p:.2g})")


def run_ours(model, x, y, loss_fn, *, nbeta, localization, num_chains, num_draws, batch_size, target_bias=0.02,
             **options):
    """``estimate_llc`` with nothing tuned but the sampler (``--sampler``; ``options``: what a
    like-for-like run fixes instead)."""
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
    start = time.perf_counter()
    result = estimate_llc(model, loader, loss_fn, nbeta=nbeta, localization=localization, num_chains=num_chains,
                          num_draws=num_draws, target_bias=target_bias, progress_bar=False,
                          **{"sampler": SAMPLER[0], **options})
    return result, time.perf_counter() - start


#: ours' chain, from --sampler
SAMPLER = ["auto"]

# ------------------------------------------------------------------------------------- cases


class Polynomial(torch.nn.Module):
    """devinterp's test model: ``x * prod_i w_i^p_i``."""

    def __init__(self, powers):
        super().__init__()
        self.powers = torch.tensor(powers, dtype=torch.float32)
        self.weights = torch.nn.Parameter(torch.zeros(len(powers)))

    def forward(self, x):
        return x * torch.prod(self.weights**self.powers)


def polynomial_exact(powers, x, y, nbeta, localization, grid=4001):
    """E[n beta (L_n(w) - L_n(0))] under exp(-n beta L_n(w) - localization |w|^2 / 2), by quadrature
    (L_n is a polynomial in P = prod w^p: S_xx P^2 - 2 S_xy P + S_yy)."""
    x, y = x.double(), y.double()
    sxx, sxy = float((x * x).mean()), float((x * y).mean())
    radius = 8 / math.sqrt(localization)
    w = torch.linspace(-radius, radius, grid, dtype=torch.float64)
    w1, w2 = torch.meshgrid(w, w, indexing="ij")
    p = w1 ** powers[0] * w2 ** powers[1]
    excess = sxx * p**2 - 2 * sxy * p  # L_n(w) - L_n(0)
    log_weight = -nbeta * excess - localization * (w1**2 + w2**2) / 2
    weight = torch.exp(log_weight - log_weight.max())
    return float((nbeta * excess * weight).sum() / weight.sum())


def _seeds(repeat: int) -> int:
    """devinterp's seed for a repeat (its chains take seed + chain); ours' global seed is set to
    ``1000 + repeat`` before its run."""
    torch.manual_seed(1000 + repeat)
    return 100 + 1000 * repeat


def polynomial_case(powers, args, repeat=0):
    torch.manual_seed(42)
    n = 1000
    x = torch.normal(0.0, 2.0, size=(n,))
    y = 0.25 * torch.normal(0.0, 1.0, size=(n,))
    nbeta, localization = n / math.log(n), 1.0
    exact = polynomial_exact(powers, x, y, nbeta, localization)
    true = 1 / (2 * max(powers))
    loss = torch.nn.functional.mse_loss
    chains, draws = (4, 1000) if args.quick else (10, 5000)  # devinterp's test: 10 x 5000
    seed = _seeds(repeat)
    ours, ours_time = run_ours(Polynomial(powers), x, y, loss, nbeta=nbeta, localization=localization,
                               num_chains=chains, num_draws=draws, batch_size=n)
    theirs = run_devinterp(Polynomial(powers), x, y, loss, lr=2e-4, nbeta=nbeta, localization=localization,
                           num_chains=chains, num_draws=draws, batch_size=n, seed=seed)
    return f"polynomial {powers}", true, exact, ours, ours_time, theirs


def aoyagi_watanabe(m: int, h: int, n: int) -> float:
    """The learning coefficient of reduced-rank regression (input M, rank H, output N) with true
    rank 0 (Aoyagi & Watanabe 2005), as devinterp's test states it."""
    if m + h < n:
        return m * h / 2
    if n + h < m:
        return h * n / 2
    if m + n < h:
        return m * n / 2
    odd = (m + h + n) % 2
    return (odd + 2 * m * n + 2 * h * n + 2 * m * h - n**2 - m**2 - h**2) / 8


class ReducedRank(torch.nn.Module):
    def __init__(self, m: int, h: int, n: int):
        super().__init__()
        self.fc1 = torch.nn.Linear(m, h, bias=False)
        self.fc2 = torch.nn.Linear(h, n, bias=False)

    def forward(self, x):
        return self.fc2(self.fc1(x))


def rrr_case(shape, args, repeat=0):
    m, h, n_out = shape
    torch.manual_seed(42)
    n = 1000
    x, y = torch.randn(n, m), torch.randn(n, n_out)
    model = ReducedRank(m, h, n_out)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(5000):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    nbeta, localization = n / math.log(n), 1.0
    chains, draws = (3, 500) if args.quick else (3, 2000)  # devinterp's test: 3 x 2000
    loss = torch.nn.functional.mse_loss
    seed = _seeds(repeat)
    ours_chains = args.rrr_ours_chains or chains
    ours, ours_time = run_ours(model, x, y, loss, nbeta=nbeta, localization=localization, num_chains=ours_chains,
                               num_draws=draws, batch_size=n)
    theirs = run_devinterp(model, x, y, loss, lr=6e-4, nbeta=nbeta, localization=localization, num_chains=chains,
                           num_draws=draws, batch_size=n, seed=seed)
    reference = None
    if args.reference and repeat == 0:  # the finite-n beta value both target, to within its printed standard error
        long, _ = run_ours(model, x, y, loss, nbeta=nbeta, localization=localization, num_chains=8, num_draws=20000,
                           batch_size=n, sampler="baoab", step_size=0.008, friction=4.0, num_burnin=3000)
        print(f"rrr {shape}: reference {long.llc:.3f} ± {long.std_error:.3f} (BAOAB, h = 0.008, 8 x 20000 draws)")
        reference = long.llc
    label = f" ours x{ours_chains}" if ours_chains != chains else ""
    return f"rrr (M,H,N)={shape}{label}", aoyagi_watanabe(m, h, n_out), reference, ours, ours_time, theirs


def mlp_setup(args):
    """The trained MLP, its data, loss, ``n beta`` and localization."""
    torch.manual_seed(0)
    n, width = 10_000, (784, 1024, 256, 10)

    def network():
        layers = []
        for a, b in zip(width[:-1], width[1:]):
            layers += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers[:-1])

    teacher, model = network(), network()
    x = torch.randn(n, width[0])
    with torch.no_grad():
        y = teacher(x).argmax(1)
    loss = torch.nn.functional.cross_entropy
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = DataLoader(TensorDataset(x, y), batch_size=256, shuffle=True)
    for _ in range(3 if args.quick else 10):
        for xb, yb in loader:
            optimizer.zero_grad()
            loss(model(xb), yb).backward()
            optimizer.step()
    device = torch.device(args.device)
    return model.to(device), x.to(device), y.to(device), loss, n / math.log(n), 100.0


def mlp_case(args, same_step=False, relaxed=False):
    """``same_step``: ours as devinterp runs, for a like-for-like time and estimate: its step
    (``--mlp-lr``), no burn-in, no control variates (a plain minibatch gradient and loss).
    ``relaxed``: ``--mlp-chains`` chains each; ours with ``num_burnin=--mlp-burnin``, devinterp at the step ours
    ended with and ``3 / (lr * localization)`` more steps left out of its estimate (the burn-in
    after which every direction is within 5% of its stationary variance)."""
    model, x, y, loss, nbeta, localization = mlp_setup(args)
    chains, draws = (2, 100) if args.quick else (4, 500)
    options = dict(step_size=args.mlp_lr, num_burnin=0, control_variates=False) if same_step else {}
    if relaxed:
        chains, options = args.mlp_chains, dict(num_burnin=args.mlp_burnin)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ours, ours_time = run_ours(model, x, y, loss, nbeta=nbeta, localization=localization, num_chains=chains,
                                   num_draws=draws, batch_size=256, **options)
    for warning in caught:
        print(f"ours ({'devinterp step' if same_step else 'default'}) warned: {warning.message}")
    print(f"ours: {ours.llc:.4g} +- {ours.std_error:.3g} in {ours_time:.1f} s ({ours.diagnostics.sampler}, "
          f"step {ours.step_size:.3g}, {ours.num_excluded} steps before the draws)", flush=True)
    lr = ours.step_size if relaxed else args.mlp_lr
    burn_in = math.ceil(3 / (lr * localization)) if relaxed else 0
    their_chains = (args.devinterp_chains or chains) if relaxed else chains
    theirs = run_devinterp(model, x, y, loss, lr=lr, nbeta=nbeta, localization=localization,
                           num_chains=their_chains, num_draws=draws + burn_in, batch_size=256, burn_in=burn_in,
                           device=args.device)
    label = ", same step" if same_step else f", relaxed, {chains} chain(s) (devinterp lr {lr:.3g}, burn-in {burn_in})" if relaxed else ""
    if their_chains != chains:  # its chains run one after the other: its time for ours' number of them
        print(f"devinterp ran {their_chains} chains in {theirs[3]:.1f} s; its time below is for {chains}")
        theirs = (*theirs[:3], theirs[3] * chains / their_chains, theirs[4])
        label += f", devinterp's time from {their_chains} chain(s)"
    return f"mlp 1.07M params{label}", None, None, ours, ours_time, theirs


def mlp_arrival(args, window=500):
    """Ours' SGLD from ``w*`` at ``--mlp-lr``, ``--mlp-chains`` chains of ``--arrival-steps`` steps, no
    burn-in: window means of ``n beta (L_B - L_n(w*))`` (over the chains, and each chain's), and the
    first window from which every later one is within 1% (and 2%, the default target bias) of the
    last quarter's mean."""
    model, x, y, loss, nbeta, localization = mlp_setup(args)
    steps = 2000 if args.quick else args.arrival_steps
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # it warns, rightly, that its draws include the relaxation
        result, seconds = run_ours(model, x, y, loss, nbeta=nbeta, localization=localization,
                                   num_chains=args.mlp_chains, num_draws=steps, batch_size=256, step_size=args.mlp_lr,
                                   num_burnin=0, control_variates=False, sampler="sgld")
    trace = nbeta * (result.loss_trace.double() - result.init_loss)
    starts = range(0, trace.shape[1] - window + 1, window)
    means = [float(trace[:, s:s + window].mean()) for s in starts]
    for s, mean in zip(starts, means):
        chains = " ".join(f"{float(v):7.1f}" for v in trace[:, s:s + window].mean(1))
        print(f"mlp-arrival: steps {s:6d}-{s + window:6d} at {args.mlp_lr:.3g}: {mean:7.1f}  (chains {chains})")
    level = float(trace[:, 3 * trace.shape[1] // 4:].mean())
    for within in (0.01, 0.02):
        arrived = next(k for k in range(len(means) + 1) if all(abs(m - level) <= within * level for m in means[k:]))
        print(f"mlp-arrival: every window from step {arrived * window} on is within {within:.0%} of the last "
              f"quarter's mean {level:.1f}")
    print(f"mlp-arrival: 3 / (lr * localization) = {math.ceil(3 / (args.mlp_lr * localization))} steps; {seconds:.0f} s")


def mlp_steps(args, large=2.26e-5, small=2.26e-6, window=250):
    """One SGLD chain on the MLP at ``large`` for 1500 steps, then at ``small``: window means of
    ``n beta (L_B - L_n(w*))``."""
    from pyro_sgmcmc.samplers import SGLD

    model, x, y, loss, nbeta, localization = mlp_setup(args)
    with torch.no_grad():
        init_loss = float(loss(model(x), y))
    sampler = SGLD(model.parameters(), lr=large, nbeta=nbeta, localization=localization)
    trace, start = [], time.perf_counter()
    for t in range(1, 1501 + (1500 if args.quick else 6000)):
        if t == 1501:
            for group in sampler.param_groups:
                group["lr"] = small
        rows = torch.randint(0, len(x), (256,))
        sampler.zero_grad()
        value = loss(model(x[rows]), y[rows])
        value.backward()
        sampler.step()
        trace.append(nbeta * (float(value.detach()) - init_loss))
        if t % window == 0:
            print(f"mlp-steps: step {t:5d} at {sampler.param_groups[0]['lr']:.3g}: mean of the last {window} "
                  f"{sum(trace[-window:]) / window:7.1f}  ({time.perf_counter() - start:.0f} s)", flush=True)


# ------------------------------------------------------------------------------------ report


def report(rows):
    """``rows``: for each case, the runs of it (one per repeat), each ``(name, true, exact, ours,
    ours_time, theirs)``."""
    repeated = any(len(runs) > 1 for runs in rows)
    header = (f"{'case':<24} {'true':>6} {'exact':>6} | {'ours':>23} {'time':>7} {'bias':>5} | {'devinterp':>23} "
              f"{'time':>7} | {'|error| ours':>12} {'devinterp':>9} | {'speed-up':>8} {'at equal error':>14}")
    print(header)
    print("-" * len(header))
    for runs in rows:
        name, true, exact, ours, ours_time, theirs = runs[0]
        exact = next((run[2] for run in runs if run[2] is not None), None)
        reference = exact if exact is not None else true
        estimates = torch.tensor([run[3].llc for run in runs], dtype=torch.float64)
        ours_se2 = sum(run[3].std_error**2 for run in runs) / len(runs)
        ours_time = sum(run[4] for run in runs) / len(runs)
        their_estimates = torch.tensor([run[5][0] for run in runs], dtype=torch.float64)
        their_se2 = sum(run[5][1] ** 2 for run in runs) / len(runs)
        spread = sum(run[5][2] for run in runs) / len(runs)
        ours_spread = sum(float(run[3].per_chain.std()) for run in runs) / len(runs)
        their_time = sum(run[5][3] for run in runs) / len(runs)
        est, mean = float(their_estimates.mean()), float(estimates.mean())
        # the mean of K runs: its standard error from the runs' mean squared standard error
        se, ours_se = math.sqrt(their_se2 / len(runs)), math.sqrt(ours_se2 / len(runs))
        err_ours = "" if reference is None else f"{abs(mean - reference):.3f}"
        err_theirs = "" if reference is None else f"{abs(est - reference):.3f}"
        equal = their_time * their_se2 / (ours_time * ours_se2)
        bias = sum(run[3].diagnostics.step_bias for run in runs) / len(runs)
        print(f"{name:<24} {'' if true is None else f'{true:.3f}':>6} {'' if exact is None else f'{exact:.3f}':>6} | "
              f"{f'{mean:.3f}±{ours_se:.3f} [{ours_spread:.3f}]':>23} {ours_time:>6.1f}s {100 * bias:>4.1f}% | "
              f"{f'{est:.3f}±{se:.3f} [{spread:.3f}]':>23} {their_time:>6.1f}s | {err_ours:>12} {err_theirs:>9} | "
              f"{their_time / ours_time:>7.1f}x {equal:>13.1f}x")
    if repeated:
        print("\nrepeats: the standard error of one run (root mean square over the runs) against the spread of the "
              "runs' estimates (their standard deviation), which it should match; the ratio at equal error with the "
              "spreads as the errors (K - 1 degrees of freedom each)")
        for runs in rows:
            k = len(runs)
            if k < 2:
                continue
            ours = torch.tensor([run[3].llc for run in runs], dtype=torch.float64)
            theirs = torch.tensor([run[5][0] for run in runs], dtype=torch.float64)
            ours_se = math.sqrt(sum(run[3].std_error**2 for run in runs) / k)
            their_se = math.sqrt(sum(run[5][1] ** 2 for run in runs) / k)
            ours_time, their_time = sum(run[4] for run in runs) / k, sum(run[5][3] for run in runs) / k
            by_spreads = their_time * float(theirs.var()) / (ours_time * float(ours.var()))
            print(f"{runs[0][0]:<24} {k} runs  ours: standard error {ours_se:.3f}, spread {float(ours.std()):.3f}  "
                  f"devinterp: standard error {their_se:.3f}, spread {float(theirs.std()):.3f}  "
                  f"at equal error by the spreads {by_spreads:.1f}x  "
                  f"(ours {' '.join(f'{v:.3f}' for v in ours.tolist())}; devinterp "
                  f"{' '.join(f'{v:.3f}' for v in theirs.tolist())})")
    print("\nours, diagnostics: effective sample size, split R-hat, sampler and step size, steps before the draws (pilot + "
          "burn-in), restarts (the first run of each case)")
    for runs in rows:
        name, _, _, ours, _, _ = runs[0]
        d = ours.diagnostics
        print(f"{name:<24} ESS {d.ess:7.0f}  R-hat {d.r_hat:.3f}  {d.sampler}, step {ours.step_size:.2e}  excluded "
              f"{ours.num_excluded:5d}  restarts {d.restarts}")
    print("\nthe standard errors' sources (the first run of each case; the larger is the one given: "
          "pyro_sgmcmc.slt._stats.ChainMean)")
    for runs in rows:
        name, _, _, ours, _, theirs = runs[0]
        d = ours.diagnostics
        sources = _error_sources(d.autocorrelation_std_error, d.spread_std_error, d.spread_p)
        print(f"{name:<24} ours: {sources}\n{'':<24} devinterp: {theirs[4]}")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"Invalid value: {value} (a positive integer)")
    return value


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", nargs="+", default=["polynomial", "rrr", "mlp"])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--mlp-lr", type=float, default=1e-5, help="devinterp's step size on the MLP")
    parser.add_argument("--mlp-burnin", type=int, default=1500, help="mlp-relaxed: ours' num_burnin")
    parser.add_argument("--mlp-chains", type=int, default=1, help="mlp-relaxed, mlp-arrival: chains of each")
    parser.add_argument("--devinterp-chains", type=_positive, default=None,
                        help="mlp-relaxed: devinterp runs this many chains (default --mlp-chains); its time is "
                             "scaled to --mlp-chains (its chains run one after the other), its estimate and error "
                             "bar are its chains'")
    parser.add_argument("--arrival-steps", type=_positive, default=19_000, help="mlp-arrival: steps a chain")
    parser.add_argument("--device", default="cpu", help="the MLP cases' device (e.g. cuda)")
    parser.add_argument("--rrr-ours-chains", type=_positive, default=None,
                        help="rrr: ours runs this many chains (devinterp its test's 3): chains batched in one "
                             "call cost less a draw, which the ratio at equal error shows")
    parser.add_argument("--rrr-shapes", nargs="+", default=None,
                        help="rrr: the cases to run, as M,H,N (default: devinterp's five)")
    parser.add_argument("--reference", action="store_true",
                        help="rrr: a long BAOAB run at a small step as the finite-n beta reference (about 40 s a case)")
    parser.add_argument("--repeats", type=_positive, default=1,
                        help="polynomial, rrr: runs of each case, with other seeds (see the module docstring)")
    parser.add_argument("--sampler", default="auto", choices=["auto", "sgld", "baoab"],
                        help="ours' chain (estimate_llc's sampler)")
    args = parser.parse_args()
    SAMPLER[0] = args.sampler
    torch.set_num_threads(args.threads)
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)  # torch's one-off lazy imports, before any timing
    rows = []
    if "polynomial" in args.cases:
        for powers in ([1, 1], [1, 2], [2, 2]):
            rows.append([polynomial_case(powers, args, repeat) for repeat in range(args.repeats)])
    if "rrr" in args.cases:
        shapes = ((5, 3, 5), (5, 4, 5), (4, 3, 8), (8, 3, 4), (3, 8, 4))
        if args.rrr_shapes:
            shapes = [tuple(int(k) for k in shape.split(",")) for shape in args.rrr_shapes]
        for shape in shapes:
            rows.append([rrr_case(shape, args, repeat) for repeat in range(args.repeats)])
    if "mlp" in args.cases:
        rows.append([mlp_case(args)])
    if "mlp-same-step" in args.cases:
        rows.append([mlp_case(args, same_step=True)])
    if "mlp-relaxed" in args.cases:
        rows.append([mlp_case(args, relaxed=True)])
    if "mlp-steps" in args.cases:
        mlp_steps(args)
    if "mlp-arrival" in args.cases:
        mlp_arrival(args)
    if rows:
        report(rows)


if __name__ == "__main__":
    main()
