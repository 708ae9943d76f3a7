"""``PenaltyOptions`` is the one home of the penalty's options: the API, the config and the CLI read it."""

from __future__ import annotations

import dataclasses
import json

import pytest

from agp_common.config import (
    DEFAULT_LR,
    PENALTY_PREFIX,
    TrainConfig,
    build_parser,
    parse_config,
    validate_config,
)
from agp_common.errors import UsageError
from agp_common.penalty_spec import OPTION_NAMES, PenaltyOptionError, PenaltyOptions, resolve_options


def test_defaults_are_the_seed_recipe_and_the_object_is_hashable():
    options = PenaltyOptions()
    assert options.is_seed_recipe and options.changed() == {}
    assert hash(options) == hash(PenaltyOptions())  # usable as a static jit argument / cache key
    assert not PenaltyOptions(norm="l2").is_seed_recipe
    assert PenaltyOptions(layers="relu2", every=3).is_seed_recipe  # which layers, how often: same formula


def test_values_are_normalised_and_frozen():
    options = PenaltyOptions(layers=["relu1", "relu2"], layer_weights={"relu2": 0.5})
    assert options.layers == ("relu1", "relu2")
    assert options.layer_weights == (("relu2", 0.5),)
    assert options.weight_of("relu2") == 0.5 and options.weight_of("relu1") == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.norm = "l2"


@pytest.mark.parametrize(("changes", "field"), [
    ({"normalization": "mean"}, "normalization"),
    ({"norm": "l1"}, "norm"),
    ({"approx": "hutchinson"}, "approx"),
    ({"fd_step": 0.0}, "fd_step"),
    ({"fd_step": float("nan")}, "fd_step"),
    ({"every": 0}, "every"),
    ({"every": 1.5}, "every"),
    ({"layers": ()}, "layers"),
    ({"layer_weights": {"relu1": -1.0}}, "layer_weights"),
])
def test_each_bad_value_names_its_option(changes, field):
    with pytest.raises(PenaltyOptionError) as info:
        PenaltyOptions(**changes)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field} must be ")


def test_resolve_merges_object_layers_and_keywords():
    base = PenaltyOptions(norm="l2", layers=("relu1",))
    assert resolve_options(base, "relu2", fd_step=0.1) == PenaltyOptions(norm="l2", layers=("relu2",),
                                                                         fd_step=0.1)
    assert resolve_options(None) == PenaltyOptions()
    with pytest.raises(TypeError, match=r"unknown penalty option\(s\) \['nrom'\]"):
        resolve_options(None, nrom="l2")
    with pytest.raises(TypeError, match="options must be a PenaltyOptions"):
        resolve_options({"norm": "l2"})


def test_every_option_has_a_config_field_and_a_flag():
    config_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    flags = set(vars(build_parser("p", "jax").parse_args([])))
    for name in OPTION_NAMES:
        assert PENALTY_PREFIX + name in config_fields
        assert PENALTY_PREFIX + name in flags


def test_flags_build_the_options_object():
    flags = ["--penalty-layers", "relu2,input", "--penalty-norm", "l2", "--penalty-layer-weights",
             "relu2=0.5,input=2", "--penalty-every", "3", "--penalty-fd-step", "0.01"]
    config = parse_config(flags, "p", "jax")
    expected = PenaltyOptions(layers=("relu2", "input"), norm="l2", every=3, fd_step=0.01,
                              layer_weights={"relu2": 0.5, "input": 2.0})
    assert config.penalty_options() == expected
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    assert parse_config(["--penalty-layers", "all"], "p", "jax").penalty_options().layers is None


@pytest.mark.parametrize(("changes", "message"), [
    ({"penalty_every": 0}, "--penalty-every must be a positive integer"),
    ({"penalty_fd_step": -1.0}, "--penalty-fd-step must be a finite number > 0"),
    ({"penalty_layer_weights": (("relu3", 1.0),)}, r"--penalty-layer-weights names \['relu3'\]"),
    ({"penalty_layers": ("relu2",), "penalty_layer_weights": (("relu1", 1.0),)}, "not penalised"),
])
def test_config_errors_name_the_flag(changes, message):
    with pytest.raises(UsageError, match=message):
        validate_config(TrainConfig(**changes), ("relu1", "relu2"))


@pytest.mark.parametrize("optimizer", sorted(DEFAULT_LR))
def test_learning_rate_defaults_per_optimizer_and_an_explicit_one_wins(optimizer):
    assert parse_config(["--optimizer", optimizer], "p", "jax").lr == DEFAULT_LR[optimizer]
    assert TrainConfig(optimizer=optimizer).lr == DEFAULT_LR[optimizer]
    assert parse_config(["--optimizer", optimizer, "--lr", "0.2"], "p", "jax").lr == 0.2


def test_help_is_grouped_and_states_each_default_once(capsys):
    with pytest.raises(SystemExit):
        build_parser("p", "jax").parse_args(["--help"])
    text = capsys.readouterr().out
    for group in ("data:", "model and penalty:", "optimisation:", "run folder:", "devices and precision:"):
        assert f"\n{group}" in text
    assert "(default: None)" not in text
    defaults = vars(build_parser("p", "jax").parse_args([]))
    assert text.count("(default:") == len([v for v in defaults.values() if v is not None and v is not False])
    assert "not set: every capture point" in text  # what an unset --penalty-layers means


def test_finite_difference_per_example_is_refused_only_when_examples_interact():
    from agp_common.penalty_spec import check_examples_interact

    fd_per_example = PenaltyOptions(approx="finite_difference", normalization="per_example")
    check_examples_interact(fd_per_example, examples_interact=False)
    check_examples_interact(PenaltyOptions(normalization="per_example"), examples_interact=True)
    with pytest.raises(ValueError, match=r"needs independent examples.*use approx='exact'"):
        check_examples_interact(fd_per_example, examples_interact=True)
