"""Readers of dataset files on disk: the two CIFAR-10 releases and a user's ``.npz``, in NumPy only.

Nothing here unpickles arbitrary objects: CIFAR-10's python release goes
through ``restricted_unpickle`` (plain types and NumPy arrays only) and
``.npz`` files are read with ``allow_pickle=False``. A file that is truncated,
damaged or claims more memory than the machine has is a ``UsageError`` naming it.
"""

from __future__ import annotations

import io
import pickle
import zipfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from agp_app.dataset import Dataset, fixed_split, physical_memory, validate_split
from agp_app.errors import UsageError

CIFAR_BINARY_FILES = (*(f"data_batch_{i}.bin" for i in range(1, 6)), "test_batch.bin")
CIFAR_PYTHON_FILES = (*(f"data_batch_{i}" for i in range(1, 6)), "test_batch")
CIFAR_RECORD_BYTES = 1 + 3 * 32 * 32  # label byte + CHW pixels


def _read_cifar_binary(path: Path) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % CIFAR_RECORD_BYTES:
        raise UsageError(f"{path}: {raw.size} bytes is not a whole number of CIFAR-10 records of "
                         f"{CIFAR_RECORD_BYTES} bytes; the file is truncated or not CIFAR-10")
    records = raw.reshape(-1, CIFAR_RECORD_BYTES)
    x = records[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW -> (N, 32, 32, 3)
    return np.ascontiguousarray(x), records[:, 0].astype(np.int32)


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only what NumPy arrays need; any other global (os.system, ...) is refused."""

    ALLOWED = frozenset({
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),  # protocol 5 arrays
        ("_codecs", "encode"),  # how Python 3 writes bytes in protocol 2: codecs.encode(str, "latin1")
    })

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}: only arrays and plain types")


def restricted_unpickle(data: bytes) -> Any:
    """Unpickle plain types (dict, list, str, bytes, numbers) and NumPy arrays, nothing else.

    Object arrays are refused as well, since their items could be anything.
    """
    obj = _RestrictedUnpickler(io.BytesIO(data), encoding="bytes").load()

    def check(value: Any) -> None:
        if isinstance(value, np.ndarray) and value.dtype == object:
            raise pickle.UnpicklingError("refusing an object array: only numeric arrays are allowed")
        if isinstance(value, dict):
            for v in value.values():
                check(v)
        elif isinstance(value, list | tuple):
            for v in value:
                check(v)

    check(obj)
    return obj


def _read_cifar_python(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = restricted_unpickle(path.read_bytes())
        data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError) as e:
        raise UsageError(f"{path}: not a readable CIFAR-10 python batch ({e})") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UsageError(f"{path}: expected uint8 data of shape (N, 3072), got {data.dtype} {data.shape}")
    x = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # CHW -> (N, 32, 32, 3)
    return np.ascontiguousarray(x), labels.astype(np.int32)


CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
#: The subfolders the two official archives unpack into, also searched below --data-dir.
CIFAR_SUBFOLDERS = ("cifar-10-batches-bin", "cifar-10-batches-py")


def find_cifar_folder(data_dir: str | Path) -> tuple[Path, str]:
    """The folder holding a complete CIFAR-10 release under ``data_dir``, and which release it is.

    Searched: ``data_dir`` itself, then its ``cifar-10-batches-bin`` and ``cifar-10-batches-py``
    subfolders; in each, the binary release (``data_batch_1.bin`` ... ``data_batch_5.bin``,
    ``test_batch.bin``) or the python one (``data_batch_1`` ... ``data_batch_5``, ``test_batch``).
    Otherwise a ``UsageError`` that says where to download CIFAR-10 and how to unpack it, and which
    files a partly filled folder lacks.
    """
    root = Path(data_dir)
    candidates = [root, *(root / sub for sub in CIFAR_SUBFOLDERS)]
    partial = []  # (files present, folder, release, missing files)
    for folder in candidates:
        for kind, files in (("binary", CIFAR_BINARY_FILES), ("python", CIFAR_PYTHON_FILES)):
            missing = [f for f in files if not (folder / f).is_file()]
            if not missing:
                return folder, kind
            if len(missing) < len(files):
                partial.append((len(files) - len(missing), str(folder), kind, missing))
    found = ""
    if partial:
        _, folder, kind, missing = max(partial)
        found = f"; {folder} holds part of the {kind} release but lacks {', '.join(missing)}"
    binary, python = (root / sub for sub in CIFAR_SUBFOLDERS)
    raise UsageError(
        f"--data-dir {root}: no complete CIFAR-10 release found (looked in "
        f"{', '.join(str(c) for c in candidates)}{found}); download the \"CIFAR-10 binary version\" "
        f"(cifar-10-binary.tar.gz) or \"CIFAR-10 python version\" (cifar-10-python.tar.gz) from {CIFAR_URL} "
        f"and unpack it with 'tar xzf <archive> -C {root}': the binary one gives {binary}/"
        f"{CIFAR_BINARY_FILES[0]} ... {CIFAR_BINARY_FILES[-2]}, {CIFAR_BINARY_FILES[-1]}; the python one "
        f"{python}/{CIFAR_PYTHON_FILES[0]} ... {CIFAR_PYTHON_FILES[-2]}, {CIFAR_PYTHON_FILES[-1]}"
    )


def load_cifar10(data_dir: str | Path) -> Dataset:
    """The official CIFAR-10 release (binary or python) from ``data_dir``: 50,000 / 10,000 uint8 images."""
    folder, kind = find_cifar_folder(data_dir)
    read = _read_cifar_binary if kind == "binary" else _read_cifar_python
    files = CIFAR_BINARY_FILES if kind == "binary" else CIFAR_PYTHON_FILES
    parts = [read(folder / f) for f in files]
    x_train = np.concatenate([p[0] for p in parts[:-1]])
    y_train = np.concatenate([p[1] for p in parts[:-1]])
    return Dataset("cifar10", x_train, y_train, *parts[-1], num_classes=10, pixel_scale=1 / 255,
                   value_range=(0.0, 1.0))


def find_npz_file(data_dir: str | Path) -> Path:
    """``data_dir`` itself if it is a file, else the single ``.npz`` inside the folder."""
    if not str(data_dir).strip():
        raise UsageError("--data-dir is empty; expected an .npz file or a folder holding one")
    path = Path(data_dir)
    if path.is_file():
        return path
    if path.exists() and not path.is_dir():  # a FIFO would block the read, a device never end it
        raise UsageError(f"--data-dir {path}: not a regular file (a FIFO, device or socket); expected an "
                         ".npz file or a folder holding one")
    if not path.is_dir():
        raise UsageError(f"--data-dir {path}: no such file or folder; expected an .npz file or a folder "
                         "holding one")
    found = sorted(path.glob("*.npz"))
    if len(found) != 1:
        raise UsageError(f"--data-dir {path}: expected exactly one .npz file in the folder, found "
                         f"{[p.name for p in found]}")
    return found[0]


def npz_claimed_bytes(npz: np.lib.npyio.NpzFile) -> int:
    """Bytes the arrays of ``npz`` claim in their ``.npy`` headers (shape x item size), read
    without loading any array: a header may claim terabytes in a file of a few hundred bytes,
    and ``np.load`` would try to allocate them. ``ValueError`` for a header that is not one."""
    total = 0
    for name in npz.zip.namelist():
        with npz.zip.open(name) as member:
            try:
                version = np.lib.format.read_magic(member)
            except ValueError:  # not an .npy member: np.load hands it over as its bytes
                total += npz.zip.getinfo(name).file_size
                continue
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape, _, dtype = read_header(member)
        total += int(np.prod(shape, dtype=object)) * dtype.itemsize
    return total


def check_npz_fits(path: Path, claimed: int) -> None:
    """``UsageError`` before loading when the arrays of ``path`` claim more bytes than the memory."""
    total = physical_memory()
    if total is not None and claimed > total:
        raise UsageError(f"{path}: its arrays' headers declare {claimed / 2**30:.3g} GiB, more than this "
                         f"machine's {total / 2**30:.3g} GiB of memory; expected an .npz whose arrays fit "
                         "in memory (the file may be damaged)")


def load_npz(data_dir: str | Path, num_classes: int | None = None) -> Dataset:
    """A user's ``x`` (N, H, W, C) and ``y`` (N,) from an .npz file (no pickles).

    Optional ``x_test``/``y_test`` give the test split; otherwise a fixed seeded
    20% of the examples is held out. Pixels are used as stored (cast to float).
    ``num_classes``: every label must be in ``[0, num_classes)``; ``None``: it is
    inferred as ``max(y) + 1`` (at least 2), and a label of ``MAX_CLASSES`` or more is refused.
    """
    path = find_npz_file(data_dir)
    try:
        # Our own handle: np.load leaks its file when the zip is truncated.
        with open(path, "rb") as handle:
            f = np.load(handle, allow_pickle=False)
            if not isinstance(f, np.lib.npyio.NpzFile):  # a plain .npy array
                raise UsageError(f"{path}: a single .npy array, not an .npz archive; expected an .npz "
                                 "holding 'x' (N, H, W, C) and 'y' (N,), as np.savez(path, x=x, y=y) writes")
            with f:
                check_npz_fits(path, npz_claimed_bytes(f))
                arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as e:  # truncated, corrupt, pickle
        raise UsageError(f"{path}: not a readable .npz file without pickles ({type(e).__name__}: {e})"
                         ) from None
    missing = [k for k in ("x", "y") if k not in arrays]
    if missing:
        raise UsageError(f"{path}: missing array(s) {missing}; expected 'x' (N, H, W, C) and 'y' (N,), "
                         f"found {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    validate_split(x, y, f"{path} (x, y)", num_classes)
    if ("x_test" in arrays) != ("y_test" in arrays):
        raise UsageError(f"{path}: give both 'x_test' and 'y_test' or neither")
    if "x_test" in arrays:
        x_test, y_test = arrays["x_test"], arrays["y_test"]
        validate_split(x_test, y_test, f"{path} (x_test, y_test)", num_classes)
        x_train, y_train = x, y
    else:
        if len(y) < 2:
            raise UsageError(f"{path}: need at least 2 examples to hold out a test split, got {len(y)}")
        train, test = fixed_split(len(y))
        x_train, y_train, x_test, y_test = x[train], y[train], x[test], y[test]
    if num_classes is None:
        num_classes = max(int(max(y_train.max(), y_test.max())) + 1, 2)
    return Dataset("npz", x_train, y_train.astype(np.int32), x_test, y_test.astype(np.int32),
                   num_classes=num_classes)
