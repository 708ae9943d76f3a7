"""The documentation's claims hold: every Python example runs as pasted, links resolve, the math is right.

Cross-framework (the examples use JAX and PyTorch). Each ```python block of
README.md and docs/*.md is one test: it is executed on its own, in a fresh
namespace (so no block can lean on an earlier one's imports or variables),
and must not leave JAX's 64-bit mode or PyTorch's default dtype changed for
the blocks after it. Shell examples are ```bash blocks and are not run; a
fence without a language is an error, so nothing runnable hides unmarked.

The blocks compile with XLA's default options, as they do for a reader who
pastes them. Cheaper compilation would save ~7 s of CPU time for all blocks
(loaded 2-core machine), but code we do not write can only get it from
``jax_disable_most_optimizations``: a process-wide flag that JAX's caches do
not key on, so the rest of the session would run programs compiled under it.
"""

from __future__ import annotations

import re
from pathlib import Path

import jax
import numpy as np
import pytest
import torch

from jax_impl import Net, penalized_loss
from parity_tests.harness import assert_all_pass, compare, fast_jit, identical_weights, jax_inputs, make_batch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
#: Languages a fence may name; only ``python`` is executed.
FENCE_LANGUAGES = ("python", "bash", "text")
README_MAX_LINES = 300

FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", flags=re.S | re.M)


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
    """``(language, line of the opening fence (1-based), code)`` of every fenced block in ``path``."""
    text = path.read_text()
    return [(m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)]


def python_blocks() -> list:
    return [
        pytest.param(path, line, code, id=f"{path.relative_to(ROOT)}:{line}")
        for path in DOCS
        for language, line, code in code_blocks(path)
        if language == "python"
    ]


@pytest.mark.parametrize(("path", "line", "code"), python_blocks())
def test_python_block_runs_on_its_own(path: Path, line: int, code: str):
    x64, default_dtype = jax.config.jax_enable_x64, torch.get_default_dtype()
    # Padding with the lines above the block makes tracebacks point at the line in the document.
    exec(compile("\n" * line + code, str(path), "exec"), {"__name__": "__docs__"})
    assert jax.config.jax_enable_x64 == x64, "the block left JAX's 64-bit mode changed; use jax.enable_x64()"
    assert torch.get_default_dtype() == default_dtype, "the block left PyTorch's default dtype changed"


def test_every_fence_names_its_language():
    unmarked = [f"{path.relative_to(ROOT)}:{line} ({language or 'no language'})"
                for path in DOCS for language, line, _ in code_blocks(path)
                if language not in FENCE_LANGUAGES]
    assert not unmarked, f"fences must say one of {FENCE_LANGUAGES}: {unmarked}"


def test_there_are_python_examples_in_the_readme_and_the_docs():
    counted = {path.name: sum(lang == "python" for lang, _, _ in code_blocks(path)) for path in DOCS}
    assert counted["README.md"] >= 3 and sum(counted.values()) > counted["README.md"], counted


def test_readme_is_at_most_300_lines():
    lines = len((ROOT / "README.md").read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines; move the rest to docs/"


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to dashes."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def headings(path: Path) -> set[str]:
    text = FENCE.sub("", path.read_text())  # a "# comment" inside a code block is not a heading
    return {anchor(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_relative_links_and_anchors_resolve():
    broken = []
    for path in DOCS:
        text = FENCE.sub("", path.read_text())
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+://", target):
                continue
            file_part, _, fragment = target.partition("#")
            linked = (path.parent / file_part).resolve() if file_part else path
            if not linked.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such file)")
            elif fragment and linked.suffix == ".md" and fragment not in headings(linked):
                broken.append(f"{path.relative_to(ROOT)}: {target} (no such heading)")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_batch_mean_penalty_is_one_over_b_squared_times_the_per_example_sum(x64):
    """README "The math in brief": g_i = (1/B) dCE_i/da_i, so penalty = (1/B^2) sum_i ||dCE_i/da_i||^2."""
    batch = 7
    _, params = identical_weights(0, "float64")
    x, y = make_batch(41, batch, "float64")
    xj, yj = jax_inputs(x, y)
    # harness.fast_jit: XLA's optimisation effort moves the result by rounding only, 1e4x below rtol.
    aux = fast_jit(lambda p, x, y: penalized_loss(p, Net(), x, y, penalty_weight=1.0)[1])
    batch_aux = aux(params, xj, yj)
    # A batch of one example has loss CE_i, so its penalty is ||dCE_i / da_i||^2.
    singles = [aux(params, *jax_inputs(x[i : i + 1], y[i : i + 1])) for i in range(batch)]
    # float64 rounding of two different summation orders: 1e-12 is ~1e4 ulps.
    per_example_sum = sum(s["penalty"] for s in singles)
    np.testing.assert_allclose(batch_aux["penalty"], per_example_sum / batch**2, rtol=1e-12)
    for name in ("relu1", "relu2"):
        per_example = np.concatenate([s["activation_grads"][name] for s in singles])
        assert_all_pass([compare(name, "float64", batch_aux["activation_grads"][name] * batch, per_example)])
