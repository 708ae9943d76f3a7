"""The PyTorch trainer: what ``torch_ref`` supplies to the shared skeleton (``agp_app.trainer``).

* ``trainer``: ``make_optimizer``, ``build_model``, ``TorchTrainer``, ``train_and_evaluate``;
* ``evaluation``: test loss and accuracy, accuracy under attack (NHWC data -> NCHW tensors);
* ``checkpoints``: ``step_<step>.pt`` files, saved atomically, loaded with ``weights_only=True``;
* ``main``: the CLI (``python -m torch_ref.train``). Never imports JAX.
"""

from agp_app.torch_train.checkpoints import (
    CHECKPOINT_PATTERN,
    FRAMEWORK,
    checkpoint_path,
    checkpoint_steps,
    restore_checkpoint,
    save_checkpoint,
)
from agp_app.torch_train.evaluation import evaluate, evaluate_attacks, to_nchw
from agp_app.torch_train.main import main
from agp_app.torch_train.trainer import (
    TORCH_DTYPES,
    TorchTrainer,
    build_model,
    make_optimizer,
    train_and_evaluate,
)
from agp_app.trainer import TrainResult

__all__ = [
    "CHECKPOINT_PATTERN",
    "FRAMEWORK",
    "TORCH_DTYPES",
    "TorchTrainer",
    "TrainResult",
    "build_model",
    "checkpoint_path",
    "checkpoint_steps",
    "evaluate",
    "evaluate_attacks",
    "main",
    "make_optimizer",
    "restore_checkpoint",
    "save_checkpoint",
    "to_nchw",
    "train_and_evaluate",
]
