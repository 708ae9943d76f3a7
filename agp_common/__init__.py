"""Framework-free pieces shared by ``jax_impl.train`` and ``torch_ref.train`` (NumPy only).

Datasets, the seeded batch order, the flag parser and frozen config, the run
folder (config.json, metrics.jsonl, progress, TensorBoard) and the plots. This
package imports neither JAX nor PyTorch, so ``torch_ref`` can use it.
"""

from agp_common.batching import (
    BatchOrder,
    epoch_permutation,
    eval_batches,
    padded_batch,
    steps_per_epoch,
    take_batch,
)
from agp_common.config import TrainConfig, build_parser, parse_config, total_steps, validate_config
from agp_common.data import Dataset, load_dataset, restricted_unpickle, validate_dataset
from agp_common.errors import (
    EXIT_NON_FINITE,
    EXIT_USAGE,
    Interrupted,
    ModelInputError,
    NonFiniteError,
    UsageError,
)
from agp_common.penalty_spec import PenaltyOptions

__all__ = [
    "EXIT_NON_FINITE",
    "EXIT_USAGE",
    "BatchOrder",
    "Dataset",
    "Interrupted",
    "ModelInputError",
    "NonFiniteError",
    "PenaltyOptions",
    "TrainConfig",
    "UsageError",
    "build_parser",
    "epoch_permutation",
    "eval_batches",
    "load_dataset",
    "padded_batch",
    "parse_config",
    "restricted_unpickle",
    "steps_per_epoch",
    "take_batch",
    "total_steps",
    "validate_config",
    "validate_dataset",
]
