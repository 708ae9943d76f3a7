"""The Flax side's penalised SGD step, compiled once per model and options.

``jax_impl.penalized_loss`` with the captures of both kinds (``capture()``
points by name, ``capture_modules`` by module path), then one ``optax.sgd``
step; it returns the total, ``aux`` and the gradients at the incoming
parameters too, so the first call serves the single-step rows.
"""

from __future__ import annotations

import functools

import flax.linen as linen
import jax
import optax

from jax_impl import penalized_loss as flax_penalized_loss
from parity_tests.harness import fast_compile_options


def compiled_sgd_step(module: linen.Module):
    """``_sgd_step`` compiled once per model, capture names and options (static), dtype and shapes.

    A hashable module (hand-written twins) is a static argument, so pairs with
    the same module share one compiled program; a module that cannot be hashed
    (Hugging Face modules hold their config) is closed over instead.
    """
    try:
        hash(module)
    except TypeError:
        return jax.jit(functools.partial(_sgd_step, model=module), compiler_options=fast_compile_options(),
                       static_argnames=("layers", "capture_modules", "mutable", "apply_kwargs"))
    return functools.partial(_static_sgd_step(), model=module)


@functools.cache
def _static_sgd_step():
    """Compile for speed of compilation (``harness.FAST_COMPILE_CPU`` on CPU).

    The verifier compiles each pair once and runs it a few times, so XLA's
    CPU optimisation passes cost seconds and save microseconds (loaded 2-core
    machine, test LeNet: the penalised SGD step 6.9 s -> 3.2 s, ``init``
    8.2 s -> 1.7 s). They do not change the arithmetic (no fast-math either
    way; the total moved by 1 ulp).
    """
    return jax.jit(_sgd_step, compiler_options=fast_compile_options(),
                   static_argnames=("model", "layers", "capture_modules", "mutable", "apply_kwargs"))


def _sgd_step(params, opt_state, model_state, x, y, penalty_weight, lr, *,
              model, layers, capture_modules, mutable, apply_kwargs):
    """One ``optax.sgd`` step on the penalised total; also returns the total, aux and the gradients.

    The total, aux and gradients are those at the incoming ``params``, so the
    first call serves the single-step rows as well.
    """
    by_path = {"capture_modules": dict(capture_modules)} if capture_modules else {}

    def total(p):
        return flax_penalized_loss(p, model, x, y, penalty_weight=penalty_weight, layers=layers,
                                   model_state=model_state, mutable=mutable, apply_kwargs=dict(apply_kwargs),
                                   **by_path)

    (value, aux), grads = jax.value_and_grad(total, has_aux=True)(params)
    updates, opt_state = optax.sgd(lr).update(grads, opt_state, params)
    if mutable:
        model_state = {**model_state, **aux["model_state"]}
    return optax.apply_updates(params, updates), opt_state, model_state, value, aux, grads
