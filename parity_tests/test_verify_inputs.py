"""``parity_tests.verify`` on inputs and outputs as real models have them.

Token ids (integers, never cast to float), a mask, inputs as a dict (keyword)
or a tuple (positional), an output object with ``.logits``, captures by
module path on both sides (the Flax path defaults to the PyTorch one), and
the command line's ``--inputs file.npz``, ``--input-dtype`` and factory
functions. The pair exists only here: embeddings, a masked mean, two dense layers.
Float64, 2 SGD steps: every row must pass (the SGD rows prove that ``lr`` and
``w`` are taken in the run's float dtype, not the integer inputs').
"""

from __future__ import annotations

import dataclasses

import flax.linen as linen
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import torch
from torch import nn

from parity_tests.verify import format_table, main, verify_pair

VOCAB, WIDTH, HIDDEN, CLASSES = 11, 6, 8, 3
SHAPE = (3, 5)  # (B, T)
STEPS = 2


@dataclasses.dataclass
class TorchOutput:
    logits: torch.Tensor


class TorchTokenNet(nn.Module):
    """Token ids (B, T) and a 0/1 mask (B, T) -> an output object whose ``.logits`` are (B, 3)."""

    def __init__(self, width: int = WIDTH):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, width)
        self.fc1 = nn.Linear(width, HIDDEN)
        self.head = nn.Linear(HIDDEN, CLASSES)

    def forward(self, input_ids, attention_mask=None):
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        h = self.embed(input_ids) * mask[..., None]  # (B, T, 6)
        h = torch.tanh(self.fc1(h))  # (B, T, 8)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)  # (B, 8): mean over real tokens
        return TorchOutput(logits=self.head(pooled))


@flax.struct.dataclass
class FlaxOutput:
    logits: jax.Array


class FlaxTokenNet(linen.Module):
    @linen.compact
    def __call__(self, input_ids, attention_mask=None):
        mask = jnp.ones_like(input_ids) if attention_mask is None else attention_mask
        h = linen.Embed(VOCAB, WIDTH, name="embed")(input_ids) * mask[..., None]  # (B, T, 6)
        h = jnp.tanh(linen.Dense(HIDDEN, name="fc1")(h))  # (B, T, 8)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)  # (B, 8)
        return FlaxOutput(logits=linen.Dense(CLASSES, name="head")(pooled))


def make_torch_token_net(width: int = WIDTH) -> TorchTokenNet:
    """A factory function, as ``resnet18`` is one (the CLI takes both)."""
    return TorchTokenNet(width)


def token_batch(seed=0):
    rng = np.random.default_rng(seed)
    input_ids = rng.integers(0, VOCAB, SHAPE)
    mask = np.ones(SHAPE, np.int64)
    mask[1, 3:] = 0  # the second sequence is padded
    return {"input_ids": input_ids, "attention_mask": mask}, rng.integers(0, CLASSES, SHAPE[0])


def seeded_net(seed=0):
    torch.manual_seed(seed)
    return TorchTokenNet()


def assert_every_row_passes(rows):
    assert all(r.passed for r in rows), format_table(rows)


def test_keyword_token_inputs_and_path_captures_pass_every_row():
    inputs, y = token_batch()
    rows = verify_pair(seeded_net(), FlaxTokenNet(), inputs, y, capture_modules=["embed", "fc1"], steps=STEPS)
    assert_every_row_passes(rows)
    quantities = {r.quantity for r in rows}
    assert {"logits", "dL/da[embed]", "dL/da[fc1]", "grad[embed/embedding]"} <= quantities


def test_positional_inputs_and_an_explicit_flax_path_pass_every_row():
    inputs, y = token_batch(seed=1)
    rows = verify_pair(seeded_net(1), FlaxTokenNet(), (inputs["input_ids"], inputs["attention_mask"]), y,
                       capture_modules={"embedded": "embed@embed", "hidden": "fc1"}, steps=STEPS)
    assert_every_row_passes(rows)
    assert {"dL/da[embedded]", "dL/da[hidden]"} <= {r.quantity for r in rows}


def test_cli_reads_keyword_inputs_from_an_npz_file(tmp_path, capsys):
    inputs, _ = token_batch()
    path = tmp_path / "tokens.npz"
    np.savez(path, **inputs)
    code = main([f"{__name__}:TorchTokenNet", f"{__name__}:FlaxTokenNet", "--inputs", str(path),
                 "--num-classes", str(CLASSES), "--captures", "embed,fc1", "--steps", str(STEPS)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "dL/da[embed]" in out and out.strip().splitlines()[-1].startswith("PASS: all")


def test_cli_draws_integer_inputs_and_builds_models_with_a_factory(capsys):
    code = main([f"{__name__}:make_torch_token_net", f"{__name__}:FlaxTokenNet", "--torch-kwargs",
                 f'{{"width": {WIDTH}}}', "--input-shape", "3,5", "--input-dtype", "int64", "--input-range",
                 f"0,{VOCAB}", "--num-classes", str(CLASSES), "--captures", "e=embed,fc1", "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "dL/da[e]" in out and "dL/da[fc1]" in out
