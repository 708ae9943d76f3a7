"""The steps ``python -m benchmarks.step_time`` times: one SGD step of the seed's CNN, JAX and PyTorch.

Each ``Runner`` does one full step and waits for it (float32, SGD, ``w = 10``):

* ``jax/penalised``: exactly what a user of the public API writes::

      (total, aux), grads = jax.value_and_grad(penalized_loss, has_aux=True)(
          params, Net(), x, y, penalty_weight=w)
      updates, opt_state = optax.sgd(lr).update(grads, opt_state, params)

  under one ``jax.jit`` with the default ``Net()`` (its convolution is picked
  per backend by ``conv_impl="auto"``: ``jax_impl.conv_impl``);
* ``jax+opts/penalised``: the same under ``jax.jit(step, **jit_options())``,
  the XLA options that the project's own compiled steps use
  (``jax_impl.xla_options``);
* ``jax/plain``, ``jax+opts/plain``: the same without the penalty (``cross_entropy_loss``);
* ``jax[impl]``, ``jax+opts[impl]``: ``Net(conv_impl=impl)`` (``--jax-conv-impls``);
* ``torch/penalised``: the seed answer's loop body with ``torch_ref.Net``
  (``autograd.grad(loss, [relu1, relu2], create_graph=True)``,
  ``zero_grad``, ``backward``, ``step``), eager mode;
* ``torch/plain``: ``zero_grad``, cross-entropy ``backward``, ``step``;
* with ``--torch-variants``, the same two PyTorch steps replayed from a CUDA
  graph (``torch+graph``, CUDA only) or over ``torch.compile``d stages
  (``torch+compile``); a variant PyTorch cannot run raises
  ``VariantUnavailable`` with PyTorch's error, which the benchmark records.

Every JAX step ends with ``block_until_ready``; on CUDA every torch step ends
with ``torch.cuda.synchronize()``.

FLOP count (analytic, multiply-accumulates x 2; elementwise ops, pooling and
the softmax are not counted). Per example, forward:

* ``conv1``: 28*28 outputs x 32 channels x (5*5*3) = F1 = 1,881,600 MACs
* ``conv2``: 10*10 outputs x 64 channels x (5*5*32) = F2 = 5,120,000 MACs
* ``linear``: 1600 x 10 = L = 16,000 MACs

so a forward pass is 7.02 M MACs = 14.0 MFLOP. The plain step adds each
layer's weight gradient and the input gradients of ``conv2`` and ``linear``
(the data needs none): 2 F1 + 3 F2 + 3 L = 19.17 M MACs (2.73 forwards).
The penalised step (double backprop) costs: forward (F1 + F2 + L); the inner
backward to ``relu1``/``relu2`` (input gradients only: F2 + L); and the outer
backward, which transposes the forward (F1 + 2 F2 + 2 L) *and* the inner
backward (each input-gradient product is bilinear in its two inputs, so it
costs two products: 2 F2 + 2 L): 2 F1 + 6 F2 + 6 L = 34.58 M MACs per example
(4.93 forwards, 1.80x the plain step). That 1.80 is the penalty overhead one
would see if every product ran at the same speed.

Peak memory (``Runner.peak_bytes``: the step's high-water mark including
parameters, optimizer state and the batch): JAX from XLA's buffer assignment
of the compiled step (``memory_analysis()``: arguments + outputs - aliased +
temporaries); PyTorch on CPU from the profiler's allocation events during one
step (running maximum of live bytes) plus the parameters and the batch; on
CUDA the device allocator's peak.

This module imports JAX, and PyTorch when a torch runner is built (``torch``
is passed in: ``import_torch()`` is None where it is not installed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jax_impl import Net, cross_entropy_loss, jit_options, penalized_loss

IMAGE_SHAPE = (32, 32, 3)  # (H, W, C), the seed's CIFAR-like input
NUM_CLASSES = 10

#: Per-example forward MACs of the seed's Net (see the module docstring).
CONV1_MACS = 28 * 28 * 32 * (5 * 5 * 3)
CONV2_MACS = 10 * 10 * 64 * (5 * 5 * 32)
LINEAR_MACS = 1600 * 10


def step_flops(batch_size: int, penalised: bool) -> int:
    """Analytic FLOPs (2 x MACs) of one training step; see the module docstring."""
    f1, f2, lin = CONV1_MACS, CONV2_MACS, LINEAR_MACS
    macs = 2 * f1 + 6 * f2 + 6 * lin if penalised else 2 * f1 + 3 * f2 + 3 * lin
    return 2 * macs * batch_size


def forward_flops(batch_size: int) -> int:
    """Analytic FLOPs of one forward pass (2 x MACs)."""
    return 2 * (CONV1_MACS + CONV2_MACS + LINEAR_MACS) * batch_size


@dataclass
class Runner:
    """One timed configuration: ``run()`` does one full step and waits for it."""

    framework: str
    step: str
    batch_size: int
    run: Callable[[], None]
    peak_bytes: Callable[[], int | None]


def make_batch(batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random NHWC float32 images (B, 32, 32, 3) and integer labels (B,), shared by both frameworks."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch_size, *IMAGE_SHAPE), dtype=np.float32)
    y = rng.integers(0, NUM_CLASSES, size=batch_size).astype(np.int32)
    return x, y


# --------------------------------------------------------------------------- JAX


def make_jax_step(model: Net, tx: optax.GradientTransformation, penalised: bool, penalty_weight: float,
                  options: bool = False):
    """The user's step: ``value_and_grad`` of ``penalized_loss`` (or plain CE) + optax update, under
    ``jax.jit`` (with ``**jit_options(conv_impl=model.conv_impl)`` when ``options``)."""

    def step(params, opt_state, x, y):
        if penalised:
            (total, _), grads = jax.value_and_grad(penalized_loss, has_aux=True)(
                params, model, x, y, penalty_weight=penalty_weight)
        else:
            total, grads = jax.value_and_grad(
                lambda p: cross_entropy_loss(model.apply({"params": p}, x), y))(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, total

    return jax.jit(step, **(jit_options(conv_impl=model.conv_impl) if options else {}))


def xla_peak_bytes(compiled) -> int | None:
    """Bytes live at the high-water mark of a compiled XLA program (None if unknown)."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # some backends do not implement it
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
               + m.temp_size_in_bytes)


def jax_runner(batch_size: int, penalised: bool, penalty_weight: float, lr: float, seed: int,
               conv_impl: str | None = None, options: bool = False) -> Runner:
    """A JAX runner; ``conv_impl=None`` is the default ``Net()`` (what users get); ``options``:
    compiled with ``jit_options()`` (framework ``jax+opts``)."""
    model = Net() if conv_impl is None else Net(conv_impl=conv_impl)
    x_np, y_np = make_batch(batch_size, seed)
    x, y = jnp.asarray(x_np), jnp.asarray(y_np)
    params = model.init(jax.random.key(seed), x)["params"]
    tx = optax.sgd(lr)
    step = make_jax_step(model, tx, penalised, penalty_weight, options)
    state = {"params": params, "opt_state": tx.init(params)}

    def run() -> None:
        params, opt_state, total = step(state["params"], state["opt_state"], x, y)
        jax.block_until_ready((params, opt_state, total))
        state["params"], state["opt_state"] = params, opt_state

    def peak() -> int | None:
        return xla_peak_bytes(step.lower(state["params"], state["opt_state"], x, y).compile())

    name = ("jax+opts" if options else "jax") + ("" if conv_impl is None else f"[{conv_impl}]")
    return Runner(name, "penalised" if penalised else "plain", batch_size, run, peak)

# ------------------------------------------------------------------------- torch


#: ``--torch-variants``: how the PyTorch step runs (framework names of their rows).
TORCH_VARIANTS = {"eager": "torch", "cuda-graph": "torch+graph", "compile": "torch+compile"}


class VariantUnavailable(Exception):
    """A ``--torch-variants`` variant cannot run here; the message (PyTorch's error) is recorded."""


def torch_setup(torch, batch_size: int, lr: float, seed: int, device: str):
    """``(net, optimizer, x, y)``: ``torch_ref.Net`` from ``seed``, SGD, the shared batch as NCHW."""
    from torch_ref.model import Net as TorchNet

    torch.manual_seed(seed)
    net = TorchNet().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    x_np, y_np = make_batch(batch_size, seed)
    x = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy()).to(device)  # NHWC -> NCHW
    y = torch.from_numpy(y_np).long().to(device)
    return net, optimizer, x, y


def seed_answer_step(torch, net, optimizer, x, y, penalised: bool, penalty_weight: float,
                     forward=None) -> Callable[[], None]:
    """One step of the seed answer's loop body (or the plain step without the penalty).

    ``forward(x) -> (logits, [relu1, relu2])``; default ``net(x)`` and the activations it stores.
    """
    criterion = torch.nn.CrossEntropyLoss()
    if forward is None:
        def forward(inputs):
            output = net(inputs)
            return output, [net.relu1, net.relu2]

    def penalised_step() -> None:
        # The seed answer, verbatim apart from names (only_inputs is deprecated and ignored).
        output, activations = forward(x)
        loss = criterion(output, y)
        grads = torch.autograd.grad(loss, activations, create_graph=True)
        grad_norm = 0
        for grad in grads:
            grad_norm += grad.pow(2).sum()
        optimizer.zero_grad()
        loss = loss + grad_norm * penalty_weight
        loss.backward()
        optimizer.step()

    def plain_step() -> None:
        optimizer.zero_grad()
        criterion(forward(x)[0], y).backward()
        optimizer.step()

    return penalised_step if penalised else plain_step


def compiled_stages(torch, net):
    """``forward(x) -> (logits, [relu1, relu2])`` from three ``torch.compile``d stages of ``net``.

    Compiling ``net`` whole would hide relu1 and relu2 inside one graph node, out of
    ``autograd.grad``'s reach; stage boundaries keep them as autograd tensors.
    """
    import torch.nn.functional as F

    stage1 = torch.compile(lambda x: F.relu(F.max_pool2d(net.conv1(x), 2)))
    stage2 = torch.compile(lambda a: F.relu(F.max_pool2d(net.conv2(a), 2)))
    head = torch.compile(lambda a: net.linear(a.reshape(a.size(0), -1)))

    def forward(x):
        relu1 = stage1(x)
        relu2 = stage2(relu1)
        return head(relu2), [relu1, relu2]

    return forward


def torch_runner(torch, batch_size: int, penalised: bool, penalty_weight: float, lr: float,
                 seed: int, device: str, variant: str = "eager") -> Runner:
    """A PyTorch runner: the seed answer's loop body with ``torch_ref.Net``, run as ``variant``.

    * ``"eager"``: as the answer wrote it.
    * ``"cuda-graph"``: the whole eager step (forward, double backward, SGD update) captured once
      in a CUDA graph and replayed (PyTorch's whole-network capture recipe). CUDA only.
    * ``"compile"``: the same step over :func:`compiled_stages`. The penalised step needs the
      double backward of compiled code; where PyTorch has none, its error is raised as
      :class:`VariantUnavailable` (and recorded by the benchmark).
    """
    if variant not in TORCH_VARIANTS:
        raise ValueError(f"variant must be one of {sorted(TORCH_VARIANTS)}, got {variant!r}")
    cuda = device.startswith("cuda")
    if variant == "cuda-graph" and not cuda:
        raise VariantUnavailable(f"CUDA graphs need a CUDA device (--torch-device is {device})")
    net, optimizer, x, y = torch_setup(torch, batch_size, lr, seed, device)
    forward = compiled_stages(torch, net) if variant == "compile" else None
    one_step = seed_answer_step(torch, net, optimizer, x, y, penalised, penalty_weight, forward)
    if variant == "cuda-graph":
        one_step = capture_cuda_graph(torch, one_step, optimizer)
    elif variant == "compile":
        try:
            one_step()  # compiles; raises where compiled stages have no double backward
        except Exception as error:  # PyTorch's own error is the result
            raise VariantUnavailable(f"{type(error).__name__}: {error}".splitlines()[0]) from error

    def run() -> None:
        one_step()
        if cuda:
            torch.cuda.synchronize()

    def peak() -> int | None:
        resident = sum(p.numel() * p.element_size() for p in net.parameters())
        resident += x.numel() * x.element_size() + y.numel() * y.element_size()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            run()
            return int(torch.cuda.max_memory_allocated())
        return resident + torch_cpu_step_peak(torch, run)

    return Runner(TORCH_VARIANTS[variant], "penalised" if penalised else "plain", batch_size, run, peak)


def torch_runners(torch, variants: Sequence[str], unavailable: dict[str, str], **common: Any) -> list[Runner]:
    """One runner per variant; a variant that cannot run adds its error to ``unavailable`` instead
    (keyed ``"<framework> <step>"``, first error only)."""
    runners = []
    for variant in variants:
        try:
            runners.append(torch_runner(torch, **common, variant=variant))
        except VariantUnavailable as error:
            key = f"{TORCH_VARIANTS[variant]} {'penalised' if common['penalised'] else 'plain'}"
            if key not in unavailable:
                print(f"  {key}: not run: {error}", flush=True)
            unavailable.setdefault(key, str(error))
    return runners


def capture_cuda_graph(torch, one_step: Callable[[], None], optimizer) -> Callable[[], None]:
    """``one_step`` captured in a CUDA graph; returns its replay (PyTorch's whole-network recipe)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph (cuDNN autotuning, allocations)
        for _ in range(3):
            one_step()
    torch.cuda.current_stream().wait_stream(side)
    optimizer.zero_grad(set_to_none=True)  # backward allocates .grad inside the graph's pool
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        one_step()
    return graph.replay


def torch_cpu_step_peak(torch, run: Callable[[], None]) -> int:
    """Running maximum of bytes allocated (minus freed) during one ``run()``, from the profiler."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def import_torch():
    """``torch`` or None when it is not installed (the benchmark then times JAX only)."""
    try:
        import torch
    except ImportError:
        return None
    return torch
