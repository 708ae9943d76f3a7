"""The Hugging Face examples: unedited library twins pass every row of the verifier in float64.

``examples/hf_resnet.py`` (``ResNetForImageClassification`` /
``FlaxResNetForImageClassification``) and ``examples/hf_bert.py``
(``BertForSequenceClassification`` / ``FlaxBertForSequenceClassification``),
tiny configurations, random initialisation, the penalty on two inner layers
named by their PyTorch paths. The tests call the examples' own ``verify``, so
what the README shows is what CI runs.
"""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from examples import hf_bert, hf_resnet
from parity_tests.verify import format_table, verify_pair


def rows_by_quantity(rows):
    return {r.quantity: r for r in rows}


def test_hf_resnet_example_passes_every_row():
    rows = hf_resnet.verify()
    assert all(r.passed for r in rows), format_table(rows)
    by = rows_by_quantity(rows)
    assert {"dL/da[resnet.encoder.stages.0]", "dL/da[resnet.encoder.stages.1]"} <= set(by)
    assert "grad[resnet/embedder/embedder/convolution/kernel]" in by
    # Every BatchNorm was matched with its Flax twin and agrees (eps 1e-5, momentum 0.1 <-> 0.9).
    assert by["normalization settings"].where.endswith("(8 of 8 layers compared)")


def test_hf_bert_example_passes_every_row():
    rows = hf_bert.verify()
    assert all(r.passed for r in rows), format_table(rows)
    by = rows_by_quantity(rows)
    assert {"dL/da[bert.encoder.layer.0]", "dL/da[bert.encoder.layer.1]"} <= set(by)
    assert "grad[bert/embeddings/word_embeddings/embedding]" in by
    assert "padding_idx" in by["converter"].where  # the batch avoids id 0; the table says why it matters
    assert by["dropout"].where.startswith("disabled on both sides: PyTorch eval() (8 Dropout modules)")


def test_a_hugging_face_twin_computing_in_float32_is_a_one_line_error_in_a_float64_run():
    inputs, labels = hf_bert.batch()
    with pytest.raises(ValueError, match=r"computes in float32 \(its dtype field\).*dtype=jnp.float64") as e:
        verify_pair(hf_bert.torch_model(), hf_bert.flax_model("float32"), inputs, labels,
                    capture_modules=hf_bert.CAPTURES)
    assert "\n" not in str(e.value)


def test_fused_attention_in_pytorch_is_a_one_line_error_naming_eager_attention():
    """PyTorch's default SDPA attention has no second derivative; the error says what to use instead."""
    import transformers

    torch_model = transformers.BertForSequenceClassification(transformers.BertConfig(**hf_bert.CONFIG,
                                                                                     attn_implementation="sdpa"))
    inputs, labels = hf_bert.batch()
    with pytest.raises(ValueError, match=r"backward pass failed: .*attn_implementation=\"eager\"") as e:
        verify_pair(torch_model, hf_bert.flax_model(), inputs, labels, capture_modules=hf_bert.CAPTURES)
    assert "\n" not in str(e.value)
