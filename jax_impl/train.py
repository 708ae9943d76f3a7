"""``python -m jax_impl.train``: train the seed CNN with the activation gradient penalty.

The entry point only: ``main(argv)`` parses the flags and calls ``train_and_evaluate(config,
workdir)``. The training code is an application on top of the library: the JAX trainer in
``agp_app.jax_train`` (state, steps, mesh, compilation, evaluation, orbax checkpoints, device
set-up), plugged into the skeleton both frameworks share (``agp_app.trainer``: validation, data,
run folder, resume, loop, summary). ``import jax_impl`` does not import this module. The names
below are re-exported so that ``jax_impl.train.train_and_evaluate`` and the like keep working.

The run folder (``--workdir``) holds config.json, metrics.jsonl, orbax checkpoints
(``checkpoints/<step>/``, atomic, the newest ``--keep-checkpoints`` kept, each with the config),
PNG plots and, with ``--tensorboard``, event files. Running the same command again resumes from
the newest checkpoint.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before the heavy imports below: a Ctrl-C during them is one line
    from agp_app.launch import run

    sys.exit(run("agp_app.jax_train"))

from agp_app.config import TrainConfig, total_steps, validate_config
from agp_app.flags import parse_config
from agp_app.jax_train import *  # noqa: F403
from agp_app.jax_train import __all__ as _trainer_names
from jax_impl.model import CAPTURE_NAMES, Net

__all__ = [*_trainer_names, "CAPTURE_NAMES", "Net", "TrainConfig", "parse_config", "total_steps",
           "validate_config"]
