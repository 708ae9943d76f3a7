"""The JAX trainer's pure steps: ``train_step``, ``train_chunk`` (several of them), ``eval_step``,
``attack_eval_step`` (see ``compile``)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from agp_app.jax_models import apply_kwargs, mutable_collections
from agp_app.jax_train.feeding import gather_batch
from agp_app.jax_train.state import Hyperparams, Params, TrainState, make_optimizer
from agp_common.attack_spec import Attack
from agp_common.penalty_spec import PenaltyOptions
from jax_impl.attacks import adversarial_correct
from jax_impl.model import Net
from jax_impl.module_capture import model_logits
from jax_impl.penalty import lazy_value_and_grad, per_example_cross_entropy


def _cast(tree: Any, dtype) -> Any:
    """Every floating leaf of ``tree`` as ``dtype`` (integer leaves unchanged)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a, tree)


def _float32_loss(outputs: Any, labels: jax.Array) -> jax.Array:
    """Per-example cross-entropy of the logits taken to float32 (mixed precision's loss): (B,)."""
    return per_example_cross_entropy(model_logits(outputs).astype(jnp.float32), labels)


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    hparams: Hyperparams,
    *,
    model: Net,
    optimizer: str,
    layers: tuple[str, ...] | None = None,
    options: PenaltyOptions | None = None,
    capture_modules: Mapping[str, str] | None = None,
    weight_decay: float = 0.0,
    decoupled: bool = False,
    compute_dtype: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on ``batch`` = {x (B, H, W, C), y (B,), mask (B,)}; returns the new state and metrics.

    ``total = loss + w * sum_l ||d loss / d a_l||^2`` with ``loss`` the masked
    mean cross-entropy and ``w = hparams.penalty_weight``; its gradient (double
    backprop) feeds ``make_optimizer(optimizer, hparams.lr, weight_decay=...,
    decoupled=...)``. When ``total``,
    ``loss``, ``penalty`` or ``grad_norm`` is not finite the step is not
    applied (the state is returned unchanged) and its metrics show the NaN/Inf.
    Metrics: ``total``, ``loss``, ``penalty``, ``penalty/<layer>``,
    ``act_grad_norm/<layer>`` (= sqrt of that term), ``accuracy`` (masked),
    ``grad_norm`` and ``param_norm`` (global L2 norms, before the update).
    ``options`` are the penalty's options (``TrainConfig.penalty_options()``;
    ``layers``, when given, overrides ``options.layers``); ``options.every`` = k
    applies the penalty with weight k*w on steps 0, k, 2k, ... only (lazy
    regularisation, ``lazy_value_and_grad``). ``capture_modules``: the layers
    captured by module path (``{name: path}``).

    A model whose ``__call__`` takes ``train`` gets ``train=True``; its
    ``batch_stats`` (``state.model_state``) are updated from the batch, as
    BatchNorm does in training. ``compute_dtype`` (``jnp.bfloat16``): mixed
    precision, the parameters, statistics and inputs cast to it inside the loss
    (forward, penalty and backward in it), the loss's softmax in float32, the
    gradients back in the master weights' dtype.
    """
    options = PenaltyOptions() if options is None else options
    if layers is not None:
        options = options.replace(layers=layers)
    params, x, model_state = state.params, batch["x"], state.model_state
    keywords: dict[str, Any] = {}
    if compute_dtype is not None:
        params, x, model_state = _cast(params, compute_dtype), _cast(x, compute_dtype), _cast(model_state,
                                                                                             compute_dtype)
        keywords["loss_fn"] = _float32_loss
    mutable = mutable_collections(model_state, train=True)
    if model_state:
        keywords.update(model_state=model_state, mutable=mutable)
    if capture_modules:
        keywords["capture_modules"] = dict(capture_modules)
    (total, aux), grads = lazy_value_and_grad(
        params, model, x, batch["y"], step=state.step, penalty_weight=hparams.penalty_weight,
        options=options, example_weights=batch["mask"], apply_kwargs=apply_kwargs(model, train=True) or None,
        **keywords)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    # The norm of the parameters before the update is read once the gradients exist: XLA otherwise
    # starts it first, beside the convolutions, and its reduction slowed them (batch 1, 2-core CPU:
    # the step 1.72 ms with it there, 1.44 ms here; the bare penalised step 1.27).
    old_params, grads = jax.lax.optimization_barrier((state.params, grads))
    tx = make_optimizer(optimizer, hparams.lr, weight_decay=weight_decay, decoupled=decoupled)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_model_state = state.model_state
    if mutable:
        new_model_state = {**state.model_state,
                           **_cast_like(aux["model_state"], state.model_state)}
    mask = batch["mask"]
    correct = (jnp.argmax(aux["logits"], axis=-1) == batch["y"]).astype(mask.dtype) * mask
    metrics = {
        "total": total.astype(mask.dtype),
        "loss": aux["loss"].astype(mask.dtype),
        "penalty": aux["penalty"].astype(mask.dtype),
        "accuracy": jnp.sum(correct) / jnp.sum(mask),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(old_params),
    }
    for name, term in aux["penalty_terms"].items():
        term = term.astype(mask.dtype)
        metrics[f"penalty/{name}"] = term
        is_norm = options.norm == "l2"  # then the term already is a norm
        metrics[f"act_grad_norm/{name}"] = term if is_norm else jnp.sqrt(term)
    # The loop's CHECKED_FINITE: a bad step keeps the last good state, which the loop may still save.
    finite = jnp.all(jnp.isfinite(jnp.stack([metrics["total"], metrics["loss"], metrics["penalty"],
                                             metrics["grad_norm"].astype(mask.dtype)])))
    new_state = TrainState(state.step + 1, params, opt_state, new_model_state)
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state), metrics


def train_chunk(
    state: TrainState,
    x: jax.Array,
    y: jax.Array,
    idx: jax.Array,
    real: jax.Array,
    hparams: Hyperparams,
    *,
    step: Callable[[TrainState, dict[str, jax.Array], Hyperparams], tuple[TrainState, dict[str, jax.Array]]],
    batch_sharding: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """``n`` consecutive ``step``s (``train_step`` with its options bound) in one program (``lax.scan``).

    Step ``i`` trains on ``feeding.gather_batch(x, y, idx[i], real[i])``: rows ``idx[i]`` (B,) of the
    training split ``x`` (N, H, W, C), ``y`` (N,), the rows where ``real[i]`` (B,) is False zeroed
    and masked; ``idx``, ``real``: (n, B). ``hparams``: ``Hyperparams`` of (n,) arrays, step ``i``
    gets ``hparams[i]``. Returns the state after the ``n`` steps and their metrics stacked, each of
    shape (n, ...). The body is ``step`` itself, so each step computes what it computes alone; a
    non-finite step leaves the state unchanged, as alone. ``batch_sharding``: the gathered batch's
    sharding (``mesh.batch_sharded``), as a single step receives it.
    """

    def body(carry: TrainState, inputs: tuple[jax.Array, jax.Array, Hyperparams]):
        step_idx, step_real, step_hparams = inputs
        batch = gather_batch(x, y, step_idx, step_real, x.dtype)  # the feeder's mask dtype is the data's
        if batch_sharding is not None:
            batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
        return step(carry, batch, step_hparams)

    return jax.lax.scan(body, state, (idx, real, hparams))


def _cast_like(tree: Any, like: Any) -> Any:
    """``tree``'s leaves in the dtypes of ``like``'s (the batch statistics back in the master dtype)."""
    return jax.tree.map(lambda a, b: a.astype(b.dtype), {k: tree[k] for k in like}, dict(like))


def variables_of(params: Params, model_state: Mapping[str, Any]) -> dict[str, Any]:
    """``{"params": params, **model_state}``: what ``model.apply`` takes."""
    return {"params": params, **model_state}


def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array], *, model: Net) -> dict[str, jax.Array]:
    """Sums over the real rows of ``batch``: ``loss_sum`` (cross-entropy), ``correct``, ``count``.

    ``variables``: ``variables_of(params, model_state)``; a model taking ``train`` gets
    ``train=False`` (BatchNorm's running statistics).
    """
    logits = model_logits(model.apply(variables, batch["x"], **apply_kwargs(model, train=False)))  # (B, K)
    mask = batch["mask"]
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])  # (B,)
    correct = (jnp.argmax(logits, axis=-1) == batch["y"]).astype(mask.dtype)
    return {"loss_sum": jnp.sum(per_example * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}


def attack_eval_step(variables: dict[str, Any], batch: dict[str, jax.Array], *, model: Net,
                     attacks: tuple[Attack, ...], clip: tuple[float, float]) -> dict[str, jax.Array]:
    """Sums over the real rows of ``batch``: ``{attack.eval_key: examples still right under it}``.

    FGSM / PGD (``jax_impl.attacks``) within ``clip``, the data's valid range; ``variables`` as in
    ``eval_step``.
    """
    apply = functools.partial(model.apply, **apply_kwargs(model, train=False))
    return adversarial_correct(apply, variables, batch["x"], batch["y"], attacks, clip=clip,
                               mask=batch["mask"])
