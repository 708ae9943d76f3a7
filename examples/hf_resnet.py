"""Verify Hugging Face's ResNet twins, unedited: ``ResNetForImageClassification`` against
``FlaxResNetForImageClassification``.

A tiny configuration (embedding 8, stages of 8 and 16 channels, one block
each), random initialisation (no download), 32x32 images, float64. The penalty
differentiates the outputs of the two stages, named by their PyTorch paths
(``resnet.encoder.stages.0`` and ``.1``; Flax ``resnet/encoder/stages/0``).
BatchNorm runs in eval mode with running statistics that a few training-mode
passes moved away from their initial values, so the converted ``batch_stats``
matter. From the repository root::

    python -m examples.hf_resnet

or through the verifier's command line::

    python -m parity_tests.verify examples.hf_resnet:torch_model examples.hf_resnet:flax_model \\
        --input-shape 2,3,32,32 --num-classes 3 --captures resnet.encoder.stages.0,resnet.encoder.stages.1

Images go in as PyTorch takes them, NCHW; the Flax module (as the Hugging Face
wrapper would) gets them NHWC and its rank-4 activations are compared NHWC.
The Flax model computes in float64 (``dtype=jnp.float64``: Hugging Face Flax
modules compute in their ``dtype`` field, float32 by default).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import FlaxResNetForImageClassification, ResNetConfig, ResNetForImageClassification

from parity_tests.verify import Row, print_report, verify_pair

CONFIG = {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1],
          "num_labels": 3}
CAPTURES = ("resnet.encoder.stages.0", "resnet.encoder.stages.1")
IMAGE_SHAPE = (2, 3, 32, 32)


def torch_model(seed: int = 0) -> ResNetForImageClassification:
    """The PyTorch twin, randomly initialised from ``seed``, its BatchNorm statistics moved by 3 batches."""
    torch.manual_seed(seed)
    model = ResNetForImageClassification(ResNetConfig(**CONFIG))
    model.train()
    with torch.no_grad():
        for _ in range(3):  # running statistics away from (0, 1), as after training
            model(torch.rand(IMAGE_SHAPE))
    return model.eval()


def flax_model(dtype: str = "float64") -> FlaxResNetForImageClassification:
    """The Flax twin computing in ``dtype``; its weights come from the PyTorch twin, so none are drawn."""
    # Building traces the model once (shapes only): in 64-bit mode, so float64 is not cut to float32.
    with jax.enable_x64(jnp.dtype(dtype) == jnp.float64):
        return FlaxResNetForImageClassification(ResNetConfig(**CONFIG), dtype=jnp.dtype(dtype),
                                                _do_init=False)


def batch(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Images (B, 3, 32, 32) in [0, 1) and labels (B,)."""
    rng = np.random.default_rng(seed)
    return rng.random(IMAGE_SHAPE), rng.integers(0, CONFIG["num_labels"], IMAGE_SHAPE[0])


def verify(steps: int = 2, seed: int = 0) -> list[Row]:
    """The verifier's rows for the pair (float64, eval mode, penalty on both stages)."""
    images, labels = batch(seed)
    return verify_pair(torch_model(seed), flax_model(), images, labels, capture_modules=CAPTURES, steps=steps,
                       dtype="float64")


def main() -> int:
    return print_report(verify())


if __name__ == "__main__":
    sys.exit(main())
