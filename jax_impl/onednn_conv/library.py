"""Building, checking and loading the native oneDNN library (no JAX tracing here).

Two steps, kept apart:

* ``build()`` (``python -m jax_impl.onednn_conv build``, run by scripts/setup.sh):
  compiles ``jax_impl/csrc/onednn_conv.cc`` against JAX's FFI headers and
  oneDNN into the private cache folder, under a file lock and a time limit,
  and stores the library's SHA-256 beside it (``<name>.so.sha256``). A
  library that is missing, damaged (digest mismatch) or stale (another
  source, flags, JAX or oneDNN: another name) is rebuilt; a current one is
  left alone.
* ``verify(path)`` (what loading does first): the file is loaded only if it
  is a regular file in a private folder, its SHA-256 is the one stored at
  build time, it is an ELF file and it names the handler symbols. Nothing is
  ever compiled while loading.

The cache folder: ``$AGP_CACHE_DIR``, else ``$XDG_CACHE_HOME/agp``, else
``~/.cache/agp``; created 0700 and refused when another user owns it or
others may write to it (a planted library must not be loaded).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import site
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import jax

try:
    import fcntl
except ImportError:  # not POSIX (Windows): no oneDNN build either (find_onednn fails first)
    fcntl = None

#: The C++ source of the three FFI handlers, shipped in the package.
SOURCE = Path(__file__).resolve().parent.parent / "csrc" / "onednn_conv.cc"
#: XLA FFI target name -> symbol of the handler in the built library.
FFI_TARGETS = {
    "agp_onednn_conv_forward": "AgpOnednnConvForward",
    "agp_onednn_conv_input_grad": "AgpOnednnConvInputGrad",
    "agp_onednn_conv_kernel_grad": "AgpOnednnConvKernelGrad",
}
#: How to get the backend (named in the fallback messages).
INSTALL_HINT = ("pip install 'activation-gradient-penalty[onednn]' (oneDNN's CPU build), a C++ compiler "
                "(apt-get install g++, or set CXX), then python -m jax_impl.onednn_conv build")
#: How to build it once oneDNN and the compiler are there.
BUILD_HINT = "python -m jax_impl.onednn_conv build"
CXX_FLAGS = ("-O3", "-std=c++17", "-fPIC", "-shared")
#: Seconds the build step waits for the lock and for the compiler (each), unless told otherwise.
BUILD_TIMEOUT_S = 300.0
#: The first bytes of every ELF file.
ELF_MAGIC = b"\x7fELF"


class OneDNNUnavailable(RuntimeError):
    """The oneDNN backend cannot run (or be built) here; the message says why."""


@dataclass(frozen=True)
class OneDNNInstall:
    """Where oneDNN's headers and library are, and its version (``"3.2.0"``)."""

    include_dir: Path
    lib_dir: Path
    version: str


def find_onednn() -> OneDNNInstall:
    """The first prefix holding ``include/oneapi/dnnl/dnnl.hpp`` and ``lib/libdnnl.so``.

    Searched: ``$AGP_ONEDNN_ROOT`` alone when set, else ``sys.prefix`` (where
    pip puts the wheels' data files) and the user site base (``pip install --user``).
    """
    root = os.environ.get("AGP_ONEDNN_ROOT")
    prefixes = [Path(root)] if root else list(dict.fromkeys([Path(sys.prefix), Path(site.getuserbase())]))
    for prefix in prefixes:
        header, lib = prefix / "include" / "oneapi" / "dnnl" / "dnnl.hpp", prefix / "lib" / "libdnnl.so"
        if header.is_file() and lib.exists():
            return OneDNNInstall(header.parent.parent.parent, lib.parent, _onednn_version(header.parent))
    raise OneDNNUnavailable(f"oneDNN not found under {', '.join(map(str, prefixes))}")


def _onednn_version(header_dir: Path) -> str:
    """``MAJOR.MINOR.PATCH`` from ``dnnl_version.h`` (``"unknown"`` if it cannot be read)."""
    try:
        text = (header_dir / "dnnl_version.h").read_text()
    except OSError:
        return "unknown"
    parts = [re.search(rf"#define DNNL_VERSION_{p}\s+(\d+)", text) for p in ("MAJOR", "MINOR", "PATCH")]
    return ".".join(m.group(1) for m in parts) if all(parts) else "unknown"


# ------------------------------------------------------------------ the private cache folder


def cache_dir() -> Path:
    """Per-user folder for the built library: ``$AGP_CACHE_DIR``, else ``$XDG_CACHE_HOME/agp``, else
    ``~/.cache/agp``."""
    if os.environ.get("AGP_CACHE_DIR"):
        return Path(os.environ["AGP_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "agp"


def private_dir_problem(directory: Path) -> str:
    """Why ``directory`` is not a private folder of this user (``""`` when it is).

    Private: a real folder (not a symlink), owned by this user, that neither
    the group nor others may write to (then no one else can plant a file in it).
    """
    try:
        st = os.lstat(directory)
    except FileNotFoundError:
        return f"cache folder {directory} does not exist"
    except OSError as e:
        return f"cache folder {directory} cannot be read ({e.strerror})"
    if not stat.S_ISDIR(st.st_mode):
        return f"cache folder {directory} is not a folder (a symlink or a file)"
    if st.st_uid != os.getuid():
        return f"cache folder {directory} belongs to another user (uid {st.st_uid})"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"cache folder {directory} is writable by other users (chmod 700 it, or remove it)"
    return ""


def make_private_dir(directory: Path) -> Path:
    """``directory``, created 0700 if missing and tightened to 0700 if it is ours; ``OneDNNUnavailable``
    when it is not private (``private_dir_problem``)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        directory.mkdir(mode=0o700)
    problem = private_dir_problem(directory)
    if problem:
        raise OneDNNUnavailable(problem)
    os.chmod(directory, 0o700)  # readable by others does no harm, but nothing there is theirs to read
    return directory


# ------------------------------------------------------------------------ names and digests


def library_path(onednn: OneDNNInstall, directory: Path | None = None) -> Path:
    """Where the library for this source, flags, JAX and oneDNN lives: the name is a hash of them, so a
    change of any of them (a stale build) means another file."""
    key = hashlib.sha256()
    key.update(SOURCE.read_bytes())
    for part in (*CXX_FLAGS, jax.__version__, jax.ffi.include_dir(), onednn.version,
                 str(onednn.include_dir), str(onednn.lib_dir)):
        key.update(b"\0" + part.encode())
    return (directory or cache_dir()) / f"onednn_conv-{key.hexdigest()[:16]}.so"


def digest_path(library: Path) -> Path:
    """The SHA-256 of ``library`` written by ``build`` (``<name>.so.sha256``)."""
    return library.with_name(library.name + ".sha256")


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def library_problem(data: bytes) -> str:
    """Why ``data`` is not a library with the three handlers (``""`` when it is): empty, not ELF, or
    without a handler's name in its symbol table (a check that needs no ``dlopen``)."""
    if not data:
        return "it is empty"
    if not data.startswith(ELF_MAGIC):
        return "it is not an ELF shared library"
    missing = [s for s in FFI_TARGETS.values() if s.encode() + b"\0" not in data]
    return f"it does not export {', '.join(missing)}" if missing else ""


def verify(path: Path) -> str:
    """Why the library at ``path`` must not be loaded (``""`` when it may).

    Checked before any ``dlopen`` (which would run the file's code): the
    folder is private, the file is regular, its SHA-256 equals the one
    ``build`` stored, and ``library_problem`` finds nothing. A truncated or
    replaced file fails the digest; a file no build of ours wrote has no digest.
    """
    if not os.path.lexists(path.parent):
        return f"the library is not built (run: {BUILD_HINT})"
    problem = private_dir_problem(path.parent)
    if problem:
        return problem
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return f"the library is not built (run: {BUILD_HINT})"
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"{path} is not a regular file only this user may write; not loaded (rebuild: {BUILD_HINT})"
    try:
        expected = digest_path(path).read_text().strip()
    except OSError:
        return f"{path} has no digest from a build of this project; not loaded (rebuild: {BUILD_HINT})"
    data = path.read_bytes()
    if _sha256(data) != expected:
        return f"{path} is damaged (its SHA-256 differs from the build's); not loaded (rebuild: {BUILD_HINT})"
    problem = library_problem(data)
    if problem:
        return f"{path} is not the handler library ({problem}); not loaded (rebuild: {BUILD_HINT})"
    return ""


# ----------------------------------------------------------------------------------- building


def compiler() -> str:
    """``$CXX`` or ``g++``; ``OneDNNUnavailable`` if it is not on the PATH."""
    cxx = os.environ.get("CXX") or "g++"
    if shutil.which(cxx) is None:
        raise OneDNNUnavailable(f"C++ compiler {cxx!r} not found")
    return cxx


def build_command(cxx: str, onednn: OneDNNInstall, output: Path) -> list[str]:
    """The compiler call: the FFI handlers against JAX's FFI headers and oneDNN, rpath to oneDNN's lib."""
    return [cxx, *CXX_FLAGS, str(SOURCE), "-isystem", jax.ffi.include_dir(), "-isystem",
            str(onednn.include_dir), f"-L{onednn.lib_dir}", "-ldnnl", "-lgomp",
            f"-Wl,-rpath,{onednn.lib_dir}", "-o", str(output)]


@contextlib.contextmanager
def _locked(directory: Path, timeout_s: float):
    """Hold ``directory/onednn_conv.lock`` (``flock``, released when the process dies), waiting at most
    ``timeout_s`` for another build to finish."""
    if fcntl is None:
        yield
        return
    fd = os.open(directory / "onednn_conv.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise OneDNNUnavailable(f"another build held {directory / 'onednn_conv.lock'} for "
                                            f"more than {timeout_s:g} s") from None
                time.sleep(0.2)
        yield
    finally:
        os.close(fd)  # releases the lock


def _first_error(stderr: str) -> str:
    """The compiler's first error line, without the file path (or the last line)."""
    lines = [line for line in stderr.splitlines() if "error" in line] or stderr.splitlines()[-1:] or ["?"]
    return lines[0].split(": error: ", 1)[-1].strip()


def _write_atomically(path: Path, data: bytes) -> None:
    """``path`` holds ``data`` or its old content, never a part (temp file + rename)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def build(timeout_s: float = BUILD_TIMEOUT_S, force: bool = False) -> Path:
    """Build the library unless a verified current one exists; its path. ``OneDNNUnavailable`` says why not.

    Under a lock (concurrent builds wait, then find the library built), the
    compiler stopped after ``timeout_s``; the output is accepted only if it
    is a non-empty ELF library with the handlers (a "compiler" that writes
    nothing, such as ``CXX=true``, leaves nothing behind). The library is
    moved into place by rename (a process that has the old one mapped keeps
    it intact) and its SHA-256 written last. ``force``: rebuild anyway.
    """
    onednn, cxx = find_onednn(), compiler()
    directory = make_private_dir(cache_dir())
    path = library_path(onednn, directory)
    with _locked(directory, timeout_s):
        if not force and not verify(path):
            return path
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=path.stem + ".", suffix=".tmp")
        os.close(fd)
        try:
            try:
                proc = subprocess.run(build_command(cxx, onednn, Path(tmp)), capture_output=True, text=True,
                                      timeout=timeout_s)
            except subprocess.TimeoutExpired:
                raise OneDNNUnavailable(f"building {SOURCE.name} took more than {timeout_s:g} s") from None
            except OSError as e:
                raise OneDNNUnavailable(f"C++ compiler {cxx!r} could not run ({e.strerror})") from None
            if proc.returncode != 0:
                raise OneDNNUnavailable(f"building {SOURCE.name} failed: {_first_error(proc.stderr)}")
            data = Path(tmp).read_bytes()
            problem = library_problem(data)
            if problem:
                raise OneDNNUnavailable(f"C++ compiler {cxx!r} did not produce the library ({problem})")
            digest_path(path).unlink(missing_ok=True)  # no old digest vouches for the new file
            os.replace(tmp, path)
            _write_atomically(digest_path(path), (_sha256(data) + "\n").encode())
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
    return path


def built_library() -> Path:
    """The verified library for this installation, without building; ``OneDNNUnavailable`` says why not."""
    path = library_path(find_onednn())
    problem = verify(path)
    if problem:
        raise OneDNNUnavailable(problem)
    return path
