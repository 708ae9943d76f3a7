"""``--init shared`` across frameworks: one NumPy draw, loaded into both twins, gives the same network.

``agp_app.shared_init.draw_shared_variables`` draws the Flax-layout tree once; the Flax twin uses
it as its variables, the PyTorch twin loads it with ``torch_ref.load_flax_variables``. In float64
both must then compute the same logits (eval mode, running statistics) and the same step-1 loss
(train mode, batch statistics), for the ResNet-18 twins and the seed answer's CNN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F

import torch_ref
from agp_app.shared_init import draw_shared_variables
from jax_impl.model import Net as FlaxNet
from jax_impl.resnet import ResNet18 as FlaxResNet18
from parity_tests.harness import TOLERANCES, compare, fast_jit, nchw_to_nhwc
from torch_ref.model import Net as TorchNet
from torch_ref.resnet import ResNet18 as TorchResNet18

#: float64: identical weights and inputs, differing summation orders only (harness.TOLERANCES).
TOL = TOLERANCES["float64"]


def _twins(name: str):
    """(Flax module, PyTorch module in float64, NCHW input (B, C, H, W), labels) of a small case."""
    rng = np.random.default_rng(0)
    if name == "resnet18":  # width 4 and 8x8 images: the whole architecture, ~0.1 s per forward
        x = rng.random((3, 3, 8, 8))
        return FlaxResNet18(num_classes=5, width=4), TorchResNet18(3, 5, width=4).double(), x, \
            rng.integers(0, 5, 3)
    x = rng.random((2, 3, 32, 32))
    return FlaxNet(num_classes=10), TorchNet(3, 10, 32).double(), x, rng.integers(0, 10, 2)


def _shapes(tree):
    return jax.tree.map(lambda a: tuple(a.shape), tree)


@pytest.mark.parametrize("name", ["resnet18", "cnn"])
def test_shared_draw_gives_both_twins_the_same_logits_and_step1_loss(name, x64):
    flax_model, torch_model, x_nchw, y = _twins(name)
    x_nhwc = jnp.asarray(nchw_to_nhwc(x_nchw))
    init_shapes = jax.eval_shape(flax_model.init, jax.random.key(0), x_nhwc)
    init_shapes = {c: v for c, v in init_shapes.items() if c in ("params", "batch_stats")}
    assert _shapes(init_shapes) == _shapes(torch_ref.export_flax_variables(torch_model)), \
        "the twins' Flax-layout trees differ: the converter would refuse the shared draw"

    variables = draw_shared_variables(init_shapes, seed=7)
    torch_ref.load_flax_variables(torch_model, variables, example_input=torch.from_numpy(x_nchw))
    flax_vars = jax.tree.map(lambda a: jnp.asarray(a, jnp.float64), variables)
    x_torch, y_torch = torch.from_numpy(x_nchw), torch.from_numpy(y)

    torch_model.eval()
    with torch.no_grad():
        eval_torch = torch_model(x_torch).numpy()
    torch_model.train()
    loss_torch = F.cross_entropy(torch_model(x_torch), y_torch).item()

    def flax_logits(v, x):
        """(eval logits: running statistics, train logits: batch statistics); the same without BatchNorm."""
        if "batch_stats" not in v:
            logits = flax_model.apply(v, x)
            return logits, logits
        return flax_model.apply(v, x), flax_model.apply(v, x, train=True, mutable=["batch_stats"])[0]

    # fast_jit, one program: the draw is what this test is about, not XLA's kernels (op by op: ~10x slower)
    eval_flax, train_flax = fast_jit(flax_logits)(flax_vars, x_nhwc)
    assert compare("eval logits", "float64", np.asarray(eval_flax), eval_torch, TOL).passed
    loss_flax = float(optax.softmax_cross_entropy_with_integer_labels(train_flax, jnp.asarray(y)).mean())
    assert loss_flax == pytest.approx(loss_torch, rel=TOL.rtol), (loss_flax, loss_torch)
