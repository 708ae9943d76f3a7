"""The oneDNN convolutions (``conv_impl="onednn"``) equal XLA's, to second order, and fall back cleanly.

Skipped only when oneDNN is not installed (``pip install -e '.[onednn]'``):
with oneDNN present, a failing build is a failure, not a skip.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import Net, jit_options, onednn_conv, penalized_loss
from jax_impl.layers import canonical_conv, conv_forward, conv_input_grad, conv_kernel_grad, resolve_conv_impl


def _onednn_installed() -> bool:
    try:
        onednn_conv.find_onednn()
    except onednn_conv.OneDNNUnavailable:
        return False
    return True


pytestmark = pytest.mark.skipif(not _onednn_installed(),
                                reason="oneDNN is not installed (pip install -e '.[onednn]')")

# float32: oneDNN and XLA sum the same products in different orders. Over the <= 800-term
# sums here that is ~1e-6 of the largest entry; 1e-5 still catches a wrong index (errors of O(1)).
MAX_REL_ERR = 1e-5


@pytest.fixture(scope="module", autouse=True)
def built():
    assert onednn_conv.available(), onednn_conv.unavailable_reason()


def max_rel_err(actual, expected) -> float:
    """max |actual - expected| / max |expected|: float32 rounding is relative to the largest entry."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


def operands(batch, image, kernel_shape, seed=0):
    """float32 x (B, H, W, Ci), kernel (kh, kw, Ci, Co), and a cotangent of the output (B, H', W', Co)."""
    (h, w), (kh, kw, ci, co) = image, kernel_shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, h, w, ci), dtype=np.float32)
    kernel = rng.standard_normal(kernel_shape, dtype=np.float32)
    ct = rng.standard_normal((batch, h - kh + 1, w - kw + 1, co), dtype=np.float32)
    return x, kernel, ct  # NumPy: the compiled functions take them as they are (no eager JAX op)


@jax.jit
def three_products(x, kernel, ct):
    """``{name: (oneDNN's, XLA's)}`` for the forward, input-gradient and kernel-gradient products.

    One program per shape: each product run eagerly (XLA's side) or jitted on its own compiles
    ~8 programs per shape, for the same values.
    """
    cases = [(onednn_conv.conv_forward, conv_forward, (x, kernel)),
             (onednn_conv.conv_input_grad, conv_input_grad, (ct, kernel)),
             (onednn_conv.conv_kernel_grad, conv_kernel_grad, (x, ct))]
    return {ours.__name__: (ours(*args), xla(*args)) for ours, xla, args in cases}


@pytest.mark.parametrize(("batch", "image", "kernel_shape"), [
    (1, (7, 9), (3, 2, 1, 2)),      # batch 1, one input channel, non-square image and kernel
    (3, (12, 10), (5, 5, 3, 8)),    # conv1-like: 3 channels
    (5, (14, 14), (5, 5, 32, 64)),  # conv2 of Net, batch not a multiple of the chunk count
    (2, (5, 6), (5, 5, 2, 3)),      # a 1x2 output
])
def test_the_three_products_equal_xla_in_float32(batch, image, kernel_shape):
    products = three_products(*operands(batch, image, kernel_shape))
    assert len(products) == 3
    for name, (ours, xla) in products.items():
        assert max_rel_err(ours, xla) < MAX_REL_ERR, name


@jax.jit
def vmapped_products(x, kernel, ct):
    """``[(oneDNN's, XLA's)]`` of each product under ``jax.vmap`` with a shared kernel (folded into
    the batch) and with mapped kernels (one call per element), all in one program."""
    xs, cts = x.reshape(3, 2, *x.shape[1:]), ct.reshape(3, 2, *ct.shape[1:])  # 3 mapped groups of 2
    kernels = jnp.stack([kernel, -kernel, 2 * kernel])
    cases = [
        (onednn_conv.conv_forward, conv_forward, (0, None), (xs, kernel)),  # folded into the batch
        (onednn_conv.conv_input_grad, conv_input_grad, (0, None), (cts, kernel)),  # folded
        (onednn_conv.conv_forward, conv_forward, (0, 0), (xs, kernels)),  # one call per element
        (onednn_conv.conv_input_grad, conv_input_grad, (None, 0), (cts[0], kernels)),
        (onednn_conv.conv_kernel_grad, conv_kernel_grad, (0, 0), (xs, cts)),
    ]
    return [(jax.vmap(ours, axes)(*args), jax.vmap(xla, axes)(*args)) for ours, xla, axes, args in cases]


def test_vmap_folds_a_shared_kernel_and_maps_the_rest():
    pairs = vmapped_products(*operands(6, (9, 8), (3, 3, 3, 4)))
    assert len(pairs) == 5
    for case, (ours, xla) in enumerate(pairs):
        assert max_rel_err(ours, xla) < MAX_REL_ERR, case


def double_backprop_objective(conv):
    """``||d <sin(conv(x, k)), ct> / d x||^2``-like scalar: its gradient by (x, k) needs the second
    derivatives of all three products, as the penalised loss does."""

    def objective(x, kernel, ct):
        inner = jax.grad(lambda x: jnp.sum(jnp.sin(conv(x, kernel)) * ct))(x)
        return jnp.sum(inner**2 * jnp.cos(x))

    return objective


def test_second_derivatives_equal_canonical_under_jit():
    x, kernel, ct = operands(3, (9, 8), (5, 4, 3, 6))
    # Both in one program (the canonical side run eagerly compiled ~25 programs).
    got, want = jax.jit(lambda *args: [jax.grad(double_backprop_objective(conv), (0, 1))(*args)
                                       for conv in (onednn_conv.onednn_conv, canonical_conv)])(x, kernel, ct)
    # Second derivatives chain three float32 products: ~1e-6 measured, 1e-4 leaves room, O(1) if wrong.
    assert max_rel_err(got[0], want[0]) < 1e-4 and max_rel_err(got[1], want[1]) < 1e-4


def test_double_backprop_through_net_matches_canonical_under_jit_options():
    """The training gradient of ``penalized_loss`` (grad of grad) with ``Net(conv_impl="onednn")``."""
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 32, 32, 3), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, 3).astype(np.int32))
    # Random parameters of Net's shapes (eval_shape: compiling Net's init alone takes seconds).
    shapes = jax.eval_shape(Net(conv_impl="xla").init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.2, 0.2, s.shape).astype(np.float32)), shapes)

    def grads(conv_impl):
        loss = lambda p: penalized_loss(p, Net(conv_impl=conv_impl), x, y, penalty_weight=10.0)[0]  # noqa: E731
        return jax.jit(jax.grad(loss), **jit_options("cpu"))(params)

    # float32 rounding through forward, inner backward and outer backward: 1e-4 of each tensor's
    # largest entry (measured ~1e-6); a wrong derivative rule is O(1) off.
    errors = jax.tree.map(max_rel_err, grads("onednn"), grads("canonical"))
    assert max(jax.tree.leaves(errors)) < 1e-4, errors


def test_the_compiled_step_calls_onednn_in_float32_and_xla_in_float64():
    x, kernel, _ = operands(2, (8, 8), (3, 3, 2, 4))

    def grad_of_loss(conv):  # d/dk ||d ||conv(x, k)||^2 / dx||^2: all three products, twice
        return jax.grad(lambda x, k: jnp.sum(jax.grad(lambda x: jnp.sum(conv(x, k) ** 2))(x) ** 2), 1)

    ours = jax.jit(grad_of_loss(onednn_conv.onednn_conv))
    assert "agp_onednn_conv" in ours.lower(x, kernel).as_text()
    with jax.enable_x64(True):
        x64, k64 = x.astype(jnp.float64), kernel.astype(jnp.float64)
        step64 = ours.lower(x64, k64)
        assert "agp_onednn_conv" not in step64.as_text()
        # That very program runs (eagerly each primitive would compile on its own), and computes the
        # same XLA products in the same order: equal to float64 rounding.
        want = jax.jit(grad_of_loss(canonical_conv))(x64, k64)
        np.testing.assert_allclose(step64.compile()(x64, k64), want, rtol=1e-12)


def test_onednn_resolves_to_itself_on_cpu_and_to_canonical_elsewhere():
    assert resolve_conv_impl("onednn", "cpu") == "onednn"
    assert resolve_conv_impl("onednn", "gpu") == "canonical"  # silently: a CPU library


def test_a_missing_onednn_is_reported_with_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("AGP_ONEDNN_ROOT", str(tmp_path))
    with pytest.raises(onednn_conv.OneDNNUnavailable, match=f"oneDNN not found under {tmp_path}"):
        onednn_conv.find_onednn()


FALLBACK_SCRIPT = textwrap.dedent("""
    import json, warnings
    import jax, numpy as np
    from jax_impl import Conv2D
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 9, 8, 3), dtype=np.float32)
    # Weights of init's shapes from NumPy: init's jax.random would compile ~0.7 s of programs here.
    shapes = jax.eval_shape(lambda: Conv2D(4, 3, impl="canonical").init(jax.random.key(0), x))
    params = jax.tree.map(lambda s: rng.uniform(-0.2, 0.2, s.shape).astype(s.dtype), shapes)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = [Conv2D(4, 3, impl="onednn").apply(params, x) for _ in range(2)]  # two layers, one warning
    want = Conv2D(4, 3, impl="canonical").apply(params, x)
    print(json.dumps({"warnings": [str(w.message) for w in caught],
                      "equal": all(bool(np.array_equal(g, want)) for g in got)}))
""")


def test_without_a_compiler_it_falls_back_to_canonical_with_one_warning(tmp_path):
    """A fresh process with an empty build cache and no g++ on PATH: the library cannot be built."""
    (tmp_path / "bin").mkdir()
    env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / "cache"), "PATH": str(tmp_path / "bin"),
           "JAX_PLATFORMS": "cpu"}
    env.pop("CXX", None)
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(result["warnings"]) == 1, result["warnings"]
    message = result["warnings"][0]
    assert "C++ compiler 'g++' not found" in message and "using 'canonical'" in message, message
    assert "pip install" in message and "g++" in message.split("Fix:")[1], message
    assert result["equal"]  # the canonical path itself


@pytest.mark.slow  # two short training runs (~10 s); the products themselves are tested above
def test_the_training_cli_option_runs_onednn_and_trains_like_canonical(tmp_path):
    """``--conv-impl onednn`` (``TrainConfig.conv_impl``) reaches the train step: two SGD steps give
    canonical's parameters and test loss up to float32 rounding, and not bit for bit."""
    from agp_common import TrainConfig
    from jax_impl.train import train_and_evaluate

    def run(conv_impl):
        config = TrainConfig(dataset="synthetic", synthetic_shape=(16, 16, 16, 1), batch_size=8, steps=2,
                             conv_impl=conv_impl, quiet=True)
        return train_and_evaluate(config, tmp_path / conv_impl, plots=False)

    onednn, canonical = run("onednn"), run("canonical")
    pairs = list(zip(jax.tree.leaves(onednn.params), jax.tree.leaves(canonical.params), strict=True))
    for a, b in pairs:
        assert max_rel_err(a, b) < MAX_REL_ERR
    # Not the same kernels: oneDNN sums in another order, so some float32 bits differ.
    assert any(not np.array_equal(a, b) for a, b in pairs)
    assert onednn.final_eval["eval_loss"] == pytest.approx(canonical.final_eval["eval_loss"], rel=1e-5)
