"""The README's claims hold: its side-by-side examples run, and its batch-mean math is right.

Cross-framework (the examples use JAX and PyTorch). The code blocks of the
section "JAX and PyTorch side by side" are executed as written, in order, in
one namespace, so the README cannot drift from the API.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np

from jax_impl import Net, penalized_loss
from parity_tests.harness import assert_all_pass, compare, identical_weights, jax_inputs, make_batch

README = Path(__file__).resolve().parents[1] / "README.md"
SECTION = "## JAX and PyTorch side by side"


def section_code_blocks(text: str, heading: str) -> list[str]:
    """The ```python blocks between ``heading`` and the next ``## `` heading."""
    start = text.index(heading) + len(heading)
    end = text.find("\n## ", start)
    body = text[start:] if end == -1 else text[start:end]
    return re.findall(r"```python\n(.*?)```", body, flags=re.S)


def test_side_by_side_examples_run_as_written(capsys):
    blocks = section_code_blocks(README.read_text(), SECTION)
    assert len(blocks) == 3, "expected a JAX block, a PyTorch block and a same-numbers block"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    assert "(1, 14, 14, 32)" in capsys.readouterr().out


def test_batch_mean_penalty_is_one_over_b_squared_times_the_per_example_sum(x64):
    """README "The math": g_i = (1/B) dCE_i/da_i, so penalty = (1/B^2) sum_i ||dCE_i/da_i||^2."""
    batch = 7
    _, params = identical_weights(0, "float64")
    x, y = make_batch(41, batch, "float64")
    xj, yj = jax_inputs(x, y)
    aux = jax.jit(lambda p, x, y: penalized_loss(p, Net(), x, y, penalty_weight=1.0)[1])
    batch_aux = aux(params, xj, yj)
    # A batch of one example has loss CE_i, so its penalty is ||dCE_i / da_i||^2.
    singles = [aux(params, xj[i : i + 1], yj[i : i + 1]) for i in range(batch)]
    # float64 rounding of two different summation orders: 1e-12 is ~1e4 ulps.
    per_example_sum = sum(s["penalty"] for s in singles)
    np.testing.assert_allclose(batch_aux["penalty"], per_example_sum / batch**2, rtol=1e-12)
    for name in ("relu1", "relu2"):
        per_example = np.concatenate([s["activation_grads"][name] for s in singles])
        assert_all_pass([compare(name, "float64", batch_aux["activation_grads"][name] * batch, per_example)])
