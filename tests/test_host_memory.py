"""``keep_host_memory``: large freed blocks are reused instead of being unmapped and faulted in again,
and the user's own malloc settings are left alone. Each case runs in a fresh interpreter: the
setting is process-wide and applied once."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# Allocates and fills a 64 MiB block (above glibc's largest adaptive mmap threshold, 32 MiB) once,
# then ten times more; prints whether the setting was applied and the minor page faults of the ten.
CHILD = """
import resource, sys
import numpy as np
from agp_common.host_memory import keep_host_memory
kept = keep_host_memory() if sys.argv[1] == "keep" else False
np.ones(1 << 23)
start = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    np.ones(1 << 23)
print(kept, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - start)
"""
HUGE_PAGES = (1 << 23) * 8 // (2 << 20)  # 2 MiB pages of one block (NumPy asks for them on Linux)


def child(mode: str, **env: str) -> tuple[str, int]:
    out = subprocess.run([sys.executable, "-c", CHILD, mode], cwd=ROOT, capture_output=True, text=True,
                         check=True, env={**os.environ, "PYTHONPATH": str(ROOT), **env}).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_kept_blocks_are_reused_without_faulting_their_pages_in_again():
    kept, faults = child("keep")
    default, default_faults = child("default")
    assert kept == "True" and default == "False"
    assert default_faults >= 10 * HUGE_PAGES  # each block mapped afresh: its pages faulted in every time
    assert faults < default_faults / 10  # the same block reused


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_the_users_own_malloc_settings_stand():
    kept, faults = child("keep", MALLOC_TOP_PAD_="0")
    assert kept == "False"
    assert faults >= 10 * HUGE_PAGES  # glibc's adaptive threshold, as without the call
