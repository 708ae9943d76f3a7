"""Data augmentation of ``--augment`` and image resizing to a model's input size (NumPy, NHWC).

``augment_batch`` draws each op's randomness from its own generator,
``np.random.default_rng([AUGMENT_STREAM, seed, step, j])`` with ``j`` the op's index in
``AUGMENT_OPS``: the same (seed, step) gives the same augmentation in both frameworks, on any
number of devices, and after a resume at step ``k`` (the draw depends on nothing a previous process
held), and one op's draws do not change when another op is turned off or its padding changes.
For a batch of ``B`` examples:

    crop    offsets (B, 2) uniform in {0, ..., 2p}   crop origin (dy, dx) in the zero-padded image
    flip    flips   (B,)   uniform in [0, 1) < 0.5   which examples are mirrored left-right

independent across examples. ``crop``: pad each image with ``p`` zeros on every side and cut the
(H, W) window at (dy, dx), i.e. ``out[i, h, w] = x[i, h + dy_i - p, w + dx_i - p]`` (0 outside);
``flip``: ``out[i, h, w] = x[i, h, W - 1 - w]``. Crop first, then flip (the CIFAR recipe's order;
both commute in distribution). The pad value is 0 in the units of the images given, so apply this
to the batch exactly as the model sees it.
"""

from __future__ import annotations

import numpy as np

#: ``--augment`` operations, in the order they are applied.
AUGMENT_OPS = ("crop", "flip")
#: Zeros added on each side before the random crop (the CIFAR recipe's 4 for 32x32 images).
CROP_PADDING = 4
#: First word of the augmentation's seed, so its stream differs from the batch order's ``[seed, epoch]``.
AUGMENT_STREAM = 0xA06


def parse_augment(text: str) -> tuple[str, ...]:
    """``"crop,flip"`` -> ``("crop", "flip")`` (in ``AUGMENT_OPS`` order); ``""``/``"none"`` -> ``()``.

    ``ValueError`` naming the choices for an unknown or repeated name.
    """
    names = [n.strip() for n in text.split(",") if n.strip()]
    if names == ["none"]:
        return ()
    unknown = [n for n in names if n not in AUGMENT_OPS]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"--augment takes a comma-separated subset of {','.join(AUGMENT_OPS)} (or none); "
                         f"got {text!r}")
    return tuple(op for op in AUGMENT_OPS if op in names)


def _check_images(images: np.ndarray) -> None:
    if images.ndim != 4:
        raise ValueError(f"expected images (B, H, W, C) (NHWC), got shape {images.shape}")


def random_crop(images: np.ndarray, offsets: np.ndarray, padding: int) -> np.ndarray:
    """(B, H, W, C) -> (B, H, W, C): the window at ``offsets[i] = (dy, dx)`` of each zero-padded image."""
    b, h, w, _ = images.shape
    padded = np.pad(images, ((0, 0), (padding, padding), (padding, padding), (0, 0)))  # (B, H+2p, W+2p, C)
    rows = offsets[:, 0, None] + np.arange(h)  # (B, H)
    cols = offsets[:, 1, None] + np.arange(w)  # (B, W)
    return padded[np.arange(b)[:, None, None], rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)


def random_flip(images: np.ndarray, flips: np.ndarray) -> np.ndarray:
    """(B, H, W, C) -> (B, H, W, C): examples with ``flips[i]`` mirrored along W."""
    return np.where(flips[:, None, None, None], images[:, :, ::-1], images)


def _rng(seed: int, step: int, op: str) -> np.random.Generator:
    """The generator of ``op`` at (seed, step) (module docstring)."""
    return np.random.default_rng([AUGMENT_STREAM, seed, step, AUGMENT_OPS.index(op)])


def augment_batch(images: np.ndarray, *, seed: int, step: int, ops: tuple[str, ...] = AUGMENT_OPS,
                  crop_padding: int = CROP_PADDING) -> np.ndarray:
    """``images`` (B, H, W, C) augmented for 0-based update ``step`` (module docstring); a new array.

    ``ops``: a subset of ``AUGMENT_OPS`` (``parse_augment``); ``()`` returns ``images`` unchanged.
    """
    _check_images(images)
    unknown = set(ops) - set(AUGMENT_OPS)
    if unknown:
        raise ValueError(f"augmentation ops must be among {AUGMENT_OPS}; got {tuple(ops)}")
    if crop_padding < 0:
        raise ValueError(f"crop padding must be >= 0; got {crop_padding}")
    b, out = images.shape[0], images
    if "crop" in ops and crop_padding:
        offsets = _rng(seed, step, "crop").integers(0, 2 * crop_padding + 1, size=(b, 2))  # (B, 2): (dy, dx)
        out = random_crop(out, offsets, crop_padding)
    if "flip" in ops:
        out = random_flip(out, _rng(seed, step, "flip").random(b) < 0.5)  # flips (B,)
    return out


def pad_to(images: np.ndarray, size: int) -> np.ndarray:
    """(B, H, W, C) -> (B, size, size, C) with zeros around, centred (the extra odd row/column
    goes to the bottom/right). ``ValueError`` if ``size`` is smaller than H or W."""
    _check_images(images)
    _, h, w, _ = images.shape
    if size < h or size < w:
        raise ValueError(f"cannot pad {h}x{w} images to the smaller size {size}")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(images, ((0, 0), (top, size - h - top), (left, size - w - left), (0, 0)))


def upscale_to(images: np.ndarray, size: int) -> np.ndarray:
    """(B, H, W, C) -> (B, size, size, C): each pixel repeated ``size / H`` x ``size / W`` times
    (nearest neighbour) when ``size`` is a multiple of both H and W (8x8 digits -> 32x32: 4x4
    blocks), else ``pad_to(images, size)`` (centred zero padding; no interpolation invents pixels)."""
    _check_images(images)
    _, h, w, _ = images.shape
    if size % h or size % w:
        return pad_to(images, size)
    return np.repeat(np.repeat(images, size // h, axis=1), size // w, axis=2)
