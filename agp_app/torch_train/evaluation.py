"""The PyTorch trainer's evaluation on the test split: clean loss and accuracy, accuracy under attack."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from agp_app.batching import eval_batches, take_batch
from agp_app.data import Dataset
from agp_common.attack_spec import Attack
from torch_ref.attacks import adversarial_correct


def to_nchw(x: np.ndarray) -> torch.Tensor:
    """NHWC images (B, H, W, C) -> NCHW tensor (B, C, H, W)."""
    # .copy() gives canonical NCHW strides, the layout PyTorch's CPU convolutions are fastest on.
    return torch.from_numpy(x.transpose(0, 3, 1, 2).copy())


@torch.no_grad()
def evaluate(model: nn.Module, ds: Dataset, batch_size: int, dtype) -> dict[str, float]:
    """``eval_loss`` (mean cross-entropy) and ``eval_accuracy`` over the whole test split."""
    loss_sum = correct = 0.0
    for idx in eval_batches(len(ds.y_test), batch_size):
        xb, yb = take_batch(ds.x_test, ds.y_test, idx, dtype, ds.pixel_scale)
        logits = model(to_nchw(xb))
        labels = torch.from_numpy(yb).long()
        loss_sum += nn.functional.cross_entropy(logits, labels, reduction="sum").item()
        correct += (logits.argmax(dim=1) == labels).sum().item()
    n = len(ds.y_test)
    return {"eval_loss": loss_sum / n, "eval_accuracy": correct / n}


def evaluate_attacks(model: nn.Module, ds: Dataset, batch_size: int, dtype,
                     attacks: Sequence[Attack]) -> dict[str, float]:
    """``{eval_accuracy/ATTACK@EPS: test accuracy}`` under each of ``attacks`` (``torch_ref.attacks``),
    clipped to the data's valid range ``ds.input_range()``."""
    counts, clip = dict.fromkeys((a.eval_key for a in attacks), 0), ds.input_range()
    for idx in eval_batches(len(ds.y_test), batch_size):
        xb, yb = take_batch(ds.x_test, ds.y_test, idx, dtype, ds.pixel_scale)
        right = adversarial_correct(model, to_nchw(xb), torch.from_numpy(yb).long(), attacks, clip=clip)
        for key, value in right.items():
            counts[key] += value
    return {key: value / len(ds.y_test) for key, value in counts.items()}
