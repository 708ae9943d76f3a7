"""agp_common: datasets, the seeded batch order, the config parser, the run folder and plots (NumPy only)."""

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agp_common import (
    BatchOrder,
    TrainConfig,
    UsageError,
    epoch_permutation,
    load_dataset,
    padded_batch,
    parse_config,
    restricted_unpickle,
    steps_per_epoch,
    validate_config,
)
from agp_common.data import (
    CIFAR_BINARY_FILES,
    CIFAR_PYTHON_FILES,
    linear_resize_matrix,
    load_cifar10,
    load_digits,
    load_npz,
    validate_split,
)
from agp_common.plot import main as plot_main
from agp_common.runlog import MetricsLog


def test_agp_common_imports_neither_jax_nor_torch():
    code = ("import sys, agp_common, agp_common.plot, agp_common.loop, agp_common.runlog; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'torch', 'flax')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@pytest.mark.parametrize("library", ["jax_impl", "torch_ref", "agp_common"])
def test_the_libraries_load_no_flags_datasets_or_run_folder_code(library):
    # The applications (agp_app, and agp_common's re-exports of it) load only when asked for.
    code = (f"import sys, {library}; print(sorted(m for m in sys.modules if m.startswith("
            "('agp_app', 'agp_common.config', 'agp_common.data', 'agp_common.runlog', 'agp_common.loop'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_digits_are_32x32_one_channel_in_unit_range_with_a_fixed_split():
    ds = load_digits()
    assert ds.x_train.shape == (1438, 32, 32, 1) and ds.x_test.shape == (359, 32, 32, 1)
    assert ds.x_train.dtype == np.float32 and ds.num_classes == 10
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert set(np.unique(ds.y_train)) == set(range(10))
    again = load_digits()
    np.testing.assert_array_equal(again.y_test, ds.y_test)  # split does not depend on --seed or the call


def test_bilinear_resize_keeps_constants_and_row_sums():
    a = linear_resize_matrix(8, 32)
    np.testing.assert_allclose(a.sum(axis=1), 1.0, rtol=0, atol=1e-12)  # rounding of 1 - frac + frac
    np.testing.assert_allclose(a @ np.full((8, 8), 3.0) @ a.T, 3.0, rtol=1e-12)


def test_batch_order_depends_only_on_seed_and_epoch_and_covers_each_example_once():
    order = BatchOrder(seed=3, num_examples=20, batch_size=8)
    assert order.steps_per_epoch == steps_per_epoch(20, 8) == 3
    epoch1 = [order.indices(s) for s in range(3, 6)]
    assert [len(b) for b in epoch1] == [8, 8, 4]
    np.testing.assert_array_equal(np.concatenate(epoch1), epoch_permutation(3, 1, 20))
    assert sorted(np.concatenate(epoch1).tolist()) == list(range(20))
    fresh = BatchOrder(seed=3, num_examples=20, batch_size=8)  # a resumed run starts at any step
    np.testing.assert_array_equal(fresh.indices(4), epoch1[1])
    assert not np.array_equal(epoch_permutation(3, 0, 20), epoch_permutation(3, 1, 20))
    assert not np.array_equal(epoch_permutation(4, 1, 20), epoch_permutation(3, 1, 20))


def test_padded_batch_zero_pads_and_masks_the_partial_batch():
    x = np.arange(5 * 16 * 16, dtype=np.uint8).reshape(5, 16, 16, 1)
    y = np.arange(5)
    b = padded_batch(x, y, np.array([4, 2]), 4, np.float64, pixel_scale=0.5)
    assert b["x"].shape == (4, 16, 16, 1) and b["x"].dtype == np.float64
    np.testing.assert_array_equal(b["x"][0], x[4] * 0.5)
    assert not b["x"][2:].any()
    assert b["y"].tolist() == [4, 2, 0, 0] and b["mask"].tolist() == [1, 1, 0, 0]


def write_cifar_binary(folder, per_file=3):
    rng = np.random.default_rng(0)
    for name in CIFAR_BINARY_FILES:
        records = rng.integers(0, 256, (per_file, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        records.tofile(folder / name)


def test_cifar10_binary_release_is_read_as_nhwc_uint8(tmp_path):
    write_cifar_binary(tmp_path)
    ds = load_cifar10(tmp_path)
    assert ds.x_train.shape == (15, 32, 32, 3) and ds.x_test.shape == (3, 32, 32, 3)
    assert ds.x_train.dtype == np.uint8 and ds.pixel_scale == pytest.approx(1 / 255)
    raw = np.fromfile(tmp_path / "data_batch_1.bin", np.uint8).reshape(3, 3073)
    np.testing.assert_array_equal(ds.x_train[0, :, :, 1], raw[0, 1 + 1024 : 1 + 2048].reshape(32, 32))
    assert ds.y_train[0] == raw[0, 0]


def test_cifar10_incomplete_folder_lists_the_expected_files(tmp_path):
    write_cifar_binary(tmp_path)
    (tmp_path / "data_batch_3.bin").unlink()
    with pytest.raises(UsageError, match=r"no complete CIFAR-10 release.*data_batch_3\.bin.*test_batch"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("release", ["binary", "python"])
def test_missing_cifar10_says_where_to_download_it_and_unpacking_as_told_makes_it_load(tmp_path, release):
    data_dir = tmp_path / "cifar"
    with pytest.raises(UsageError) as error:
        load_cifar10(data_dir)
    message = str(error.value)
    assert "\n" not in message
    for part in ("https://www.cs.toronto.edu/~kriz/cifar.html", '"CIFAR-10 binary version"',
                 '"CIFAR-10 python version"', f"tar xzf <archive> -C {data_dir}"):
        assert part in message
    # Do what the message says the archive gives, with stand-in records, and the folder loads.
    folder = re.search(rf"the {release} one (?:gives )?(\S+)/data_batch_1", message).group(1)
    os.makedirs(folder)
    if release == "binary":
        write_cifar_binary(Path(folder))
    else:
        assert f"{folder}/data_batch_1 ... data_batch_5, test_batch" in message
        for name in CIFAR_PYTHON_FILES:
            batch = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [3]}
            (Path(folder) / name).write_bytes(pickle.dumps(batch))
    assert load_cifar10(data_dir).y_test.shape == ((3,) if release == "binary" else (1,))


def test_cifar10_truncated_binary_file_is_refused(tmp_path):
    write_cifar_binary(tmp_path)
    with open(tmp_path / "test_batch.bin", "ab") as f:
        f.write(b"\x00" * 10)
    with pytest.raises(UsageError, match="not a whole number of CIFAR-10 records"):
        load_cifar10(tmp_path)


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar10_python_release_goes_through_the_restricted_unpickler(tmp_path, protocol):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in CIFAR_PYTHON_FILES:
        batch = {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [1, 7],
                 b"batch_label": b"x", b"filenames": [b"a.png", b"b.png"]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    ds = load_cifar10(tmp_path)
    assert ds.x_train.shape == (10, 32, 32, 3) and ds.y_test.tolist() == [1, 7]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_malicious_pickle_is_refused_not_run(tmp_path):
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit()).replace(b"touch pwned", f"touch {marker}".encode())
    with pytest.raises(pickle.UnpicklingError, match="refusing to load global"):
        restricted_unpickle(payload)
    folder = tmp_path / "cifar"
    folder.mkdir()
    for name in CIFAR_PYTHON_FILES:
        (folder / name).write_bytes(payload)
    with pytest.raises(UsageError, match="not a readable CIFAR-10 python batch"):
        load_cifar10(folder)
    assert not marker.exists()


def test_npz_with_x_and_y_gets_a_fixed_split_and_needs_no_pickle(tmp_path):
    x = np.random.default_rng(0).random((10, 16, 16, 2), dtype=np.float32)
    y = np.arange(10) % 3
    np.savez(tmp_path / "mine.npz", x=x, y=y)
    ds = load_npz(tmp_path)  # the single .npz inside the folder
    assert len(ds.y_train) == 8 and len(ds.y_test) == 2 and ds.num_classes == 3
    assert ds.image_shape == (16, 16, 2)
    np.savez(tmp_path / "objects.npz", x=np.array([object()] * 2, dtype=object), y=y[:2])
    with pytest.raises(UsageError, match=r"not a readable \.npz file without pickles"):
        load_npz(tmp_path / "objects.npz")
    with pytest.raises(UsageError, match=r"expected exactly one \.npz file"):
        load_npz(tmp_path)


def test_npz_without_y_names_the_expected_arrays(tmp_path):
    np.savez(tmp_path / "d.npz", images=np.zeros((2, 16, 16, 1)))
    with pytest.raises(UsageError, match=r"missing array\(s\) \['x', 'y'\].*found \['images'\]"):
        load_npz(tmp_path / "d.npz")


@pytest.mark.parametrize(("x", "y", "message"), [
    (np.zeros((2, 16, 16)), np.zeros(2, int), r"expected images of shape \(N, H, W, C\)"),
    (np.zeros((2, 16, 16, 1)), np.zeros(3, int), "2 images but 3 labels"),
    (np.zeros((0, 16, 16, 1)), np.zeros(0, int), "the dataset is empty"),
    (np.full((1, 16, 16, 1), np.nan), np.zeros(1, int), "NaN or Inf"),
    (np.zeros((1, 16, 16, 1)), np.zeros(1), "expected integer class labels, got dtype float64"),
    (np.zeros((1, 16, 16, 1)), np.array([10]), r"labels must be in \[0, 10\)"),
    (np.zeros((1, 8, 8, 1)), np.zeros(1, int), "at least 16x16"),
])
def test_bad_arrays_get_a_message_saying_what_was_expected(x, y, message):
    with pytest.raises(UsageError, match=message):
        validate_split(x, y, "data", num_classes=10)


def test_synthetic_data_is_seeded_and_has_the_requested_shape():
    config = TrainConfig(dataset="synthetic", synthetic_shape=(10, 17, 19, 3), seed=5)
    a, b = load_dataset(config), load_dataset(config)
    assert a.x_train.shape == (10, 17, 19, 3) and a.x_test.shape == (2, 17, 19, 3)
    np.testing.assert_array_equal(a.x_train, b.x_train)
    other = load_dataset(TrainConfig(dataset="synthetic", synthetic_shape=(10, 17, 19, 3), seed=6))
    assert not np.array_equal(a.x_train, other.x_train)


def test_synthetic_labels_are_balanced_and_the_class_means_of_the_training_images_predict_the_test_ones():
    ds = load_dataset(TrainConfig(dataset="synthetic", synthetic_shape=(200, 16, 16, 1)))
    assert np.bincount(np.concatenate([ds.y_train, ds.y_test])).tolist() == [24] * 10  # chance is 1/10
    # The labels are a function of the images: nearest class mean, no model, no training.
    means = np.stack([ds.x_train[ds.y_train == k].mean(axis=0) for k in range(10)])  # (10, 16, 16, 1)
    distances = ((ds.x_test[:, None] - means[None]) ** 2).sum(axis=(2, 3, 4))  # (40, 10)
    assert np.mean(distances.argmin(axis=1) == ds.y_test) > 0.9


def test_parser_defaults_and_frozen_config_round_trip():
    config = parse_config([], prog="p", framework="jax")
    assert (config.dataset, config.optimizer, config.penalty_weight, config.penalty_layers) == (
        "digits", "sgd", 10.0, None)
    assert config.workdir == "runs/jax_digits_cnn"
    with pytest.raises(AttributeError):
        config.lr = 1.0  # frozen
    custom = parse_config(["--penalty-layers", "relu2", "--synthetic-shape", "4x16x16x1"], "p", "torch")
    assert custom.penalty_layers == ("relu2",) and custom.synthetic_shape == (4, 16, 16, 1)
    assert TrainConfig.from_json(json.loads(json.dumps(custom.to_json()))) == custom


@pytest.mark.parametrize(("changes", "message"), [
    ({"epochs": 1, "steps": 2}, "give --epochs or --steps, not both"),
    ({"batch_size": 0}, "--batch-size must be >= 1"),
    ({"penalty_weight": float("inf")}, "--penalty-weight must be a finite number >= 0"),
    ({"penalty_layers": ("relu1", "relu1")}, "duplicates"),
    ({"dataset": "npz"}, "--dataset npz needs --data-dir"),
])
def test_validate_config_names_the_bad_flag(changes, message):
    with pytest.raises(UsageError, match=message):
        validate_config(TrainConfig(**changes), ("relu1", "relu2"))


def test_metrics_log_drops_records_newer_than_the_resumed_checkpoint(tmp_path):
    log = MetricsLog(tmp_path, resume_step=0)
    for step in range(1, 6):
        log.write({"step": step, "split": "train"})
    log.close()
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "spl')  # torn last line of a killed run
    MetricsLog(tmp_path, resume_step=3).close()
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3]


def test_plot_cli_writes_three_pngs_and_rejects_a_folder_without_metrics(tmp_path, capsys):
    with open(tmp_path / "metrics.jsonl", "w") as f:
        for step in range(1, 5):
            f.write(json.dumps({"step": step, "split": "train", "loss": 2.0 / step, "total": 2.1 / step,
                                "penalty": 0.01 / step, "accuracy": 0.2 * step,
                                "act_grad_norm/relu1": 0.1, "act_grad_norm/relu2": 0.2}) + "\n")
        f.write(json.dumps({"step": 4, "split": "eval", "eval_loss": 0.6, "eval_accuracy": 0.7}) + "\n")
    assert plot_main([str(tmp_path)]) == 0
    for name in ("loss.png", "grad_norms.png", "accuracy.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_main([str(tmp_path / "missing")]) == 2
    assert "expected the metrics.jsonl of a training run" in capsys.readouterr().err


def test_workdir_that_is_a_file_is_a_usage_error(tmp_path):
    from agp_common.runlog import prepare_workdir

    (tmp_path / "file").write_text("x")
    with pytest.raises(UsageError, match="is a file; expected a folder"):
        prepare_workdir(tmp_path / "file")


def test_loop_stops_at_the_first_non_finite_loss_before_saving_it(tmp_path):
    from agp_common.errors import NonFiniteError
    from agp_common.loop import run_loop

    config = TrainConfig(dataset="synthetic", batch_size=2, steps=4, checkpoint_every=1, quiet=True)
    losses = iter([1.0, float("nan"), 0.5, 0.4])
    saved = []

    def step(indices):
        return {"loss": next(losses), "penalty": 0.0, "total": 0.0, "grad_norm": 1.0, "accuracy": 0.5}

    with pytest.raises(NonFiniteError, match="step 2: loss is nan"):
        run_loop(config, tmp_path, BatchOrder(0, 8, 2), 0, 4, train_step=step,
                 evaluate=lambda: {"eval_loss": 0.0, "eval_accuracy": 1.0}, save=saved.append)
    assert saved == [1]
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1]
