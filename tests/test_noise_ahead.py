"""Noise drawn ahead (``noise_ahead=True``): the next step's noise is drawn in the noise threads
right after a step; the chain, the refusals and the saved state are bit for bit those of drawing
in ``step()``, whatever happens between steps (a scale that changes, a refused step, a
checkpoint, a reload)."""

from __future__ import annotations

import copy

import pytest
import torch

from pyro_sgmcmc.functional import NonFiniteError
from pyro_sgmcmc.samplers import SGLD

#: one noise chunk (the common case); three chunks (each its own buffer); two groups (not drawn ahead)
SHAPES = {"one chunk": [(30, 20), (20,)], "three chunks": [(2_200_000,)], "two groups": [(30, 20), (20,)]}


def make(shapes, ahead: bool, **options):
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(*shape, generator=gen)) for shape in shapes]
    groups = [{"params": [p]} for p in params] if options.pop("groups", False) else params
    return params, SGLD(groups, lr=1e-3, generator=torch.Generator().manual_seed(1), noise_ahead=ahead, **options)


def run(params, sampler, steps, events=()):
    """``steps`` steps on the quadratic potential |p - 1|^2 / 2; ``events[k]`` runs before step k."""
    events = dict(events)
    for k in range(steps):
        if k in events:
            events[k](params, sampler)
        for p in params:
            p.grad = p.detach() - 1.0
        sampler.step()
    return [p.detach().clone() for p in params]


def refuse_once(params, sampler):
    params[0].grad = torch.full_like(params[0], float("nan"))
    with pytest.raises(NonFiniteError):
        sampler.step()


def halve_lr(params, sampler):
    for group in sampler.param_groups:
        group["lr"] /= 2


@pytest.mark.parametrize("case", list(SHAPES))
def test_noise_ahead_is_the_same_chain(case):
    events = {2: refuse_once, 3: halve_lr, 5: lambda params, sampler: sampler.state_dict()}
    paths = []
    for ahead in (False, True):
        params, sampler = make(SHAPES[case], ahead, groups=case == "two groups")
        paths.append(run(params, sampler, 8, events))
        if ahead:
            assert (sampler._noise.ahead is not None) == (case != "two groups")  # drawing the next one
    for plain, ahead in zip(*paths):
        assert torch.equal(plain, ahead)


def test_noise_ahead_saves_and_resumes_exactly():
    """A checkpoint taken while the next step's noise is drawn holds the streams from before it:
    the same state as without drawing ahead; resumed (either way), the chain goes on unchanged."""
    params, plain = make(SHAPES["one chunk"], False)
    run(params, plain, 4)
    expected_state = copy.deepcopy(plain.state_dict())
    expected = run(params, plain, 4)

    params, ahead = make(SHAPES["one chunk"], True)
    run(params, ahead, 4)
    state = copy.deepcopy(ahead.state_dict())
    for saved, wanted in zip(state["noise_state"]["streams"], expected_state["noise_state"]["streams"]):
        assert torch.equal(saved, wanted)
    at = [p.detach().clone() for p in params]
    assert torch.equal(run(params, ahead, 4)[0], expected[0])

    for noise_ahead in (True, False):
        with torch.no_grad():
            for p, value in zip(params, at):
                p.copy_(value)
        resumed = SGLD(params, lr=1e-3, noise_ahead=noise_ahead)
        resumed.load_state_dict(state)
        assert torch.equal(run(params, resumed, 4)[0], expected[0])


def test_noise_ahead_option_is_checked():
    theta = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="Invalid noise_ahead"):
        SGLD([theta], lr=1e-3, noise_ahead="yes")


@pytest.mark.parametrize("case", ["one chunk", "three chunks"])
def test_steps_use_the_noise_drawn_ahead(monkeypatch, case):
    """Once running, a step draws no noise itself (no fill from the step's ``draw``): the noise
    threads drew it after the last step, one fill per chunk and step."""
    import sys

    import pyro_sgmcmc.functional._noise as noise_module

    drawn_in_step = []
    fill = noise_module.fill

    def counting(flat, std, generator):
        drawn_in_step.append(sys._getframe(1).f_code.co_name == "draw")  # the step's draw, not the threads'
        fill(flat, std, generator)

    monkeypatch.setattr(noise_module, "fill", counting)
    params, sampler = make(SHAPES[case], True)
    run(params, sampler, 2)
    sampler._noise.ahead.wait()
    chunks = len(sampler._noise.ahead.plan.chunks)
    drawn_in_step.clear()
    run(params, sampler, 3)
    sampler._noise.ahead.wait()
    assert len(drawn_in_step) == 3 * chunks and not any(drawn_in_step)
    # without drawing ahead every fill is the step's own (the check above can fail)
    params, sampler = make(SHAPES[case], False)
    drawn_in_step.clear()
    run(params, sampler, 2)
    assert len(drawn_in_step) == 2 * chunks and all(drawn_in_step)


class _Interrupting:
    """A draw's future whose first wait is interrupted by a Ctrl-C (the draw itself goes on)."""

    def __init__(self, future):
        self.future, self.interrupted = future, False

    def exception(self):
        if not self.interrupted:
            self.interrupted = True
            raise KeyboardInterrupt
        return self.future.exception()

    def done(self):
        return self.future.done()

    def result(self):
        return self.future.result()


def test_ctrl_c_while_giving_the_noise_back_keeps_the_chain():
    """A Ctrl-C while a checkpoint waits for the draws ahead is raised once the streams are back
    in their states from before the draws: the chain then goes on as drawing in ``step()``."""
    params, plain = make(SHAPES["one chunk"], False)
    run(params, plain, 2)
    expected = run(params, plain, 2)[0]
    params, ahead = make(SHAPES["one chunk"], True)
    run(params, ahead, 2)
    noise = ahead._noise
    noise.ahead.futures = [_Interrupting(future) for future in noise.ahead.futures]
    with pytest.raises(KeyboardInterrupt):
        ahead.state_dict()
    assert noise.ahead is None
    assert torch.equal(run(params, ahead, 2)[0], expected)


def test_a_copy_gives_the_noise_drawn_ahead_back():
    """``copy.deepcopy`` of a sampler's noise source while it draws ahead works (the draws do
    not copy: they are given back first), and the sampler goes on as drawing in ``step()`` would."""
    params, plain = make(SHAPES["one chunk"], False)
    run(params, plain, 2)
    expected = run(params, plain, 2)[0]
    params, ahead = make(SHAPES["one chunk"], True)
    run(params, ahead, 2)
    copy.deepcopy(ahead._noise)
    assert ahead._noise.ahead is None
    assert torch.equal(run(params, ahead, 2)[0], expected)
