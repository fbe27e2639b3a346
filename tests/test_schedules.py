"""Schedules against their closed forms, and their state round trips."""
import math

import numpy as np
import pytest

from ddl.nn.module import Parameter
from ddl.optim import SGD
from ddl.schedules import CosineAnnealingLR, LinearWarmup, LRScheduler, StepLR, make_schedule


def lrs(schedule, n):
    """The lr in force at t = 0 .. n-1, stepping the schedule as the trainer does."""
    out = []
    for _ in range(n):
        out.append(schedule.optimizer.lr)
        schedule.step()
    return out


def sgd(lr=0.5):
    return SGD([Parameter(np.zeros(2))], lr=lr)


def test_step_lr_closed_form():
    np.testing.assert_allclose(lrs(StepLR(sgd(), step_size=3, gamma=0.5), 10),
                               [0.5 * 0.5 ** (t // 3) for t in range(10)], rtol=1e-15)


def test_cosine_closed_form():
    got = lrs(CosineAnnealingLR(sgd(), T_max=8, eta_min=0.1), 9)
    want = [0.1 + 0.4 * (1 + math.cos(math.pi * t / 8)) / 2 for t in range(9)]
    np.testing.assert_allclose(got, want, rtol=1e-15)
    assert got[0] == 0.5 and abs(got[8] - 0.1) < 1e-15


def test_linear_warmup_multiplies_the_schedule():
    step = StepLR(sgd(), step_size=4, gamma=0.1)
    got = lrs(LinearWarmup(step, warmup_steps=5, start_factor=0.2), 9)
    factor = [0.2 + 0.8 * min(t, 5) / 5 for t in range(9)]
    np.testing.assert_allclose(got, [0.5 * 0.1 ** (t // 4) * f for t, f in enumerate(factor)])


@pytest.mark.parametrize("make", [
    lambda o: StepLR(o, 2, 0.3),
    lambda o: CosineAnnealingLR(o, 7),
    lambda o: LinearWarmup(CosineAnnealingLR(o, 7), 3),
])
def test_schedule_state_round_trip(make):
    schedule = make(sgd())
    lrs(schedule, 4)
    sd = schedule.state_dict()
    assert set(sd) == {"last_epoch", "base_lr"}
    resumed = make(sgd(lr=9.0))  # base lr comes from the saved state
    resumed.load_state_dict(sd)
    assert resumed.optimizer.lr == schedule.optimizer.lr
    assert lrs(resumed, 3) == lrs(schedule, 3)


def test_make_schedule_per_iteration():
    total = 2 * 5
    constant = make_schedule("constant", sgd(), epochs=2, steps_per_epoch=5)
    assert lrs(constant, total) == [0.5] * total
    # ceil(10 / 3) = 4 iterations per phase: three phases within the run
    assert lrs(make_schedule("step", sgd(), 2, 5), total) == pytest.approx(
        [0.5] * 4 + [0.05] * 4 + [0.005] * 2)
    cosine = lrs(make_schedule("cosine", sgd(), 2, 5), total + 1)
    assert cosine[0] == 0.5 and cosine[-1] == pytest.approx(0.0, abs=1e-15)
    assert all(a > b for a, b in zip(cosine, cosine[1:]))
    warm = lrs(make_schedule("constant", sgd(), 2, 5, warmup_steps=4), total)
    assert warm[:5] == pytest.approx([0.05, 0.1625, 0.275, 0.3875, 0.5]) and warm[5:] == [0.5] * 5
    with pytest.raises(ValueError, match="constant, step, cosine"):
        make_schedule("linear", sgd(), 2, 5)


@pytest.mark.parametrize("make,match", [
    (lambda o: StepLR(o, step_size=0), "step_size"),
    (lambda o: StepLR(o, step_size=2.5), "step_size"),
    (lambda o: CosineAnnealingLR(o, T_max=0), "T_max"),
    (lambda o: LinearWarmup(LRScheduler(o), warmup_steps=0), "warmup_steps"),
    (lambda o: LinearWarmup(LRScheduler(o), warmup_steps=3, start_factor=0.0), "start_factor"),
    (lambda o: make_schedule("cosine", o, epochs=0, steps_per_epoch=10), "at least one"),
])
def test_invalid_schedules(make, match):
    with pytest.raises(ValueError, match=match):
        make(sgd())
