"""``agp_app.model_spec``: ``--model`` / ``--model-args`` parsed, user models imported and checked.

The user's modules are files this test writes to a temporary folder put on ``sys.path``; the base
type is a small class written there too, so the rules are tested without a framework (the framework registries
have their own tests below).
"""

from __future__ import annotations

import functools
import importlib
import sys
import textwrap

import pytest

from agp_app.model_spec import ModelSpec, build_model, parse_model_spec

BASE_MODULE = """
class Base:
    \"\"\"Stands in for flax.linen.Module / torch.nn.Module.\"\"\"

class Builtin(Base):
    def __init__(self, num_classes, width=8):
        self.num_classes, self.width = num_classes, width
"""

USER_MODULE = """
from userbase import Base

class Good(Base):
    def __init__(self, num_classes=3, depth=1):
        self.num_classes, self.depth = num_classes, depth

def factory(depth=2, **kwargs):
    return Good(depth=depth, **kwargs)

def wrong_type():
    return object()

def raises(depth=1):
    raise RuntimeError("depth too small")

class NotAModel:
    pass

instance = Good()
number = 3
"""
MODULES = {"userbase": BASE_MODULE, "usermodels": USER_MODULE, "brokensyntax": "def f(:\n    pass\n",
           "raisesatimport": "raise RuntimeError('no GPU here')\n"}


@pytest.fixture
def user(tmp_path, monkeypatch):
    """Writes the modules of ``MODULES`` to a folder on sys.path; returns ``userbase``."""
    for name, text in MODULES.items():
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(text))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield importlib.import_module("userbase")
    for name in MODULES:
        sys.modules.pop(name, None)


def build(user, model, args=None, data=None):
    registry = {"cnn": functools.partial(user.Builtin, num_classes=10),
                "resnet18": functools.partial(user.Builtin, 10)}
    return build_model(parse_model_spec(model, args), registry, user.Base, "Test", data_kwargs=data)


def test_builtin_names_build_from_the_registry_with_model_args(user):
    model = build(user, "resnet18", '{"width": 64}')
    assert (type(model), model.num_classes, model.width) == (user.Builtin, 10, 64)


def test_user_class_gets_model_args_and_the_data_keywords_it_names(user):
    model = build(user, "usermodels:Good", '{"depth": 4}', data={"num_classes": 7, "in_channels": 1})
    assert (model.num_classes, model.depth) == (7, 4)  # in_channels: not in its signature, not passed
    model = build(user, "usermodels:Good", '{"num_classes": 2}', data={"num_classes": 7})
    assert model.num_classes == 2  # --model-args wins over the data's value


def test_user_factory_function_is_called(user):
    model = build(user, "usermodels:factory", None, data={"num_classes": 5})
    assert (type(model).__name__, model.depth, model.num_classes) == ("Good", 2, 5)  # **kwargs takes it


@pytest.mark.parametrize(("model", "args", "error", "message"), [
    ("resnet", None, ValueError, "--model must be cnn, resnet18 or pkg.module:Name"),
    ("usermodels.Good", None, ValueError, "--model must be cnn, resnet18 or pkg.module:Name"),
    ("nosuchmodule_xyz:Net", None, ValueError, "cannot import module 'nosuchmodule_xyz'"),
    ("brokensyntax:Net", None, ValueError, r"'brokensyntax' failed: SyntaxError: .*brokensyntax.py, line 1"),
    ("raisesatimport:Net", None, ValueError, "'raisesatimport' failed: RuntimeError: no GPU here"),
    ("usermodels:Missing", None, ValueError, "module 'usermodels' .* has no attribute 'Missing'"),
    ("usermodels:NotAModel", None, ValueError, "class NotAModel is not a subclass of Base"),
    ("usermodels:instance", None, ValueError, "names a model instance"),
    ("usermodels:number", None, ValueError, "is a int, neither a class nor a function"),
    ("usermodels:wrong_type", None, ValueError, "built a builtins.object, expected a Test model"),
    ("usermodels:raises", None, ValueError, "raised RuntimeError: depth too small"),
    ("usermodels:Good", '{"widht": 3}', TypeError, r"keywords \{\"widht\": 3\}: .*widht.*fix --model-args"),
    ("resnet18", '{"depth": 3}', TypeError, "depth.*fix --model-args"),
    ("cnn", "[1, 2]", ValueError, "--model-args must be a JSON object"),
    ("cnn", "{width: 3}", ValueError, "--model-args must be a JSON object .* at character 1"),
])
def test_mistakes_give_one_line_naming_what_to_fix(user, model, args, error, message):
    with pytest.raises(error, match=message) as info:
        build(user, model, args)
    assert "\n" not in str(info.value)


def test_builtin_missing_from_a_frameworks_registry_is_named(user):
    with pytest.raises(ValueError, match="--model resnet18 is not available for Test"):
        build_model(ModelSpec("resnet18"), {"cnn": user.Builtin}, user.Base, "Test")


def test_spec_round_trips_through_json_and_is_hashable():
    spec = parse_model_spec("pkg.mod:Net", '{"width": 64, "blocks": [1, 1]}')
    assert ModelSpec.from_json(spec.to_json()) == spec
    assert hash(ModelSpec("cnn", {"a": 1, "b": 2})) == hash(ModelSpec("cnn", {"b": 2, "a": 1}))
    assert str(spec) == 'pkg.mod:Net {"blocks": [1, 1], "width": 64}'
    with pytest.raises(ValueError, match="a model record must be"):
        ModelSpec.from_json({"name": "cnn"})


FLAX_USER_MODULE = """
import flax.linen as nn

class Mlp(nn.Module):
    num_classes: int = 3
    hidden: int = 8

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.hidden)(x.reshape(x.shape[0], -1))))
"""

TORCH_USER_MODULE = """
from torch import nn

class Mlp(nn.Module):
    def __init__(self, in_channels, image_size, num_classes=3, hidden=8):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_channels * image_size**2, hidden), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)
"""


def test_jax_registry_builds_the_builtins_and_detects_train_and_batch_stats():
    import flax.linen as nn

    from agp_app.jax_models import apply_kwargs, jax_registry, mutable_collections, takes_train
    from jax_impl.model import Net
    from jax_impl.resnet import ResNet18

    resnet = build_model(parse_model_spec("resnet18", '{"width": 4}'), jax_registry(7), nn.Module, "Flax")
    assert (type(resnet), resnet.num_classes, resnet.width) == (ResNet18, 7, 4)
    cnn = build_model(ModelSpec("cnn"), jax_registry(7), nn.Module, "Flax")
    assert isinstance(cnn, Net) and cnn.num_classes == 7
    assert (takes_train(resnet), takes_train(cnn)) == (True, False)
    assert (apply_kwargs(resnet, train=True), apply_kwargs(cnn, train=True)) == ({"train": True}, {})
    variables = {"params": {}, "batch_stats": {}}
    assert mutable_collections(variables, train=True) == ("batch_stats",)
    assert mutable_collections(variables, train=False) == ()
    assert mutable_collections({"params": {}}, train=True) == ()


def test_json_arrays_in_model_args_reach_a_flax_module_as_tuples_so_it_hashes_and_applies():
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from agp_app.jax_models import jax_registry

    spec = parse_model_spec("resnet18", '{"width": 2, "blocks": [1, 1]}')
    resnet = build_model(spec, jax_registry(3), nn.Module, "Flax")
    assert resnet.blocks == (1, 1)
    hash(resnet)  # the CLI's jitted steps take the model as a static argument: a list attribute cannot hash
    x = jnp.zeros((1, 16, 16, 3))
    variables = jax.eval_shape(lambda: resnet.init(jax.random.key(0), x, train=False))
    assert jax.eval_shape(lambda v: resnet.apply(v, x, train=False), variables).shape == (1, 3)
    assert spec.to_json()["args"]["blocks"] == [1, 1]  # config.json keeps the JSON the user wrote


def test_torch_registry_builds_the_builtins_for_the_datas_sizes():
    import torch

    from agp_app.torch_models import torch_registry
    from torch_ref.model import Net

    spec = parse_model_spec("resnet18", '{"width": 4}')
    resnet = build_model(spec, torch_registry(1, 7, 8), torch.nn.Module, "PyTorch")
    assert (resnet.conv1.in_channels, resnet.conv1.out_channels, resnet.linear.out_features) == (1, 4, 7)
    cnn = build_model(ModelSpec("cnn"), torch_registry(1, 7, 32), torch.nn.Module, "PyTorch")
    assert isinstance(cnn, Net) and cnn(torch.zeros(2, 1, 32, 32)).shape == (2, 7)


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_a_users_model_class_gets_model_args_and_the_datas_sizes(tmp_path, monkeypatch, framework):
    text = FLAX_USER_MODULE if framework == "flax" else TORCH_USER_MODULE
    (tmp_path / f"my_{framework}_models.py").write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path))
    if framework == "flax":
        import flax.linen as nn
        base, data = nn.Module, {"num_classes": 5}
    else:
        import torch
        base, data = torch.nn.Module, {"num_classes": 5, "in_channels": 1, "image_size": 4}
    try:
        model = build_model(parse_model_spec(f"my_{framework}_models:Mlp", '{"hidden": 6}'), {}, base,
                            framework, data_kwargs=data)
        assert type(model).__name__ == "Mlp" and isinstance(model, base)
        if framework == "flax":
            assert (model.num_classes, model.hidden) == (5, 6)
        else:
            sizes = (model.net[1].in_features, model.net[1].out_features, model.net[3].out_features)
            assert sizes == (16, 6, 5)  # in_channels * image_size**2 = 16, hidden 6, num_classes 5
        with pytest.raises(TypeError, match="fix --model-args"):
            build_model(parse_model_spec(f"my_{framework}_models:Mlp", '{"hiden": 6}'), {}, base, framework,
                        data_kwargs=data)
    finally:
        sys.modules.pop(f"my_{framework}_models", None)
