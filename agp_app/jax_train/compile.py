"""The JAX trainer's compiled functions, built once per process and key so that runs share them."""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
from jax.sharding import Mesh

from agp_app.jax_models import build_jax_model
from agp_app.jax_train.mesh import batch_sharded, data_mesh, replicated
from agp_app.jax_train.steps import attack_eval_step, eval_step, train_chunk, train_step
from agp_app.model_spec import DEFAULT_MODEL, ModelSpec
from agp_common.attack_spec import Attack
from agp_common.penalty_spec import PenaltyOptions
from jax_impl.model import Net
from jax_impl.xla_options import jit_options


def _bound_step(model: Net, optimizer: str, layers: tuple[str, ...] | None,
                options: PenaltyOptions | None, step_options: dict) -> Callable:
    """``train_step`` with everything but ``(state, batch, hparams)`` bound: what both compiled forms run."""
    return functools.partial(train_step, model=model, optimizer=optimizer, layers=layers, options=options,
                             **step_options)


def _step_options(capture_modules: tuple[tuple[str, str], ...], weight_decay: float, decoupled: bool,
                  compute_dtype: str | None) -> dict:
    """``train_step``'s keyword options from the hashable cache keys of ``compiled_steps``."""
    return {"capture_modules": dict(capture_modules), "weight_decay": weight_decay, "decoupled": decoupled,
            "compute_dtype": None if compute_dtype is None else jax.numpy.dtype(compute_dtype)}


def make_train_step(model: Net, optimizer: str, layers: tuple[str, ...] | None, mesh: Mesh, *,
                    options: PenaltyOptions | None = None, **step_options) -> Callable:
    """``train_step`` compiled for ``mesh``: state replicated and donated, batch sharded, ``Hyperparams``
    replicated and traced; with ``jit_options()``.

    The loss and penalty are those of the global batch (XLA inserts the
    cross-device reductions), so results match one device up to rounding.
    ``step_options``: ``train_step``'s
    ``capture_modules``, ``weight_decay``, ``decoupled``, ``compute_dtype``.
    """
    step = _bound_step(model, optimizer, layers, options, step_options)
    return jax.jit(step, in_shardings=(replicated(mesh), batch_sharded(mesh), replicated(mesh)),
                   out_shardings=(replicated(mesh), replicated(mesh)), donate_argnums=0,
                   **jit_options(conv_impl=getattr(model, "conv_impl", "auto")))


def make_train_chunk(model: Net, optimizer: str, layers: tuple[str, ...] | None, mesh: Mesh, *,
                     options: PenaltyOptions | None = None, **step_options) -> Callable:
    """``train_chunk`` of ``make_train_step``'s step, compiled for ``mesh``: called as
    ``(state, x, y, idx, real, hparams) -> (state, metrics)`` with the training split ``x``, ``y``
    (``feeding.DeviceFeeder``'s), ``idx``/``real`` (n, B) and ``Hyperparams`` of (n,) arrays;
    everything replicated but the gathered batches (sharded as a single step's), state donated.

    XLA compiles it once per chunk length n (``agp_app.loop.chunk_length`` uses two: N and 1).
    """
    step = _bound_step(model, optimizer, layers, options, step_options)
    chunk = functools.partial(train_chunk, step=step, batch_sharding=batch_sharded(mesh))
    return jax.jit(chunk, in_shardings=replicated(mesh), out_shardings=replicated(mesh), donate_argnums=0,
                   **jit_options(conv_impl=getattr(model, "conv_impl", "auto")))


def make_eval_step(model: Net, mesh: Mesh):
    """``eval_step`` compiled for ``mesh`` (params replicated, batch sharded), with ``jit_options()``."""
    return jax.jit(functools.partial(eval_step, model=model),
                   in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=replicated(mesh),
                   **jit_options(conv_impl=getattr(model, "conv_impl", "auto")))


@functools.lru_cache(maxsize=16)
def compiled_steps(num_classes: int, optimizer: str, devices: tuple[jax.Device, ...],
                   options: PenaltyOptions | None = None, conv_impl: str = "auto", *,
                   model: ModelSpec = DEFAULT_MODEL, capture_modules: tuple[tuple[str, str], ...] = (),
                   weight_decay: float = 0.0, decoupled: bool = False, compute_dtype: str | None = None):
    """``(model, mesh, train_step_fn, eval_step_fn)`` for a run, built once per process and key.

    Runs in one process with the same model, optimizer, penalty options and devices (tests, sweeps)
    share one jitted step whatever their learning rate and penalty weight, so XLA compiles each
    (shape, dtype) only once. ``conv_impl``: ``Net``'s convolution algorithm (``--conv-impl``).
    ``model``: the ``--model`` spec (``agp_app.jax_models.build_jax_model``); ``capture_modules``:
    ``(name, module path)`` pairs penalised by path; ``weight_decay``, ``decoupled``: the optimizer's;
    ``compute_dtype`` ``"bfloat16"``: mixed precision (``train_step``).
    """
    net, mesh = build_jax_model(model, num_classes, conv_impl), data_mesh(devices)
    step_fn = make_train_step(net, optimizer, None, mesh, options=options,
                              **_step_options(capture_modules, weight_decay, decoupled, compute_dtype))
    return net, mesh, step_fn, make_eval_step(net, mesh)


@functools.lru_cache(maxsize=16)
def compiled_train_chunk(num_classes: int, optimizer: str, devices: tuple[jax.Device, ...],
                         options: PenaltyOptions | None = None, conv_impl: str = "auto", *,
                         model: ModelSpec = DEFAULT_MODEL, capture_modules: tuple[tuple[str, str], ...] = (),
                         weight_decay: float = 0.0, decoupled: bool = False,
                         compute_dtype: str | None = None):
    """``make_train_chunk`` of ``compiled_steps``' model and mesh for the same arguments, built once per
    process and key (``--steps-per-dispatch``: runs of a sweep share it)."""
    net, mesh, _, _ = compiled_steps(num_classes, optimizer, devices, options, conv_impl, model=model,
                                     capture_modules=capture_modules, weight_decay=weight_decay,
                                     decoupled=decoupled, compute_dtype=compute_dtype)
    return make_train_chunk(net, optimizer, None, mesh, options=options,
                            **_step_options(capture_modules, weight_decay, decoupled, compute_dtype))


@functools.lru_cache(maxsize=16)
def compiled_attack_eval(num_classes: int, attacks: tuple[Attack, ...], clip: tuple[float, float],
                         devices: tuple[jax.Device, ...], conv_impl: str = "auto", *,
                         model: ModelSpec = DEFAULT_MODEL):
    """``attack_eval_step`` compiled for the mesh of ``devices`` (params replicated, batch sharded), once
    per process and key (a sweep's runs share it)."""
    mesh = data_mesh(devices)
    net = build_jax_model(model, num_classes, conv_impl)
    step = functools.partial(attack_eval_step, model=net, attacks=attacks, clip=clip)
    return jax.jit(step, in_shardings=(replicated(mesh), batch_sharded(mesh)), out_shardings=replicated(mesh),
                   **jit_options(conv_impl=conv_impl))
