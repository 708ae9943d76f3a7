"""``parity_tests.verify``: the verifier passes faithful PyTorch/Flax twins and catches wrong ones.

Cross-framework (imports JAX and PyTorch). The model pairs below exist only
here (the project ships none of them): a LeNet-5 with tanh and average
pooling, a strided, padded CNN with BatchNorm and a non-square flatten, and an
MLP with LayerNorm. Float64, tiny shapes, 2 SGD steps: every row must pass,
in both conversion directions (PyTorch-initialised weights exported to Flax;
Flax-initialised weights loaded into PyTorch).
"""

from __future__ import annotations

import flax.linen as linen
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

from jax_impl import capture
from parity_tests.verifier.settings import flax_path
from parity_tests.verify import format_table, init_flax_variables, main, verdict, verify_pair

STEPS = 2
CLASSES = 5


def batch(shape, seed=0):
    rng = np.random.default_rng(seed)
    return rng.random(shape), rng.integers(0, CLASSES, shape[0])


def seeded(cls, seed=0, **kwargs):
    torch.manual_seed(seed)
    return cls(**kwargs)


def assert_every_row_passes(rows):
    assert rows, "no rows"
    assert all(r.passed for r in rows), format_table(rows)


# ------------------------------------------------------------------------ (1) LeNet, tanh, avg pool


class TorchLeNet(nn.Module):
    """(B, 1, 12, 12) -> (B, 5); one ``nn.Tanh`` called twice, so its captures are ``tanh:0``, ``tanh:1``."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 3, 3, padding=1)
        self.conv2 = nn.Conv2d(3, 4, 3)
        self.tanh = nn.Tanh()
        self.pool = nn.AvgPool2d(2)
        self.fc1 = nn.Linear(4 * 2 * 2, 8)
        self.fc2 = nn.Linear(8, CLASSES)

    def forward(self, x):
        x = self.pool(self.tanh(self.conv1(x)))  # (B, 3, 6, 6)
        x = self.pool(self.tanh(self.conv2(x)))  # (B, 4, 2, 2)
        return self.fc2(torch.tanh(self.fc1(x.flatten(1))))  # (B, 5)


class FlaxLeNet(linen.Module):
    @linen.compact
    def __call__(self, x):
        # (B, 12, 12, 3)
        x = capture(self, "tanh1", jnp.tanh(linen.Conv(3, (3, 3), padding=1, name="conv1")(x)))
        x = linen.avg_pool(x, (2, 2), strides=(2, 2))  # (B, 6, 6, 3)
        x = capture(self, "tanh2", jnp.tanh(linen.Conv(4, (3, 3), padding="VALID", name="conv2")(x)))
        x = linen.avg_pool(x, (2, 2), strides=(2, 2)).reshape(x.shape[0], -1)  # (B, 16), (h, w, c)
        return linen.Dense(CLASSES, name="fc2")(jnp.tanh(linen.Dense(8, name="fc1")(x)))


LENET_CAPTURES = {"tanh1": "tanh:0", "tanh2": "tanh:1"}
LENET_SHAPE = (4, 1, 12, 12)


def test_lenet_passes_every_row_with_torch_weights():
    x, y = batch(LENET_SHAPE)
    torch_model = seeded(TorchLeNet)
    before = {k: v.clone() for k, v in torch_model.state_dict().items()}
    rows = verify_pair(torch_model, FlaxLeNet(), x, y, capture_modules=LENET_CAPTURES, steps=STEPS)
    assert_every_row_passes(rows)
    quantities = [r.quantity for r in rows]
    assert quantities[:5] == ["round trip Flax->PyTorch->Flax", "logits", "loss", "penalty", "total"]
    assert {"dL/da[tanh1]", "dL/da[tanh2]", "grad[conv1/kernel]", "grad[fc2/bias]"} <= set(quantities)
    assert sum(q.startswith("grad[") for q in quantities) == 8  # 4 layers x (kernel, bias)
    # The caller's module is neither trained nor cast to float64.
    after = torch_model.state_dict()
    assert all(torch.equal(before[k], after[k]) and after[k].dtype == torch.float32 for k in before)


def test_lenet_passes_every_row_with_flax_weights_loaded_into_torch():
    x, y = batch(LENET_SHAPE, seed=1)
    variables = init_flax_variables(FlaxLeNet(), x, seed=1)
    rows = verify_pair(seeded(TorchLeNet), FlaxLeNet(), torch.from_numpy(x), torch.from_numpy(y),
                       capture_modules=LENET_CAPTURES, steps=STEPS, flax_variables=variables)
    assert_every_row_passes(rows)


# ------------------------------------------------- (2) strided, padded CNN, BatchNorm, non-square flatten


class TorchBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class TorchBNNet(nn.Module):
    """(B, 2, 10, 6) -> block (B, 4, 5, 3) -> (B, 6, 3, 2) -> flatten 36 (a non-square map) -> (B, 5)."""

    def __init__(self):
        super().__init__()
        self.block = TorchBlock()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.act2 = nn.ReLU()
        self.head = nn.Linear(6 * 3 * 2, CLASSES)

    def forward(self, x):
        x = self.block(x)
        x = self.act2(self.bn2(self.conv2(x)))
        return self.head(x.flatten(1))


def flax_bn(train, name, epsilon=1e-5, momentum=0.9):
    # PyTorch's momentum 0.1 is Flax's 0.9; the exact variance (not E[x^2] - E[x]^2) like PyTorch.
    return linen.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon,
                           use_fast_variance=False, name=name)


class FlaxBlock(linen.Module):
    @linen.compact
    def __call__(self, x, train):
        x = linen.Conv(4, (3, 3), strides=2, padding=1, name="conv")(x)  # PyTorch padding=1, not "SAME"
        return capture(self, "relu", linen.relu(flax_bn(train, "bn")(x)))


class FlaxBNNet(linen.Module):
    flatten_channels_first: bool = False  # True: the deliberately wrong twin (API and CLI tests)
    bn2_settings: tuple[float, float] = (1e-5, 0.9)  # (epsilon, momentum) of bn2; others: a wrong twin

    @linen.compact
    def __call__(self, x, train: bool = False):
        x = FlaxBlock(name="block")(x, train)  # (B, 5, 3, 4)
        x = linen.Conv(6, (3, 3), strides=2, padding=1, use_bias=False, name="conv2")(x)  # (B, 3, 2, 6)
        x = capture(self, "relu2", linen.relu(flax_bn(train, "bn2", *self.bn2_settings)(x)))
        if self.flatten_channels_first:
            x = x.transpose(0, 3, 1, 2)
        return linen.Dense(CLASSES, name="head")(x.reshape(x.shape[0], -1))


BN_CAPTURES = {"block/relu": "block.act", "relu2": "act2"}
BN_SHAPE = (4, 2, 10, 6)


def bn_net_with_running_statistics():
    net = seeded(TorchBNNet, seed=2)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for bn in (net.block.bn, net.bn2):
            bn.running_mean.copy_(0.3 * torch.randn(bn.num_features, generator=gen))
            bn.running_var.copy_(0.5 + torch.rand(bn.num_features, generator=gen))
            bn.weight.copy_(1 + 0.2 * torch.randn(bn.num_features, generator=gen))
            bn.bias.copy_(0.1 * torch.randn(bn.num_features, generator=gen))
    return net


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batchnorm_cnn_passes_every_row(train):
    x, y = batch(BN_SHAPE, seed=2)
    rows = verify_pair(bn_net_with_running_statistics(), FlaxBNNet(), x, y, capture_modules=BN_CAPTURES,
                       steps=STEPS, train=train, flax_apply_kwargs={"train": train})
    assert_every_row_passes(rows)
    assert "grad[block/bn/scale]" in {r.quantity for r in rows}


def test_batchnorm_cnn_passes_every_row_with_flax_weights_loaded_into_torch():
    x, y = batch(BN_SHAPE, seed=3)
    variables = init_flax_variables(FlaxBNNet(), x, seed=1, flax_apply_kwargs={"train": False})
    assert set(variables) == {"params", "batch_stats"}
    rows = verify_pair(seeded(TorchBNNet), FlaxBNNet(), x, y, capture_modules=BN_CAPTURES, steps=STEPS,
                       flax_apply_kwargs={"train": False}, flax_variables=variables)
    assert_every_row_passes(rows)


def test_flatten_in_the_wrong_order_fails_the_logits_and_gradients():
    x, y = batch(BN_SHAPE, seed=4)
    rows = verify_pair(bn_net_with_running_statistics(), FlaxBNNet(flatten_channels_first=True), x, y,
                       capture_modules=BN_CAPTURES, steps=STEPS, flax_apply_kwargs={"train": False})
    failed = {r.quantity for r in rows if not r.passed}
    # The weights still convert (the round trip passes); what the model computes with them does not agree.
    assert {"logits", "loss", "grad[head/kernel]", "dL/da[relu2]"} <= failed
    assert "round trip Flax->PyTorch->Flax" not in failed
    assert verdict(rows).startswith(f"FAIL: {len(failed)} of {len(rows)} rows")


def test_batchnorm_epsilon_and_momentum_mismatches_are_named_in_a_failing_row():
    x, y = batch(BN_SHAPE, seed=2)
    rows = verify_pair(bn_net_with_running_statistics(), FlaxBNNet(bn2_settings=(1e-3, 0.99)), x, y,
                       capture_modules=BN_CAPTURES, steps=1, flax_apply_kwargs={"train": False})
    settings = {r.quantity: r for r in rows}["normalization settings"]
    assert not settings.passed
    assert "bn2: eps 1e-05 (PyTorch) != epsilon 0.001 (Flax)" in settings.where
    assert "bn2: momentum 0.1 (PyTorch) is Flax momentum 0.9, the Flax twin has 0.99" in settings.where
    assert "block.bn" not in settings.where  # the other BatchNorm agrees
    assert "bn2: eps 1e-05" in verdict(rows)  # the verdict names the cause of the numeric failures


def test_a_batchnorm_mode_mismatch_is_a_value_error_naming_the_flag():
    x, y = batch(BN_SHAPE)
    with pytest.raises(ValueError, match=r"Flax BatchNorm 'block/bn' normalises with batch statistics .*"
                                         r"PyTorch's 'block.bn' is in eval mode"):
        verify_pair(bn_net_with_running_statistics(), FlaxBNNet(), x, y, capture_modules=BN_CAPTURES,
                    flax_apply_kwargs={"train": True})


# ---------------------------------------------------------------------------- (3) MLP with LayerNorm


class TorchMLP(nn.Module):
    """(B, 2, 3, 3) image flattened (c, h, w) -> 16 -> LayerNorm -> GELU -> 8 -> LayerNorm -> tanh -> 5.

    Its first capture point is the attribute ``self.hidden`` that ``forward``
    stores (the seed answer's way), the second the output of module ``act2``.
    """

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(18, 16)
        self.ln1 = nn.LayerNorm(16)
        self.act1 = nn.GELU()
        self.fc2 = nn.Linear(16, 8)
        self.ln2 = nn.LayerNorm(8)
        self.act2 = nn.Tanh()
        self.out = nn.Linear(8, CLASSES)

    def forward(self, x):
        self.hidden = self.act1(self.ln1(self.fc1(x.flatten(1))))  # stored: captured by attribute name
        return self.out(self.act2(self.ln2(self.fc2(self.hidden))))


class FlaxMLP(linen.Module):
    dropout: float = 0.0  # > 0: a dropout left on (deterministic=False), which the verifier refuses
    dtype: str | None = None  # a compute dtype field, as Hugging Face's Flax modules have

    @linen.compact
    def __call__(self, x):
        if self.dropout:
            x = linen.Dropout(self.dropout, deterministic=False, name="drop")(x)
        x = linen.Dense(16, name="fc1")(x.reshape(x.shape[0], -1))  # (h, w, c) order: the converter permutes
        # PyTorch's LayerNorm eps is 1e-5 (Flax's default 1e-6); its GELU is the exact erf form.
        x = linen.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln1")(x)
        x = capture(self, "gelu", linen.gelu(x, approximate=False))
        x = linen.LayerNorm(epsilon=1e-5, use_fast_variance=False, name="ln2")(linen.Dense(8, name="fc2")(x))
        return linen.Dense(CLASSES, name="out")(capture(self, "tanh", jnp.tanh(x)))


def test_layernorm_mlp_passes_every_row():
    x, y = batch((4, 2, 3, 3), seed=5)
    rows = verify_pair(seeded(TorchMLP, seed=5), FlaxMLP(), x, y,
                       capture_modules={"gelu": "hidden", "tanh": "act2"}, steps=STEPS)
    assert_every_row_passes(rows)
    notes = {r.quantity: r.where for r in rows if r.is_note}
    assert notes["normalization settings"] == "epsilon and momentum agree (2 of 2 layers compared)"
    assert notes["dropout"].startswith("disabled on both sides")


def test_a_flax_dropout_left_on_is_a_value_error():
    x, y = batch((4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"dropout is active at \['drop'\].*deterministic"):
        verify_pair(seeded(TorchMLP), FlaxMLP(dropout=0.5), x, y, capture_modules={"tanh": "act2"})


def test_a_flax_twin_computing_in_float32_is_a_value_error_in_a_float64_run():
    x, y = batch((4, 2, 3, 3))
    with pytest.raises(ValueError, match=r"computes in float32 \(its dtype field\).*dtype=jnp.float64"):
        verify_pair(seeded(TorchMLP), FlaxMLP(dtype="float32"), x, y, capture_modules={"tanh": "act2"})


# ------------------------------------------------------------------------------ errors a user can make


def test_a_flax_module_with_other_layer_names_is_a_one_line_value_error():
    class Renamed(FlaxLeNet):
        @linen.compact
        def __call__(self, x):
            x = linen.Conv(3, (3, 3), padding=1, name="first")(x)
            return capture(self, "tanh1", jnp.tanh(x)).mean(axis=(1, 2))

    x, y = batch(LENET_SHAPE)
    with pytest.raises(ValueError, match=r"do not fit the Flax module.*params\['first'\].*name_map") as info:
        verify_pair(seeded(TorchLeNet), Renamed(), x, y, capture_modules={"tanh1": "tanh:0"}, steps=0)
    assert "\n" not in str(info.value)


def test_an_unknown_capture_name_is_a_value_error_listing_the_flax_capture_points():
    x, y = batch(LENET_SHAPE)
    message = r"capture 'relu1': .*no capture\(\) point 'relu1' \(it has \['tanh1', 'tanh2'\]\)"
    with pytest.raises(ValueError, match=message):
        verify_pair(seeded(TorchLeNet), FlaxLeNet(), x, y, capture_modules={"relu1": "tanh:0"}, steps=0)


def test_a_capture_path_given_twice_is_a_value_error():
    x, y = batch(LENET_SHAPE)
    with pytest.raises(ValueError, match=r"capture name 'act1' is given twice"):
        verify_pair(seeded(TorchLeNet), FlaxLeNet(), x, y, capture_modules=["act1", "act1"])


@pytest.mark.parametrize("torch_path, flax_paths, expected", [
    ("block.bn", ["block/bn"], "block/bn"),
    ("layers.0.bn", ["layers_0/bn"], "layers_0/bn"),  # a list of submodules assigned in setup
    ("stage.layer.0.norm", ["stage/layer/layer_0/norm"], "stage/layer/layer_0/norm"),  # HF's Flax ResNet
    ("features.1", ["conv1", "bn1"], "bn1"),  # through name_map
    ("head.bn", ["block/bn"], None),
])
def test_normalization_layers_are_matched_across_flax_spellings(torch_path, flax_paths, expected):
    assert flax_path(torch_path, {"features.1": "bn1"}, flax_paths) == expected


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_passes_the_example_pair(capsys):
    code = main(["examples.lenet_torch:LeNet", "examples.lenet_flax:LeNet", "--input-shape", "8,1,28,28",
                 "--num-classes", "10", "--captures", "tanh1=act1,tanh2=act2", "--steps", str(STEPS)])
    out = capsys.readouterr().out
    assert code == 0, out
    lines = out.strip().splitlines()
    assert lines[0].split()[:4] == ["quantity", "max", "rel", "err"]
    assert any(line.startswith("grad[fc1/kernel]") for line in lines)
    assert lines[-1].startswith("PASS: all")


def test_cli_exits_1_on_a_wrong_twin(capsys):
    """The wrong flatten order of ``test_flatten_in_the_wrong_order_...``, through the CLI.

    Same Flax module, options and shapes as that test, so the two share one
    compilation of the verifier's step.
    """
    code = main([f"{__name__}:TorchBNNet", f"{__name__}:FlaxBNNet", "--flax-kwargs",
                 '{"flatten_channels_first": true}', "--flax-apply-kwargs", '{"train": false}',
                 "--input-shape", ",".join(map(str, BN_SHAPE)), "--num-classes", str(CLASSES),
                 "--captures", ",".join(f"{k}={v}" for k, v in BN_CAPTURES.items()), "--steps", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "logits" in out.split("FAIL:")[-1]


@pytest.mark.parametrize("args, message", [
    (["nosuchpackage.mod:Net", "examples.lenet_flax:LeNet"], "cannot import module 'nosuchpackage.mod'"),
    (["examples.lenet_torch", "examples.lenet_flax:LeNet"], "expected 'package.module:Name'"),
    (["examples.lenet_torch:Nope", "examples.lenet_flax:LeNet"], "has no attribute 'Nope'"),
    (["examples.lenet_flax:LeNet", "examples.lenet_torch:LeNet"], "expected a subclass of torch.nn"),
], ids=["module", "no-colon", "attribute", "swapped"])
def test_cli_bad_class_path_exits_2_with_one_line(args, message, capsys):
    code = main([*args, "--input-shape", "8,1,28,28", "--captures", "tanh1=act1"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


@pytest.mark.parametrize("flag, value, message", [
    ("--input-shape", "8,x,28", "--input-shape: expected positive integers"),
    ("--captures", "tanh1=", "--captures: expected 'torch.module.path' or 'name=torch.module.path"),
    ("--torch-kwargs", "{num_classes: 3}", "--torch-kwargs must be a JSON object"),
], ids=["shape", "captures", "json"])
def test_cli_bad_values_exit_2_with_one_line(flag, value, message, capsys):
    argv = ["examples.lenet_torch:LeNet", "examples.lenet_flax:LeNet", "--input-shape", "8,1,28,28",
            "--captures", "tanh1=act1", flag, value]
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and message in err, err


def test_cli_missing_arguments_exit_2_with_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        main(["examples.lenet_torch:LeNet"])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert err.count("\n") == 1 and "the following arguments are required" in err, err
