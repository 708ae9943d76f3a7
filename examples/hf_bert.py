"""Verify Hugging Face's BERT twins, unedited: ``BertForSequenceClassification`` against
``FlaxBertForSequenceClassification``.

A tiny configuration, random initialisation (no download), float64. The
penalty differentiates the outputs of the two encoder layers
(``bert.encoder.layer.0`` and ``.1``: each returns ``(hidden_states, ...)``,
whose first element is the activation), named once by their PyTorch paths;
the Flax side takes the same paths with ``"/"`` (``bert/encoder/layer/0``).
Inputs are keyword inputs as Hugging Face models take them: ``input_ids``,
``attention_mask`` (the second sequence padded), ``token_type_ids``. From the
repository root::

    python -m examples.hf_bert

or the same pair through the verifier's command line (token ids drawn at random)::

    python -m parity_tests.verify examples.hf_bert:torch_model examples.hf_bert:flax_model \\
        --input-shape 2,8 --input-dtype int64 --input-range 1,50 --num-classes 3 \\
        --captures bert.encoder.layer.0,bert.encoder.layer.1

Two settings matter, both below: the PyTorch model uses eager attention
(PyTorch's fused scaled-dot-product attention has no second derivative, which
the penalty's gradient needs), and the Flax model computes in float64
(``dtype=jnp.float64``: Hugging Face Flax modules compute in their ``dtype``
field, float32 by default, whatever the weights). Token id 0 is BERT's padding
index: PyTorch gives its embedding row no gradient and Flax does, so the
batch uses ids from 1 (the table notes the converter's warning about it).
"""

from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
from transformers import BertConfig, BertForSequenceClassification, FlaxBertForSequenceClassification

from parity_tests.verify import Row, print_report, verify_pair

#: Hidden size 16, 2 layers of 2 heads, a vocabulary of 50, 3 classes.
CONFIG = {"vocab_size": 50, "hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
          "intermediate_size": 32, "max_position_embeddings": 16, "num_labels": 3}
CAPTURES = ("bert.encoder.layer.0", "bert.encoder.layer.1")
BATCH, SEQUENCE = 2, 8


def config() -> BertConfig:
    # Eager attention: the penalty's gradient differentiates attention twice (SDPA cannot).
    return BertConfig(**CONFIG, attn_implementation="eager")


def torch_model(seed: int = 0) -> BertForSequenceClassification:
    """The PyTorch twin, randomly initialised from ``seed``."""
    torch.manual_seed(seed)
    return BertForSequenceClassification(config())


def flax_model(dtype: str = "float64") -> FlaxBertForSequenceClassification:
    """The Flax twin computing in ``dtype``; its weights come from the PyTorch twin, so none are drawn."""
    # Building traces the model once (shapes only): in 64-bit mode, so float64 is not cut to float32.
    with jax.enable_x64(jnp.dtype(dtype) == jnp.float64):
        return FlaxBertForSequenceClassification(config(), dtype=jnp.dtype(dtype), _do_init=False)


def batch(seed: int = 0) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Keyword inputs (B, T) and labels (B,): ids in [1, vocab), the second sequence padded after 5 tokens."""
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(1, CONFIG["vocab_size"], (BATCH, SEQUENCE))
    attention_mask = np.ones((BATCH, SEQUENCE), np.int64)
    attention_mask[1, 5:] = 0
    token_type_ids = np.zeros((BATCH, SEQUENCE), np.int64)
    token_type_ids[:, SEQUENCE // 2:] = 1  # two segments
    labels = rng.integers(0, CONFIG["num_labels"], BATCH)
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
    return inputs, labels


def verify(steps: int = 2, seed: int = 0) -> list[Row]:
    """The verifier's rows for the pair (float64, penalty on both encoder layers)."""
    inputs, labels = batch(seed)
    return verify_pair(torch_model(seed), flax_model(), inputs, labels, capture_modules=CAPTURES, steps=steps,
                       dtype="float64")


def main() -> int:
    return print_report(verify())


if __name__ == "__main__":
    sys.exit(main())
