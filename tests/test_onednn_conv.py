"""The native oneDNN convolutions: equal to XLA's to second order, shape-checked, built only by the
explicit build step, loaded only when verified, and replaced by the canonical path where absent.

Tests that run oneDNN's kernels build the library first (the explicit step, as scripts/setup.sh
does) and are skipped only where oneDNN or a C++ compiler is not installed: with both present a
failing build is a failure. The builder and loader checks use a stand-in compiler and oneDNN prefix
and run everywhere; the fallback and crash checks run in subprocesses, so a crash fails a test
instead of ending pytest.
"""

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_impl import Net, jit_options, onednn_conv, penalized_loss
from jax_impl.conv_impl import ConvImpl, conv2d_valid, resolve_conv_impl
from jax_impl.conv_products import canonical_conv, conv_forward, conv_input_grad, conv_kernel_grad
from jax_impl.onednn_conv import library

# float32: oneDNN and XLA sum the same products in different orders. Over the <= 800-term
# sums here that is ~1e-6 of the largest entry; 1e-5 still catches a wrong index (errors of O(1)).
MAX_REL_ERR = 1e-5


def _installed() -> str:
    """Why oneDNN's kernels cannot be built here (``""`` when oneDNN and a compiler are installed)."""
    try:
        library.find_onednn()
        library.compiler()
    except library.OneDNNUnavailable as e:
        return str(e)
    return ""


@pytest.fixture(scope="module")
def built():
    """The library, built by the explicit step (a no-op when a verified current one exists)."""
    if _installed():
        pytest.skip(f"oneDNN's kernels cannot be built here: {_installed()}")
    path = onednn_conv.build()
    assert onednn_conv.available(), onednn_conv.unavailable_reason()
    return path


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


# ------------------------------------------------------------------------------ the numbers


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
def test_the_three_products_equal_xla_in_float32(built, batch, image, kernel_shape):
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


def test_vmap_folds_a_shared_kernel_and_maps_the_rest(built):
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


def test_second_derivatives_equal_canonical_under_jit(built):
    x, kernel, ct = operands(3, (9, 8), (5, 4, 3, 6))
    # Both in one program (the canonical side run eagerly compiled ~25 programs).
    got, want = jax.jit(lambda *args: [jax.grad(double_backprop_objective(conv), (0, 1))(*args)
                                       for conv in (onednn_conv.onednn_conv, canonical_conv)])(x, kernel, ct)
    # Second derivatives chain three float32 products: ~1e-6 measured, 1e-4 leaves room, O(1) if wrong.
    assert max_rel_err(got[0], want[0]) < 1e-4 and max_rel_err(got[1], want[1]) < 1e-4


def test_double_backprop_through_the_default_net_is_onednn_and_matches_canonical(built):
    """The training gradient of ``penalized_loss`` (grad of grad) with the default ``Net()``."""
    assert Net().conv_impl is ConvImpl.ONEDNN  # "auto" on CPU, once built
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((3, 32, 32, 3), dtype=np.float32))
    y = jnp.asarray(rng.integers(0, 10, 3).astype(np.int32))
    # Random parameters of Net's shapes (eval_shape: compiling Net's init alone takes seconds).
    shapes = jax.eval_shape(Net(conv_impl="xla").init, jax.random.key(0), x)["params"]
    params = jax.tree.map(lambda s: jnp.asarray(rng.uniform(-0.2, 0.2, s.shape).astype(np.float32)), shapes)

    def grads(model):
        loss = lambda p: penalized_loss(p, model, x, y, penalty_weight=10.0)[0]  # noqa: E731
        return jax.jit(jax.grad(loss), **jit_options("cpu", conv_impl=model.conv_impl))(params)

    # float32 rounding through forward, inner backward and outer backward: 1e-4 of each tensor's
    # largest entry (measured ~1e-6); a wrong derivative rule is O(1) off.
    errors = jax.tree.map(max_rel_err, grads(Net()), grads(Net(conv_impl="canonical")))
    assert max(jax.tree.leaves(errors)) < 1e-4, errors


def test_the_compiled_step_calls_onednn_in_float32_and_xla_in_float64(built):
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


def test_onednn_and_auto_resolve_to_onednn_on_cpu_and_elsewhere_to_the_gpu_paths(built):
    assert resolve_conv_impl("onednn", "cpu") is ConvImpl.ONEDNN
    assert resolve_conv_impl("auto", "cpu") is ConvImpl.ONEDNN
    assert resolve_conv_impl("onednn", "gpu") is ConvImpl.CANONICAL  # silently: a CPU library
    assert resolve_conv_impl("auto", "gpu") is ConvImpl.XLA
    assert jit_options("cpu") == {}  # custom calls: XLA's kernel options do not reach them


# ------------------------------------------------------------------------------ shape checks


@pytest.mark.parametrize(("op", "a", "b", "message"), [
    (onednn_conv.conv_forward, (2, 10, 10, 3), (5, 5, 4, 8), r"input channels of x \(3\) and kernel \(4\)"),
    (onednn_conv.conv_forward, (2, 6, 6, 3), (7, 7, 3, 8), r"window 7x7 .* fit in the 6x6 image"),
    (onednn_conv.conv_forward, (10, 10, 3), (5, 5, 3, 8), r"x must have rank 4"),
    (onednn_conv.conv_input_grad, (2, 6, 6, 8), (5, 5, 3, 7), r"output channels of ct \(8\) and kernel"),
    (onednn_conv.conv_kernel_grad, (2, 10, 10, 3), (3, 6, 6, 8), r"batch sizes of x \(2\) and ct \(3\)"),
    (onednn_conv.conv_kernel_grad, (2, 5, 5, 3), (2, 6, 6, 8), r"window 0x0"),
])
def test_mismatched_shapes_raise_a_value_error_naming_the_operands(op, a, b, message):
    """Checked before oneDNN is asked (no library needed): XLA raises ValueError for its own too."""
    with pytest.raises(ValueError, match=message):
        op(np.ones(a, np.float32), np.ones(b, np.float32))


def test_a_mismatched_call_under_jit_raises_instead_of_returning_numbers():
    with pytest.raises(ValueError, match=r"input channels of x \(3\) and kernel \(4\)"):
        jax.jit(lambda x, k: conv2d_valid(x, k, ConvImpl.ONEDNN))(np.ones((2, 10, 10, 3), np.float32),
                                                                 np.ones((5, 5, 4, 8), np.float32))


CRASH_SCRIPT = textwrap.dedent("""
    import json, jax, jax.numpy as jnp, numpy as np
    from jax_impl import onednn_conv
    assert onednn_conv.available(), onednn_conv.unavailable_reason()  # loads it: registers the targets
    out = {}
    try:  # the reported segfault: 2**24 input channels against a one-channel kernel
        onednn_conv.conv_forward(jnp.ones((1, 1, 1, 1 << 24)), jnp.ones((1, 1, 1, 1)))
    except ValueError as e:
        out["channels"] = str(e)
    # An image 2**24 pixels wide crashed oneDNN's kernels: beyond their limits XLA computes it.
    wide = onednn_conv.conv_forward(jnp.ones((1, 1, 1 << 24, 1)), jnp.full((1, 1, 1, 1), 2.0))
    out["wide"] = float(wide.sum())
    # Calls that bypass the Python checks: the C++ handlers answer INVALID_ARGUMENT.
    errors = []
    for target, a, b, result in [
            ("agp_onednn_conv_forward", (2, 10, 10, 3), (5, 5, 4, 8), (2, 6, 6, 8)),
            ("agp_onednn_conv_forward", (1, 1, 1, 1 << 24), (1, 1, 1, 1), (1, 1, 1, 1)),
            ("agp_onednn_conv_forward", (2, 10, 10, 3), (5, 5, 3, 8), (2, 7, 6, 8)),
            ("agp_onednn_conv_forward", (1, 1, 1 << 24, 1), (1, 1, 1, 1), (1, 1, 1 << 24, 1)),
            ("agp_onednn_conv_input_grad", (2, 6, 6, 8), (5, 5, 3, 8), (3, 10, 10, 3)),
            ("agp_onednn_conv_kernel_grad", (2, 10, 10, 3), (3, 6, 6, 8), (5, 5, 3, 8)),
            ("agp_onednn_conv_kernel_grad", (2, 10, 10, 3), (2, 6, 6, 8), (5, 5, 3, 9))]:
        call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(result, jnp.float32))
        try:
            jax.block_until_ready(call(jnp.ones(a), jnp.ones(b)))
            errors.append("no error")
        except Exception as e:  # jaxlib's own runtime error type
            errors.append(str(e).splitlines()[0])
    out["errors"] = errors
    print(json.dumps(out))
""")


def test_crafted_shapes_give_errors_not_crashes(built):
    """The issue's segfaulting call, an image too wide for oneDNN, and raw FFI calls with shapes that
    disagree, in a subprocess (a crash would end pytest)."""
    proc = subprocess.run([sys.executable, "-c", CRASH_SCRIPT], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "input channels of x (16777216) and kernel (1)" in out["channels"]
    assert out["wide"] == 2.0 * (1 << 24)  # exact: a sum of 2.0s below 2**24 * 2 in float32
    assert len(out["errors"]) == 7
    for error in out["errors"]:
        assert "INVALID_ARGUMENT: oneDNN conv_" in error, out["errors"]


# ---------------------------------------------------------------------- build step and loader


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """A oneDNN prefix with the two files ``find_onednn`` looks for, an empty cache folder
    (``AGP_CACHE_DIR``) and a stand-in ``CXX`` that writes a small ELF-headed file naming the
    handlers (and counts its calls): the builder's logic without a real compile."""
    prefix = tmp_path / "onednn"
    (prefix / "include" / "oneapi" / "dnnl").mkdir(parents=True)
    (prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp").touch()
    (prefix / "lib").mkdir()
    (prefix / "lib" / "libdnnl.so").touch()
    symbols = "".join(f"{s}\\0" for s in library.FFI_TARGETS.values())
    cxx = tmp_path / "fake-cxx"
    cxx.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import sys
        open(sys.argv[0] + ".calls", "a").write("x")
        out = sys.argv[sys.argv.index("-o") + 1]
        open(out, "wb").write(b"\\x7fELF" + b"{symbols}")
        """))
    cxx.chmod(0o755)
    monkeypatch.setenv("AGP_ONEDNN_ROOT", str(prefix))
    monkeypatch.setenv("AGP_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CXX", str(cxx))
    return tmp_path


def compiler_calls(stand_ins) -> int:
    calls = stand_ins / "fake-cxx.calls"
    return len(calls.read_text()) if calls.exists() else 0


def test_the_build_step_builds_once_into_a_private_folder_with_a_digest(stand_ins):
    path = library.build()
    assert compiler_calls(stand_ins) == 1 and library.verify(path) == ""
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert library.digest_path(path).is_file()
    assert library.build() == path and compiler_calls(stand_ins) == 1  # verified and current: kept


def test_a_damaged_library_is_refused_by_the_loader_and_rebuilt_by_the_build_step(stand_ins):
    path = library.build()
    path.write_bytes(path.read_bytes()[:5])  # truncated, as by a full disk
    assert "is damaged" in library.verify(path)
    with pytest.raises(library.OneDNNUnavailable, match="is damaged"):
        library.built_library()
    assert library.build() == path and compiler_calls(stand_ins) == 2
    assert library.verify(path) == ""


def test_a_file_no_build_wrote_is_never_loaded(stand_ins):
    path = library.library_path(library.find_onednn(), library.make_private_dir(library.cache_dir()))
    elf = b"\x7fELF" + b"".join(s.encode() + b"\0" for s in library.FFI_TARGETS.values())
    path.write_bytes(elf)  # planted: no digest beside it
    assert "has no digest" in library.verify(path)
    path.write_bytes(b"\x7fELF another library")  # with a digest, but not ours
    library.digest_path(path).write_text(hashlib.sha256(path.read_bytes()).hexdigest())
    assert "does not export AgpOnednnConvForward" in library.verify(path)


def test_a_library_or_cache_folder_others_may_write_to_is_refused(stand_ins):
    path = library.build()
    path.chmod(0o666)
    assert "only this user may write" in library.verify(path)
    path.chmod(0o600)
    path.parent.chmod(0o777)
    assert "writable by other users" in library.verify(path)
    with pytest.raises(library.OneDNNUnavailable, match="writable by other users"):
        library.build()
    assert compiler_calls(stand_ins) == 1


def test_a_compiler_that_writes_nothing_leaves_no_library(stand_ins, monkeypatch):
    monkeypatch.setenv("CXX", shutil.which("true") or "true")
    with pytest.raises(library.OneDNNUnavailable, match=r"did not produce the library \(it is empty\)"):
        library.build()
    assert sorted(p.name for p in library.cache_dir().iterdir()) == ["onednn_conv.lock"]


def test_a_compiler_past_the_time_limit_is_stopped(stand_ins, monkeypatch):
    (stand_ins / "slow-cxx").write_text(f"#!{sys.executable}\nimport time\ntime.sleep(30)\n")
    (stand_ins / "slow-cxx").chmod(0o755)
    monkeypatch.setenv("CXX", str(stand_ins / "slow-cxx"))
    with pytest.raises(library.OneDNNUnavailable, match=r"took more than 0\.5 s"):
        library.build(timeout_s=0.5)
    assert not library.library_path(library.find_onednn()).exists()


def test_a_missing_onednn_is_reported_with_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.setenv("AGP_ONEDNN_ROOT", str(tmp_path))
    with pytest.raises(library.OneDNNUnavailable, match=f"oneDNN not found under {tmp_path}"):
        library.find_onednn()


# -------------------------------------------------------------------------------- fallback


FALLBACK_SCRIPT = textwrap.dedent("""
    import json, warnings
    import jax, numpy as np
    from jax_impl import Conv2D, Net, onednn_conv
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 32, 32, 3), dtype=np.float32)
    # Weights of init's shapes from NumPy: init's jax.random would compile programs here.
    shapes = jax.eval_shape(lambda: Net(conv_impl="xla").init(jax.random.key(0), x))
    params = jax.tree.map(lambda s: rng.uniform(-0.2, 0.2, s.shape).astype(s.dtype), shapes)
    models = [Net(), Net(num_classes=10)]  # "auto": one line for the process
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        explicit = [Conv2D(4, 3, impl="onednn") for _ in range(2)]  # two layers, one warning
    got, want = (jax.jit(model.apply)(params, x) for model in (models[0], Net(conv_impl="xla")))
    print(json.dumps({
        "reason": onednn_conv.unavailable_reason(),
        "auto": [str(m.conv_impl) for m in models], "explicit": [str(c.impl) for c in explicit],
        "warnings": [str(w.message) for w in caught],
        "rel_err": float(np.max(np.abs(got - want)) / np.max(np.abs(want))), "dtype": str(got.dtype)}))
""")


def run_fallback(tmp_path, env_changes):
    env = {**os.environ, "AGP_CACHE_DIR": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu", **env_changes}
    proc = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr, env


def test_without_a_compiler_auto_falls_back_to_canonical_with_one_line(tmp_path, monkeypatch, capsys):
    """A fresh process with an empty cache and no compiler: nothing is built at use time, "auto" is
    the canonical path (the same numbers) with one logged line, "onednn" warns once; the build step
    prints one line, fails with exit 1 and leaves no library."""
    result, stderr, env = run_fallback(tmp_path, {"CXX": str(tmp_path / "no-such-compiler")})
    no_onednn = "oneDNN not found" in _installed()  # then that is the reason, else the missing build
    assert ("oneDNN not found" if no_onednn else "not built") in result["reason"]
    assert result["auto"] == ["canonical", "canonical"] and result["explicit"] == ["canonical", "canonical"]
    # The forward pass of "canonical" is XLA's convolution itself: equal up to float32 rounding.
    assert result["rel_err"] < 1e-6 and result["dtype"] == "float32"
    lines = [line for line in stderr.splitlines() if "oneDNN" in line]
    assert len(lines) == 1 and "conv_impl='auto' uses the 'canonical' convolutions" in lines[0], stderr
    assert "python -m jax_impl.onednn_conv build" in lines[0]
    assert len(result["warnings"]) == 1 and "conv_impl='onednn' is unavailable" in result["warnings"][0]

    # ``python -m jax_impl.onednn_conv build`` is ``sys.exit(main())``: run in this process, in the same
    # environment (the build reads it when called; nothing of the build step is cached in the process).
    from jax_impl.onednn_conv.__main__ import main as build_main

    for name in ("CXX", "AGP_CACHE_DIR"):
        monkeypatch.setenv(name, env[name])
    capsys.readouterr()
    assert build_main(["build"]) == 1
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 1 and "not built" in out, out
    assert ("oneDNN not found" if no_onednn else "no-such-compiler") in out
    assert not list((tmp_path / "cache").glob("*.so"))


def test_a_truncated_cached_library_is_not_loaded(built, tmp_path):
    """The issue's Bus error: the real library truncated in place, its digest kept. The loader checks
    the digest before dlopen, so the process falls back (rc 0) instead of dying."""
    cache = library.make_private_dir(tmp_path / "cache")
    target = library.library_path(library.find_onednn(), cache)
    target.write_bytes(built.read_bytes()[:60000])
    shutil.copy(library.digest_path(built), library.digest_path(target))
    script = "from jax_impl import Net, onednn_conv; print(onednn_conv.unavailable_reason(), Net().conv_impl)"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "AGP_CACHE_DIR": str(cache), "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "is damaged" in proc.stdout and proc.stdout.split()[-1] == "canonical", proc.stdout


@pytest.mark.slow  # two short training runs (~10 s); the products themselves are tested above
def test_the_training_cli_option_runs_onednn_and_trains_like_canonical(built, tmp_path):
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
