"""FGSM and PGD against closed forms (both frameworks), their flags, and accuracy under attack in both CLIs.

Closed forms on a linear softmax model ``logits = W x + b`` (x flattened, W (K, D)):
``d CE / d x = W^T (softmax(W x + b) - onehot(y))``, so

    fgsm: x_adv = clip(x + eps * sign(W^T (p - onehot(y))), lo, hi).

With two classes the gradient is ``(p_1 - y)(W_1 - W_0)`` and ``0 < p_1 < 1``,
so its sign ``s = (1 - 2y) sign(W_1 - W_0)`` never changes along the path:
K PGD steps of alpha move every entry monotonically, and

    pgd: x_adv = clip(x + min(K alpha, eps) * s, lo, hi).
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from torch import nn

import jax_impl.attacks as jattacks
import jax_impl.train as jtrain
import torch_ref.attacks as tattacks
import torch_ref.train as ttrain
from agp_common import Dataset, TrainConfig, parse_config
from agp_common.attack_spec import Attack

pytestmark = pytest.mark.usefixtures("one_torch_thread")

B, SIDE = 6, 4  # images (B, 4, 4, 1): one channel, so NHWC and NCHW flatten alike
D = SIDE * SIDE


def linear_model(num_classes: int, seed: int = 0):
    """(W (K, D), b (K,), x (B, D) in [0, 1], y (B,)), float64; W's first column is 0."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((num_classes, D))
    w[:, 0] = 0.0  # the loss does not depend on pixel 0: sign(0) = 0 must leave it in place
    return w, rng.standard_normal(num_classes), rng.random((B, D)), rng.integers(0, num_classes, B)


def softmax(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def attack_jax(name, w, b, x, y, eps, **kwargs):
    def apply_fn(v, images):
        return images.reshape(images.shape[0], -1) @ v["W"].T + v["b"]  # (B, K)

    with jax.enable_x64(True):
        fn = jattacks.fgsm if name == "fgsm" else jattacks.pgd
        images = jnp.asarray(x.reshape(B, SIDE, SIDE, 1))
        out = fn(apply_fn, {"W": jnp.asarray(w), "b": jnp.asarray(b)}, images, jnp.asarray(y), eps,
                 clip=(0.0, 1.0), **kwargs)
        return np.asarray(out).reshape(B, D)


def attack_torch(name, w, b, x, y, eps, **kwargs):
    model = nn.Sequential(nn.Flatten(), nn.Linear(D, len(b))).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(w))
        model[1].bias.copy_(torch.from_numpy(b))
    fn = tattacks.fgsm if name == "fgsm" else tattacks.pgd
    out = fn(model, torch.from_numpy(x.reshape(B, 1, SIDE, SIDE)), torch.from_numpy(y), eps, clip=(0.0, 1.0),
             **kwargs)
    return out.numpy().reshape(B, D)


ATTACK_FNS = {"jax": attack_jax, "torch": attack_torch}


@pytest.mark.parametrize("framework", ATTACK_FNS)
@pytest.mark.parametrize("eps", [0.05, 0.3])  # 0.3: many entries are clipped to [0, 1]
def test_fgsm_on_a_linear_softmax_model_is_its_closed_form(framework, eps):
    w, b, x, y = linear_model(num_classes=5)
    p = softmax(x @ w.T + b)  # (B, K)
    expected = np.clip(x + eps * np.sign((p - np.eye(5)[y]) @ w), 0.0, 1.0)  # (B, D)
    got = ATTACK_FNS[framework]("fgsm", w, b, x, y, eps)
    np.testing.assert_array_equal(got, expected)  # exact: the same signs, then the same two operations
    np.testing.assert_array_equal(got[:, 0], x[:, 0])  # zero gradient: not moved


@pytest.mark.parametrize("framework", ATTACK_FNS)
@pytest.mark.parametrize("steps", [3, 10])  # 3 steps of eps/4 stop inside the ball, 10 reach its surface
def test_pgd_on_a_binary_linear_model_moves_each_entry_min_k_alpha_eps_along_one_sign(framework, steps):
    w, b, x, y = linear_model(num_classes=2, seed=1)
    eps = 0.2
    s = (1 - 2 * y)[:, None] * np.sign(w[1] - w[0])[None, :]  # (B, D)
    expected = np.clip(x + min(steps * eps / 4, eps) * s, 0.0, 1.0)
    got = ATTACK_FNS[framework]("pgd", w, b, x, y, eps, steps=steps)  # default step size eps / 4
    # float64: K additions of alpha against one multiplication, a few ulps of 1.
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-15)


def test_masked_rows_of_a_padded_batch_are_not_counted():
    w, b, x, y = linear_model(num_classes=5)

    def apply_fn(v, images):
        return images.reshape(images.shape[0], -1) @ v["W"].T + v["b"]

    # Jitted as the training loop's attack evaluation is (one compilation instead of dozens of op-by-op ones).
    correct = jax.jit(jattacks.adversarial_correct, static_argnums=(0, 4), static_argnames=("clip",))
    variables = {"W": jnp.asarray(w, jnp.float32), "b": jnp.asarray(b, jnp.float32)}
    xj, yj = jnp.asarray(x.reshape(B, SIDE, SIDE, 1), jnp.float32), jnp.asarray(y)
    attacks = (Attack("fgsm", 0.1),)
    clean_right = np.asarray(jnp.argmax(apply_fn(variables, xj), -1) == yj)
    mask = jnp.asarray([1, 1, 1, 0, 0, 0], jnp.float32)
    # eps tiny: the attack changes no decision, so the count is the clean count of the real rows.
    tiny = (Attack("fgsm", 1e-9),)
    got = correct(apply_fn, variables, xj, yj, tiny, clip=(0.0, 1.0), mask=mask)
    assert float(got[tiny[0].eval_key]) == clean_right[:3].sum()
    full = correct(apply_fn, variables, xj, yj, attacks, clip=(0.0, 1.0))
    assert set(full) == {"eval_accuracy/fgsm@0.1"}


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"eps": 0.0}, "eps must be a finite number > 0, got 0.0"),
    ({"eps": float("nan")}, "eps must be a finite number > 0"),
    ({"clip": (1.0, 0.0)}, "clip must be (lo, hi) with finite lo < hi"),
    ({"steps": 0}, "steps must be an integer >= 1, got 0"),
])
def test_impossible_arguments_are_one_line_value_errors_in_both_frameworks(kwargs, message):
    w, _, x, y = linear_model(num_classes=3)
    args = {"eps": 0.1, "clip": (0.0, 1.0), **kwargs}
    eps, clip = args.pop("eps"), args.pop("clip")
    x4 = x.reshape(B, SIDE, SIDE, 1)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")) as e:
        jattacks.pgd(lambda v, a: a.reshape(B, -1) @ v.T, jnp.asarray(w), jnp.asarray(x4), jnp.asarray(y),
                     eps, clip=clip, **args)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tattacks.pgd(nn.Flatten(), torch.from_numpy(x4), torch.from_numpy(y), eps, clip=clip, **args)


def test_the_valid_range_is_stated_for_known_data_and_measured_for_npz():
    x = np.asarray([[-2.0, 3.0], [0.5, 1.0]]).reshape(2, 1, 2, 1)
    y = np.zeros(2, np.int32)
    assert Dataset("npz", x[:1], y[:1], x[1:], y[1:], 2, pixel_scale=0.5).input_range() == (-1.0, 1.5)
    assert Dataset("digits", x, y, x, y, 10, value_range=(0.0, 1.0)).input_range() == (0.0, 1.0)
    flat = np.ones((1, 1, 2, 1))
    assert Dataset("npz", flat, y[:1], flat, y[:1], 2).input_range() == (1.0, 2.0)  # constant data


def test_flags_give_every_attack_at_every_eps_and_survive_a_json_round_trip():
    config = parse_config(["--eval-attacks", "fgsm,pgd", "--eval-eps", "0.05,0.1", "--eval-pgd-steps", "7",
                           "--eval-pgd-step-ratio", "0.5"], prog="t", framework="jax")
    assert [a.label for a in config.attacks()] == ["fgsm@0.05", "fgsm@0.1", "pgd@0.05", "pgd@0.1"]
    assert config.attacks()[3] == Attack("pgd", 0.1, steps=7, step_size=0.05)
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    default = parse_config([], prog="t", framework="jax")
    assert default.attacks() == () and default.eval_eps == (0.05, 0.1)


@pytest.mark.parametrize(("argv", "message"), [
    (["--eval-attacks", "fgsm,cw"], "--eval-attacks must be a comma-separated subset of ['fgsm', 'pgd']"),
    (["--eval-attacks", "pgd", "--eval-eps", "0,0.1"], "--eval-eps must be one or more finite numbers > 0"),
    (["--eval-attacks", "fgsm", "--eval-eps", "nan"], "--eval-eps must be one or more finite numbers > 0"),
    (["--eval-pgd-steps", "0"], "--eval-pgd-steps must be an integer >= 1, got 0"),
    (["--eval-pgd-step-ratio", "-1"], "--eval-pgd-step-ratio must be a finite number > 0, got -1.0"),
])
def test_bad_attack_flags_are_one_line_usage_errors_with_exit_2(tmp_path, capsys, argv, message):
    assert jtrain.main([*argv, "--dataset", "synthetic", "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # refused before anything is written


def test_a_malformed_eps_list_is_argparses_one_line_error(capsys):
    with pytest.raises(SystemExit) as e:
        jtrain.main(["--eval-eps", "0.1,x"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert "--eval-eps: expected comma-separated numbers such as 0.05,0.1, got '0.1,x'" in err


def attacked_records(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == "eval"]


#: 60 Adam steps in batches of 8 on 160 small synthetic images: test accuracy ~1 on its 32 test images,
#: so an attack has something to break, in a few seconds. Batches of 8 on 16x16x1: the train step of the
#: Adam runs in tests/test_train.py, and the train, eval and attack steps of the resume test below,
#: compile once.
CLI_ARGS = ["--dataset", "synthetic", "--synthetic-shape", "160,16,16,1", "--optimizer", "adam",
            "--lr", "0.003", "--batch-size", "8", "--steps", "60", "--eval-every", "30", "--quiet",
            "--eval-attacks", "fgsm,pgd", "--eval-eps", "0.05,0.1"]
KEYS = tuple(f"eval_accuracy/{a}@{e}" for a in ("fgsm", "pgd") for e in ("0.05", "0.1"))


@pytest.mark.parametrize("framework", ["jax", "torch"])
def test_cli_writes_accuracy_under_attack_next_to_the_clean_one(framework, tmp_path, capsys):
    # The CLI's flags, parsed and trained as its ``main`` does, without the plots (~0.5 s a run; the
    # run folder tests check them).
    train = {"jax": jtrain, "torch": ttrain}[framework].train_and_evaluate
    train(parse_config([*CLI_ARGS, "--workdir", str(tmp_path)], prog="t", framework=framework), plots=False)
    evals = attacked_records(tmp_path)
    assert [r["step"] for r in evals] == [30, 60]
    last = evals[-1]
    assert all(0.0 <= last[k] <= 1.0 for k in KEYS)
    assert last["eval_accuracy"] > 0.8
    # A larger ball and more steps never help the model here: monotone in eps, PGD at most FGSM + noise.
    assert last["eval_accuracy/pgd@0.1"] <= last["eval_accuracy/pgd@0.05"] < last["eval_accuracy"]
    assert last["eval_accuracy/pgd@0.1"] <= last["eval_accuracy/fgsm@0.1"]
    assert "pgd@0.1" in capsys.readouterr().out  # the eval log line names the attacked accuracies


def test_attacks_can_be_added_when_a_run_is_resumed(tmp_path):
    # CLI_ARGS' optimizer and batch shape: the train and eval steps that the JAX CLI run above compiled
    # (``compiled_steps`` is keyed on the optimizer), so this test compiles nothing of its own.
    base = ["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--optimizer", "adam",
            "--lr", "0.003", "--batch-size", "8", "--quiet", "--workdir", str(tmp_path)]

    def train(*flags):  # as the CLI does, without its plots (the test above has them)
        jtrain.train_and_evaluate(parse_config([*base, *flags], prog="t", framework="jax"), plots=False)

    train("--steps", "2")
    # The attacks of CLI_ARGS: the same compiled attack evaluation (same batch shape, eps and valid range).
    train("--steps", "3", "--eval-attacks", "fgsm,pgd", "--eval-eps", "0.05,0.1")
    assert set(KEYS) <= set(attacked_records(tmp_path)[-1])
