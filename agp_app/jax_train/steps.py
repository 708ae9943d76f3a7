"""The JAX trainer's pure steps: ``train_step``, ``eval_step``, ``attack_eval_step`` (see ``compile``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from agp_app.jax_train.state import Hyperparams, Params, TrainState, make_optimizer
from agp_common.attack_spec import Attack
from agp_common.penalty_spec import PenaltyOptions
from jax_impl.attacks import adversarial_correct
from jax_impl.model import Net
from jax_impl.penalty import lazy_value_and_grad


def train_step(
    state: TrainState,
    batch: dict[str, jax.Array],
    hparams: Hyperparams,
    *,
    model: Net,
    optimizer: str,
    layers: tuple[str, ...] | None = None,
    options: PenaltyOptions | None = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
    """One update on ``batch`` = {x (B, H, W, C), y (B,), mask (B,)}; returns the new state and metrics.

    ``total = loss + w * sum_l ||d loss / d a_l||^2`` with ``loss`` the masked
    mean cross-entropy and ``w = hparams.penalty_weight``; its gradient (double
    backprop) feeds ``make_optimizer(optimizer, hparams.lr)``. When ``total``,
    ``loss``, ``penalty`` or ``grad_norm`` is not finite the step is not
    applied (the state is returned unchanged) and its metrics show the NaN/Inf.
    Metrics: ``total``, ``loss``, ``penalty``, ``penalty/<layer>``,
    ``act_grad_norm/<layer>`` (= sqrt of that term), ``accuracy`` (masked),
    ``grad_norm`` and ``param_norm`` (global L2 norms, before the update).
    ``options`` are the penalty's options (``TrainConfig.penalty_options()``;
    ``layers``, when given, overrides ``options.layers``); ``options.every`` = k
    applies the penalty with weight k*w on steps 0, k, 2k, ... only (lazy
    regularisation, ``lazy_value_and_grad``).
    """
    options = PenaltyOptions() if options is None else options
    if layers is not None:
        options = options.replace(layers=layers)
    (total, aux), grads = lazy_value_and_grad(
        state.params, model, batch["x"], batch["y"], step=state.step, penalty_weight=hparams.penalty_weight,
        options=options, example_weights=batch["mask"])
    updates, opt_state = make_optimizer(optimizer, hparams.lr).update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    mask = batch["mask"]
    correct = (jnp.argmax(aux["logits"], axis=-1) == batch["y"]).astype(mask.dtype) * mask
    metrics = {
        "total": total,
        "loss": aux["loss"],
        "penalty": aux["penalty"],
        "accuracy": jnp.sum(correct) / jnp.sum(mask),
        "grad_norm": optax.tree.norm(grads),
        "param_norm": optax.tree.norm(state.params),
    }
    for name, term in aux["penalty_terms"].items():
        metrics[f"penalty/{name}"] = term
        is_norm = options.norm == "l2"  # then the term already is a norm
        metrics[f"act_grad_norm/{name}"] = term if is_norm else jnp.sqrt(term)
    # The loop's CHECKED_FINITE: a bad step keeps the last good state, which the loop may still save.
    finite = jnp.all(jnp.isfinite(jnp.stack([total, aux["loss"], aux["penalty"], metrics["grad_norm"]])))
    new_state = TrainState(state.step + 1, params, opt_state)
    return jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, state), metrics


def eval_step(params: Params, batch: dict[str, jax.Array], *, model: Net) -> dict[str, jax.Array]:
    """Sums over the real rows of ``batch``: ``loss_sum`` (cross-entropy), ``correct``, ``count``."""
    logits = model.apply({"params": params}, batch["x"])  # (B, K)
    mask = batch["mask"]
    per_example = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"])  # (B,)
    correct = (jnp.argmax(logits, axis=-1) == batch["y"]).astype(mask.dtype)
    return {"loss_sum": jnp.sum(per_example * mask), "correct": jnp.sum(correct * mask),
            "count": jnp.sum(mask)}


def attack_eval_step(params: Params, batch: dict[str, jax.Array], *, model: Net, attacks: tuple[Attack, ...],
                     clip: tuple[float, float]) -> dict[str, jax.Array]:
    """Sums over the real rows of ``batch``: ``{attack.eval_key: examples still right under it}``.

    FGSM / PGD (``jax_impl.attacks``) within ``clip``, the data's valid range.
    """
    return adversarial_correct(model.apply, {"params": params}, batch["x"], batch["y"], attacks, clip=clip,
                               mask=batch["mask"])
