"""Driver of the kill tests: runs a trainer's ``main(argv)`` in this process, paused at one chosen point.

    python tests/kill_driver.py <module> <pause> [argv ...]

``<module>`` is ``jax_impl.train`` or ``torch_ref.train``; ``<pause>`` is

* ``record:<split>:<step>``: just after metrics.jsonl received the ``<split>``
  (``train`` or ``eval``) record of ``<step>``, before that step's checkpoint
  (JAX writes a train record when it fetches the metrics, which may be a few
  steps later);
* ``before_step:<step>``: when the loop asks for the batch of ``<step>``
  (1-based), before that step runs;
* ``in_save:<step>``: inside the write of checkpoint ``<step>``: JAX after orbax
  wrote its temporary folder and before the rename, PyTorch after the temporary
  file is written and before the rename.

There the process prints ``PAUSED <pause>`` on stderr and waits (up to
``WAIT_S``) until SIGTERM or SIGINT reaches the run's ``GracefulStop``, or
SIGKILL ends it. The trainers have no test hook: this driver wraps their
functions from outside, in the child process, then calls the real ``main``.
"""

from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

import agp_app.loop
from agp_app.batching import BatchOrder
from agp_app.runlog import MetricsLog

WAIT_S = 120.0
#: Every ``GracefulStop`` the loop entered, so that a pause ends when a stop is requested.
stops: list[agp_app.loop.GracefulStop] = []


class RecordingStop(agp_app.loop.GracefulStop):
    """The loop's ``GracefulStop``, remembered in ``stops``."""

    def __enter__(self):
        stops.append(self)
        return super().__enter__()


def pause(where: str) -> None:
    print(f"PAUSED {where}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline and not any(stop.requested for stop in stops):
        time.sleep(0.01)


def pause_after_record(where: str, split: str, step: int) -> None:
    write = MetricsLog.write

    def write_then_pause(self, record):
        write(self, record)
        if record["split"] == split and record["step"] == step:
            pause(where)

    MetricsLog.write = write_then_pause


def pause_before_step(where: str, step: int) -> None:
    indices = BatchOrder.indices

    def pause_then_indices(self, step0):
        if step0 + 1 == step:
            pause(where)
        return indices(self, step0)

    BatchOrder.indices = pause_then_indices


def pause_in_jax_save(where: str, step: int) -> None:
    import orbax.checkpoint as ocp

    handler = ocp.CompositeCheckpointHandler
    finalize = handler.finalize

    def pause_then_finalize(self, directory):
        # ``directory``: the temporary folder ``<step>.orbax-checkpoint-tmp-<n>``, renamed after this.
        if Path(directory).name.split(".")[0] == str(step):
            pause(where)
        return finalize(self, directory)

    handler.finalize = pause_then_finalize


def pause_in_torch_save(where: str, step: int) -> None:
    import agp_app.torch_train.checkpoints as checkpoints

    atomic_write = checkpoints.atomic_write

    def atomic_write_pausing(path, write, **kwargs):
        def write_then_pause(f):
            write(f)
            f.flush()  # the temporary file is complete on disk, not yet renamed
            match = checkpoints.CHECKPOINT_PATTERN.fullmatch(Path(path).name)
            if match and int(match.group(1)) == step:
                pause(where)

        return atomic_write(path, write_then_pause, **kwargs)

    checkpoints.atomic_write = atomic_write_pausing


def main() -> int:
    module, where, *argv = sys.argv[1:]
    agp_app.loop.GracefulStop = RecordingStop
    kind, *args = where.split(":")
    if kind == "record":
        pause_after_record(where, args[0], int(args[1]))
    elif kind == "before_step":
        pause_before_step(where, int(args[0]))
    elif kind == "in_save" and module == "jax_impl.train":
        pause_in_jax_save(where, int(args[0]))
    elif kind == "in_save" and module == "torch_ref.train":
        pause_in_torch_save(where, int(args[0]))
    else:
        raise SystemExit(f"kill_driver: unknown pause {where!r} for {module}")
    return importlib.import_module(module).main(argv)


if __name__ == "__main__":
    sys.exit(main())
