"""jax_impl.train: compiled once, masked partial batches, exact resume, multi-device equality, the CLI."""

import dataclasses
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jax_impl.train as train
from agp_common import TrainConfig, load_dataset, padded_batch
from jax_impl import Net, penalized_loss

# 20 examples in batches of 8: steps of 8, 8 and 4 examples in every epoch; 16x16 keeps steps cheap.
SMALL = TrainConfig(dataset="synthetic", synthetic_shape=(20, 16, 16, 1), batch_size=8, steps=6,
                    eval_every=3, checkpoint_every=3, keep_checkpoints=5, quiet=True)
TIMING_KEYS = ("step_time_s", "examples_per_s")


def records(workdir, split="train"):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def without_timing(record):
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def test_train_step_compiles_once_for_full_and_padded_partial_batches():
    ds = load_dataset(SMALL)
    model, tx = Net(num_classes=ds.num_classes), train.make_optimizer("sgd", 0.05)
    mesh = train.data_mesh()
    step = train.make_train_step(model, "sgd", None, mesh)
    state = train.create_train_state(train.init_params(model, ds.image_shape, 0, np.float32), tx)
    state = jax.device_put(state, train.replicated(mesh))  # as train_and_evaluate does
    # The last batch is partial; the learning rate and penalty weight change every step.
    for i, indices in enumerate((np.arange(8), np.arange(8, 16), np.arange(16, 20))):
        batch = padded_batch(ds.x_train, ds.y_train, indices, 8, np.float32)
        hparams = train.hyperparams(0.05 / (i + 1), 10.0 * i, np.float32)
        hparams = jax.device_put(hparams, train.replicated(mesh))
        state, _ = step(state, train.put_batch(batch, mesh), hparams)
    assert int(state.step) == 3
    assert step.traces == 1  # a second trace would be a second compilation


def test_a_sweep_over_penalty_weights_and_learning_rates_compiles_the_train_step_once(tmp_path):
    config = dataclasses.replace(SMALL, steps=2, eval_every=2, checkpoint_every=2, penalty_layers=("relu1",))
    runs = [train.train_and_evaluate(dataclasses.replace(config, penalty_weight=w, lr=lr), tmp_path / f"w{w}",
                                     plots=False)
            for w, lr in ((0.0, 0.01), (1.0, 0.01), (3.0, 0.05), (10.0, 0.1))]
    # Another test in this process may have compiled these shapes already: then none compiles.
    assert sum(r.train_step_compilations for r in runs) <= 1
    assert [r.train_step_compilations for r in runs[1:]] == [0, 0, 0]
    assert len({float(r.last_train["loss"]) for r in runs[1:]}) == 3  # the weights did reach the step


def test_a_nan_step_leaves_the_state_unchanged_and_shows_in_its_metrics():
    ds = load_dataset(SMALL)
    model, tx = Net(num_classes=ds.num_classes), train.make_optimizer("sgd", 0.05)
    state = train.create_train_state(train.init_params(model, ds.image_shape, 0, np.float32), tx)
    batch = padded_batch(ds.x_train, ds.y_train, np.arange(8), 8, np.float32)
    batch["x"][0] = np.nan
    step = jax.jit(functools.partial(train.train_step, model=model, optimizer="sgd"))
    after, metrics = step(state, batch, train.hyperparams(0.05, 10.0, np.float32))
    assert not np.isfinite(metrics["loss"])
    jax.tree.map(np.testing.assert_array_equal, after, state)  # step counter included


def test_counting_jit_counts_one_trace_per_new_argument_shape():
    double = train.CountingJit(lambda x: 2 * x)
    double(jnp.ones(3))
    double(jnp.zeros(3))  # same shape and dtype: cached
    assert double.traces == 1
    double(jnp.ones(4))
    assert double.traces == 2


def test_masked_padded_batch_has_the_loss_penalty_and_gradient_of_its_real_examples():
    ds = load_dataset(SMALL)
    model = Net(num_classes=ds.num_classes)
    params = train.init_params(model, ds.image_shape, 0, np.float32)
    real = padded_batch(ds.x_train, ds.y_train, np.arange(4), 4, np.float32)
    padded = padded_batch(ds.x_train, ds.y_train, np.arange(4), 8, np.float32)
    assert padded["mask"].tolist() == [1] * 4 + [0] * 4

    @jax.jit
    def objective(batch, weights):
        def f(p):
            return penalized_loss(p, model, batch["x"], batch["y"], penalty_weight=10.0,
                                  example_weights=weights)
        return jax.value_and_grad(f, has_aux=True)(params)

    (total_r, aux_r), grads_r = objective(real, None)
    (total_p, aux_p), grads_p = objective(padded, jnp.asarray(padded["mask"]))
    # float32, same math with zeros added to the sums: a few ulps of summation-order difference.
    for key in ("loss", "penalty"):
        np.testing.assert_allclose(aux_p[key], aux_r[key], rtol=1e-5)
    np.testing.assert_allclose(total_p, total_r, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads_p, grads_r)


def test_run_writes_the_run_folder_and_never_recompiles(tmp_path):
    result = train.train_and_evaluate(SMALL, tmp_path)
    # Six steps, two of them padded partial batches: at most the first compiles (0 if an earlier test
    # in this process compiled the same shapes).
    assert result.train_step_compilations <= 1
    assert result.step == 6
    names = {p.name for p in tmp_path.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoints", "loss.png", "grad_norms.png",
            "accuracy.png"} <= names
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["3", "6"]
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["framework"] == "jax" and saved["config"]["steps"] == 6
    assert saved["dataset"]["train_examples"] == 20
    train_records = records(tmp_path)
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert [r["examples"] for r in train_records] == [8, 8, 4, 8, 8, 4]
    expected_keys = {"loss", "penalty", "total", "accuracy", "grad_norm", "param_norm", "lr", "step_time_s",
                     "examples_per_s", "penalty/relu1", "penalty/relu2", "act_grad_norm/relu1",
                     "act_grad_norm/relu2"}
    assert expected_keys <= set(train_records[0])
    assert [r["step"] for r in records(tmp_path, "eval")] == [3, 6]
    assert 0 <= result.final_eval["eval_accuracy"] <= 1


def test_resumed_run_ends_bitwise_identical_to_an_uninterrupted_one(tmp_path):
    full = train.train_and_evaluate(SMALL, tmp_path / "full", plots=False)
    # Simulate a run killed after its step-3 checkpoint: newer checkpoint gone, metrics of steps 4-6 written.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(tmp_path / "full", interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "6")
    resumed = train.train_and_evaluate(SMALL, interrupted, plots=False)
    assert resumed.train_step_compilations == 0  # the restored state has the shardings the step expects
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), resumed.params, full.params)
    assert [r["step"] for r in records(interrupted)] == [1, 2, 3, 4, 5, 6]  # no duplicates, none missing
    expected = [without_timing(r) for r in records(tmp_path / "full")]
    assert [without_timing(r) for r in records(interrupted)] == expected
    assert records(interrupted, "eval") == records(tmp_path / "full", "eval")


def test_resume_with_more_steps_continues_the_same_trajectory(tmp_path):
    full = train.train_and_evaluate(SMALL, tmp_path / "full", plots=False)
    short = TrainConfig(**{**SMALL.__dict__, "steps": 3})
    train.train_and_evaluate(short, tmp_path / "extended", plots=False)
    extended = train.train_and_evaluate(SMALL, tmp_path / "extended", plots=False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), extended.params, full.params)


# The reference for the multi-device and multi-process tests: 4 steps (batches of 8, 8, 4, 8) on one device.
FOUR_STEPS = TrainConfig(**{**SMALL.__dict__, "steps": 4})


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("one_device")
    result = train.train_and_evaluate(FOUR_STEPS, workdir, devices=jax.devices()[:1], plots=False)
    return result, records(workdir)


MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import jax_impl.train as train
    from agp_common import TrainConfig, UsageError
    assert jax.device_count() == 4, jax.devices()
    config = TrainConfig(**json.loads(sys.argv[2]))
    r = train.train_and_evaluate(config, f"{sys.argv[1]}/run", plots=False)
    out = {"params": jax.tree.map(lambda a: a.tolist(), r.params), "eval": r.final_eval,
           "compilations": r.train_step_compilations}
    try:
        train.train_and_evaluate(TrainConfig(**{**config.__dict__, "batch_size": 6}), f"{sys.argv[1]}/bad")
    except UsageError as e:
        out["error"] = str(e)
    print(json.dumps(out))
""")


def test_four_cpu_devices_give_the_losses_and_parameters_of_one(tmp_path, one_device_run):
    one, one_records = one_device_run
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    argv = [sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(tmp_path), json.dumps(FOUR_STEPS.to_json())]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = json.loads(proc.stdout.strip().splitlines()[-1])
    assert four["compilations"] == 1
    four_records = records(tmp_path / "run")
    # float32 with the batch reductions split over 4 devices: summation order differs, a few ulps per step.
    expected = [r["total"] for r in one_records]
    np.testing.assert_allclose([r["total"] for r in four_records], expected, rtol=1e-5)
    np.testing.assert_allclose(four["eval"]["eval_loss"], one.final_eval["eval_loss"], rtol=1e-5)
    for layer, tensors in one.params.items():
        for name, value in tensors.items():
            np.testing.assert_allclose(four["params"][layer][name], value,
                                       rtol=1e-4, atol=1e-6)  # same reason; atol for entries near 0
    assert "--batch-size 6 must be a multiple of the number of devices (4)" in four["error"]


def test_cli_trains_on_digits_and_writes_tensorboard_and_a_summary(tmp_path, capsys):
    workdir = tmp_path / "run"
    argv = ["--steps", "2", "--batch-size", "16", "--workdir", str(workdir), "--quiet", "--tensorboard"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("done (jax): 2 steps") and "test accuracy" in out[-1]
    assert any(line.startswith("step 2/2") for line in out)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["config"]["dataset"] == "digits"
    fingerprint = saved["dataset"].pop("fingerprint")  # the data's content hash, checked on resume
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
    assert saved["dataset"] == {"name": "digits", "train_examples": 1438, "test_examples": 359,
                                "image_shape": [32, 32, 1], "num_classes": 10}
    # Running the same command again resumes at the end: nothing to train, same summary.
    assert train.main(argv) == 0
    assert capsys.readouterr().out.strip().startswith("resuming from the checkpoint at step 2")


def test_cli_learns_the_synthetic_labels_well_above_chance(tmp_path, capsys):
    argv = ["--dataset", "synthetic", "--synthetic-shape", "256,16,16,1", "--steps", "80",
            "--eval-every", "80", "--checkpoint-every", "80", "--quiet", "--workdir", str(tmp_path)]
    assert train.main(argv) == 0
    capsys.readouterr()
    (final,) = records(tmp_path, "eval")
    assert final["eval_accuracy"] > 0.5  # 51 test images of 10 balanced classes: chance is 0.1


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_each_optimizer_lowers_the_digits_loss_with_its_default_lr(optimizer, tmp_path, capsys):
    argv = ["--optimizer", optimizer, "--steps", "60", "--eval-every", "60", "--checkpoint-every", "60",
            "--quiet", "--workdir", str(tmp_path)]  # no --lr: the documented default of this optimizer
    assert train.main(argv) == 0
    capsys.readouterr()
    first = records(tmp_path)[0]  # measured before the first update: the loss of the initial model
    (final,) = records(tmp_path, "eval")
    # 60 steps take the test loss to about a third of the initial one (0.3-0.7 vs 2.3).
    assert final["eval_loss"] < 0.5 * first["loss"], (first["lr"], first["loss"], final)


@pytest.mark.parametrize(("argv", "message"), [
    (["--penalty-weight", "-1"], "--penalty-weight must be a finite number >= 0, got -1.0"),
    (["--penalty-layers", "relu3"], "unknown --penalty-layers ['relu3']"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--batch-size", "5000"], "--batch-size 5000 is larger than the 1438 training examples"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "no complete CIFAR-10 release found"),
])
def test_cli_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert train.main([*argv, "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_epochs_with_steps(capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--epochs", "1", "--steps", "2"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err


def test_resume_refuses_a_workdir_with_another_config(tmp_path, capsys):
    config = TrainConfig(**{**SMALL.__dict__, "steps": 1})
    train.train_and_evaluate(config, tmp_path, plots=False)
    argv = ["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "8", "--steps", "1",
            "--lr", "0.1", "--workdir", str(tmp_path)]
    assert train.main(argv) == 2
    assert "lr: saved 0.05, now 0.1" in capsys.readouterr().err


def test_help_explains_every_flag_in_one_line(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--dataset", "--data-dir", "--epochs", "--steps", "--batch-size", "--optimizer", "--lr",
                 "--penalty-weight", "--penalty-layers", "--seed", "--workdir", "--eval-every",
                 "--checkpoint-every", "--quiet", "--tensorboard"):
        assert flag in text


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # two JAX processes start and compile (~15 s); one-process sharding runs by default
def test_two_processes_on_localhost_train_like_one(tmp_path, one_device_run):
    """Multi-host path: jax.distributed over Gloo CPU collectives, each process feeds half of a batch."""
    single, single_records = one_device_run
    argv = [sys.executable, "-m", "jax_impl.train", "--dataset", "synthetic", "--synthetic-shape",
            "20,16,16,1", "--batch-size", "8", "--steps", "4", "--eval-every", "3", "--checkpoint-every", "3",
            "--quiet", "--workdir", str(tmp_path / "multi")]
    port = free_port()
    procs = [subprocess.Popen(argv, env={**os.environ, "JAX_PLATFORMS": "cpu",
                                         "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
                                         "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(i),
                                         "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo"},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    multi = records(tmp_path / "multi")
    # float32, batch reductions split over two processes: a few ulps of summation-order difference.
    expected = [r["total"] for r in single_records if r["split"] == "train"]
    np.testing.assert_allclose([r["total"] for r in multi], expected, rtol=1e-5)
    np.testing.assert_allclose(records(tmp_path / "multi", "eval")[-1]["eval_loss"],
                               single.final_eval["eval_loss"], rtol=1e-5)
    assert sorted(p.name for p in (tmp_path / "multi" / "checkpoints").iterdir()) == ["3", "4"]
