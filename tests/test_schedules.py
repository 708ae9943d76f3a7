"""``agp_app.schedules``: the learning rate of every update, against formulas written out here."""

from __future__ import annotations

import itertools
import math

import pytest

from agp_app.schedules import learning_rate, step_boundaries

BASE = 0.1


def rate(step, schedule, total=100, warmup=0, **kw):
    return learning_rate(step, base_lr=BASE, schedule=schedule, total_steps=total, warmup_steps=warmup, **kw)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "step"])
def test_warmup_rises_linearly_from_zero_to_the_base_rate(schedule):
    # exact: b * t / W in float64, the same expression as the code's, so equality is the right check
    assert [rate(t, schedule, warmup=4) for t in range(4)] == [0.0, BASE / 4, BASE / 2, BASE * 3 / 4]
    assert rate(4, schedule, warmup=4) == pytest.approx(BASE, rel=1e-15)  # the decay starts at b


def test_constant_schedule_keeps_the_base_rate_after_the_warmup():
    assert {rate(t, "constant", warmup=10) for t in range(10, 200)} == {BASE}


def test_cosine_schedule_halves_at_mid_decay_and_reaches_zero_at_the_end():
    total, warmup = 110, 10
    # cos(pi/2) = 6e-17 and cos(pi) = -1 exactly: abs 1e-15 covers the rounding of 0.5 * (1 + cos)
    assert rate(60, "cosine", total, warmup) == pytest.approx(BASE / 2, abs=1e-15)
    assert rate(total, "cosine", total, warmup) == pytest.approx(0.0, abs=1e-15)
    assert rate(10 * total, "cosine", total, warmup) == pytest.approx(0.0, abs=1e-15)  # clamped past the end
    values = [rate(t, "cosine", total, warmup) for t in range(warmup, total)]
    assert all(a > b for a, b in itertools.pairwise(values))  # strictly decreasing


def test_cosine_schedule_matches_the_closed_form_at_a_quarter():
    # at a quarter of the decay: b/2 (1 + cos(pi/4)) = b (2 + sqrt 2) / 4; 1e-15: a few float64 roundings
    assert rate(25, "cosine", 100) == pytest.approx(BASE * (2 + math.sqrt(2)) / 4, rel=1e-15)


def test_step_schedule_drops_tenfold_at_half_and_three_quarters_of_the_decay():
    total, warmup = 120, 20  # decay span 100: milestones at updates 20 + 50 = 70 and 20 + 75 = 95
    assert step_boundaries(total, warmup) == [70, 95]
    got = [rate(t, "step", total, warmup) for t in (20, 69, 70, 94, 95, 119)]
    # products of 0.1 in float64: rel 1e-15 covers their rounding
    assert got == pytest.approx([BASE, BASE, BASE * 0.1, BASE * 0.1, BASE * 0.01, BASE * 0.01], rel=1e-15)


def test_step_schedule_takes_its_milestones_and_factor():
    got = [rate(t, "step", 10, step_milestones=(0.3,), step_factor=0.5) for t in (2, 3)]
    assert got == [BASE, BASE * 0.5]


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"schedule": "linear"}, "--lr-schedule must be one of constant, cosine, step"),
    ({"warmup_steps": 100}, r"--warmup-steps must be an integer in \[0, 100\)"),
    ({"warmup_steps": -1}, "--warmup-steps"),
    ({"total_steps": 0}, "at least 1 step"),
    ({"base_lr": math.nan}, "--lr must be a finite number"),
    ({"step_milestones": (1.5,)}, "milestones must be fractions"),
])
def test_invalid_settings_are_refused_with_the_flag_named(kwargs, message):
    settings = {"base_lr": BASE, "schedule": "cosine", "total_steps": 100, "warmup_steps": 0, **kwargs}
    with pytest.raises(ValueError, match=message):
        learning_rate(0, **settings)
