"""``python -m torch_ref.train``: the same training job in PyTorch, for comparison with ``jax_impl.train``.

The entry point only: ``main(argv)`` parses the flags (the same as ``jax_impl.train``) and calls
``train_and_evaluate(config, workdir)``. The training code is an application on top of the
library: the PyTorch trainer in ``agp_app.torch_train`` (optimizer, evaluation, ``.pt``
checkpoints), plugged into the skeleton both frameworks share (``agp_app.trainer``). ``import
torch_ref`` does not import this module. The names below are re-exported so that
``torch_ref.train.train_and_evaluate`` and the like keep working. This module never imports JAX.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before the heavy imports below: a Ctrl-C during them is one line
    from agp_app.launch import run

    sys.exit(run("agp_app.torch_train"))

from agp_app.config import TrainConfig, total_steps, validate_config
from agp_app.flags import parse_config
from agp_app.torch_train import *  # noqa: F403
from agp_app.torch_train import __all__ as _trainer_names
from torch_ref.model import CAPTURE_NAMES, Net

__all__ = [*_trainer_names, "CAPTURE_NAMES", "Net", "TrainConfig", "parse_config", "total_steps",
           "validate_config"]
