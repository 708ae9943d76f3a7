"""FGSM and PGD examples of ``jax_impl.attacks`` and ``torch_ref.attacks`` on identical weights.

What holds (seed ``Net``, 32x32x3 U[0, 1) images, PyTorch's init copied with
``export_flax_params``, NCHW <-> NHWC):

* float64: the input gradients agree to rounding (1e-10), so every sign
  agrees and FGSM and the 10 PGD iterates are the *same numbers*, bit for
  bit (``x + eps * s`` and the clips are exact, identical operations).
* float32: FGSM is still identical here; in general ``sign`` can differ only
  at entries whose gradient is at float32 rounding level (below 1e-5 of the
  example's largest entry). PGD feeds each step's example into the next
  gradient, so one such flip sends that example along another path inside
  the ball: whole examples may then differ (by up to 2 eps per entry, both
  still valid attacks), the others stay identical. Tested: every PGD step,
  taken from the same iterate in both frameworks, agrees in sign outside
  that rounding band, and at most a quarter of the examples differ at the end.

The JAX attacks are compiled once per dtype with ``jax.jit`` (``eps`` is
traced, so both radii share a compilation): op by op, the first attack paid
~7 s of per-primitive compilations and each PGD call recompiled its loop.
``docs/robustness.md`` runs ``pgd`` un-jitted, and tests/test_attacks.py both attacks on closed
forms. The default suite attacks
with ``EPS[0]``; ``EPS[1:]`` runs with ``-m slow`` (the same code path at
another radius), as does the float32 FGSM test (see its comment).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import pytest

import torch_ref
from jax_impl import Net, fgsm, input_gradient, pgd
from parity_tests.harness import (
    identical_weights,
    jax_dtype,
    jax_inputs,
    make_batch,
    nchw_to_nhwc,
    nhwc_to_nchw,
    to_numpy,
    torch_inputs,
)

EPS = (0.05, 0.1)
CLIP = (0.0, 1.0)
BATCH = 16
#: float32 input gradients agree to ~1e-6 of their scale (harness.TOLERANCES); a sign may only
#: differ below 1e-5 of the example's largest entry (10x headroom).
FLOAT32_SIGN_BAND = 1e-5
EPS_PARAMS = [EPS[0], *(pytest.param(eps, marks=pytest.mark.slow) for eps in EPS[1:])]
#: One instance: ``apply_fn`` is a static argument, and jit caches a bound method per instance.
MODEL = Net()


@functools.cache
def compiled(fn):
    """``fgsm``, ``pgd`` or ``input_gradient`` compiled (``apply_fn`` and ``clip`` static, ``eps`` traced)."""
    return jax.jit(fn, static_argnums=0, static_argnames=("clip",) if fn in (fgsm, pgd) else ())


def attacked_pair(dtype, attack, eps):
    """(JAX NHWC examples, PyTorch examples as NHWC) of ``attack`` on the same weights and batch."""
    with jax_dtype(dtype):
        net, params = identical_weights(0, dtype)
        x_nchw, y = make_batch(1, BATCH, dtype)
        xj, yj = jax_inputs(x_nchw, y)
        xt, yt = torch_inputs(x_nchw, y)
        ours = np.asarray(compiled(fgsm if attack == "fgsm" else pgd)(MODEL.apply, {"params": params}, xj, yj,
                                                                       eps, clip=CLIP))
        theirs = nchw_to_nhwc(to_numpy((torch_ref.fgsm if attack == "fgsm" else torch_ref.pgd)(
            net, xt, yt, eps, clip=CLIP)))
    return ours, theirs, nchw_to_nhwc(x_nchw)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
@pytest.mark.parametrize("eps", EPS_PARAMS)
def test_float64_fgsm_and_pgd_examples_are_bitwise_identical(attack, eps):
    ours, theirs, x = attacked_pair("float64", attack, eps)
    np.testing.assert_array_equal(ours, theirs)  # exact: same signs, then the same exact operations
    moved = np.abs(ours - x)
    assert moved.max() <= eps * (1 + 1e-12) and moved.mean() > eps / 4  # a real attack, in the ball


# -m slow: implied in the default suite by the first step of the PGD test below (JAX's and PyTorch's
# float32 input-gradient signs at x agree outside the band, and FGSM is clip(x + eps * those signs)),
# with fgsm itself checked bit for bit in float64; this one compiles float32 FGSM for it alone.
@pytest.mark.slow
@pytest.mark.parametrize("eps", EPS)
def test_float32_fgsm_examples_agree_outside_the_rounding_band(eps):
    ours, theirs, _ = attacked_pair("float32", "fgsm", eps)
    with jax_dtype("float32"):
        _, params = identical_weights(0, "float32")
        x_nchw, y = make_batch(1, BATCH, "float32")
        g = np.asarray(compiled(input_gradient)(MODEL.apply, {"params": params}, *jax_inputs(x_nchw, y)))
    scale = np.abs(g).reshape(BATCH, -1).max(axis=1)[:, None, None, None]  # per example
    differ = ours != theirs
    assert np.all(np.abs(g[differ]) <= FLOAT32_SIGN_BAND * np.broadcast_to(scale, g.shape)[differ])


@pytest.mark.parametrize("eps", EPS_PARAMS)
def test_float32_pgd_steps_agree_in_sign_outside_the_rounding_band(eps):
    with jax_dtype("float32"):
        net, params = identical_weights(0, "float32")
        x_nchw, y = make_batch(1, BATCH, "float32")
        _, yj = jax_inputs(x_nchw, y)
        _, yt = torch_inputs(x_nchw, y)
        variables = {"params": params}
        # The iterates in NumPy (float32, the same elementwise operations): eager jnp compiled a
        # program per operation (8 of them) for this test alone.
        x_k = nchw_to_nhwc(x_nchw)
        lower, upper = np.maximum(x_k - eps, CLIP[0]), np.minimum(x_k + eps, CLIP[1])
        for _ in range(10):  # pgd's own iteration, each gradient taken in both frameworks at x_k
            g = np.asarray(compiled(input_gradient)(MODEL.apply, variables, x_k, yj))
            xt_k = torch_inputs(nhwc_to_nchw(x_k), y)[0]
            g_torch = nchw_to_nhwc(to_numpy(torch_ref.input_gradient(net, xt_k, yt)))
            scale = np.abs(g).reshape(BATCH, -1).max(axis=1)[:, None, None, None]
            outside = np.abs(g) > FLOAT32_SIGN_BAND * scale
            np.testing.assert_array_equal(np.sign(g)[outside], np.sign(g_torch)[outside])
            x_k = np.clip(x_k + eps / 4 * np.sign(g), lower, upper)
            assert x_k.dtype == np.float32  # NumPy keeps float32 with Python-float eps, as JAX did
    ours, theirs, x = attacked_pair("float32", "pgd", eps)
    differing_examples = int(np.any((ours != theirs).reshape(BATCH, -1), axis=1).sum())
    assert differing_examples <= BATCH // 4, differing_examples
    for adv in (ours, theirs):  # either way, a valid example: in the ball and the box
        assert np.abs(adv - x).max() <= eps * (1 + 1e-6) and adv.min() >= 0.0 and adv.max() <= 1.0
