"""``jit_options()``: the keyword arguments of ``jax.jit`` that make the penalised step fastest here.

XLA picks its convolution kernels per compiled function, from its
``compiler_options``; this module names the set that measured fastest for
each backend, so every compiled step of the project (the training CLI's train
and eval steps, the sweep, the benchmark, the parity suite) and any user's own
``jax.jit`` can ask for it without a process-wide ``XLA_FLAGS``::

    step = jax.jit(train_step, **jit_options())

CPU (XLA 0.10-0.11). XLA hands NHWC convolutions and dots to YNNPACK by
default; ``xla_cpu_experimental_ynn_fusion_type`` is that list, and setting it
to dots only sends the convolutions to XLA's Eigen kernels instead. Measured
on a 2-core AMD EPYC (AVX2), float32, the user-level step
``jax.jit(value_and_grad(penalized_loss))`` + SGD with ``Net()`` on
``"canonical"`` convolutions (the default where oneDNN's are not built), ms per
step, median of 15 interleaved rounds
in one process (``python -m benchmarks.step_time``: rows ``jax`` and
``jax+opts``), on a machine shared with another job (load 0.7-1.3):

==========================  =========  =========  ==========
options                     batch 1    batch 32   batch 128
==========================  =========  =========  ==========
``{}`` (YNNPACK convs)      3.07       49.8       294
Eigen convolutions          2.41       35.5       148
==========================  =========  =========  ==========

In separate A/B runs under heavier load (2-4) Eigen won 1.8x at batch 128
(the kernel-gradient convolution of conv1 runs at ~4 GFLOP/s under YNNPACK
there), tied at batch 16-32 and at batch 1 was within the noise. The XNNPACK
switches of the same XLA (``xla_cpu_use_xnnpack``,
``xla_cpu_experimental_xnn_fusion_type`` with convolutions) timed the same as
Eigen, and oneDNN's changed nothing, so the smaller set is used. XLA's native
convolution derivatives (``Net(conv_impl="xla")``) are 2.5-4x slower than
``"canonical"`` under every option set.

GPU and TPU: ``{}``; the ``xla_cpu_*`` options do not apply there, and no
GPU option has been measured to help (the H100 numbers of docs/performance.md
are without options).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jax_impl.conv_impl import ConvImpl, resolve_conv_impl

#: CPU: convolutions to Eigen, dots still to YNNPACK (the list replaces XLA's default one).
CPU_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def jit_options(backend: str | None = None, conv_impl: str | ConvImpl = "auto") -> dict[str, Any]:
    """Keyword arguments for ``jax.jit`` that select the fastest convolutions on ``backend``.

    ``backend`` defaults to JAX's default backend; ``conv_impl`` is the
    model's ``Net(conv_impl=...)`` (a name or the model's resolved
    ``ConvImpl``: ``jit_options(conv_impl=model.conv_impl)``). Returns
    ``{"compiler_options": CPU_COMPILER_OPTIONS}`` on CPU and ``{}`` on GPU and
    TPU, or where the installed XLA does not know the option (older jaxlib: an
    unknown compiler option is an error at compile time, so it is tried once on
    a one-element function first). ``{}`` too for a model whose convolutions
    run as oneDNN (``"onednn"``, and ``"auto"`` on CPU, where it is built): they are
    custom calls that XLA's kernel options do not reach, and the options slowed
    the rest of that step down (batch 32, 2 cores, in one process: 56 ms with
    them, 48 without, for the user-level step; 58 against 44 for the CLI's).
    The options change which kernels run, not the arithmetic's definition:
    results differ from the default only by float rounding. A fresh dict each
    call, safe to extend::

        step = jax.jit(step_fn, donate_argnums=0, **jit_options())
    """
    backend = backend or jax.default_backend()
    if backend == "cpu" and resolve_conv_impl(conv_impl, backend) is ConvImpl.ONEDNN:
        return {}
    if backend == "cpu" and _accepted(tuple(CPU_COMPILER_OPTIONS.items())):
        return {"compiler_options": dict(CPU_COMPILER_OPTIONS)}
    return {}


@functools.cache
def _accepted(options: tuple[tuple[str, Any], ...]) -> bool:
    """Whether this jaxlib's CPU compiler accepts ``options`` (compiles a scalar ``x + 1`` with them)."""
    try:
        jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(
            jax.ShapeDtypeStruct((), jnp.float32)).compile()
    except Exception:  # jaxlib raises its own runtime error type for an unknown option or value
        return False
    return True
