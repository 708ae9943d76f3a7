"""The framework-free library layer shared by ``jax_impl`` and ``torch_ref`` (NumPy only).

``PenaltyOptions`` (``agp_common.penalty_spec``), the attack specs (``agp_common.attack_spec``)
and ``ModelInputError``, the error the libraries raise for bad inputs. This package imports
neither JAX nor PyTorch, so both libraries use it.

The training applications' pieces (``TrainConfig`` and the flags, datasets, the batch order, the
CLI errors) live in ``agp_app``; the names below are still importable from here
(``from agp_common import TrainConfig``) but are loaded only when asked for, so ``import
jax_impl`` or ``import torch_ref`` loads no flag, dataset or run-folder code.
"""

from __future__ import annotations

from agp_common.errors import ModelInputError as ModelInputError
from agp_common.errors import PenaltyOptionsError as PenaltyOptionsError
from agp_common.lazy import lazy_exports
from agp_common.penalty_spec import PenaltyOptions as PenaltyOptions

#: Names re-exported from the applications (``agp_app.<module>``), loaded on first use.
_APPLICATION_NAMES = {
    "BatchOrder": "batching",
    "epoch_permutation": "batching",
    "eval_batches": "batching",
    "padded_batch": "batching",
    "steps_per_epoch": "batching",
    "take_batch": "batching",
    "TrainConfig": "config",
    "build_parser": "config",
    "parse_config": "config",
    "total_steps": "config",
    "validate_config": "config",
    "Dataset": "data",
    "load_dataset": "data",
    "restricted_unpickle": "data",
    "validate_dataset": "data",
    "EXIT_NON_FINITE": "errors",
    "EXIT_USAGE": "errors",
    "Interrupted": "errors",
    "NonFiniteError": "errors",
    "UsageError": "errors",
}


__getattr__, __dir__ = lazy_exports(
    __name__, {name: f"agp_app.{module}" for name, module in _APPLICATION_NAMES.items()})


__all__ = sorted(["ModelInputError", "PenaltyOptions", "PenaltyOptionsError", *_APPLICATION_NAMES])
