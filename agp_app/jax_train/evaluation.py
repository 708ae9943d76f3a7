"""The JAX trainer's evaluation on the test split: clean loss and accuracy, accuracy under attack."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh

from agp_app.batching import eval_batches, padded_batch
from agp_app.data import Dataset
from agp_app.jax_train.mesh import put_batch
from agp_app.jax_train.state import Params


def evaluate(eval_fn, params: Params, ds: Dataset, batch_size: int, dtype, mesh: Mesh) -> dict[str, float]:
    """``eval_loss`` (mean cross-entropy) and ``eval_accuracy`` over the whole test split."""
    sums = [eval_fn(params, put_batch(padded_batch(ds.x_test, ds.y_test, idx, batch_size, dtype,
                                                     ds.pixel_scale), mesh))
            for idx in eval_batches(len(ds.y_test), batch_size)]
    sums = jax.device_get(sums)  # one sync for the whole pass
    total = {k: float(np.sum([s[k] for s in sums], dtype=np.float64)) for k in sums[0]}
    count = total["count"]
    return {"eval_loss": total["loss_sum"] / count, "eval_accuracy": total["correct"] / count}


def evaluate_attacks(attack_fn, params: Params, ds: Dataset, batch_size: int, dtype, mesh: Mesh
                     ) -> dict[str, float]:
    """``{eval_accuracy/ATTACK@EPS: test accuracy}`` under each attack of ``compiled_attack_eval``."""
    sums = [attack_fn(params, put_batch(padded_batch(ds.x_test, ds.y_test, idx, batch_size, dtype,
                                                       ds.pixel_scale), mesh))
            for idx in eval_batches(len(ds.y_test), batch_size)]
    sums = jax.device_get(sums)  # one sync for the whole pass
    return {k: float(np.sum([s[k] for s in sums], dtype=np.float64)) / len(ds.y_test) for k in sums[0]}
