"""``agp_app.jax_recipe``: the optax schedule equals ``learning_rate``; SGD with both weight-decay forms."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from agp_app.jax_recipe import make_optimizer, optax_schedule
from agp_app.schedules import learning_rate


@pytest.mark.parametrize(("schedule", "total", "warmup"),
                         [("constant", 50, 7), ("cosine", 50, 0), ("cosine", 50, 7), ("step", 50, 0),
                          ("step", 53, 9), ("step", 3, 1)])
def test_optax_schedule_gives_the_rates_of_learning_rate_at_every_update(schedule, total, warmup):
    settings = {"base_lr": 0.1, "schedule": schedule, "total_steps": total, "warmup_steps": warmup}
    with jax.enable_x64(True):
        sched = jax.jit(optax_schedule(**settings))
        got = [float(sched(jnp.asarray(t, jnp.int32))) for t in range(total + 3)]
    want = [learning_rate(t, **settings) for t in range(total + 3)]
    # same formulas; optax orders the float64 operations differently (1 - t/W etc.): ~1e-17 apart
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def _two_updates(tx, p, g):
    state = tx.init(p)
    updates, state = tx.update(g, state, p)
    p = optax.apply_updates(p, updates)
    updates, state = tx.update(g, state, p)  # a second update exercises the momentum buffer
    return optax.apply_updates(p, updates)


@pytest.mark.parametrize("decoupled", [False, True])
def test_weight_decay_follows_its_written_update_rule_for_two_steps(decoupled):
    lr, mu, wd = 0.1, 0.9, 0.05
    with jax.enable_x64(True):
        p0, g = jnp.asarray([1.0, -2.0, 3.0]), jnp.asarray([0.5, 0.25, -1.0])
        tx = make_optimizer(lr, momentum=mu, weight_decay=wd, decoupled=decoupled)
        got = np.asarray(_two_updates(tx, p0, g))
    p, m = np.asarray([1.0, -2.0, 3.0]), np.zeros(3)
    gn = np.asarray([0.5, 0.25, -1.0])
    for _ in range(2):  # the rules of the module docstring, in NumPy
        if decoupled:
            m = mu * m + gn
            p = p - lr * (m + wd * p)
        else:
            m = mu * m + (gn + wd * p)
            p = p - lr * m
    np.testing.assert_allclose(got, p, rtol=1e-14)  # a handful of float64 roundings


def test_without_weight_decay_the_optimizer_is_optax_sgd_with_its_state_tree():
    params = {"w": jnp.ones(3)}
    ours = make_optimizer(0.1, momentum=0.9).init(params)
    theirs = optax.sgd(0.1, momentum=0.9).init(params)
    assert jax.tree.structure(ours) == jax.tree.structure(theirs)  # old checkpoints restore into it
    assert jax.tree.structure(make_optimizer(0.1, momentum=0).init(params)) == \
        jax.tree.structure(optax.sgd(0.1).init(params))


def test_a_traced_learning_rate_and_weight_decay_compile_once():
    p, g = jnp.ones(3), jnp.full(3, 0.5)

    @jax.jit
    def step(lr, wd):
        tx = make_optimizer(lr, momentum=0.9, weight_decay=wd)
        updates, _ = tx.update(g, tx.init(p), p)
        return optax.apply_updates(p, updates)

    step(0.1, 0.01)
    step(0.2, 0.02)
    assert step._cache_size() == 1
