"""The seed answer's penalised loss and SGD step, and the question's procedure.

Answer (the reference)::

    grads = torch.autograd.grad(loss, [model.relu1, model.relu2], create_graph=True)
    grad_norm = sum(g.pow(2).sum() for g in grads)
    optimizer.zero_grad()
    loss = loss + grad_norm * grad_penalty_weight
    loss.backward()
    optimizer.step()

The answer also passes ``only_inputs=True``; current PyTorch ignores that
argument (deprecated), so it is left out here.

The forward pass with its capture points is in ``torch_ref.penalty_forward``;
the error of a second derivative PyTorch lacks, in ``torch_ref.double_backward_errors``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from agp_common.penalty_spec import (
    INPUT,
    PenaltyOptions,
    check_examples_interact,
    check_layer_weights,
    resolve_options,
    select_layers,
    wants_input,
)
from torch_ref.capture import output_logits, running_stats_frozen
from torch_ref.double_backward_errors import explain_missing_second_derivatives, second_derivative_hint
from torch_ref.penalty_forward import (
    check_some_capture_points,
    forward_pass,
    replace_first_tensor,
    stored_captures,
    with_input_leaf,
)
from torch_ref.validation import check_labels, check_labels_fit_logits, check_loss_inputs

__all__ = [
    "has_interacting_examples",
    "is_penalty_step",
    "lazy_penalized_loss",
    "lazy_penalty_weight",
    "penalized_loss",
    "question_step",
    "second_derivative_hint",
    "stored_captures",
    "train_step",
]


def has_interacting_examples(model: nn.Module) -> bool:
    """True when a BatchNorm layer in train mode makes each example's loss depend on the others."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training for m in model.modules())


def _activation_grads(target: torch.Tensor, acts: Sequence[torch.Tensor], names: Sequence[str], *,
                      create_graph: bool) -> tuple[torch.Tensor, ...]:
    """``d target / d a`` for each capture point; one clear line for a point the loss does not depend on.

    (``autograd.grad``'s own error does not say which; a zero penalty there would be silent.)
    """
    grads = torch.autograd.grad(target, acts, create_graph=create_graph, retain_graph=True, allow_unused=True)
    unused = [n for n, g in zip(names, grads, strict=True) if g is None]
    if unused:
        raise ValueError(f"capture point(s) {unused} do not affect the loss: the model does not use the "
                         "captured tensor downstream; capture a module on the path from input to output")
    return grads


def _default_loss(output: Any, label: torch.Tensor) -> torch.Tensor:
    """Per-example softmax cross-entropy of ``output_logits(output)``, (B,)."""
    return nn.functional.cross_entropy(output_logits(output), label, reduction="none")


def _safe_sqrt(s: torch.Tensor) -> torch.Tensor:
    """``sqrt(s)`` with derivative 0 (not inf) at ``s == 0``, as in ``jax_impl.penalty``."""
    positive = s > 0
    root = torch.sqrt(torch.where(positive, s, torch.ones_like(s)))
    return torch.where(positive, root, torch.zeros_like(s))


def _per_example_squares(g: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B,): squared L2 norm of each example's slice."""
    return g.pow(2).reshape(g.shape[0], -1).sum(dim=1)


def _phi(squared: torch.Tensor, norm: str) -> torch.Tensor:
    return squared if norm == "squared_l2" else _safe_sqrt(squared)


def penalized_loss(
    model: nn.Module,
    input: torch.Tensor,
    label: torch.Tensor,
    penalty_weight: float,
    layers: Sequence[str] | str | None = None,
    *,
    options: PenaltyOptions | None = None,
    capture_modules: Mapping[str, str] | None = None,
    examples_interact: bool | None = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    **option_keywords: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """Forward pass and ``total = loss + w * sum_l ||d loss / d a_l||^2`` (seed answer).

    Capture points, by name: without ``capture_modules``, the activations that
    ``forward`` stores as attributes, as in the seed answer's ``Net``
    (``self.relu1 = ...``; ``layers`` defaults to the seed's ``relu1``,
    ``relu2``; a model with a ``captures()`` method, like ``torch_ref.Net``,
    names its own); with ``capture_modules={name: "module.path[:k]"}``, the
    outputs of those submodules (forward hooks, ``torch_ref.capture``), for any
    ``nn.Module``. Returns ``(total, aux)`` with ``aux`` holding ``loss``,
    ``penalty``, ``penalty_terms``, ``activation_grads`` (NCHW, still in the
    graph) and ``logits``. ``total.backward()`` then puts the training
    gradient into the parameters' ``.grad``.

    ``options`` (a ``PenaltyOptions``) or its fields as keywords mirror
    ``jax_impl.penalized_loss`` (same formulas): ``normalization``, ``norm``,
    ``layer_weights``, ``"input"`` in ``layers``, ``approx`` with ``fd_step``.
    ``examples_interact=None`` means: a BatchNorm module is in train mode; then
    per-example gradients take one backward pass per example.

    Models as they come (Hugging Face, model zoos):

    - ``input``: a tensor (``model(input)``), a tuple of positional inputs
      (``model(*input)``) or a dict of keyword inputs (``model(**input)``,
      e.g. ``input_ids``, ``attention_mask``); the batch size is the first
      tensor's leading axis. Integer inputs (token ids) work; the ``"input"``
      capture point then refuses (it differentiates the first input tensor,
      which must be floating).
    - Captured modules that return a tuple (Hugging Face layers) contribute
      their first element; a ``ModelOutput`` its first field
      (``torch_ref.capture``). ``torch_ref.capture_points(model, x)`` lists the
      specs. Hooked outputs get a zero leaf added and are differentiated
      through it, so an in-place op after the capture point
      (``ReLU(inplace=True)``) does not change the penalty.
    - The default loss is the mean softmax cross-entropy of
      ``outputs.logits`` where the output has it (``SequenceClassifierOutput``),
      else element 0 of a tuple/list, else the output (B, K). ``loss_fn``
      overrides it: a per-example loss ``(outputs, y) -> (B,)`` of the *raw*
      output (as ``jax_impl.penalized_loss``'s). ``aux["logits"]`` holds the
      logits so found, ``aux["outputs"]`` the raw output.
    - Fused attention (``F.scaled_dot_product_attention``, Hugging Face's
      default ``attn_implementation="sdpa"``) has no second derivative;
      ``total.backward()`` then raises a ``RuntimeError`` naming the fix:
      ``attn_implementation="eager"`` or ``approx="finite_difference"``.
    """
    opts = resolve_options(options, layers, **option_keywords)
    check_loss_inputs(input, penalty_weight)  # clear ValueError (torch_ref.validation)
    check_labels(model, input, label, loss_fn)
    plain_call = loss_fn is None and capture_modules is None and isinstance(input, torch.Tensor)
    if opts.is_seed_recipe and plain_call and not wants_input(opts.layers):
        return _seed_penalized_loss(model, input, label, penalty_weight, opts.layers)
    return _penalized_loss_options(model, input, label, penalty_weight, opts, capture_modules=capture_modules,
                                   examples_interact=examples_interact, loss_fn=loss_fn)


def _seed_penalized_loss(model, input, label, penalty_weight, layers):
    """The seed answer's computation, unchanged (the defaults of ``penalized_loss``)."""
    output = model(input)
    check_labels_fit_logits(output, label)  # one clear line instead of cross_entropy's IndexError
    loss = nn.CrossEntropyLoss()(output, label)
    captures = stored_captures(model, layers)
    names = select_layers(tuple(captures), layers)
    check_some_capture_points(names)
    grads = torch.autograd.grad(loss, [captures[n] for n in names], create_graph=True)
    terms = {n: g.pow(2).sum() for n, g in zip(names, grads, strict=True)}
    grad_norm = 0
    for term in terms.values():
        grad_norm += term
    total = loss + grad_norm * penalty_weight
    aux = {
        "loss": loss,
        "penalty": grad_norm,
        "penalty_terms": terms,
        "activation_grads": dict(zip(names, grads, strict=True)),
        "logits": output,
        "outputs": output,
    }
    return total, aux


def _penalized_loss_options(model, input, label, penalty_weight, opts: PenaltyOptions, *, capture_modules,
                            examples_interact, loss_fn):
    normalization, norm, approx = opts.normalization, opts.norm, opts.approx
    per_example = normalization == "per_example"
    if examples_interact is None:
        examples_interact = has_interacting_examples(model)
    check_examples_interact(opts, examples_interact)
    x, leaf = with_input_leaf(input) if wants_input(opts.layers) else (input, None)
    output, _, wrt = forward_pass(model, x, capture_modules, opts.layers)
    names = select_layers(tuple(wrt), opts.layers)
    check_some_capture_points(names)
    wrt = {**wrt, INPUT: leaf}
    check_layer_weights(opts, names)
    weights = {n: opts.weight_of(n) for n in names}
    acts = [wrt[n] for n in names]  # d loss / d z = d loss / d a (z: the zero leaf added to a)
    if loss_fn is None:
        check_labels_fit_logits(output_logits(output), label)
        loss_fn = _default_loss
    losses = loss_fn(output, label)  # (B,)
    loss = losses.mean()
    exact = approx == "exact"
    if not per_example:
        grads = _activation_grads(loss, acts, names, create_graph=exact)
    elif not examples_interact:
        # loss_i depends on a_i only: slice i of d(sum_i loss_i)/da is d loss_i / d a_i.
        grads = _activation_grads(losses.sum(), acts, names, create_graph=exact)
    else:
        # One backward per example, keeping slice i of d loss_i / d a (B passes).
        rows = [_activation_grads(losses[i], acts, names, create_graph=True) for i in range(losses.shape[0])]
        grads = [torch.stack([rows[i][k][i] for i in range(len(rows))]) for k in range(len(acts))]
    if exact:
        explain_missing_second_derivatives(grads)
    grads = dict(zip(names, grads, strict=True))
    if per_example:
        terms = {n: _phi(_per_example_squares(g), norm).mean() for n, g in grads.items()}
    else:
        terms = {n: _phi(g.pow(2).sum(), norm) for n, g in grads.items()}
    if exact:
        grad_norm = 0
        for n, term in terms.items():
            grad_norm += term if opts.layer_weights is None else weights[n] * term
    else:
        grad_norm = _finite_difference_penalty(
            model, input, label, leaf, capture_modules, loss_fn, grads, loss if not per_example else losses,
            norm=norm, per_example=per_example, weights=weights, fd_step=opts.fd_step,
        )
        terms = {n: t.detach() for n, t in terms.items()}
    total = loss + grad_norm * penalty_weight
    aux = {
        "loss": loss,
        "penalty": grad_norm,
        "penalty_terms": terms,
        "activation_grads": grads,
        "logits": output_logits(output),
        "outputs": output,
    }
    return total, aux


def _finite_difference_penalty(
    model, input, label, leaf, capture_modules, loss_fn, grads, base, *, norm, per_example, weights, fd_step
):
    """Finlay & Oberman (2019), as ``jax_impl.penalty._finite_difference_penalty``.

    ``d = (loss(a + h v) - loss(a)) / h`` along the detached, weighted, unit
    direction ``v``; squared L2: one joint shift of every layer, ``d^2``; L2:
    one shift per layer, ``lambda_l d_l``; per example: per-example ``d_i``
    with each example shifted along its own direction, then the mean.
    """
    grads = {n: g.detach() for n, g in grads.items()}
    groups = [tuple(grads)] if norm == "squared_l2" else [(n,) for n in grads]
    penalty = 0
    for group in groups:
        # (squared L2: g^T Lambda g over the group; L2: the one layer's ||g_l||^2, unweighted).
        lam = weights if norm == "squared_l2" else dict.fromkeys(weights, 1.0)
        if per_example:
            sq = sum(lam[n] * _per_example_squares(grads[n]) for n in group)  # (B,)
        else:
            sq = sum(lam[n] * grads[n].pow(2).sum() for n in group)
        positive = sq > 0
        inv_len = torch.where(positive, torch.rsqrt(torch.where(positive, sq, torch.ones_like(sq))),
                              torch.zeros_like(sq))
        shifts = {}
        for n in group:
            scale = inv_len.reshape((-1,) + (1,) * (grads[n].dim() - 1)) if per_example else inv_len
            shifts[n] = fd_step * lam[n] * scale * grads[n]
        shifted_input = replace_first_tensor(input, leaf + shifts.pop(INPUT)) if INPUT in shifts else input
        with running_stats_frozen(model):
            output, _, _ = forward_pass(model, shifted_input, capture_modules, tuple(grads), shifts)
        losses = loss_fn(output, label)
        shifted = losses if per_example else losses.mean()
        d = (shifted - base) / fd_step
        contribution = d.pow(2) if norm == "squared_l2" else weights[group[0]] * d
        penalty = penalty + (contribution.mean() if per_example else contribution)
    return penalty


def is_penalty_step(step: int, every: int) -> bool:
    """Lazy regularisation: the penalty applies on steps 0, k, 2k, ... (as ``jax_impl``)."""
    if not (isinstance(every, int) and not isinstance(every, bool) and every >= 1):
        raise ValueError(f"penalty every must be a positive integer number of steps, got {every!r}")
    return step % every == 0


def lazy_penalty_weight(step: int, every: int, weight: float) -> float:
    """``every * weight`` on penalty steps, 0 otherwise (StyleGAN2's lazy R1 scaling).

    On the other steps call the plain loss instead (``lazy_penalized_loss``)
    to skip the double backprop entirely.
    """
    return weight * every if is_penalty_step(step, every) else 0.0


def lazy_penalized_loss(
    model: nn.Module,
    input: torch.Tensor,
    label: torch.Tensor,
    penalty_weight: float,
    layers: Sequence[str] | str | None = None,
    *,
    step: int,
    every: int | None = None,
    options: PenaltyOptions | None = None,
    **keywords: Any,
) -> tuple[torch.Tensor, dict[str, Any]]:
    """``penalized_loss`` with weight ``every * w`` on penalty steps, the plain loss on the others.

    ``every=None`` takes ``options.every``. On plain steps ``aux`` holds
    ``loss``, ``logits``, and zeros for ``penalty`` and every chosen layer's
    ``penalty_terms`` (no double backprop is done). ``keywords`` are
    ``penalized_loss``'s.
    """
    opts = options if options is not None else PenaltyOptions()
    every = opts.every if every is None else every
    if is_penalty_step(step, every):
        return penalized_loss(model, input, label, penalty_weight * every, layers, options=opts, **keywords)
    layers = resolve_options(opts, layers).layers
    output, captures, _ = forward_pass(model, input, keywords.get("capture_modules"), layers)
    loss_fn = keywords.get("loss_fn")
    if loss_fn is None:
        logits = output_logits(output)
        check_labels_fit_logits(logits, label)
        loss = nn.CrossEntropyLoss()(logits, label)
    else:
        loss = loss_fn(output, label).mean()
    zero = torch.zeros((), dtype=loss.dtype)
    names = select_layers(tuple(captures), layers)
    check_some_capture_points(names)
    terms = dict.fromkeys(names, zero)
    return loss, {"loss": loss, "penalty": zero, "penalty_terms": terms, "logits": output_logits(output),
                  "outputs": output}


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    input: torch.Tensor,
    label: torch.Tensor,
    penalty_weight: float,
    layers: Sequence[str] | str | None = None,
    *,
    options: PenaltyOptions | None = None,
    step: int = 0,
    capture_modules: Mapping[str, str] | None = None,
) -> dict[str, float]:
    """One step of the seed answer's loop: penalised loss, ``zero_grad``, ``backward``, ``step``.

    ``options`` (default: the seed recipe; ``layers`` overrides ``options.layers``) and
    ``capture_modules`` are ``penalized_loss``'s. With ``options.every`` = k the penalty
    (weight k*w) applies only when the 0-based ``step`` is 0, k, 2k, ... and the other steps
    use the plain loss (lazy regularisation, ``lazy_penalized_loss``); ``python -m
    torch_ref.train`` runs this step.

    Returns the step's metrics as floats, with the keys of ``jax_impl.train.train_step``'s:
    ``total``, ``loss``, ``penalty``, ``penalty/<layer>``, ``act_grad_norm/<layer>`` (the
    square root of the term; the term itself with ``norm="l2"``), ``accuracy``, and
    ``grad_norm``, ``param_norm`` (global L2 norms, before the update).
    """
    opts = options if options is not None else PenaltyOptions()
    total, aux = lazy_penalized_loss(model, input, label, penalty_weight, layers, step=step, options=opts,
                                     capture_modules=capture_modules)
    optimizer.zero_grad()
    total.backward()
    params = list(model.parameters())
    with torch.no_grad():  # sqrt(sum of squares of every entry), as ``optax.tree.norm``
        grad_norm = sum(float(p.grad.pow(2).sum()) for p in params) ** 0.5
        param_norm = sum(float(p.pow(2).sum()) for p in params) ** 0.5
    metrics = {
        "total": total.detach().item(),
        "loss": aux["loss"].detach().item(),
        "penalty": aux["penalty"].detach().item(),
        "accuracy": (aux["logits"].detach().argmax(dim=1) == label).double().mean().item(),
        "grad_norm": grad_norm,
        "param_norm": param_norm,
    }
    for name, term in aux["penalty_terms"].items():
        value = term.detach().item()
        metrics[f"penalty/{name}"] = value
        metrics[f"act_grad_norm/{name}"] = value if opts.norm == "l2" else value ** 0.5  # l2: already a norm
    optimizer.step()
    return metrics


def question_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    input: torch.Tensor,
    label: torch.Tensor,
) -> None:
    """The seed *question*'s loop body, kept verbatim in spirit for comparison.

    It retains the activations' ``.grad``, calls ``loss.backward(retain_graph=True)``
    (weight gradients of the loss), then ``autograd.grad(..., create_graph=True)``
    and ``grad_norm.backward()``, which *adds* the penalty's weight gradients
    (with weight 1). Its weight gradients equal the answer's with
    ``penalty_weight=1``. Its retained activation ``.grad`` fields end up as
    ``2 * d loss / d a + d grad_norm / d a``: ``backward`` writes d loss / d a,
    ``autograd.grad`` fires the ``retain_grad`` hooks and adds it again, and
    ``grad_norm.backward()`` adds the penalty's part (see the FAQ and
    parity_tests/test_question_vs_answer.py).
    """
    output = model(input)
    model.relu1.retain_grad()
    model.relu2.retain_grad()
    loss = nn.CrossEntropyLoss()(output, label)
    optimizer.zero_grad()
    loss.backward(retain_graph=True)
    grads = torch.autograd.grad(loss, [model.relu1, model.relu2], create_graph=True)
    grad_norm = 0
    for grad in grads:
        grad_norm += grad.pow(2).sum()
    grad_norm.backward()
    optimizer.step()
