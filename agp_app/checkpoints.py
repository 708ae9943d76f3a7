"""What both trainers say about their checkpoints: one wording for JAX's orbax folders and PyTorch's files.

The frameworks store checkpoints their own way (``agp_app.jax_train.checkpoints``,
``agp_app.torch_train.checkpoints``); the checks around them and their messages are the same,
so they live here once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from agp_app.errors import NonFiniteError, UsageError

#: The run folder's sub-folder holding the checkpoints, in both frameworks.
CHECKPOINT_DIR = "checkpoints"


def first_line(error: BaseException, limit: int = 300) -> str:
    """``Type: first line of the message`` (orbax, tensorstore and torch messages run over many lines)."""
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0] if lines else ''}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def restore_advice(steps: Sequence[int]) -> str:
    """What to do about a newest checkpoint that cannot be used, given the ``steps`` saved."""
    return (f"move it away to resume from the one before (steps saved: {list(steps)}), "
            "or use another --workdir")


def unreadable(where: str, error: BaseException, steps: Sequence[int]) -> UsageError:
    """``UsageError``: the checkpoint ``where`` could not be read back at all."""
    return UsageError(f"{where}: unreadable, corrupt or truncated ({first_line(error)}); "
                      f"{restore_advice(steps)}")


def does_not_fit(where: str, error: BaseException, steps: Sequence[int]) -> UsageError:
    """``UsageError``: the checkpoint ``where`` was read but does not fit this model's state."""
    return UsageError(f"{where}: does not fit this model's state, corrupt or from another model "
                      f"({first_line(error)}); {restore_advice(steps)}")


def diverged(step: int, newest: int | None) -> NonFiniteError:
    """``NonFiniteError``: the state of ``step`` holds NaN/Inf, so it is not saved (``newest`` is kept)."""
    return NonFiniteError(f"step {step}: the parameters or optimizer state are NaN/Inf after the update; "
                          f"not saved (the newest checkpoint, step {newest}, is intact); "
                          "try a smaller --lr or --penalty-weight")


#: Key of the state's digest in the record saved with every checkpoint (both frameworks).
DIGEST_KEY = "state_digest"


def arrays_digest(arrays: Iterable[tuple[str, np.ndarray]]) -> str:
    """``sha256:<hex>`` of named arrays: each name, dtype, shape and bytes, in the order given.

    Saved with every checkpoint and recomputed from what is read back, so a checkpoint damaged
    on disk (a flipped bit that the file format does not notice) is refused instead of trained on.
    """
    h = hashlib.sha256()
    for name, array in arrays:
        array = np.ascontiguousarray(array)
        h.update(f"{name}|{array.dtype.str}|{array.shape}|".encode())
        h.update(array.tobytes())
    return "sha256:" + h.hexdigest()


def check_digest(where: str, saved: dict[str, Any], actual: str, steps: Sequence[int]) -> None:
    """``UsageError`` when the digest saved with a checkpoint differs from that of the arrays read back.

    Checkpoints written before digests existed have none and are not checked.
    """
    expected = saved.get(DIGEST_KEY) if isinstance(saved, dict) else None
    if expected is not None and expected != actual:
        raise UsageError(f"{where}: damaged, its arrays do not match the digest saved with them "
                         f"({expected[:19]}... saved, {actual[:19]}... read); {restore_advice(steps)}")
