"""``python -m parity_tests.gpu_precision``: its tables, its exit status and the PyTorch switch it sets.

On a CPU every setting is full float32, so each row must be within the float32 tolerance; on a GPU
the same program measures TF32 (docs/parity.md has the H100's numbers).
"""

from __future__ import annotations

import pytest
import torch

from parity_tests import gpu_precision


def test_the_report_has_a_row_per_setting_and_passes_at_full_float32(capsys):
    # Batch 1, the seed's recipe on the same weights and images as the parity grid's batch-1 cells:
    # its "highest" float32 and its float64 programs are the grid's (comparisons.jax_quantities
    # caches them), so in one suite run only the "default" precision compiles anew.
    assert gpu_precision.main(["--batch", "1", "--torch-device", "cpu"]) == 0
    out = capsys.readouterr().out
    for row in ("JAX on cpu, precision default", "JAX on cpu, precision highest", "PyTorch on cpu, default",
                "PyTorch on cpu, ieee", "JAX on cpu, float64", "PyTorch on cpu, float64",
                "JAX highest / PyTorch ieee", "JAX default / PyTorch default"):
        line = next(line for line in out.splitlines() if line.startswith(f"| {row} |"))
        assert line.endswith("| yes (1e-05) |") or line.endswith("| yes (1e-10) |"), line


def test_ieee_turns_tf32_off_inside_the_block_and_restores_the_settings():
    before = gpu_precision.torch_precision_flags()
    with gpu_precision.torch_fp32_precision("ieee"):
        inside = gpu_precision.torch_precision_flags()
        if hasattr(torch.backends.cudnn, "conv"):  # PyTorch >= 2.9
            assert "cudnn.conv.fp32_precision=ieee, cuda.matmul.fp32_precision=ieee" in inside
        else:
            assert inside == "cudnn.allow_tf32=False, cuda.matmul.allow_tf32=False"
    assert gpu_precision.torch_precision_flags() == before
    with pytest.raises(ValueError, match="setting must be one of"):
        with gpu_precision.torch_fp32_precision("tf16"):
            pass
