"""The activation gradient penalty, as one small pure function.

For a model with capture points ``a_l`` (marked with ``layers.capture``) and
the batch-mean cross-entropy

    loss = (1/B) * sum_i CE(f(x_i), y_i),

the penalty of the seed answer is

    penalty = sum_{l in layers} || d loss / d a_l ||_2^2      (sum over every entry)
    total   = loss + penalty_weight * penalty.

``d loss / d a_l`` is obtained as the gradient with respect to a zero
perturbation added at ``a_l`` (Flax's ``perturb``); the gradient of ``total``
with respect to the parameters then differentiates through that gradient
(double backprop), exactly like ``torch.autograd.grad(..., create_graph=True)``
followed by ``backward()``.

Because ``loss`` is a batch *mean*, each example's slice of ``d loss / d a``
carries a factor 1/B, so with examples that do not interact the penalty is
(1/B^2) * sum_i ||d CE_i / d a_i||^2: it shrinks like 1/B at a fixed
per-example gradient size.

How the penalty is computed beyond that (which layers, per-example
normalisation, L2 instead of squared L2, layer weights, the finite-difference
approximation) is one ``PenaltyOptions`` object (agp_common/penalty_spec.py,
the formulas are in its docstring), shared with ``torch_ref`` and the CLIs;
``penalized_loss`` takes it as ``options=`` or as keywords (``norm="l2"``).
With ``g_l = d loss / d a_l`` and ``G_{l,i} = d loss_i / d a_{l,i}``:

* ``normalization="per_example"``: when examples do not interact,
  ``g_{l,i} = G_{l,i} / B``, so with squared L2 ``batch_mean == per_example / B``
  exactly.
* ``"input"`` in ``layers``: a zero perturbation added to ``x`` itself, giving
  the input-gradient penalty (double backpropagation, Drucker & LeCun 1992)
  for any model.
* ``approx="finite_difference"`` (Finlay & Oberman 2019): the squared norm is
  replaced by the square of a finite-difference directional derivative along
  the detached gradient, ``((loss(a + h v) - loss(a)) / h)^2`` with
  ``v = Lambda g / sqrt(g^T Lambda g)``; only first-order differentiation is
  needed, and the value and its parameter gradient are exact up to O(h).

Capture points are the model's ``capture()`` marks and, for models written
elsewhere (Hugging Face, model zoos), submodules named by path with
``capture_modules={name: "path/to/module[:k]"}`` (``jax_impl.capture``; the
output, or its first element for a tuple, is the activation). A penalty over
zero capture points is an error, never 0.

The model is reached through one function, ``forward(perturbations, x) ->
(outputs, updated_state_or_None)`` (``linen_forward`` builds it for a Linen
module; ``jax_impl.nnx`` for an NNX one), so models with other collections
(BatchNorm's ``batch_stats``, dropout) need no special keywords beyond
``model_state`` / ``mutable``; anything else ``apply`` needs is bound with
``functools.partial(model.apply, train=True, rngs=...)`` passed as ``model``.

The pieces live in their own modules: the loss and its batch mean in
``jax_impl.losses``, the model as ``forward`` in ``jax_impl.forward``, the
per-layer terms and the finite-difference estimate in
``jax_impl.penalty_terms``; their public names are importable from here too.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from agp_common.penalty_spec import (
    INPUT,
    PenaltyOptions,
    check_examples_interact,
    check_layer_weights,
    resolve_options,
    select_layers,
)

# ``linen_forward``, ``zero_perturbations``, ``cross_entropy_loss`` and ``per_example_cross_entropy``
# moved out of this module; ``x as x`` re-exports them so that ``from jax_impl.penalty import ...`` works.
from jax_impl.forward import Apply, Forward, Params, _chosen_zeros, _linen_forward_and_zeros, _perturbed
from jax_impl.forward import linen_forward as linen_forward
from jax_impl.forward import zero_perturbations as zero_perturbations
from jax_impl.losses import _batch_loss, default_loss, weighted_mean
from jax_impl.losses import cross_entropy_loss as cross_entropy_loss
from jax_impl.losses import per_example_cross_entropy as per_example_cross_entropy
from jax_impl.model_runner import apply_fn
from jax_impl.module_capture import SEP as SEP  # re-exported: jax_impl.nnx and callers use penalty.SEP
from jax_impl.outputs import model_logits
from jax_impl.penalty_terms import _exact_terms, _finite_difference_penalty
from jax_impl.validation import (
    check_example_weights,
    check_fd_step,
    check_input_capture,
    check_loss_inputs,
    check_penalized_loss_args,
)


def _apply_fn(model: nn.Module | Apply, apply_kwargs: Mapping | None = None, rngs: Any = None) -> Apply:
    """``model.apply`` with bound keywords (``module_capture.apply_fn``; kept for callers of this name)."""
    return apply_fn(model, apply_kwargs, rngs)


def penalized_loss_from_forward(
    forward: Forward,
    zeros: Mapping[str, jax.Array],
    x: jax.Array,
    y: jax.Array,
    *,
    penalty_weight: float | jax.Array,
    layers: Sequence[str] | str | None = None,
    options: PenaltyOptions | None = None,
    example_weights: jax.Array | None = None,
    examples_interact: bool = False,
    loss_fn: Callable[[jax.Array, jax.Array], jax.Array] | None = None,
    **option_keywords: Any,
) -> tuple[jax.Array, dict[str, Any]]:
    """``penalized_loss`` for any model given as a pure ``forward(perturbations, x)``.

    The framework-independent core used by ``penalized_loss`` (Linen) and
    ``jax_impl.nnx.penalized_loss`` (NNX); see ``penalized_loss`` for the
    options and ``aux``. ``zeros`` are the model's zero perturbations
    (``{capture name: zeros}``, without ``"input"``).
    """
    check_loss_inputs(x, penalty_weight)  # clear ValueError (jax_impl.validation)
    check_example_weights(example_weights)
    opts = resolve_options(options, layers, **option_keywords)
    layers = select_layers(tuple(zeros), opts.layers)  # raises for zero capture points
    if INPUT in layers:
        check_input_capture(x)
    check_layer_weights(opts, layers)
    check_examples_interact(opts, examples_interact)
    loss_fn = default_loss if loss_fn is None else loss_fn
    chosen = _chosen_zeros(zeros, x, layers)
    per_example = opts.normalization == "per_example"

    # Activation gradients: (B, ...) per layer. batch_mean: g = d loss / d a.
    # per_example: G[i] = d loss_i / d a_i (loss_i not divided by B).
    if not per_example:
        run = _perturbed(forward, zeros, x, _batch_loss(loss_fn, y, example_weights))
        (loss, (outputs, state)), grads = jax.value_and_grad(run, has_aux=True)(chosen)
    elif not examples_interact:
        # Examples independent: loss_i depends on a_i only, so the gradient of
        # sum_i m_i loss_i has example i's gradient (times m_i) in slice i.
        # One backward pass.
        run = _perturbed(forward, zeros, x, lambda out: loss_fn(out, y))

        def summed(c):
            losses, aux = run(c)  # (B,)
            return jnp.sum(losses), (weighted_mean(losses, example_weights), aux)

        (_, (loss, (outputs, state))), grads = jax.value_and_grad(summed, has_aux=True)(chosen)
    else:
        # Examples interact (e.g. BatchNorm batch statistics): loss_i depends on
        # every a_j. The Jacobian of the B losses w.r.t. the perturbations,
        # one VJP per example (B backward passes, memory B x activations),
        # and its diagonal blocks d loss_i / d a_i.
        run = _perturbed(forward, zeros, x, lambda out: loss_fn(out, y))
        losses, vjp, (outputs, state) = jax.vjp(run, chosen, has_aux=True)
        batch = losses.shape[0]
        (jac,) = jax.vmap(vjp)(jnp.eye(batch, dtype=losses.dtype))  # {name: (B, B, ...)}
        diag = jnp.arange(batch)
        grads = {name: j[diag, diag] for name, j in jac.items()}  # {name: (B, ...)}
        loss = weighted_mean(losses, example_weights)

    terms = _exact_terms(grads, opts.norm, per_example, example_weights)
    if opts.approx == "exact":
        penalty = sum(opts.weight_of(name) * term for name, term in terms.items()) \
            if opts.layer_weights is not None else sum(terms.values())
    else:
        check_fd_step(opts.fd_step, [g.dtype for g in grads.values()])
        penalty = _finite_difference_penalty(
            forward, zeros, x, y, loss_fn, example_weights, jax.lax.stop_gradient(grads),
            loss if not per_example else None, opts,
        )
        terms = jax.lax.stop_gradient(terms)
    total = loss + penalty_weight * penalty
    aux = {
        "loss": loss,
        "penalty": penalty,
        "penalty_terms": terms,
        "activation_grads": grads,
        "logits": model_logits(outputs),
    }
    if state is not None:
        aux["model_state"] = state
    return total, aux


def penalized_loss(
    params: Params,
    model: nn.Module | Apply,
    x: jax.Array,
    y: jax.Array,
    *,
    penalty_weight: float | jax.Array,
    layers: Sequence[str] | str | None = None,
    options: PenaltyOptions | None = None,
    example_weights: jax.Array | None = None,
    model_state: Mapping | None = None,
    mutable: Sequence[str] = (),
    examples_interact: bool | None = None,
    loss_fn: Callable[[Any, jax.Array], jax.Array] | None = None,
    capture_modules: Mapping[str, str] | None = None,
    fast_convolutions: bool = True,
    **option_keywords: Any,
) -> tuple[jax.Array, dict[str, Any]]:
    """``total = loss + penalty_weight * sum_l ||d loss / d a_l||^2`` and its parts.

    Args:
      params: the model's ``"params"`` collection (for a Hugging Face
        model: what its ``params=`` argument takes, e.g. ``model.params``).
      model: a Flax Linen module (e.g. ``Net()``), or an ``apply`` function
        with the signature of ``Module.apply`` (``functools.partial(model.apply,
        train=True, rngs={"dropout": key})`` for models whose ``__call__``
        takes more), or a Hugging Face ``FlaxPreTrainedModel`` (run as
        ``model(*inputs, params=params)``). A Linen model is applied as
        ``apply({"params": params, **model_state, "perturbations": ...}, x)``.
      x: inputs: one array (NHWC for ``Net``: (B, 32, 32, C), any batch
        size), a tuple of positional inputs (``apply(variables, *x)``) or a
        dict of keyword inputs (``apply(variables, **x)``, e.g.
        ``{"input_ids": ..., "attention_mask": ...}``). B is the first axis
        of the first array leaf. Integer inputs (token ids) are fine; the
        ``"input"`` capture needs ``x`` to be one floating-point array.
      y: integer class labels (B,) (or whatever ``loss_fn`` takes).
      penalty_weight: the weight ``w`` (the seed answer uses 10); may be traced.
      layers: capture names to penalise; ``None`` (default) penalises all of
        the model's capture points; ``"input"`` names the input ``x`` itself.
        Overrides ``options.layers``.
      options: a ``PenaltyOptions`` (normalization, norm, layer_weights,
        approx, fd_step; formulas in its docstring). Its fields may also be
        given as keywords (``norm="l2"``), which override ``options``.
      example_weights: optional (B,) weights; the loss becomes
        ``sum_i m_i CE_i / sum_i m_i``. A 0/1 mask gives exactly the loss and
        penalty of the real examples of a zero-padded batch (per-example
        means are weighted the same way).
      model_state: other variable collections, e.g. ``{"batch_stats": ...}``.
      mutable: collections the model updates, e.g. ``["batch_stats"]`` for
        BatchNorm in train mode; the updates are in ``aux["model_state"]``.
      examples_interact: whether an example's loss depends on other examples'
        activations (BatchNorm in train mode). Only used by ``per_example``:
        then the per-example gradients are the diagonal blocks of the full
        Jacobian (B backward passes instead of one). ``None``: True exactly
        when ``"batch_stats"`` is in ``mutable``.
      loss_fn: per-example loss ``(outputs, y) -> (B,)`` on the model's raw
        outputs; default: softmax cross-entropy of ``outputs.logits`` where
        the output has that attribute (Hugging Face), else of element 0 of a
        tuple/list, else of the outputs. The loss is its (weighted) mean.
      capture_modules: capture points by module path, for models without
        ``capture()`` marks: ``{name: "path/to/module"}`` or
        ``{name: "path/to/module:k"}`` (the k-th call, 0-based, of a module
        called more than once), e.g. ``{"layer0": "bert/encoder/layer/0"}``
        (``"."`` separators are accepted too). The activation is the
        module's output, or its first element when it returns a tuple
        (Hugging Face layers return ``(hidden_states, ...)``). They combine
        with the model's ``capture()`` points (a name in both is an error);
        ``layers`` chooses among all of them. ``jax_impl.capture_points``
        lists the paths; details in ``jax_impl.capture``.
      fast_convolutions: on CPU, compute the model's ``flax.linen.Conv``
        layers (any stride, padding, dilation, groups) with derivatives that
        stay fast convolutions (``jax_impl.fast_conv``; same values up to
        rounding, 2-10x faster penalised steps). No effect on GPU/TPU;
        ``False`` runs flax's own convolutions.
      **option_keywords: ``PenaltyOptions`` fields; also ``apply_kwargs`` and
        ``rngs`` (the older spelling of a ``functools.partial`` ``model``).

    Returns:
      ``(total, aux)`` with ``aux`` holding ``loss``, ``penalty``,
      ``penalty_terms`` (``{layer: phi(...)}`` before ``layer_weights``),
      ``activation_grads`` (``{layer: d loss / d a_layer}``, or the
      per-example ``d loss_i / d a_i`` stacked (B, ...) for ``per_example``),
      ``logits`` (as the default loss reads them), and ``model_state`` when
      ``mutable`` is given.

    Raises ``ValueError`` (one line) for a penalty over zero capture points,
    a ``capture()`` name reached twice, a ``capture_modules`` path that is
    not called (listing the nearest paths), all-zero ``example_weights`` and
    an ``fd_step`` lost in rounding (``agp_common.penalty_spec.min_fd_step``).
      ``jax.grad(lambda p: penalized_loss(p, ...)[0])(params)`` is the training
      gradient (double backprop).

    PyTorch equivalent (the seed answer)::

        grads = torch.autograd.grad(loss, [relu1, relu2], create_graph=True)
        total = loss + w * sum(g.pow(2).sum() for g in grads)
    """
    check_loss_inputs(x, penalty_weight)  # clear ValueError (jax_impl.validation), before any forward pass
    check_penalized_loss_args(model, x, y, example_weights, loss_fn)
    if examples_interact is None:
        examples_interact = "batch_stats" in tuple(mutable)
    option_keywords["capture_modules"] = capture_modules  # popped again by _linen_forward_and_zeros
    # On CPU the model's nn.Conv layers get fast derivatives (jax_impl.fast_conv), inside every forward.
    forward, zeros = _linen_forward_and_zeros(params, model, x, model_state, mutable, option_keywords,
                                              fast=None if fast_convolutions else False)
    return penalized_loss_from_forward(
        forward, zeros, x, y, penalty_weight=penalty_weight, layers=layers, options=options,
        example_weights=example_weights, examples_interact=examples_interact, loss_fn=loss_fn,
        **option_keywords,
    )


def is_penalty_step(step: jax.Array | int, every: int) -> jax.Array:
    """Lazy regularisation: whether ``step`` (0-based) applies the penalty, ``step % every == 0``."""
    return jnp.asarray(step) % every == 0


def lazy_penalty_weight(step: jax.Array | int, every: int, weight: float | jax.Array) -> jax.Array:
    """The weight to use at ``step`` under lazy regularisation (StyleGAN2's lazy R1).

    ``every * weight`` on every ``every``-th step (0, k, 2k, ...), 0 otherwise,
    so the penalty's average weight per step stays ``weight`` while it is
    computed k times less often. Multiplying a weight of 0 does not skip the
    double backprop: to save the compute, branch with ``lax.cond`` on
    ``is_penalty_step`` (``lazy_value_and_grad`` does).
    """
    PenaltyOptions(every=every)  # checks every
    return jnp.where(is_penalty_step(step, every), weight * every, jnp.zeros_like(jnp.asarray(weight)))


def lazy_value_and_grad(
    params: Params,
    model: nn.Module | Apply,
    x: jax.Array,
    y: jax.Array,
    *,
    step: jax.Array | int,
    every: int | None = None,
    penalty_weight: float | jax.Array,
    options: PenaltyOptions | None = None,
    **keywords: Any,
) -> tuple[tuple[jax.Array, dict[str, Any]], Params]:
    """``value_and_grad`` of ``penalized_loss`` with the penalty only every ``every`` steps.

    On penalty steps (``step % every == 0``) it is the gradient of
    ``loss + every * penalty_weight * penalty``; on the others the gradient of
    the plain loss, computed *without* the double backprop (``lax.cond``
    executes one branch). ``aux`` has the same structure on both branches:
    on plain steps ``penalty``, ``penalty_terms`` and ``activation_grads``
    are zeros. ``every`` is a Python int (it picks the compiled program);
    ``None`` takes ``options.every``. ``keywords`` are ``penalized_loss``'s.
    """
    opts = options if options is not None else PenaltyOptions()
    every = opts.every if every is None else every
    opts = opts.replace(every=every)

    def penalized(p):
        return jax.value_and_grad(
            lambda q: penalized_loss(q, model, x, y, penalty_weight=penalty_weight * every, options=opts,
                                     **keywords),
            has_aux=True,
        )(p)

    if every == 1:
        return penalized(params)
    aux_shapes = jax.eval_shape(penalized, params)[0][1]

    def plain(p):
        return jax.value_and_grad(
            lambda q: _plain_loss(q, model, x, y, aux_shapes, **keywords), has_aux=True
        )(p)

    return jax.lax.cond(is_penalty_step(step, every), penalized, plain, params)


def _plain_loss(params, model, x, y, aux_shapes, *, example_weights=None, model_state=None, mutable=(),
                loss_fn=None, fast_convolutions=True, **keywords):
    """The unpenalised loss with an ``aux`` shaped like ``penalized_loss``'s (zeros for the penalty)."""
    forward, zeros = _linen_forward_and_zeros(params, model, x, model_state, mutable, dict(keywords),
                                              fast=None if fast_convolutions else False)
    outputs, state = forward(zeros, x)
    loss = weighted_mean((loss_fn or default_loss)(outputs, y), example_weights)
    aux = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), aux_shapes)
    aux["loss"] = loss
    aux["logits"] = model_logits(outputs)
    if state is not None:
        aux["model_state"] = state
    return loss, aux
