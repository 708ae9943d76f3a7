"""How far ``--dtype bfloat16`` moves the penalty and its gradients from float32, on one batch.

    python -m benchmarks.bf16_penalty

For the answer's CNN (capture points relu1, relu2) and resnet18 (width 16, module paths layer1.0,
layer2.0) at their seeded initial weights on one digits batch of 32 (32x32x1): the penalty and the
gradients of the penalty alone (``d(w * penalty)/d params``) and of the total, computed as the JAX
trainer's bfloat16 step does (parameters, batch statistics and inputs cast to bfloat16 inside the
loss, the softmax cross-entropy in float32, gradients cast back), against float32. Prints the relative
errors ``|a - b| / |b|`` (global L2 norms over all parameters). The numbers are in docs/training.md.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from agp_app.data import load_digits
from agp_app.jax_models import apply_kwargs, build_jax_model
from agp_app.jax_train.state import init_variables
from agp_app.model_spec import ModelSpec
from jax_impl.module_capture import model_logits
from jax_impl.penalty import penalized_loss, per_example_cross_entropy

CASES = {"cnn": (ModelSpec("cnn"), {}, ("relu1", "relu2")),
         "resnet18 (width 16)": (ModelSpec("resnet18", {"width": 16}), {"layer1.0": "layer1.0",
                                                                     "layer2.0": "layer2.0"},
                                 ("layer1.0", "layer2.0"))}


def cast(tree, dtype):
    return jax.tree.map(lambda a: a.astype(dtype), tree)


def gradients(model, params, state, x, y, weight, dtype, capture_modules, layers):
    """(penalty, d(total)/d params) with the forward and both backward passes in ``dtype``."""
    def total(p):
        keywords = {"model_state": cast(state, dtype), "mutable": ("batch_stats",)} if state else {}
        value, aux = penalized_loss(cast(p, dtype), model, x.astype(dtype), y, penalty_weight=weight,
                                    layers=layers, capture_modules=capture_modules or None,
                                    apply_kwargs=apply_kwargs(model, train=True) or None,
                                    loss_fn=lambda o, t: per_example_cross_entropy(
                                        model_logits(o).astype(jnp.float32), t), **keywords)
        return value.astype(jnp.float32), aux["penalty"].astype(jnp.float32)
    (_, penalty), grads = jax.value_and_grad(total, has_aux=True)(params)
    return float(penalty), grads


def relative(a, b) -> float:
    a, b = (np.concatenate([np.ravel(v).astype(np.float64) for v in jax.tree.leaves(t)]) for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def main() -> None:
    ds = load_digits()
    x, y = jnp.asarray(ds.x_train[:32]), jnp.asarray(ds.y_train[:32])
    for name, (spec, capture_modules, layers) in CASES.items():
        model = build_jax_model(spec, 10)
        params, state = init_variables(model, ds.image_shape, 0, np.float32)
        results = {}
        for dtype in (jnp.float32, jnp.bfloat16):
            with_penalty = gradients(model, params, state, x, y, 10.0, dtype, capture_modules, layers)
            plain = gradients(model, params, state, x, y, 0.0, dtype, capture_modules, layers)
            penalty_grad = jax.tree.map(lambda a, b: a - b, with_penalty[1], plain[1])
            results[dtype] = (with_penalty[0], penalty_grad, with_penalty[1], plain[1])
        (p32, pg32, g32, l32), (p16, pg16, g16, l16) = results[jnp.float32], results[jnp.bfloat16]
        print(f"{name}: penalty {p32:.4e} (float32) vs {p16:.4e} (bfloat16), rel. error "
              f"{abs(p16 - p32) / p32:.2e};"
              f" penalty gradient rel. error {relative(pg16, pg32):.2e}; total gradient rel. error "
              f"{relative(g16, g32):.2e}; loss gradient rel. error {relative(l16, l32):.2e}")


if __name__ == "__main__":
    main()
