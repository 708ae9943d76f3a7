"""jax_impl.train: compiled once, masked partial batches, exact resume, multi-device equality, the CLI."""

import contextlib
import dataclasses
import io
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
from agp_common import TrainConfig, UsageError, load_dataset, padded_batch, parse_config
from jax_impl import Net, penalized_loss
from tests.compile_counter import CompileCounter

# 20 examples in batches of 8: steps of 8, 8 and 4 examples in every epoch; 16x16 keeps steps cheap.
SMALL = TrainConfig(dataset="synthetic", synthetic_shape=(20, 16, 16, 1), batch_size=8, steps=6,
                    eval_every=3, checkpoint_every=3, keep_checkpoints=5, quiet=True)
TIMING_KEYS = ("step_time_s", "examples_per_s")
#: XLA CPU options for a test's own programs: they compile in a fraction of the time (the program is run
#: once), and the arithmetic is the same (parity_tests/verify.py compiles its steps with them).
FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def records(workdir, split="train"):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split]


def without_timing(record):
    return {k: v for k, v in record.items() if k not in TIMING_KEYS}


def shared_steps(ds):
    """``(model, mesh, train step, eval step)`` of SMALL's runs: ``compiled_steps``' cache, so the tests
    below reuse the step that every run of these shapes in this process compiles once."""
    return train.compiled_steps(ds.num_classes, SMALL.optimizer, tuple(jax.devices()),
                                SMALL.penalty_options())


def initial_state(ds, model, mesh, lr=0.05):
    tx = train.make_optimizer("sgd", lr)
    state = train.create_train_state(train.init_params(model, ds.image_shape, 0, np.float32), tx)
    return jax.device_put(state, train.replicated(mesh))  # as train_and_evaluate does


def test_train_step_compiles_once_for_full_and_padded_partial_batches(compile_counter):
    ds = load_dataset(SMALL)
    model, mesh, step, _ = shared_steps(ds)
    state = initial_state(ds, model, mesh)
    compilations = []
    # The last batch is partial; the learning rate and penalty weight change every step.
    for i, indices in enumerate((np.arange(8), np.arange(8, 16), np.arange(16, 20))):
        batch = padded_batch(ds.x_train, ds.y_train, indices, 8, np.float32)
        hparams = train.hyperparams(0.05 / (i + 1), 10.0 * i, np.float32)
        hparams = jax.device_put(hparams, train.replicated(mesh))
        state, _ = step(state, train.put_batch(batch, mesh), hparams)
        compilations.append(compile_counter.compilations("train_step"))
    assert int(state.step) == 3
    assert compilations[0] <= 1  # the first call compiles, unless an earlier call of these shapes did
    assert compilations[1:] == [compilations[0]] * 2  # nothing compiled for the later calls


def test_a_sweep_over_penalty_weights_and_learning_rates_compiles_the_train_step_once(tmp_path,
                                                                                    compile_counter):
    config = dataclasses.replace(SMALL, steps=2, eval_every=2, checkpoint_every=2)
    runs, compilations = [], []
    for w, lr in ((0.0, 0.01), (1.0, 0.01), (3.0, 0.05), (10.0, 0.1)):
        runs.append(train.train_and_evaluate(dataclasses.replace(config, penalty_weight=w, lr=lr),
                                             tmp_path / f"w{w}", plots=False))
        compilations.append(compile_counter.compilations("train_step"))  # so far in this test
    # Another test in this process may have compiled these shapes already: then none compiles.
    assert compilations[0] <= 1
    assert compilations[1:] == [compilations[0]] * 3
    assert len({float(r.last_train["loss"]) for r in runs[1:]}) == 3  # the weights did reach the step


def test_a_nan_step_leaves_the_state_unchanged_and_shows_in_its_metrics():
    ds = load_dataset(SMALL)
    model, mesh, step, _ = shared_steps(ds)
    state = initial_state(ds, model, mesh)
    before = jax.device_get(state)  # the step donates (deletes) its input state
    batch = padded_batch(ds.x_train, ds.y_train, np.arange(8), 8, np.float32)
    batch["x"][0] = np.nan
    hparams = jax.device_put(train.hyperparams(0.05, 10.0, np.float32), train.replicated(mesh))
    after, metrics = step(state, train.put_batch(batch, mesh), hparams)
    assert not np.isfinite(metrics["loss"])
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(after), before)  # step counter included


def test_compile_counter_counts_one_compilation_per_new_argument_shape(compile_counter):
    def double_it(x):
        return 2 * x

    double = jax.jit(double_it)
    double(jnp.ones(3))
    double(jnp.zeros(3))  # same shape and dtype: cached
    assert compile_counter.compilations("double_it") == 1
    assert compile_counter.traces["double_it"] == 1
    double(jnp.ones(4))
    assert compile_counter.compilations("double_it") == 2


def test_masked_padded_batch_has_the_loss_penalty_and_gradient_of_its_real_examples():
    ds = load_dataset(SMALL)
    model = Net(num_classes=ds.num_classes)
    params = train.init_params(model, ds.image_shape, 0, np.float32)
    real = padded_batch(ds.x_train, ds.y_train, np.arange(4), 4, np.float32)
    padded = padded_batch(ds.x_train, ds.y_train, np.arange(4), 8, np.float32)
    assert padded["mask"].tolist() == [1] * 4 + [0] * 4

    def objective(batch, weights):
        def f(p):
            return penalized_loss(p, model, batch["x"], batch["y"], penalty_weight=10.0,
                                  example_weights=weights)
        return jax.value_and_grad(f, has_aux=True)(params)

    objective = jax.jit(objective, compiler_options=FAST_COMPILE if jax.default_backend() == "cpu" else None)

    (total_r, aux_r), grads_r = objective(real, None)
    (total_p, aux_p), grads_p = objective(padded, jnp.asarray(padded["mask"]))
    # float32, same math with zeros added to the sums: a few ulps of summation-order difference.
    for key in ("loss", "penalty"):
        np.testing.assert_allclose(aux_p[key], aux_r[key], rtol=1e-5)
    np.testing.assert_allclose(total_p, total_r, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), grads_p, grads_r)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    """(result, workdir, train step compilations) of SMALL run once, plots included; read-only (copy it
    to resume or damage it)."""
    workdir = tmp_path_factory.mktemp("small") / "run"
    with CompileCounter() as counter:
        result = train.train_and_evaluate(SMALL, workdir)
    return result, workdir, counter.compilations("train_step")


def test_run_writes_the_run_folder_and_never_recompiles(small_run):
    result, workdir, compilations = small_run
    # Six steps, two of them padded partial batches: at most the first compiles (0 if an earlier test
    # in this process compiled the same shapes).
    assert compilations <= 1
    assert result.step == 6
    names = {p.name for p in workdir.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoints", "loss.png", "grad_norms.png",
            "accuracy.png"} <= names
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["framework"] == "jax" and saved["config"]["steps"] == 6
    assert saved["dataset"]["train_examples"] == 20
    train_records = records(workdir)
    assert [r["step"] for r in train_records] == [1, 2, 3, 4, 5, 6]
    assert [r["examples"] for r in train_records] == [8, 8, 4, 8, 8, 4]
    expected_keys = {"loss", "penalty", "total", "accuracy", "grad_norm", "param_norm", "lr", "step_time_s",
                     "examples_per_s", "penalty/relu1", "penalty/relu2", "act_grad_norm/relu1",
                     "act_grad_norm/relu2"}
    assert expected_keys <= set(train_records[0])
    assert [r["step"] for r in records(workdir, "eval")] == [3, 6]
    assert 0 <= result.final_eval["eval_accuracy"] <= 1


def test_resumed_run_ends_bitwise_identical_to_an_uninterrupted_one(small_run, tmp_path, compile_counter):
    full, full_dir, _ = small_run
    # Simulate a run killed after its step-3 checkpoint: newer checkpoint gone, metrics of steps 4-6 written.
    interrupted = tmp_path / "interrupted"
    shutil.copytree(full_dir, interrupted)
    shutil.rmtree(interrupted / "checkpoints" / "6")
    resumed = train.train_and_evaluate(SMALL, interrupted, plots=False)
    # The restored state has the shardings the step expects: nothing compiled again.
    assert compile_counter.compilations("train_step") == 0
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), resumed.params, full.params)
    assert [r["step"] for r in records(interrupted)] == [1, 2, 3, 4, 5, 6]  # no duplicates, none missing
    expected = [without_timing(r) for r in records(full_dir)]
    assert [without_timing(r) for r in records(interrupted)] == expected
    assert records(interrupted, "eval") == records(full_dir, "eval")


def test_resume_with_more_steps_continues_the_same_trajectory(small_run, tmp_path):
    full, _, _ = small_run
    short = TrainConfig(**{**SMALL.__dict__, "steps": 3})
    train.train_and_evaluate(short, tmp_path / "extended", plots=False)
    extended = train.train_and_evaluate(SMALL, tmp_path / "extended", plots=False)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), extended.params, full.params)


def flip_a_bit_in_the_largest_file(folder):
    """Bit rot: one bit flipped in the middle of the largest file under ``folder`` (the arrays' bytes)."""
    path = max((p for p in folder.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def test_a_checkpoint_damaged_on_disk_is_refused_naming_it_never_trained_on(small_run, tmp_path):
    _, full_dir, _ = small_run
    damaged = tmp_path / "damaged"
    shutil.copytree(full_dir, damaged)
    flip_a_bit_in_the_largest_file(damaged / "checkpoints" / "6" / "state")
    longer = TrainConfig(**{**SMALL.__dict__, "steps": 9})
    with pytest.raises(UsageError, match=r"checkpoints/6: damaged, its arrays do not match the digest"):
        train.train_and_evaluate(longer, damaged, plots=False)
    assert [r["step"] for r in records(damaged)] == [1, 2, 3, 4, 5, 6]  # nothing trained, nothing cut


# The reference for the multi-device and multi-process tests: 4 steps (batches of 8, 8, 4, 8) on one device.
FOUR_STEPS = TrainConfig(**{**SMALL.__dict__, "steps": 4})


def initial_params():
    """SMALL's seeded initial parameters, as host arrays (``init`` compiles once per process)."""
    model = Net(num_classes=10)
    return jax.device_get(train.init_params(model, SMALL.synthetic_shape[1:], SMALL.seed, np.float32))


@pytest.fixture(scope="module")
def one_device_run(tmp_path_factory):
    """(result, train records) of FOUR_STEPS on one device."""
    workdir = tmp_path_factory.mktemp("one_device")
    result = train.train_and_evaluate(FOUR_STEPS, workdir, params=initial_params(), devices=jax.devices()[:1],
                                      plots=False)
    return result, records(workdir)


def test_a_run_given_parameters_does_not_initialise_a_model_without_batch_stats():
    """What ``JaxTrainer.init`` uses when the run brings ``params``: ``Net`` keeps no batch statistics,
    so nothing of ``model.init`` is compiled (``init_variables``, the control, compiles it)."""
    from agp_app.jax_train.state import init_model_state, init_variables

    model = Net(num_classes=7)  # a configuration no other test initialises: not in the jit cache
    with CompileCounter() as counter:
        assert init_model_state(model, (32, 32, 3), 0, jnp.float32) == {}
    assert counter.compilations("init") == 0
    with CompileCounter() as counter:
        init_variables(model, (32, 32, 3), 0, jnp.float32)
    assert counter.compilations("init") == 1


def test_init_model_state_gives_the_batch_stats_that_init_variables_gives():
    """A model with BatchNorm still gets its initial batch statistics when the run brings parameters."""
    from agp_app.jax_train.state import init_model_state, init_variables
    from jax_impl.resnet import ResNet18

    model = ResNet18(num_classes=10, width=4, blocks=(1, 1))
    expected = init_variables(model, (8, 8, 3), 0, jnp.float32)[1]
    got = init_model_state(model, (8, 8, 3), 0, jnp.float32)
    assert set(got) == {"batch_stats"}
    jax.tree.map(np.testing.assert_array_equal, got, expected)


# The child gets the initial parameters from the test instead of initialising them itself: compiling
# ``Net.init`` takes longer than the train step, and the initialisation does not depend on the devices.
MULTI_DEVICE_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    import jax_impl.train as train
    from agp_common import TrainConfig, UsageError
    from tests.compile_counter import CompileCounter
    assert jax.device_count() == 4, jax.devices()
    config = TrainConfig(**json.loads(sys.argv[2]))
    params = {}
    with np.load(sys.argv[3]) as saved:
        for key in saved.files:
            layer, name = key.split(".")
            params.setdefault(layer, {})[name] = saved[key]
    with CompileCounter() as counter:
        r = train.train_and_evaluate(config, f"{sys.argv[1]}/run", params=params, plots=False)
    out = {"params": jax.tree.map(lambda a: a.tolist(), r.params), "eval": r.final_eval,
           "compilations": counter.compilations("train_step")}
    try:
        train.train_and_evaluate(TrainConfig(**{**config.__dict__, "batch_size": 6}), f"{sys.argv[1]}/bad")
    except UsageError as e:
        out["error"] = str(e)
    print(json.dumps(out))
""")
FOUR_DEVICE_TEST = "test_four_cpu_devices_give_the_losses_and_parameters_of_one"


@pytest.fixture(scope="module", autouse=True)
def four_device_child(request, tmp_path_factory):
    """(process, folder) of FOUR_DEVICE_TEST's child, which trains FOUR_STEPS on 4 CPU devices; None when
    that test is not selected.

    Started as this module starts, so that its start-up and compilation (~8 s: the step of 4 devices is
    a program of its own) overlap the tests before FOUR_DEVICE_TEST instead of adding to them wherever
    a second core is free. Its output goes to files in ``folder``; it is killed if still running at
    the end of the module.
    """
    if not any(item.name == FOUR_DEVICE_TEST for item in request.session.items):
        yield None
        return
    folder = tmp_path_factory.mktemp("four_devices")
    saved = folder / "initial.npz"
    np.savez(saved, **{f"{layer}.{name}": v for layer, tensors in initial_params().items()
                       for name, v in tensors.items()})
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
    # No persistent compilation cache (a test session's, if it has one): the child's programs are its own
    # (4 devices), and it compiles while this process does, which must not read an entry half written.
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    argv = [sys.executable, "-c", MULTI_DEVICE_SCRIPT, str(folder), json.dumps(FOUR_STEPS.to_json()),
            str(saved)]
    with open(folder / "stdout", "w") as out, open(folder / "stderr", "w") as err:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err)
    try:
        yield proc, folder
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_four_cpu_devices_give_the_losses_and_parameters_of_one(four_device_child, one_device_run):
    one, one_records = one_device_run
    proc, folder = four_device_child
    proc.wait(timeout=600)
    assert proc.returncode == 0, (folder / "stderr").read_text()[-3000:]
    four = json.loads((folder / "stdout").read_text().strip().splitlines()[-1])
    assert four["compilations"] == 1
    four_records = records(folder / "run")
    # float32 with the batch reductions split over 4 devices: summation order differs, a few ulps per step.
    expected = [r["total"] for r in one_records]
    np.testing.assert_allclose([r["total"] for r in four_records], expected, rtol=1e-5)
    np.testing.assert_allclose(four["eval"]["eval_loss"], one.final_eval["eval_loss"], rtol=1e-5)
    for layer, tensors in one.params.items():
        for name, value in tensors.items():
            np.testing.assert_allclose(four["params"][layer][name], value,
                                       rtol=1e-4, atol=1e-6)  # same reason; atol for entries near 0
    assert "--batch-size 6 must be a multiple of the number of devices (4)" in four["error"]


# The digits case is slow: the default data set at its 32x32 size compiles a model of its own (~10 s)
# for the same CLI path as the synthetic case; digits themselves are loaded by default in
# tests/test_data.py and by the PyTorch CLI's digits run in tests/test_train_torch.py.
@pytest.mark.parametrize(("data_flags", "dataset"), [
    pytest.param(["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "8"],
                 {"name": "synthetic", "train_examples": 20, "test_examples": 4, "image_shape": [16, 16, 1],
                  "num_classes": 10}, id="synthetic"),
    pytest.param(["--batch-size", "16"],
                 {"name": "digits", "train_examples": 1438, "test_examples": 359, "image_shape": [32, 32, 1],
                  "num_classes": 10}, id="digits", marks=pytest.mark.slow),
])
def test_cli_writes_tensorboard_and_a_summary_and_resumes_at_the_end(tmp_path, capsys, data_flags, dataset):
    workdir = tmp_path / "run"
    argv = [*data_flags, "--steps", "2", "--workdir", str(workdir), "--quiet", "--tensorboard"]
    assert train.main(argv) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("done (jax): 2 steps") and "test accuracy" in out[-1]
    assert any(line.startswith("step 2/2") for line in out)
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    saved = json.loads((workdir / "config.json").read_text())
    assert saved["config"]["dataset"] == dataset["name"]
    fingerprint = saved["dataset"].pop("fingerprint")  # the data's content hash, checked on resume
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", fingerprint)
    assert saved["dataset"] == dataset
    # Running the same command again resumes at the end: nothing to train, same summary.
    assert train.main(argv) == 0
    assert capsys.readouterr().out.strip().startswith("resuming from the checkpoint at step 2")


#: 250 steps in batches of 8 on 256 synthetic 16x16 images (SMALL's step shapes, so SGD's step is the one
#: compiled for SMALL). With its default lr each optimizer takes the test loss from 2.3 to 0.3 or less
#: (SGD 0.12, momentum 0.28, Adam 0.02); with 10x that lr or a tenth of it none gets below 2.0.
LEARN_ARGS = ["--dataset", "synthetic", "--synthetic-shape", "256,16,16,1", "--batch-size", "8",
              "--steps", "250", "--eval-every", "250", "--checkpoint-every", "250", "--quiet"]


@pytest.fixture(scope="module")
def learned(tmp_path_factory):
    """``learned(optimizer)``: (first train record, eval records) of a run of the CLI flags LEARN_ARGS with
    that optimizer and no --lr (so the documented default of that optimizer), each run once per module.
    Parsed and trained as ``main`` does, without the plots (~1 s a run; the other CLI tests check them)."""
    runs = {}

    def run(optimizer):
        if optimizer not in runs:
            workdir = tmp_path_factory.mktemp(optimizer)
            config = parse_config([*LEARN_ARGS, "--optimizer", optimizer], prog="test", framework="jax")
            with contextlib.redirect_stdout(io.StringIO()):
                train.train_and_evaluate(config, workdir, plots=False)
            # The first record is measured before the first update: the loss of the initial model.
            runs[optimizer] = records(workdir)[0], records(workdir, "eval")
        return runs[optimizer]

    return run


def test_cli_learns_the_synthetic_labels_well_above_chance(learned):
    _, (final,) = learned("sgd")  # the default optimizer
    assert final["eval_accuracy"] > 0.5  # 51 test images of 10 balanced classes: chance is 0.1


@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam"])
def test_each_optimizer_lowers_the_loss_with_its_default_lr(optimizer, learned):
    first, (final,) = learned(optimizer)
    assert final["eval_loss"] < 0.5 * first["loss"], (first["lr"], first["loss"], final)


@pytest.mark.parametrize(("argv", "message"), [
    (["--penalty-weight", "-1"], "--penalty-weight must be a finite number >= 0, got -1.0"),
    (["--penalty-layers", "relu3"], "unknown --penalty-layers ['relu3']"),
    (["--lr", "nan"], "--lr must be a finite number > 0"),
    (["--dataset", "synthetic", "--synthetic-shape", "20,16,16,1", "--batch-size", "5000"],
     "--batch-size 5000 is larger than the 20 training examples"),
    (["--dataset", "cifar10", "--data-dir", "/nonexistent"], "no complete CIFAR-10 release found"),
])
def test_cli_usage_errors_are_one_line_and_exit_2(tmp_path, capsys, argv, message):
    assert train.main([*argv, "--workdir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1


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
