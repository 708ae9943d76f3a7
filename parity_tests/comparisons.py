"""Every cross-framework comparison of the parity suite, as functions returning ``Comparison`` lists.

Cross-framework code (JAX and PyTorch). The tests assert on these lists and
``python -m parity_tests.report`` tabulates them, so each idea is written once.

* :func:`compare_case` - one (batch, dtype, layers, weight, init) case: logits,
  loss, total, penalty, each layer's penalty term, each activation gradient
  and every parameter gradient of the total, on identical weights.
* :func:`trajectory_comparisons` - 50 SGD steps over the same batch sequence,
  parameters compared after every step.
* :func:`maxpool_tie_comparisons` - inputs whose pooling windows hold equal
  maxima.
* :func:`seed_answer_comparisons` - the seed answer's literal loop body against
  ``jax_impl.penalized_loss`` + ``jax.grad``.
* :func:`question_vs_answer_comparisons` - PyTorch only: what the question's
  procedure computes, against the answer's.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import traverse_util

import torch_ref
from jax_impl import Net, jit_options, penalized_loss
from parity_tests import seed_code
from parity_tests.harness import (
    TOLERANCES,
    TORCH_DTYPES,
    Comparison,
    Tolerance,
    compare,
    compare_trees,
    failures,
    identical_weights,
    jax_dtype,
    jax_inputs,
    make_batch,
    nchw_to_nhwc,
    to_numpy,
    torch_inputs,
    torch_net,
)

Layers = tuple[str, ...] | None

# ------------------------------------------------------------------------ one forward/backward


#: Compiler options under which a GPU computes convolutions of short dyadic fractions exactly, for
#: the max-pool tie cases (see :func:`tie_setup`). XLA's GPU autotuner times cuDNN's algorithms and
#: may pick a transform-based one (FFT, Winograd) whose float32 rounding breaks exact ties: with
#: XLA's defaults the float32 tie cases failed in 2 of 5 runs on an H100 and an H200 (at autotune
#: level 1, 11,200 tied pool2 windows became 6,797). With autotuning off XLA takes cuDNN's
#: heuristic choice, which summed them exactly in all 7 runs there (docs/parity.md).
EXACT_CONV_OPTIONS = {"gpu": {"xla_gpu_autotune_level": 0}}


@functools.cache
def _jax_value_and_grad(layers: Layers, conv_impl: str = "auto", exact_convolutions: bool = False):
    """``jit(value_and_grad(penalized_loss))`` for one layer choice, compiled once per shape/dtype.

    The penalty weight is a traced argument, so weights 0 and 10 share a compilation. Compiled
    with plain ``jax.jit``: the grid holds JAX's default kernels to float32's 1e-5. The faster CPU
    kernels of ``jit_options()`` round float32 convolutions less tightly (measured 8.6e-6 relative
    error on relu1's penalty term against float64, 8e-8 with the default kernels); the trajectory
    below runs them, and tests/test_xla_options.py bounds their error against float64.
    """
    model = Net(conv_impl=conv_impl)

    def total(params, x, y, penalty_weight):
        return penalized_loss(params, model, x, y, penalty_weight=penalty_weight, layers=layers)

    options = EXACT_CONV_OPTIONS.get(jax.default_backend()) if exact_convolutions else None
    return jax.jit(jax.value_and_grad(total, has_aux=True), compiler_options=options)


def jax_quantities(params, x_nchw: np.ndarray, y: np.ndarray, penalty_weight: float,
                   layers: Layers = None, conv_impl: str = "auto",
                   exact_convolutions: bool = False) -> dict[str, np.ndarray]:
    """Everything ``penalized_loss`` computes, plus ``jax.grad`` of the total, as NumPy (NHWC).

    ``exact_convolutions``: compile with :data:`EXACT_CONV_OPTIONS` (the tie cases). Call inside
    ``jax_dtype(dtype)``.
    """
    x, y = jax_inputs(x_nchw, y)
    weight = jnp.asarray(penalty_weight, x.dtype)
    (total, aux), grads = _jax_value_and_grad(layers, conv_impl, exact_convolutions)(params, x, y, weight)
    return _quantities(total, aux, grads, activation_layout=np.asarray)


def torch_quantities(net: torch.nn.Module, x_nchw: np.ndarray, y: np.ndarray, penalty_weight: float,
                     layers: Layers = None) -> dict[str, np.ndarray]:
    """The same quantities from ``torch_ref.penalized_loss`` + ``backward()``; activations as NHWC.

    Runs on the device of ``net``'s parameters.
    """
    net.zero_grad(set_to_none=True)
    x, y = torch_inputs(x_nchw, y, device=next(net.parameters()).device)
    total, aux = torch_ref.penalized_loss(net, x, y, penalty_weight, layers)
    total.backward()
    grads = torch_ref.export_flax_params(net, grads=True)
    aux = {
        **{k: to_numpy(aux[k]) for k in ("loss", "penalty", "logits")},
        "penalty_terms": {k: to_numpy(v) for k, v in aux["penalty_terms"].items()},
        "activation_grads": {k: to_numpy(v) for k, v in aux["activation_grads"].items()},
    }
    return _quantities(to_numpy(total), aux, grads, activation_layout=nchw_to_nhwc)


def _quantities(total, aux, grads, activation_layout) -> dict[str, np.ndarray]:
    out = {
        "logits": np.asarray(aux["logits"]),
        "loss": np.asarray(aux["loss"]),
        "penalty": np.asarray(aux["penalty"]),
        "total": np.asarray(total),
    }
    for name, term in aux["penalty_terms"].items():
        out[f"penalty_term[{name}]"] = np.asarray(term)
    for name, grad in aux["activation_grads"].items():
        out[f"activation_grad[{name}]"] = activation_layout(grad)
    for key, grad in traverse_util.flatten_dict(dict(grads), sep=".").items():
        out[f"param_grad[{key}]"] = np.asarray(grad)
    return out


def compare_quantities(dtype: str, actual: dict, expected: dict, case: str = "",
                       tolerance: Tolerance | None = None) -> list[Comparison]:
    """Compare two ``*_quantities`` dicts key by key; their keys must be the same."""
    if set(actual) != set(expected):
        raise ValueError(f"{case}: quantities {sorted(actual)} (JAX) != {sorted(expected)} (PyTorch)")
    return [compare(k, dtype, actual[k], expected[k], tolerance, case) for k in sorted(expected)]


# ---------------------------------------------------------------------------------- the grid


@dataclass(frozen=True)
class Case:
    """One point of the parity grid.

    ``init_batch=None``: PyTorch initialises the weights (exported to Flax);
    an integer: ``jax_impl.Net().init`` on that many images does (loaded into
    PyTorch), and it differs from ``batch`` on purpose.
    """

    dtype: str
    batch: int
    penalty_weight: float = 10.0
    layers: Layers = None
    init_batch: int | None = None
    conv_impl: str = "auto"
    seed: int = 0

    @property
    def name(self) -> str:
        layers = "+".join(self.layers) if self.layers else "relu1+relu2"
        init = "torch" if self.init_batch is None else f"flax@B={self.init_batch}"
        impl = "" if self.conv_impl == "auto" else f" conv={self.conv_impl}"
        return f"{self.dtype} B={self.batch} w={self.penalty_weight:g} {layers} init={init}{impl}"


def default_cases() -> list[Case]:
    """The grid: batch 1 (the seed's), 7, 32; init batch != apply batch; w 0 and 10; each layer alone.

    Not the full product (36 compilations of a few seconds each): every value
    of every axis appears, each axis is varied around the B=7 case, and the
    cases are chosen to share compilations (one per batch size x layer choice
    x dtype; the weight is traced). ``conv_impl="auto"`` (``"canonical"`` on
    CPU, see ``jax_impl.layers.resolve_conv_impl``) is the model users get
    here; one float64 case pins the native XLA convolution (the GPU/TPU
    default) too.
    """
    cases = []
    for dtype in ("float64", "float32"):
        cases += [
            Case(dtype, batch=1),
            Case(dtype, batch=7, init_batch=32),
            Case(dtype, batch=32, init_batch=1),
            Case(dtype, batch=7, layers=("relu1",)),
            Case(dtype, batch=7, layers=("relu2",)),
            Case(dtype, batch=7, penalty_weight=0.0),
            Case(dtype, batch=7, penalty_weight=0.0, layers=("relu2",), init_batch=1),
        ]
    cases.append(Case("float64", batch=7, conv_impl="xla"))
    return cases


def compare_case(case: Case) -> list[Comparison]:
    """All quantities of one case, JAX against PyTorch, on identical weights and inputs."""
    x, y = make_batch(case.seed + 1, case.batch, case.dtype)
    with jax_dtype(case.dtype):
        net, params = identical_weights(case.seed, case.dtype, case.init_batch)
        actual = jax_quantities(params, x, y, case.penalty_weight, case.layers, case.conv_impl)
    expected = torch_quantities(net, x, y, case.penalty_weight, case.layers)
    return compare_quantities(case.dtype, actual, expected, case.name)


# ---------------------------------------------------------------------------------- trajectory

#: SGD learning rate of the trajectory check. The seed's 0.001 moves the weights by 0.9% of their
#: largest entry in 50 steps; 0.01 moves them 6.3% (``Trajectory.relative_move``), so a gradient that
#: is wrong by 1% shifts the parameters by ~6e-4 of their scale, 60x the float32 tolerance, instead of
#: hiding in it. Float32 trajectories only agree while no pre-activation lands within float32
#: rounding (~3e-7) of a ReLU or max-pool kink: with the jax_impl of commit a5eafda and lr 0.05,
#: step 2 put a pool1 output 7.6e-10 from zero, the frameworks took different branches (4.7e-5 at
#: step 2, 0.17 by step 46) while float64 agreed to 1e-15; see docs/parity.md.
TRAJECTORY_LR = 0.01
TRAJECTORY_STEPS = 50

#: Tolerance on the displacement theta_t - theta_0 (the parameters themselves use TOLERANCES).
DISPLACEMENT_TOLERANCES = {
    "float64": TOLERANCES["float64"],
    # Each step stores theta_t in float32 (half an ulp of |theta| <= 0.2 is 7e-9) while the displacement
    # after one step is only lr * |g| ~ 1e-3 of that; rounding alone gives ~1e-5 of the displacement
    # (measured max 2.5e-5, at step 1), so 1e-4 is the float32 bound, with 4x headroom.
    "float32": Tolerance(1e-4, 0.0, "float32 rounding of theta (7e-9) vs a displacement of ~lr*|g|; 4x"),
}
TRAJECTORY_BATCH = 8


@functools.cache
def _jax_sgd_step(lr: float, penalty_weight: float):
    model = Net()

    def step(params, x, y):
        grads = jax.grad(lambda p: penalized_loss(p, model, x, y, penalty_weight=penalty_weight)[0])(params)
        return jax.tree.map(lambda p, g: p - lr * g, params, grads)

    return jax.jit(step, **jit_options())  # the CLI's kernels (jax_impl.xla_options)


#: How close (relative to the layer's largest |value|) a pre-activation must come to a kink for
#: float32 to be allowed to take another branch there: the two frameworks' float32 convolutions sum
#: 75 (conv1) and 800 (conv2) products in different orders, so their outputs differ by up to ~1e-6 of
#: the layer's scale; a max-pool window whose two largest entries are closer than that, or a ReLU
#: input closer to 0, can send the gradient to another entry. Float64 differs by ~1e-15: no excuse.
KINK_MARGIN = {"float64": 0.0, "float32": 1e-6}


def kink_margin(net: torch.nn.Module, x_nchw: np.ndarray) -> float:
    """Distance of ``torch_ref.Net``'s pre-activations on ``x`` to the nearest kink, computed in float64.

    Kinks: a 2x2 max-pool window's two largest entries (which one gets the
    gradient) and a pool output at 0 (the ReLU after it). Each distance is
    relative to its layer's largest |value|; the minimum over both stages.
    """
    margins = []
    with torch.no_grad():
        h = torch.from_numpy(np.asarray(x_nchw, dtype=np.float64))
        for conv in (net.conv1, net.conv2):
            c = torch.nn.functional.conv2d(h, conv.weight.double(), conv.bias.double())  # (B, C, H, W)
            b, ch, height, width = c.shape
            h2, w2 = height // 2, width // 2
            windows = c[:, :, : 2 * h2, : 2 * w2].reshape(b, ch, h2, 2, w2, 2).permute(0, 1, 2, 4, 3, 5)
            top2 = windows.reshape(b, ch, h2, w2, 4).topk(2).values  # the two largest of each 2x2 window
            pooled = top2[..., 0]
            scale = float(c.abs().max())
            margins += [float((top2[..., 0] - top2[..., 1]).min()) / scale, float(pooled.abs().min()) / scale]
            h = torch.relu(pooled)
    return min(margins)


@dataclass(frozen=True)
class Trajectory:
    """Per-step comparisons of the parameters and how far the parameters moved in total.

    ``kink_steps`` lists ``(step, margin)`` for the float32 steps that disagreed while a
    pre-activation sat within ``KINK_MARGIN`` of a kink (``kink_margin``): there both
    branches are right to float32 rounding, the step's comparisons are left out, and JAX
    continues from PyTorch's parameters so the branch does not propagate.
    """

    params: list[Comparison]
    displacement: list[Comparison]
    relative_move: float
    kink_steps: tuple[tuple[int, float], ...] = ()


def trajectory_comparisons(dtype: str, steps: int = TRAJECTORY_STEPS, batch: int = TRAJECTORY_BATCH,
                           lr: float = TRAJECTORY_LR, penalty_weight: float = 10.0, seed: int = 0
                           ) -> Trajectory:
    """Train both frameworks ``steps`` SGD steps from identical weights on the same batches.

    After every step the parameters are compared (``trajectory params[...]``)
    and so is the displacement from the initial weights, ``theta_t - theta_0``
    (``trajectory displacement[...]``): the parameters are dominated by their
    initial values, while the displacement is exactly what the gradients
    produced, so it is the sharper check. ``relative_move`` is
    ``||theta_T - theta_0||_inf / ||theta_0||_inf`` (PyTorch side), the evidence
    that the parameters moved measurably.
    """
    with jax_dtype(dtype):
        net, params = identical_weights(seed, dtype)
        initial = jax.tree.map(np.asarray, params)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        jax_step = _jax_sgd_step(lr, penalty_weight)
        param_cmp, move_cmp, kink_steps = [], [], []
        for t in range(1, steps + 1):
            x, y = make_batch(seed * 100_003 + t, batch, dtype)
            margin = kink_margin(net, x)
            params = jax_step(params, *jax_inputs(x, y))
            torch_ref.train_step(net, optimizer, *torch_inputs(x, y), penalty_weight)
            expected = torch_ref.export_flax_params(net)
            actual = jax.tree.map(np.asarray, params)
            case = f"step {t}"
            step_params = compare_trees("trajectory params", dtype, actual, expected, case=case)
            step_moves = compare_trees(
                "trajectory displacement", dtype,
                jax.tree.map(np.subtract, actual, initial), jax.tree.map(np.subtract, expected, initial),
                DISPLACEMENT_TOLERANCES[dtype], case=case)
            if margin < KINK_MARGIN[dtype] and failures(step_params + step_moves):
                kink_steps.append((t, margin))
                params = jax.device_put(expected)  # harness.jax_inputs: no compilation
                continue
            param_cmp += step_params
            move_cmp += step_moves
    final_move = max(float(np.max(np.abs(e - i))) for e, i in zip(
        jax.tree.leaves(expected), jax.tree.leaves(initial), strict=True))
    scale = max(float(np.max(np.abs(i))) for i in jax.tree.leaves(initial))
    return Trajectory(param_cmp, move_cmp, final_move / scale, tuple(kink_steps))


# ------------------------------------------------------------------------------ max-pool ties

TIE_KINDS = ("constant", "quantised")


def tie_setup(kind: str, dtype: str, batch: int = 7, seed: int = 0):
    """Weights and inputs whose max-pool windows contain equal maxima.

    ``"constant"``: conv1's kernel is zero and its bias positive, so every
    pool1 window is four equal numbers; conv2 (weights rounded to 1/64) of
    that constant image is constant per channel, so every pool2 window ties
    too.

    ``"quantised"``: weights rounded to multiples of 1/16 (conv1) and 1/64
    (conv2) and pixels in {0, 1/4, 2/4, 3/4}: every conv output is a short
    dyadic fraction computed *exactly* in either framework (whatever the
    summation order), so ties are frequent, scattered, and identical on both
    sides. On a GPU this holds for direct convolution algorithms only, hence
    :data:`EXACT_CONV_OPTIONS` on the JAX side (PyTorch runs on the CPU).

    Returns ``(torch_net, x_nchw, y)``; export the weights with ``export_flax_params``.
    """
    net = torch_net(seed, dtype)
    rng = np.random.default_rng(seed + 7)
    with torch.no_grad():
        if kind == "constant":
            net.conv1.weight.zero_()
            net.conv1.bias.copy_(torch.arange(1, 33, dtype=TORCH_DTYPES[dtype]) / 64)
            # Dyadic relu1 and conv2 weights make conv2's sums exact, hence exact ties on both sides
            # (with float weights, PyTorch's float64 conv returns values 1e-16 apart, and the tie is gone).
            net.conv2.weight.copy_(torch.round(net.conv2.weight * 64) / 64)
            x = rng.random((batch, 3, 32, 32)).astype(dtype)
        elif kind == "quantised":
            for layer, step in ((net.conv1, 16), (net.conv2, 64)):
                layer.weight.copy_(torch.round(layer.weight * step) / step)
                layer.bias.copy_(torch.round(layer.bias * step) / step)
            x = (rng.integers(0, 4, (batch, 3, 32, 32)) / 4).astype(dtype)
        else:
            raise ValueError(f"tie kind must be one of {TIE_KINDS}, got {kind!r}")
    y = rng.integers(0, 10, batch).astype(np.int64)
    return net, x, y


def count_tied_windows(net: torch.nn.Module, x_nchw: np.ndarray) -> dict[str, int]:
    """Number of 2x2 pooling windows whose maximum occurs more than once, for pool1 and pool2."""

    def tied(pre_pool: torch.Tensor) -> int:
        b, c, h, w = pre_pool.shape
        windows = pre_pool[:, :, : h // 2 * 2, : w // 2 * 2].reshape(b, c, h // 2, 2, w // 2, 2)
        windows = windows.permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // 2, w // 2, 4)
        top = windows.max(dim=-1, keepdim=True).values
        return int(((windows == top).sum(dim=-1) > 1).sum())

    with torch.no_grad():
        conv1 = net.conv1(torch.from_numpy(x_nchw))
        conv2 = net.conv2(net.relu(net.pool(conv1)))
    return {"pool1": tied(conv1), "pool2": tied(conv2)}


def maxpool_tie_comparisons(kind: str, dtype: str, penalty_weight: float = 10.0) -> list[Comparison]:
    """All quantities of :func:`compare_case`, on the tie-laden weights and inputs of ``kind``."""
    net, x, y = tie_setup(kind, dtype)
    with jax_dtype(dtype):
        params = jax.device_put(torch_ref.export_flax_params(net))  # harness.jax_inputs: no compilation
        actual = jax_quantities(params, x, y, penalty_weight, exact_convolutions=True)
    expected = torch_quantities(net, x, y, penalty_weight)
    return compare_quantities(dtype, actual, expected, f"max-pool ties ({kind})")


# ----------------------------------------------------------------------- the seed answer's code

#: (batch, init batch) pairs of the independent check; init batch != batch except the seed's 1.
SEED_ANSWER_BATCHES = ((1, 32), (7, 1), (32, 7))


def seed_answer_comparisons(batch: int, init_batch: int, penalty_weight: float = 10.0,
                            seed: int = 0) -> list[Comparison]:
    """The answer's literal loop body (``parity_tests.seed_code``) against JAX, float64.

    The weights come from ``jax_impl.Net().init`` at ``init_batch`` images and
    reach the answer's own ``Net`` through ``load_flax_params`` (into a
    ``torch_ref.Net``) and ``load_state_dict`` (same parameter names).
    """
    dtype = "float64"
    x, y = make_batch(seed + 11, batch, dtype)
    with jax_dtype(dtype):
        ref, params = identical_weights(seed, dtype, init_batch)
        actual = jax_quantities(params, x, y, penalty_weight)
    model = seed_code.Net().double()
    model.load_state_dict(ref.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.001)
    total = seed_code.loop_body(model, optimizer, *torch_inputs(x, y), penalty_weight)
    case = f"seed answer B={batch} init B={init_batch}"
    out = [compare("total", dtype, actual["total"], to_numpy(total), case=case)]
    grads = torch_ref.export_flax_params(model, grads=True)  # the answer's Net as written
    out += compare_trees("param_grad", dtype, _param_grads(actual), grads, case=case)
    return out


def _param_grads(quantities: dict[str, np.ndarray]) -> dict:
    flat = {k[len("param_grad["):-1]: v for k, v in quantities.items() if k.startswith("param_grad[")}
    return traverse_util.unflatten_dict(flat, sep=".")


# ---------------------------------------------------------------- the question vs the answer


def question_vs_answer(seed: int = 0, batch: int = 3, dtype: str = "float64") -> dict:
    """Run the question's procedure and the answer's (w=1) from identical weights; return both.

    Returns ``question_grads`` / ``answer_grads`` (parameter ``.grad`` in the
    Flax layout), ``question_activation_grads`` (the retained ``.grad`` of
    ``relu1``/``relu2`` after the question's step, NCHW), and, recomputed with
    autograd at the pre-step weights, ``loss_grads`` (d loss / d a) and
    ``penalty_grads`` (d grad_norm / d a, grad_norm = sum_l ||d loss / d a_l||^2).
    """
    x, y = torch_inputs(*make_batch(seed + 21, batch, dtype))
    question = torch_net(seed, dtype)
    answer = copy.deepcopy(question)
    before = copy.deepcopy(question)

    torch_ref.question_step(question, torch.optim.SGD(question.parameters(), lr=0.001), x, y)
    torch_ref.train_step(answer, torch.optim.SGD(answer.parameters(), lr=0.001), x, y, 1.0)

    loss = torch.nn.CrossEntropyLoss()(before(x), y)
    acts = [before.relu1, before.relu2]
    loss_grads = torch.autograd.grad(loss, acts, create_graph=True)
    grad_norm = sum(g.pow(2).sum() for g in loss_grads)
    penalty_grads = torch.autograd.grad(grad_norm, acts)
    names = torch_ref.CAPTURE_NAMES
    return {
        "question_grads": torch_ref.export_flax_params(question, grads=True),
        "answer_grads": torch_ref.export_flax_params(answer, grads=True),
        "question_params": torch_ref.export_flax_params(question),
        "answer_params": torch_ref.export_flax_params(answer),
        "question_activation_grads": {n: to_numpy(getattr(question, n).grad) for n in names},
        "loss_grads": dict(zip(names, map(to_numpy, loss_grads), strict=True)),
        "penalty_grads": dict(zip(names, map(to_numpy, penalty_grads), strict=True)),
    }


def question_vs_answer_comparisons(seed: int = 0, batch: int = 3) -> list[Comparison]:
    """The equalities that hold between the question's and the answer's procedures (float64).

    * weight ``.grad`` of the question == the answer's with ``penalty_weight=1``
      (the question adds grad(loss) and grad(grad_norm) in two backward calls),
      and so are the weights after the SGD step;
    * the question's retained activation ``.grad`` == 2 d loss / d a + d grad_norm / d a:
      ``loss.backward`` writes d loss / d a, ``autograd.grad(loss, ...)`` fires
      the ``retain_grad`` hooks and adds it *again* (PyTorch 2.13), and
      ``grad_norm.backward()`` adds d grad_norm / d a. It is not d loss / d a.
    """
    r = question_vs_answer(seed, batch)
    case = f"question vs answer B={batch}"
    out = compare_trees("question .grad vs answer w=1", "float64", r["question_grads"],
                        r["answer_grads"], case=case)
    out += compare_trees("question params after step vs answer w=1", "float64", r["question_params"],
                         r["answer_params"], case=case)
    expected = {n: 2 * r["loss_grads"][n] + r["penalty_grads"][n] for n in r["loss_grads"]}
    out += compare_trees("question activation .grad vs 2 dL/da + dP/da", "float64",
                         r["question_activation_grads"], expected, case=case)
    return out
