"""The JAX trainer: what ``jax_impl`` supplies to the shared skeleton (``agp_app.trainer``).

One job per module, as in Flax's examples/imagenet:

* ``state``: ``TrainState`` (with the model's ``batch_stats``), ``Hyperparams``, ``make_optimizer``
  (``agp_app.jax_recipe.named_optimizer``), ``init_params``, ``init_variables`` (``--init``);
* ``steps``: the pure ``train_step``, ``eval_step``, ``attack_eval_step``;
* ``mesh``: the 1-D ``"data"`` mesh, its shardings, ``put_batch``;
* ``feeding``: each step's batch onto the devices, gathered there from a kept copy or put from the host;
* ``dispatch``: ``--steps-per-dispatch``, several steps per compiled call (``steps.train_chunk``);
* ``compile``: the steps compiled once per process and key (``compiled_steps``);
* ``evaluation``: test loss and accuracy, accuracy under attack;
* ``checkpoints``: orbax save and restore;
* ``cpu_devices``, ``distributed``: the process's JAX set-up (``--cpu-devices``, multi-host);
* ``trainer``: ``JaxTrainer`` and ``train_and_evaluate``; ``main``: the CLI.

``python -m jax_impl.train`` runs ``main``.
"""

from agp_app.jax_train.checkpoints import (
    FRAMEWORK,
    all_finite,
    checkpoint_manager,
    restore_checkpoint,
    save_checkpoint,
)
from agp_app.jax_train.compile import (
    compiled_attack_eval,
    compiled_steps,
    compiled_train_chunk,
    make_eval_step,
    make_train_chunk,
    make_train_step,
)
from agp_app.jax_train.cpu_devices import (
    EXAMPLES_PER_CPU_DEVICE,
    FORCE_DEVICE_COUNT_FLAG,
    auto_cpu_devices,
    choose_cpu_devices,
    configure_cpu_devices,
    usable_cores,
)
from agp_app.jax_train.dispatch import (
    ACCELERATOR_STEPS_PER_DISPATCH,
    AUTO_STEPS_PER_DISPATCH,
    ChunkStep,
    fetch_metrics,
    resolve_steps_per_dispatch,
)
from agp_app.jax_train.distributed import distributed_launch, maybe_initialize_distributed
from agp_app.jax_train.evaluation import evaluate, evaluate_attacks
from agp_app.jax_train.feeding import FEEDS, DeviceFeeder, HostFeeder, choose_feed, make_feeder
from agp_app.jax_train.main import main
from agp_app.jax_train.mesh import (
    DATA_AXIS,
    batch_sharded,
    check_batch_size,
    data_mesh,
    put_batch,
    replicated,
)
from agp_app.jax_train.state import (
    Hyperparams,
    Params,
    TrainState,
    create_train_state,
    hyperparams,
    init_params,
    init_variables,
    make_optimizer,
)
from agp_app.jax_train.steps import attack_eval_step, eval_step, train_chunk, train_step, variables_of
from agp_app.jax_train.trainer import METRICS_EVERY, JaxTrainer, train_and_evaluate
from agp_app.trainer import TrainResult

__all__ = [
    "ACCELERATOR_STEPS_PER_DISPATCH",
    "AUTO_STEPS_PER_DISPATCH",
    "DATA_AXIS",
    "EXAMPLES_PER_CPU_DEVICE",
    "FEEDS",
    "FORCE_DEVICE_COUNT_FLAG",
    "FRAMEWORK",
    "METRICS_EVERY",
    "ChunkStep",
    "DeviceFeeder",
    "HostFeeder",
    "Hyperparams",
    "JaxTrainer",
    "Params",
    "TrainResult",
    "TrainState",
    "all_finite",
    "attack_eval_step",
    "auto_cpu_devices",
    "batch_sharded",
    "check_batch_size",
    "checkpoint_manager",
    "choose_cpu_devices",
    "choose_feed",
    "compiled_attack_eval",
    "compiled_steps",
    "compiled_train_chunk",
    "configure_cpu_devices",
    "create_train_state",
    "data_mesh",
    "distributed_launch",
    "eval_step",
    "evaluate",
    "evaluate_attacks",
    "fetch_metrics",
    "hyperparams",
    "init_params",
    "init_variables",
    "main",
    "make_eval_step",
    "make_feeder",
    "make_optimizer",
    "make_train_chunk",
    "make_train_step",
    "maybe_initialize_distributed",
    "put_batch",
    "replicated",
    "resolve_steps_per_dispatch",
    "restore_checkpoint",
    "save_checkpoint",
    "train_and_evaluate",
    "train_chunk",
    "train_step",
    "usable_cores",
    "variables_of",
]
