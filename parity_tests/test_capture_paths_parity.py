"""Capture by module path: an unmodified Hugging Face BERT gives the same penalty in JAX and PyTorch.

``FlaxBertForSequenceClassification`` (tiny config, random weights, no download) is penalised with
``jax_impl.penalized_loss(..., capture_modules=...)``; its PyTorch twin, holding the same weights
(``transformers.modeling_flax_pytorch_utils.load_flax_weights_in_pytorch_model``), with
``torch_ref.penalized_loss(..., capture_modules=...)`` (forward hooks). On the Flax side layer 0 is
captured as ``bert/encoder/layer/0``, which returns a tuple (its element 0 is the activation); on
the PyTorch side as the tensor output of ``bert.encoder.layer.0.output``, the same activation
(a ``BertLayer``'s output is its ``BertOutput``'s). Float64; eager attention on the PyTorch side
(SDPA has no double backward on CPU).
"""

from __future__ import annotations

import jax
import numpy as np
import pytest
import torch

import torch_ref
from jax_impl import penalized_loss
from parity_tests.harness import fast_jit

transformers = pytest.importorskip("transformers")

# Same network, same weights, two frameworks' float64 kernels (matmul and softmax orders): rounding.
RTOL = 1e-10
B, L, HIDDEN = 2, 5, 16


class LogitsOf(torch.nn.Module):
    """``model(input_ids, attention_mask=mask).logits``: tensor in, tensor out, as the reference takes."""

    def __init__(self, model: torch.nn.Module, mask: torch.Tensor):
        super().__init__()
        self.model, self.mask = model, mask

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, attention_mask=self.mask).logits


def test_hugging_face_bert_penalty_by_path_matches_pytorch_hooks_float64():
    from transformers.modeling_flax_pytorch_utils import load_flax_weights_in_pytorch_model

    config = transformers.BertConfig(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=2,
                                     vocab_size=50, intermediate_size=32, max_position_embeddings=16,
                                     num_labels=3, attn_implementation="eager")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 50, (B, L))
    mask = np.ones((B, L), np.int64)
    mask[1, 3:] = 0
    y = np.array([0, 2])
    with jax.enable_x64(True):
        flax_model = transformers.FlaxBertForSequenceClassification(config, dtype=np.float64, _do_init=False)
        # Random weights of init's shapes, from NumPy (init itself would compile a program per shape).
        shapes = jax.eval_shape(lambda key: flax_model.init_weights(key, (B, L)), jax.random.key(0))
        params = jax.tree.map(lambda s: 0.3 * rng.standard_normal(s.shape), shapes)
        captures = {"l0": "bert/encoder/layer/0", "l1": "bert.encoder.layer.1.output"}
        aux = fast_jit(lambda p: penalized_loss(
            p, flax_model, {"input_ids": ids, "attention_mask": mask}, y, penalty_weight=1.0,
            capture_modules=captures)[1])(params)
        aux = jax.tree.map(np.asarray, aux)

    torch_model = transformers.BertForSequenceClassification(config).double().eval()
    load_flax_weights_in_pytorch_model(torch_model, params)
    torch_model = torch_model.double()
    wrapped = LogitsOf(torch_model, torch.as_tensor(mask))
    hooks = {"l0": "model.bert.encoder.layer.0.output", "l1": "model.bert.encoder.layer.1.output"}
    _, aux_t = torch_ref.penalized_loss(wrapped, torch.as_tensor(ids), torch.as_tensor(y), 1.0,
                                        capture_modules=hooks)

    np.testing.assert_allclose(aux["logits"], aux_t["logits"].detach().numpy(), rtol=RTOL, atol=1e-14)
    np.testing.assert_allclose(aux["loss"], aux_t["loss"].detach().item(), rtol=RTOL)
    for name in ("l0", "l1"):
        np.testing.assert_allclose(aux["penalty_terms"][name], aux_t["penalty_terms"][name].detach().item(),
                                   rtol=RTOL)
        np.testing.assert_allclose(aux["activation_grads"][name],
                                   aux_t["activation_grads"][name].detach().numpy(), rtol=RTOL, atol=1e-15)
    assert aux["penalty"] > 0
