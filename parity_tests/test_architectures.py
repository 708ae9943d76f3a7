"""The penalty on other architectures: an MLP and a residual CNN with BatchNorm, JAX vs PyTorch.

Cross-framework (imports JAX and PyTorch). The PyTorch models have no capture
code: their capture points are named for forward hooks
(``capture_modules``); the Flax models mark them with ``layers.capture``.
Float64, identical weights (``torch_ref.export_flax_params`` / ``export_flax_variables``).

The JAX side is computed once per module and model, every case of the model
in one program compiled with ``harness.fast_jit`` (``mlp_jax_results``,
``resnet_jax_results``): XLA shares the cases' forward passes, and at these
sizes its optimisation effort only costs time (the ResNet's four cases: 15 s
op by op, the earlier way, 28 s as four default compilations, 5 s as one fast
one). Each case is still compared on its own, against its own PyTorch run.
"""

import jax
import numpy as np
import pytest
import torch
from flax import traverse_util

import torch_ref
from jax_impl import penalized_loss
from parity_tests import models_torch
from parity_tests.harness import fast_jit
from parity_tests.models_jax import MLP, ResNet

# float64 rounding only (~1e-16 per op through double backprop, BatchNorm included): >1000x headroom.
RTOL = 1e-10
WEIGHT = 10.0
BATCH = 5
SHAPE_CHW = (2, 6, 6)  # two channels so that the NCHW/NHWC flatten order matters for the MLP


def mlp_params(net, *, grads=False):
    """The MLP flattens its input image: only running it once shows the converter that (C, H, W) map."""
    example = torch.zeros(1, *SHAPE_CHW, dtype=torch.float64)
    return torch_ref.export_flax_params(net, grads=grads, example_input=example)


def bn_modules(net):
    """The BatchNorm layers by their Flax ``batch_stats`` path ("block1/bn1"): same names in both models."""
    layers = net.named_modules()
    return {path.replace(".", "/"): m for path, m in layers if isinstance(m, torch.nn.BatchNorm2d)}


def normwise(actual, expected, rtol, what):
    """``max|a - b| <= rtol * max|b|`` (see parity_tests/harness.py for why normwise)."""
    actual, expected = np.asarray(actual), np.asarray(expected)
    err, scale = np.max(np.abs(actual - expected)), np.max(np.abs(expected))
    assert err <= rtol * scale, f"{what}: max abs err {err:.3e} > {rtol:.0e} * {scale:.3e}"


def compare_trees(jax_tree, numpy_tree, rtol, what):
    flat_j = traverse_util.flatten_dict(jax.tree.map(np.asarray, jax_tree), sep="/")
    flat_t = traverse_util.flatten_dict(numpy_tree, sep="/")
    assert set(flat_j) == set(flat_t), what
    for key, value in flat_t.items():
        normwise(flat_j[key], value, rtol, f"{what} {key}")


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(BATCH, *SHAPE_CHW))
    y = rng.integers(0, 10, BATCH)
    return x, y


def torch_penalty(net, capture_modules, x, y, options):
    net.zero_grad()
    options = dict(options)
    layers = options.pop("layers", None)
    total, aux = torch_ref.penalized_loss(
        net, torch.tensor(x), torch.tensor(y), WEIGHT, layers, capture_modules=capture_modules, **options
    )
    total.backward()
    return total, aux


MLP_CASES = {
    "default": {},
    "per_example_l2": {"normalization": "per_example", "norm": "l2"},
    "input_weighted": {"layers": ["input", "relu2"], "layer_weights": {"input": 3.0}},
    "fd": {"approx": "finite_difference", "fd_step": 1e-2},
}


def mlp():
    torch.manual_seed(0)
    return models_torch.MLP(int(np.prod(SHAPE_CHW))).double()


def in_x64(fun, *args):
    """``fun(*args)`` compiled (``fast_jit``) and run in 64-bit mode; the results as NumPy.

    ``args`` go in as NumPy: the compiled program converts them (``jnp.asarray`` compiled a small
    program per array shape first).
    """
    with jax.enable_x64(True):
        return jax.tree.map(np.asarray, fast_jit(fun)(*args))


@pytest.fixture(scope="module")
def mlp_jax_results(batch):
    """``case -> ((total, aux), grads)`` of every ``MLP_CASES`` case on ``mlp()``'s weights, one program."""
    x, y = batch

    def all_cases(params, xj, yj):
        return {case: jax.value_and_grad(
            lambda p, options=options: penalized_loss(p, MLP(), xj, yj, penalty_weight=WEIGHT, **options),
            has_aux=True)(params) for case, options in MLP_CASES.items()}

    return in_x64(all_cases, mlp_params(mlp()), x.transpose(0, 2, 3, 1), y)


@pytest.mark.parametrize("case", list(MLP_CASES))
def test_mlp_penalty_matches_reference_with_forward_hooks(case, batch, mlp_jax_results):
    options = MLP_CASES[case]
    # The finite difference amplifies the loss's rounding differences by ~1/h = 100 (measured ~1e-13).
    rtol = 1e-10 if options.get("approx") == "finite_difference" else RTOL
    x, y = batch
    net = mlp()
    total_t, aux_t = torch_penalty(net, models_torch.MLP_CAPTURE_MODULES, x, y, options)
    (total_j, aux_j), grads_j = mlp_jax_results[case]
    normwise(total_j, total_t.item(), rtol, "total")
    for name, term in aux_t["penalty_terms"].items():
        normwise(aux_j["penalty_terms"][name], term.item(), RTOL, f"term {name}")
    compare_trees(grads_j, mlp_params(net, grads=True), rtol, "grad")


def randomize_running_stats(net, seed):
    gen = torch.Generator().manual_seed(seed)
    for bn in bn_modules(net).values():
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen, dtype=torch.float64))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen, dtype=torch.float64) + 0.5)


def make_resnet():
    torch.manual_seed(0)
    net = models_torch.ResNet(in_channels=SHAPE_CHW[0], width=4).double()
    with torch.no_grad():
        randomize_running_stats(net, 0)
        for bn in bn_modules(net).values():  # non-trivial affine parameters
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return net


@pytest.fixture
def resnet():
    return make_resnet()


RESNET_CASES = {
    "batch_mean": {},
    "per_example_interacting": {"normalization": "per_example"},
    "l2_input": {"norm": "l2", "layers": ["input", "block1/relu"]},
}


@pytest.fixture(scope="module")
def resnet_jax_results(batch):
    """``case -> ((total, aux), grads)`` on ``make_resnet()``'s variables, in one program.

    The ``RESNET_CASES`` in train mode (``mutable=["batch_stats"]``), and
    ``"eval"``: the plain penalty in eval mode (running statistics).
    """
    x, y = batch

    def all_cases(variables, xj, yj):
        def value_and_grad(train, options):
            mutable = ["batch_stats"] if train else ()
            return jax.value_and_grad(lambda p: penalized_loss(
                p, ResNet(width=4), xj, yj, penalty_weight=WEIGHT,
                model_state={"batch_stats": variables["batch_stats"]}, mutable=mutable,
                apply_kwargs={"train": train}, **options,
            ), has_aux=True)(variables["params"])

        out = {case: value_and_grad(True, options) for case, options in RESNET_CASES.items()}
        out["eval"] = value_and_grad(False, {})
        return out

    return in_x64(all_cases, torch_ref.export_flax_variables(make_resnet()), x.transpose(0, 2, 3, 1), y)


@pytest.mark.parametrize("case", list(RESNET_CASES))
def test_resnet_batchnorm_train_mode_matches_reference(case, resnet, batch, resnet_jax_results):
    """Train mode: batch statistics; ``batch_stats`` is updated while perturbations are differentiated."""
    options = RESNET_CASES[case]
    x, y = batch
    before = torch_ref.export_flax_variables(resnet)
    resnet.train()
    total_t, aux_t = torch_penalty(resnet, models_torch.RESNET_CAPTURE_MODULES, x, y, options)
    (total_j, aux_j), grads_j = resnet_jax_results[case]
    normwise(total_j, total_t.item(), RTOL, "total")
    for name, term in aux_t["penalty_terms"].items():
        normwise(aux_j["penalty_terms"][name], term.item(), RTOL, f"term {name}")
    compare_trees(grads_j, torch_ref.export_flax_params(resnet, grads=True), RTOL, "grad")

    # Running statistics after one train-mode step. Flax: 0.9 old + 0.1 biased var; PyTorch
    # (momentum 0.1): 0.9 old + 0.1 unbiased var, unbiased = biased * n / (n - 1), n = B*H*W.
    n = BATCH * SHAPE_CHW[1] * SHAPE_CHW[2]
    new_stats = traverse_util.flatten_dict(aux_j["model_state"]["batch_stats"], sep="/")
    old_stats = traverse_util.flatten_dict(before["batch_stats"], sep="/")
    for path, bn in bn_modules(resnet).items():
        normwise(new_stats[f"{path}/mean"], bn.running_mean.numpy(), RTOL, f"{path} running mean")
        torch_new_var = bn.running_var.numpy()
        torch_batch_var_unbiased = (torch_new_var - 0.9 * old_stats[f"{path}/var"]) / 0.1
        flax_new_var = np.asarray(new_stats[f"{path}/var"])
        flax_batch_var_biased = (flax_new_var - 0.9 * old_stats[f"{path}/var"]) / 0.1
        # The /0.1 un-mixing loses ~1 digit; still float64 rounding.
        normwise(flax_batch_var_biased * n / (n - 1), torch_batch_var_unbiased, 1e-9, f"{path} batch var")


def test_resnet_batchnorm_eval_mode_matches_reference(resnet, batch, resnet_jax_results):
    x, y = batch
    resnet.eval()
    total_t, _ = torch_penalty(resnet, models_torch.RESNET_CAPTURE_MODULES, x, y, {})
    (total_j, aux_j), grads_j = resnet_jax_results["eval"]
    assert "model_state" not in aux_j
    normwise(total_j, total_t.item(), RTOL, "total")
    compare_trees(grads_j, torch_ref.export_flax_params(resnet, grads=True), RTOL, "grad")


def test_torch_finite_difference_leaves_batchnorm_running_stats_as_one_forward(resnet, batch):
    """The extra shifted forward of the finite difference must not update running stats a second time."""
    x, y = batch
    resnet.train()
    stats_once = {}
    with torch.no_grad():
        saved = {k: v.clone() for k, v in resnet.state_dict().items()}
        resnet(torch.tensor(x))
        stats_once = {k: v.clone() for k, v in resnet.state_dict().items()}
        resnet.load_state_dict(saved)
    torch_penalty(resnet, models_torch.RESNET_CAPTURE_MODULES, x, y, {"approx": "finite_difference"})
    for key, value in resnet.state_dict().items():
        torch.testing.assert_close(value, stats_once[key], rtol=0, atol=0)
