"""What the sweep measures on a trained model: accuracy (clean, noisy), per-example gradient sizes."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from agp_app.batching import eval_batches, padded_batch
from agp_app.data import Dataset
from agp_app.sweep.grid import INPUT_NORMS, MEASURED_LAYERS, NOISE_SEED
from agp_common.penalty_spec import INPUT
from jax_impl.model import Net
from jax_impl.penalty import penalized_loss
from jax_impl.xla_options import jit_options


def _batch_measures(params, x, y, mask, noisy_x, *, num_classes: int):
    """Sums over the real rows of one batch: loss, correct (clean, noisy), per-layer ||G_i|| and ||G_i||^2."""
    model = Net(num_classes=num_classes)
    _, aux = penalized_loss(params, model, x, y, penalty_weight=0.0, layers=MEASURED_LAYERS,
                            normalization="per_example", example_weights=mask)
    count = jnp.sum(mask)
    sums = {"loss_sum": aux["loss"] * count}
    for name, g in aux["activation_grads"].items():  # G_i = d CE_i / d a_i, (B, ...)
        sq = jnp.sum(jnp.square(g).reshape(g.shape[0], -1), axis=1)  # (B,)
        sums[f"grad_norm/{name}"] = jnp.sum(jnp.sqrt(sq) * mask)
        sums[f"grad_sq/{name}"] = jnp.sum(sq * mask)
        if name == INPUT:
            sums[INPUT_NORMS] = jnp.sqrt(sq)  # (B,): each example's, for the median
    sums["correct"] = jnp.sum((jnp.argmax(aux["logits"], -1) == y) * mask)
    sums["noisy_correct"] = jnp.stack([
        jnp.sum((jnp.argmax(model.apply({"params": params}, xn), -1) == y) * mask) for xn in noisy_x
    ]) if len(noisy_x) else jnp.zeros((0,), mask.dtype)
    sums["count"] = count
    return sums


@functools.cache
def _compiled_batch_measures():
    """``_batch_measures`` under ``jax.jit`` with ``jit_options()`` (built on first use, not at import)."""
    return jax.jit(_batch_measures, static_argnames="num_classes", **jit_options())


def noise_draws(ds: Dataset, sigmas: Sequence[float]) -> np.ndarray:
    """Fixed Gaussian noise (S, N_test, H, W, C), float32, one standard normal draw scaled per sigma."""
    z = np.random.default_rng(NOISE_SEED).standard_normal(ds.x_test.shape).astype(np.float32)
    return np.stack([np.float32(s) * z for s in sigmas]) if sigmas else np.zeros((0, *z.shape), np.float32)


def _split_sums(params, x, y, ds: Dataset, batch_size: int, noise: np.ndarray) -> dict[str, Any]:
    """``_batch_measures`` summed over a whole split (noise (S, N, H, W, C), S may be 0)."""
    totals: dict[str, Any] = {}
    norms = []
    for idx in eval_batches(len(y), batch_size):
        batch = padded_batch(x, y, idx, batch_size, np.float32, ds.pixel_scale)
        pad = ((0, batch_size - len(idx)), (0, 0), (0, 0), (0, 0))
        noisy = np.stack([batch["x"] + np.pad(n[idx], pad) for n in noise]) if len(noise) \
            else np.zeros((0, *batch["x"].shape), np.float32)
        sums = jax.device_get(_compiled_batch_measures()(params, batch["x"], batch["y"], batch["mask"], noisy,
                                                         num_classes=ds.num_classes))
        norms.append(np.asarray(sums.pop(INPUT_NORMS), np.float64)[: len(idx)])  # real rows only
        for k, v in sums.items():
            totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
    totals[INPUT_NORMS] = np.concatenate(norms)  # (N,)
    return totals


def measure(
    params, ds: Dataset, batch_size: int, sigmas: Sequence[float], noise: np.ndarray
) -> dict[str, float]:
    """Test accuracy, accuracy under each noise level, and mean per-example activation-gradient norms.

    Keys ``{test,train}_{accuracy,loss}``, ``{test,train}_grad_rms/<layer>``,
    ``{test,train}_grad_norm/<layer>``, ``{test,train}_grad_median/input`` (see the module
    docstring) and ``noisy_accuracy@<sigma>``.
    """
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    totals = _split_sums(params, ds.x_test, ds.y_test, ds, batch_size, noise)
    out: dict[str, float] = {}
    noisy_correct = totals.pop("noisy_correct")
    train = _split_sums(params, ds.x_train, ds.y_train, ds, batch_size, noise[:0, :0])
    train.pop("noisy_correct")
    for prefix, sums in (("test_", totals), ("train_", train)):
        out[f"{prefix}grad_median/{INPUT}"] = float(np.median(sums.pop(INPUT_NORMS)))
        count = float(sums.pop("count"))
        out[f"{prefix}accuracy"] = float(sums.pop("correct")) / count
        out[f"{prefix}loss"] = float(sums.pop("loss_sum")) / count
        for key, value in sums.items():
            kind, layer = key.split("/")
            if kind == "grad_sq":  # root mean square: sqrt of the per-example penalty's term
                out[f"{prefix}grad_rms/{layer}"] = math.sqrt(float(value) / count)
            else:
                out[f"{prefix}grad_norm/{layer}"] = float(value) / count
    for s, c in zip(sigmas, np.atleast_1d(noisy_correct), strict=False):
        out[f"noisy_accuracy@{s:g}"] = float(c) / len(ds.y_test)
    return out


def convention_numbers(params, ds: Dataset, batch_size: int) -> dict[str, float]:
    """On the first ``batch_size`` training examples: the seed's batch-mean penalty next to the loss.

    ``penalty_batch_mean`` = sum_l ||d loss / d a_l||^2 with the batch-mean loss;
    ``penalty_per_example`` = mean_i sum_l ||d loss_i / d a_{l,i}||^2 (= B x the former);
    ``grad_ratio@w`` = ||grad_theta (w * penalty_batch_mean)|| / ||grad_theta loss||: how much
    of the training step the penalty is at weight w.
    """
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    idx = np.arange(batch_size)
    batch = padded_batch(ds.x_train, ds.y_train, idx, batch_size, np.float32, ds.pixel_scale)
    model = Net(num_classes=ds.num_classes)
    x, y = jnp.asarray(batch["x"]), jnp.asarray(batch["y"])
    _, bm = penalized_loss(params, model, x, y, penalty_weight=1.0)
    _, pe = penalized_loss(params, model, x, y, penalty_weight=1.0, normalization="per_example")
    loss_grad = jax.grad(lambda p: penalized_loss(p, model, x, y, penalty_weight=0.0)[1]["loss"])(params)
    pen_grad = jax.grad(lambda p: penalized_loss(p, model, x, y, penalty_weight=1.0)[1]["penalty"])(params)
    ratio = float(optax.tree.norm(pen_grad) / optax.tree.norm(loss_grad))
    out = {
        "batch_size": batch_size,
        "loss": float(bm["loss"]),
        "penalty_batch_mean": float(bm["penalty"]),
        "penalty_per_example": float(pe["penalty"]),
        "per_example_over_batch_mean": float(pe["penalty"] / bm["penalty"]),
    }
    for w in (1.0, 10.0):
        out[f"grad_ratio@{w:g}"] = w * ratio
    return out
