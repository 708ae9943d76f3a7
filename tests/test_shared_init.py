"""``agp_app.shared_init``: PyTorch's default initialisation drawn in NumPy, in the Flax layout."""

from __future__ import annotations

import math

import numpy as np
import pytest

from agp_app.shared_init import draw_shared_variables

SHAPES = {
    "params": {
        "conv1": {"kernel": (3, 3, 4, 64), "bias": (64,)},  # HWIO: fan_in 3*3*4 = 36
        "bn1": {"scale": (64,), "bias": (64,)},
        "linear": {"kernel": (256, 10), "bias": (10,)},  # fan_in 256
        "embed": {"embedding": (50, 8)},
    },
    "batch_stats": {"bn1": {"mean": (64,), "var": (64,)}},
}


def test_each_leaf_follows_pytorchs_default_for_its_layer():
    v = draw_shared_variables(SHAPES, seed=0)
    p = v["params"]
    for layer, fan in (("conv1", 36), ("linear", 256)):
        bound = 1 / math.sqrt(fan)
        for leaf in ("kernel", "bias"):
            x = p[layer][leaf]
            assert x.dtype == np.float32 and x.shape == SHAPES["params"][layer][leaf]
            assert np.abs(x).max() <= bound
    # the kernels (2560+ draws) and conv1's bias (64 draws) reach close to their bound: the bias's
    # bound is its kernel's fan_in (its own would be 1/sqrt(64) = 0.125 > 1/6, caught by <= above)
    assert np.abs(p["conv1"]["kernel"]).max() > 0.99 / 6 and np.abs(p["conv1"]["bias"]).max() > 0.9 / 6
    assert np.abs(p["linear"]["kernel"]).max() > 0.99 / 16
    # U(-a, a) has std a / sqrt(3); 9216 draws: the sample std's own spread is ~0.5%, 3% is ~6 sigma
    kernel = p["conv1"]["kernel"]
    assert kernel.std() == pytest.approx(1 / math.sqrt(36) / math.sqrt(3), rel=0.03)
    assert (p["bn1"]["scale"] == 1).all() and (p["bn1"]["bias"] == 0).all()
    assert (v["batch_stats"]["bn1"]["mean"] == 0).all() and (v["batch_stats"]["bn1"]["var"] == 1).all()
    # N(0, 1): 400 draws, std within 15% (about 4 sigma of the sample std's 3.5%)
    assert p["embed"]["embedding"].std() == pytest.approx(1.0, rel=0.15)


def test_draw_depends_on_seed_and_path_not_on_dict_order_or_other_layers():
    a = draw_shared_variables(SHAPES, seed=1)
    reordered = {"batch_stats": SHAPES["batch_stats"],
                 "params": {"linear": SHAPES["params"]["linear"], "conv1": SHAPES["params"]["conv1"]}}
    b = draw_shared_variables(reordered, seed=1)
    np.testing.assert_array_equal(a["params"]["conv1"]["kernel"], b["params"]["conv1"]["kernel"])
    np.testing.assert_array_equal(a["params"]["linear"]["bias"], b["params"]["linear"]["bias"])
    c = draw_shared_variables(SHAPES, seed=2)
    assert not np.array_equal(a["params"]["conv1"]["kernel"], c["params"]["conv1"]["kernel"])
    assert not np.array_equal(a["params"]["conv1"]["bias"], a["params"]["linear"]["bias"][:10])


def test_leaves_may_be_arrays_or_objects_with_a_shape():
    shapes = {"params": {"d": {"kernel": np.zeros((3, 2)), "bias": np.zeros(2)}}}
    v = draw_shared_variables(shapes, seed=0)
    np.testing.assert_array_equal(v["params"]["d"]["kernel"],
                                  draw_shared_variables({"params": {"d": {"kernel": (3, 2), "bias": (2,)}}},
                                                        seed=0)["params"]["d"]["kernel"])


def test_weightless_collections_are_left_out():
    v = draw_shared_variables({"params": {}, "perturbations": {"relu1": (2, 3)}}, seed=0)
    assert set(v) == {"params"}


@pytest.mark.parametrize(("shapes", "message"), [
    ({"params": {"attn": {"query": (4, 4)}}}, "params/attn/query: no shared-init rule for a leaf named"),
    ({"batch_stats": {"bn": {"count": ()}}}, "batch_stats/bn/count: no shared-init rule"),
    ({"params": {}, "cache": {}}, r"no shared-init rule for the collections \['cache'\]"),
    ({"params": {"d": {"kernel": "3x3"}}}, "params/d/kernel: expected a shape"),
])
def test_unknown_leaves_and_collections_are_refused_by_path(shapes, message):
    with pytest.raises(ValueError, match=message):
        draw_shared_variables(shapes, seed=0)
