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
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from agp_common.penalty_spec import (
    INPUT,
    PenaltyOptions,
    check_examples_interact,
    check_layer_weights,
    resolve_options,
    select_layers,
)
from jax_impl.fast_conv import fast_convolutions as _fast_convolutions
from jax_impl.module_capture import SEP as SEP  # re-exported: jax_impl.nnx and callers use penalty.SEP
from jax_impl.module_capture import Runner, apply_fn, intercepted, is_hf_model, model_logits, probe, runner
from jax_impl.validation import (
    check_example_weights,
    check_fd_step,
    check_input_capture,
    check_loss_inputs,
    check_penalized_loss_args,
)

Params = Any

#: ``forward(perturbations, x) -> (outputs, updated_state_or_None)``; the
#: perturbations are a flat ``{capture name: array}`` dict of the model's
#: capture points (never ``"input"``, which is added to ``x`` by the caller).
Forward = Callable[[dict[str, jax.Array], Any], tuple[Any, Any]]
#: ``apply(variables, x, mutable=...)``: ``Module.apply``, or a function with its signature.
Apply = Callable[..., Any]


def per_example_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Softmax cross-entropy of each example: (B, K), (B,) -> (B,)."""
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def weighted_mean(per_example: jax.Array, example_weights: jax.Array | None = None) -> jax.Array:
    """``mean(l)``, or ``sum_i m_i l_i / sum_i m_i`` with example weights ``m`` (B,)."""
    if example_weights is None:
        return per_example.mean()
    weights = example_weights.astype(per_example.dtype)
    return jnp.sum(weights * per_example) / jnp.sum(weights)


def cross_entropy_loss(
    logits: jax.Array, labels: jax.Array, example_weights: jax.Array | None = None
) -> jax.Array:
    """Mean softmax cross-entropy, PyTorch's ``nn.CrossEntropyLoss()``: (B, K), (B,) -> ().

    With ``example_weights`` m (B,) it is ``sum_i m_i CE_i / sum_i m_i``; a 0/1
    mask makes it the mean over the real examples of a zero-padded batch (the
    training loop pads its last partial batch so the step is not recompiled).
    """
    return weighted_mean(per_example_cross_entropy(logits, labels), example_weights)  # (B,) -> ()


def _apply_fn(model: nn.Module | Apply, apply_kwargs: Mapping | None = None, rngs: Any = None) -> Apply:
    """``model.apply`` with bound keywords (``module_capture.apply_fn``; kept for callers of this name)."""
    return apply_fn(model, apply_kwargs, rngs)


def linen_forward(
    model: nn.Module | Apply,
    params: Params,
    *,
    model_state: Mapping | None = None,
    mutable: Sequence[str] = (),
    apply_kwargs: Mapping | None = None,
    rngs: Any = None,
    capture_modules: Mapping[str, str] | None = None,
) -> Forward:
    """``forward(perturbations, x)`` for a Linen module: ``model.apply`` with the perturbations.

    ``model`` is a Linen module, an ``apply`` function with ``Module.apply``'s
    signature (e.g. ``functools.partial(model.apply, train=True)``) or a
    Hugging Face Flax model (``jax_impl.capture``). ``x`` is one array, a
    tuple (positional inputs) or a dict (keyword inputs).
    Variables are ``{"params": params, **model_state, "perturbations": ...}``;
    the perturbations of ``capture_modules`` names (``{name: "path/to/module[:k]"}``)
    are added to those modules' outputs instead (``jax_impl.capture``).
    Returns ``(outputs, updated collections)`` when ``mutable`` names
    collections (e.g. ``["batch_stats"]``), else ``(outputs, None)``.
    """
    return _forward_of(runner(model, apply_kwargs=apply_kwargs, rngs=rngs), params, model_state, mutable,
                       capture_modules)


def _forward_of(run: Runner, params, model_state, mutable, capture_modules) -> Forward:
    """``forward(perturbations, x)`` from ``module_capture.runner``'s ``run``, capture by path outermost."""
    run = intercepted(run, capture_modules)
    mutable = list(mutable)

    def forward(perturbations: dict[str, jax.Array], x: Any):
        return run(params, model_state, perturbations, x, mutable)

    return forward


def zero_perturbations(
    model: nn.Module | Apply,
    params: Params,
    x: Any,
    *,
    model_state: Mapping | None = None,
    mutable: Sequence[str] = (),
    apply_kwargs: Mapping | None = None,
    rngs: Any = None,
    capture_modules: Mapping[str, str] | None = None,
) -> dict[str, jax.Array]:
    """Zero perturbations for every capture point of ``model`` at the batch ``x``.

    Returns a flat dict ``{"relu1": zeros(B, 14, 14, 32), ...}`` keyed by capture
    name (nested modules give ``"block/relu"``), then the ``capture_modules``
    names (zeros shaped like those modules' outputs, first element of a tuple).
    Shapes come from tracing only (``jax.eval_shape``), so this is free under
    ``jit`` and always matches the batch size of ``x``, not the one the model
    was initialised with. ``model`` and the keywords are as in ``linen_forward``.
    Raises a one-line ``ValueError`` for a ``capture()`` name reached twice
    and for a ``capture_modules`` path that is not called (listing the nearest).
    """
    return _zeros_of(runner(model, apply_kwargs=apply_kwargs, rngs=rngs), params, x, model_state, mutable,
                     capture_modules, hf=is_hf_model(model))


def _zeros_of(run: Runner, params, x, model_state, mutable, capture_modules, *, hf: bool):
    found = probe(run, params, model_state, x, mutable, capture_modules, with_collections=not hf)
    shapes = {**found.capture_shapes, **found.path_shapes}
    return {name: jnp.zeros(s.shape, s.dtype) for name, s in shapes.items()}


def _chosen_zeros(
    zeros: Mapping[str, jax.Array], x: jax.Array, layers: Sequence[str]
) -> dict[str, jax.Array]:
    """The perturbations that are differentiated: the chosen capture points, and ``x`` for ``"input"``."""
    return {name: (jnp.zeros_like(x) if name == INPUT else zeros[name]) for name in layers}


def _perturbed(forward: Forward, zeros: Mapping[str, jax.Array], x: jax.Array, reduce):
    """``chosen -> (reduce(outputs), (outputs, state))`` with the chosen perturbations applied.

    ``chosen`` holds perturbations of some capture points (added where the
    model marks them) and, under ``"input"``, one added to ``x``.
    """

    def run(chosen: Mapping[str, jax.Array]):
        inner = {**zeros, **{k: v for k, v in chosen.items() if k != INPUT}}
        inputs = x + chosen[INPUT] if INPUT in chosen else x
        outputs, state = forward(inner, inputs)
        return reduce(outputs), (outputs, state)

    return run


def default_loss(outputs: Any, labels: jax.Array) -> jax.Array:
    """Per-example softmax cross-entropy of the model's logits (``model_logits``: ``outputs.logits``,
    else element 0 of a tuple, else the outputs): (B, K), (B,) -> (B,)."""
    return per_example_cross_entropy(model_logits(outputs), labels)


def _batch_loss(loss_fn, y, example_weights):
    return lambda outputs: weighted_mean(loss_fn(outputs, y), example_weights)


def _sum_over_examples(v: jax.Array) -> jax.Array:
    """Per-example sum of squares over all non-batch axes: (B, ...) -> (B,)."""
    return jnp.sum(jnp.square(v).reshape(v.shape[0], -1), axis=1)


def _safe_sqrt(s: jax.Array) -> jax.Array:
    """``sqrt(s)`` whose derivative at ``s == 0`` is 0 instead of inf (so 0 * inf never makes NaN)."""
    positive = s > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1.0)), 0.0)


def _apply_norm(squared: jax.Array, norm: str) -> jax.Array:
    return squared if norm == "squared_l2" else _safe_sqrt(squared)


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


def _exact_terms(grads, norm, per_example, example_weights):
    """Per-layer terms before ``layer_weights``: ``phi(||g_l||^2)`` or ``mean_i phi(||G_{l,i}||^2)``."""
    if not per_example:
        return {name: _apply_norm(jnp.sum(jnp.square(g)), norm) for name, g in grads.items()}
    return {
        name: weighted_mean(_apply_norm(_sum_over_examples(g), norm), example_weights)
        for name, g in grads.items()
    }


def _finite_difference_penalty(
    forward, zeros, x, y, loss_fn, example_weights, grads, base_loss, options: PenaltyOptions,
):
    """Finlay & Oberman (2019): ``phi(||g||^2)`` from a directional finite difference.

    With ``g`` detached, ``v = Lambda g / sqrt(g^T Lambda g)`` and
    ``d = (loss(a + h v) - loss(a)) / h = sqrt(g^T Lambda g) + O(h)``, the
    squared-L2 penalty ``sum_l lambda_l ||g_l||^2`` is estimated by ``d^2``
    (one joint shift of all layers), the L2 one by ``sum_l lambda_l d_l`` (one
    shift per layer, ``v_l = g_l / ||g_l||``). Differentiating ``d`` w.r.t. the
    parameters is ordinary backprop, and
    ``grad_theta d^2 = 2 (dg/dtheta)^T Lambda g + O(h)``: the exact gradient up
    to O(h). Per example the same holds example by example, with every
    example shifted along its own direction in one forward pass (exact only
    when examples do not interact).
    """
    norm, fd_step = options.norm, options.fd_step
    per_example = options.normalization == "per_example"
    weights = {name: options.weight_of(name) for name in grads}
    groups = [tuple(grads)] if norm == "squared_l2" else [(name,) for name in grads]
    per_loss = (lambda out: loss_fn(out, y)) if per_example else _batch_loss(loss_fn, y, example_weights)
    run = _perturbed(forward, zeros, x, per_loss)
    if base_loss is None:
        base, _ = run({name: jnp.zeros_like(g) for name, g in grads.items()})  # (B,)
    else:
        base = base_loss
    penalty = 0.0
    for group in groups:
        # Squared length of the weighted direction, per example (B,) or for the batch ().
        # (squared L2: g^T Lambda g over the group; L2: the one layer's ||g_l||^2, unweighted).
        lam = weights if norm == "squared_l2" else dict.fromkeys(weights, 1.0)
        if per_example:
            sq = sum(lam[n] * _sum_over_examples(grads[n]) for n in group)  # (B,)
        else:
            sq = sum(lam[n] * jnp.sum(jnp.square(grads[n])) for n in group)  # ()
        positive = sq > 0
        inv_len = jnp.where(positive, jax.lax.rsqrt(jnp.where(positive, sq, 1.0)), 0.0)
        shifts = {}
        for name, g in grads.items():
            if name not in group:
                shifts[name] = jnp.zeros_like(g)
                continue
            scale = inv_len.reshape((-1,) + (1,) * (g.ndim - 1)) if per_example else inv_len
            shifts[name] = fd_step * lam[name] * scale * g
        shifted, _ = run(shifts)
        d = (shifted - base) / fd_step  # (B,) or ()
        if norm == "squared_l2":
            contribution = jnp.square(d)
        else:
            contribution = weights[group[0]] * d
        if per_example:
            contribution = weighted_mean(contribution, example_weights)
        penalty = penalty + contribution
    return penalty


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


def _linen_forward_and_zeros(params, model, x, model_state, mutable, keywords: dict,
                             fast: bool | None = False):
    """The forward closure and zero perturbations of a Linen model (pops ``apply_kwargs``, ``rngs``,
    ``capture_modules`` from ``keywords``); ``fast``: ``jax_impl.fast_conv.fast_convolutions``'s flag.

    The fast convolutions are entered inside each model run, so that capture by path
    (``jax_impl.capture``) intercepts first: an interceptor that replaces ``nn.Conv``'s computation
    ends the chain, and one entered before it would hide the ``nn.Conv`` calls from the capture.
    """
    run = runner(model, apply_kwargs=keywords.pop("apply_kwargs", None), rngs=keywords.pop("rngs", None))
    capture_modules = keywords.pop("capture_modules", None)
    if fast is not False:
        run = _with_fast_convolutions(run, fast)
    forward = _forward_of(run, params, model_state, mutable, capture_modules)
    zeros = _zeros_of(run, params, x, model_state, mutable, capture_modules, hf=is_hf_model(model))
    return forward, zeros


def _with_fast_convolutions(run: Runner, enabled: bool | None) -> Runner:
    def run_fast(*args):
        with _fast_convolutions(enabled):
            return run(*args)

    return run_fast


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
