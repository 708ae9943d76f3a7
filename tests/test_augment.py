"""``agp_app.augment``: seeded crop and flip, resumable, and resizing digits to 32x32."""

from __future__ import annotations

import numpy as np
import pytest

from agp_app.augment import augment_batch, pad_to, parse_augment, random_crop, upscale_to


def _images(b=6, h=5, w=7, c=2) -> np.ndarray:
    return np.arange(b * h * w * c, dtype=np.float32).reshape(b, h, w, c) + 1  # no zeros: padding shows


def _crop_by_loops(x, dy, dx, p):
    """The crop's definition, pixel by pixel: out[h, w] = x[h + dy - p, w + dx - p], 0 outside."""
    h, w, _ = x.shape
    out = np.zeros_like(x)
    for i in range(h):
        for j in range(w):
            si, sj = i + dy - p, j + dx - p
            if 0 <= si < h and 0 <= sj < w:
                out[i, j] = x[si, sj]
    return out


def test_random_crop_takes_each_examples_window_of_the_zero_padded_image():
    x = _images()
    offsets = np.array([[0, 0], [4, 4], [8, 8], [1, 7], [3, 2], [8, 0]])
    got = random_crop(x, offsets, 4)
    for i, (dy, dx) in enumerate(offsets):
        np.testing.assert_array_equal(got[i], _crop_by_loops(x[i], dy, dx, 4))


def test_augmentation_depends_only_on_seed_and_step():
    x = _images()
    a = augment_batch(x, seed=3, step=11)
    np.testing.assert_array_equal(a, augment_batch(x.copy(), seed=3, step=11))  # resume at step 11: same
    assert not np.array_equal(a, augment_batch(x, seed=3, step=12))
    assert not np.array_equal(a, augment_batch(x, seed=4, step=11))


def test_flip_only_mirrors_some_examples_and_keeps_the_others():
    x = _images(b=32)
    got = augment_batch(x, seed=0, step=0, ops=("flip",))
    flipped = [np.array_equal(g, xi[:, ::-1]) for g, xi in zip(got, x, strict=True)]
    kept = [np.array_equal(g, xi) for g, xi in zip(got, x, strict=True)]
    assert all(f != k for f, k in zip(flipped, kept, strict=True))  # each example one or the other
    assert 0 < sum(flipped) < 32  # independent draws per example (P(all same) = 2**-31)


def test_turning_crop_off_leaves_the_flips_unchanged():
    x = _images(b=16)
    both = augment_batch(x, seed=1, step=5, crop_padding=0)  # padding 0: the crop is the identity
    np.testing.assert_array_equal(both, augment_batch(x, seed=1, step=5, ops=("flip",)))
    # and with a real crop: crop+flip equals the flip's draws applied after the crop's
    cropped = augment_batch(x, seed=1, step=5, ops=("crop",))
    crop_then_flip = augment_batch(cropped, seed=1, step=5, ops=("flip",))
    np.testing.assert_array_equal(augment_batch(x, seed=1, step=5), crop_then_flip)


def test_no_ops_return_the_images_unchanged():
    x = _images()
    np.testing.assert_array_equal(augment_batch(x, seed=0, step=0, ops=()), x)


def test_crop_offsets_cover_every_position_and_are_independent_per_example():
    x = np.ones((2000, 3, 3, 1), np.float32)
    got = augment_batch(x, seed=0, step=0, ops=("crop",), crop_padding=1)
    # with padding 1 on a 3x3 image of ones, the count of kept ones tells the offset class
    kept = got.reshape(2000, -1).sum(axis=1)
    assert set(np.unique(kept)) == {4.0, 6.0, 9.0}  # corner, edge, centre offsets all occur


@pytest.mark.parametrize(("text", "ops"), [("crop,flip", ("crop", "flip")), ("flip, crop", ("crop", "flip")),
                                           ("flip", ("flip",)), ("", ()), ("none", ())])
def test_parse_augment_reads_the_flag(text, ops):
    assert parse_augment(text) == ops


@pytest.mark.parametrize("text", ["rotate", "crop,crop", "crop,none"])
def test_parse_augment_refuses_unknown_names(text):
    with pytest.raises(ValueError, match="--augment takes a comma-separated subset of crop,flip"):
        parse_augment(text)


def test_upscale_repeats_each_digit_pixel_into_a_4x4_block():
    x = _images(b=2, h=8, w=8, c=1)
    got = upscale_to(x, 32)
    assert got.shape == (2, 32, 32, 1)
    for i in range(32):
        for j in range(32):
            assert np.array_equal(got[:, i, j], x[:, i // 4, j // 4])


def test_upscale_to_a_size_that_does_not_divide_pads_with_zeros_centred():
    x = _images(b=1, h=8, w=8, c=1)
    got = upscale_to(x, 13)
    np.testing.assert_array_equal(got, pad_to(x, 13))
    np.testing.assert_array_equal(got[0, 2:10, 2:10], x[0])  # (13 - 8) // 2 = 2 rows/cols before
    assert got.sum() == x.sum()  # everything else is zero


def test_pad_to_a_smaller_size_is_refused():
    with pytest.raises(ValueError, match="cannot pad 8x8 images to the smaller size 4"):
        pad_to(_images(h=8, w=8), 4)
