"""The seeded batch order shared by both frameworks: a function of (seed, epoch) only.

Step ``s`` (0-based) of a run is batch ``s % steps_per_epoch`` of epoch
``s // steps_per_epoch``; each epoch is a fresh permutation of the training
set drawn from ``np.random.default_rng([seed, epoch])``. The order therefore
does not depend on where a run was resumed, on the framework, or on the
number of devices. The last batch of an epoch holds the remaining
``N % batch_size`` examples (if any); ``padded_batch`` pads it to the full
batch size with a 0/1 mask so that a compiled step sees one shape only.
"""

from __future__ import annotations

import math

import numpy as np

from agp_app.errors import UsageError


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """ceil(N / B): every example is used once per epoch, the last batch may be partial."""
    return math.ceil(num_examples / batch_size)


def check_batch_fits(batch_size: int, num_examples: int) -> None:
    """``UsageError`` when one batch would need more examples than the training split has."""
    if batch_size > num_examples:
        raise UsageError(f"--batch-size {batch_size} is larger than the {num_examples} training examples")


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """The order of the training examples in ``epoch``: (N,) int64."""
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


class BatchOrder:
    """Indices of the examples of every step; caches the current epoch's permutation."""

    def __init__(self, seed: int, num_examples: int, batch_size: int):
        self.seed, self.num_examples, self.batch_size = seed, num_examples, batch_size
        self.steps_per_epoch = steps_per_epoch(num_examples, batch_size)
        self._epoch, self._perm = -1, np.empty(0, np.int64)

    def epoch_of(self, step: int) -> int:
        """0-based epoch of 0-based ``step``."""
        return step // self.steps_per_epoch

    def indices(self, step: int) -> np.ndarray:
        """Example indices of 0-based ``step``: (B,) or fewer for the last batch of an epoch."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, epoch_permutation(self.seed, epoch, self.num_examples)
        return self._perm[i * self.batch_size : (i + 1) * self.batch_size]


def take_batch(x: np.ndarray, y: np.ndarray, indices: np.ndarray, dtype, pixel_scale: float = 1.0):
    """(images (b, H, W, C) as ``dtype`` times ``pixel_scale``, labels (b,) int32) of ``indices``."""
    xb = x[indices].astype(dtype)
    if pixel_scale != 1.0:
        xb *= np.asarray(pixel_scale, dtype)
    return xb, y[indices].astype(np.int32)


def padded_batch(x: np.ndarray, y: np.ndarray, indices: np.ndarray, batch_size: int, dtype,
                 pixel_scale: float = 1.0) -> dict[str, np.ndarray]:
    """``take_batch`` zero-padded to ``batch_size`` rows, ``mask`` (B,): 1 real, 0 padding."""
    xb, yb = take_batch(x, y, indices, dtype, pixel_scale)
    pad = batch_size - len(indices)
    mask = np.ones(batch_size, dtype)
    if pad:
        xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), dtype)])
        yb = np.concatenate([yb, np.zeros(pad, np.int32)])
        mask[len(indices):] = 0
    return {"x": xb, "y": yb, "mask": mask}


def eval_batches(num_examples: int, batch_size: int):
    """Consecutive index ranges covering the test split: yields (B,) or fewer indices."""
    for start in range(0, num_examples, batch_size):
        yield np.arange(start, min(start + batch_size, num_examples))
