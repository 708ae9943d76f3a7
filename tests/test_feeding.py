"""agp_app.jax_train.feeding: batches gathered on the device are those of padded_batch, bit for bit.

The reference is the host path (``padded_batch`` in NumPy, then ``put_batch``), the code the
trainer ran before batches were gathered on the device. All comparisons are exact: the gather only
copies rows (and zeroes the padding), so nothing may differ by even one ulp.
"""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

from agp_app import trainer as skeleton
from agp_app.augment import augment_batch
from agp_app.batching import BatchOrder, padded_batch
from agp_app.config import TrainConfig
from agp_app.data import Dataset, load_synthetic
from agp_app.jax_train import feeding
from agp_app.jax_train.feeding import DeviceFeeder, HostFeeder, augment_transform, choose_feed, make_feeder
from agp_app.jax_train.mesh import data_mesh
from agp_app.jax_train.trainer import JaxTrainer

# 20 examples in batches of 8: steps of 8, 8 and 4 examples per epoch (the last one padded).
N, B = 20, 8
TIMING_KEYS = ("step_time_s", "examples_per_s")


def uint8_dataset() -> Dataset:
    """Byte images with a pixel scale (as CIFAR-10 is stored): the conversion happens in the feeder."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(N + 4, 6, 6, 3), dtype=np.uint8)
    y = (np.arange(N + 4) % 10).astype(np.int64)
    return Dataset("bytes", x[:N], y[:N], x[N:], y[N:], num_classes=10, pixel_scale=1 / 255)


def host(batch) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in jax.device_get(batch).items()}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("make_ds", [uint8_dataset, lambda: load_synthetic((N, 5, 5, 1), seed=1)],
                         ids=["uint8-scaled", "float32"])
def test_device_gathered_batches_equal_padded_batch_bit_for_bit_partial_batch_included(make_ds, dtype):
    ds, mesh = make_ds(), data_mesh(jax.devices()[:1])
    with jax.enable_x64(dtype == np.float64):
        device, on_host = DeviceFeeder(ds, B, dtype, mesh), HostFeeder(ds, B, dtype, mesh)
        order = BatchOrder(3, N, B)
        for step in range(2 * order.steps_per_epoch):  # two epochs: two permutations, two partial batches
            indices = order.indices(step)
            got, want = host(device(indices, step)), host(on_host(indices, step))
            reference = padded_batch(ds.x_train, ds.y_train, indices, B, dtype, ds.pixel_scale)
            for key in ("x", "y", "mask"):
                assert got[key].dtype == want[key].dtype == reference[key].dtype, key
                np.testing.assert_array_equal(got[key], want[key], err_msg=key)  # exact: rows are copied
                np.testing.assert_array_equal(got[key], reference[key], err_msg=key)
            if len(indices) < B:
                assert not got["x"][len(indices):].any() and not got["y"][len(indices):].any()


def test_the_augmentation_hook_augments_the_real_rows_for_the_step_and_leaves_the_padding_zero():
    ds, mesh = load_synthetic((N, 6, 6, 1), seed=2), data_mesh(jax.devices()[:1])
    feeder = HostFeeder(ds, B, np.float32, mesh, augment_transform(("crop", "flip"), seed=5))
    indices = BatchOrder(0, N, B).indices(2)  # the partial batch: 4 real rows
    got = host(feeder(indices, 7))
    plain = padded_batch(ds.x_train, ds.y_train, indices, B, np.float32)
    want = augment_batch(plain["x"][:4], seed=5, step=7, ops=("crop", "flip"))
    np.testing.assert_array_equal(got["x"][:4], want)  # exact: the same NumPy code and draws
    assert not got["x"][4:].any()
    assert not np.array_equal(got["x"][:4], plain["x"][:4])  # something was changed


def test_auto_gathers_on_the_device_unless_the_host_transforms_the_batch_or_the_data_is_too_large(
        monkeypatch):
    ds, mesh = load_synthetic((N, 6, 6, 1), seed=0), data_mesh(jax.devices()[:1])
    transform = augment_transform(("flip",), seed=0)
    assert choose_feed("auto", ds, np.float32, mesh, None) == "device"
    assert choose_feed("auto", ds, np.float32, mesh, transform) == "host"
    assert choose_feed("host", ds, np.float32, mesh, None) == "host"
    assert isinstance(make_feeder("auto", ds, B, np.float32, mesh), DeviceFeeder)
    with pytest.raises(ValueError, match=r"feed='device' cannot apply: the batch is transformed on the host"):
        choose_feed("device", ds, np.float32, mesh, transform)
    with pytest.raises(ValueError, match=r"feed must be one of \('auto', 'device', 'host'\), got 'gpu'"):
        choose_feed("gpu", ds, np.float32, mesh, None)
    monkeypatch.setattr(feeding, "DEVICE_DATA_MAX_BYTES", N * 6 * 6 * 4 - 1)  # one byte short
    assert choose_feed("auto", ds, np.float32, mesh, None) == "host"


def test_a_run_fed_on_the_device_writes_the_metrics_of_a_run_fed_from_the_host(tmp_path):
    config = TrainConfig(dataset="synthetic", synthetic_shape=(N, 16, 16, 1), batch_size=B, steps=5,
                         eval_every=3, checkpoint_every=5, quiet=True)
    written = {}
    for feed in ("host", "device"):
        trainer = JaxTrainer(feed=feed)
        skeleton.train_and_evaluate(config, tmp_path / feed, trainer, plots=False)
        assert trainer.feeder.mode == feed
        lines = (tmp_path / feed / "metrics.jsonl").read_text().splitlines()
        written[feed] = [{k: v for k, v in json.loads(line).items() if k not in TIMING_KEYS}
                         for line in lines]
    assert written["device"] == written["host"]  # every number, exactly (step 3 is a padded partial batch)
    assert len(written["host"]) == 5 + 2  # five train records, two evaluations


def test_the_default_trainer_gathers_on_the_device_and_augmentation_moves_it_to_the_host():
    config = TrainConfig(dataset="synthetic", synthetic_shape=(N, 16, 16, 1), batch_size=B, steps=1,
                         quiet=True)
    ds = load_synthetic(config.synthetic_shape)
    for augment, mode in (((), "device"), (("flip",), "host")):
        trainer = JaxTrainer()
        trainer.prepare(dataclasses.replace(config, augment=augment), ds)
        assert trainer.feeder.mode == mode
