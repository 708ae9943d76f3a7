"""The training recipe across frameworks: the same schedule, momentum and weight decay give the same steps.

``agp_app.jax_recipe.make_optimizer`` (optax) and ``agp_app.torch_recipe.make_optimizer``
(``torch.optim``) take three steps on the same tiny linear classifier from the same weights, with
the rate of each update from ``agp_app.schedules.learning_rate`` (cosine with a warmup, so the rate
changes every step), momentum 0.9 and weight decay in either form. In float64 the parameters must
agree after every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

from agp_app.jax_recipe import make_optimizer as jax_optimizer
from agp_app.jax_recipe import optax_schedule
from agp_app.schedules import learning_rate
from agp_app.torch_recipe import make_optimizer as torch_optimizer
from agp_app.torch_recipe import set_learning_rate

SCHEDULE = {"base_lr": 0.5, "schedule": "cosine", "total_steps": 4, "warmup_steps": 1}
MOMENTUM, WEIGHT_DECAY, STEPS = 0.9, 0.05, 3
#: A few float64 roundings per update on values of size ~1: ~1e-16; 1e-12 leaves 1e4x headroom.
ATOL = 1e-12


def _problem():
    rng = np.random.default_rng(0)
    return rng.normal(size=(4, 3)), rng.integers(0, 2, 4), rng.normal(size=(2, 3)), rng.normal(size=2)


def _torch_steps(decoupled: bool) -> list[dict[str, np.ndarray]]:
    x, y, w, b = _problem()
    model = torch.nn.Linear(3, 2).double()
    with torch.no_grad():
        model.weight.copy_(torch.from_numpy(w))
        model.bias.copy_(torch.from_numpy(b))
    opt = torch_optimizer(model, lr=SCHEDULE["base_lr"], momentum=MOMENTUM, weight_decay=WEIGHT_DECAY,
                          decoupled=decoupled)
    out = []
    for t in range(STEPS):
        set_learning_rate(opt, learning_rate(t, **SCHEDULE))
        opt.zero_grad()
        F.cross_entropy(model(torch.from_numpy(x)), torch.from_numpy(y)).backward()
        opt.step()
        out.append({"kernel": model.weight.detach().numpy().T.copy(),
                    "bias": model.bias.detach().numpy().copy()})
    return out


def _jax_steps(decoupled: bool, scheduled_in_optax: bool) -> list[dict[str, np.ndarray]]:
    x, y, w, b = _problem()
    params = {"kernel": jnp.asarray(w.T), "bias": jnp.asarray(b)}

    def loss(p):
        logits = jnp.asarray(x) @ p["kernel"] + p["bias"]  # (4, 2)
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean()

    def tx(lr):
        return jax_optimizer(lr, momentum=MOMENTUM, weight_decay=WEIGHT_DECAY, decoupled=decoupled)

    # the rate from the optimizer state's count, or computed on the host and passed per update
    # (traced, as the CLI passes it); one compiled step either way (op by op costs ~10x more)
    schedule = optax_schedule(**SCHEDULE) if scheduled_in_optax else None

    @jax.jit
    def step(params, state, lr):
        opt = tx(schedule if scheduled_in_optax else lr)
        updates, state = opt.update(jax.grad(loss)(params), state, params)
        return optax.apply_updates(params, updates), state

    state = tx(schedule if scheduled_in_optax else 0.0).init(params)
    out = []
    for t in range(STEPS):
        params, state = step(params, state, jnp.asarray(learning_rate(t, **SCHEDULE)))
        out.append({k: np.asarray(v) for k, v in params.items()})
    return out


@pytest.mark.parametrize("scheduled_in_optax", [False, True], ids=["host_rate", "optax_schedule"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["coupled", "decoupled"])
def test_both_frameworks_take_the_same_sgd_steps_with_schedule_momentum_and_weight_decay(
        decoupled, scheduled_in_optax, x64):
    want = _torch_steps(decoupled)
    got = _jax_steps(decoupled, scheduled_in_optax)
    for t, (g, w) in enumerate(zip(got, want, strict=True)):
        for name in ("kernel", "bias"):
            np.testing.assert_allclose(g[name], w[name], rtol=0, atol=ATOL, err_msg=f"step {t + 1} {name}")


def test_decay_forms_differ_so_the_test_above_tells_them_apart(x64):
    a, b = _torch_steps(False), _torch_steps(True)
    assert np.abs(a[-1]["kernel"] - b[-1]["kernel"]).max() > 1e-4
