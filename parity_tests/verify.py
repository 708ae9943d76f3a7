"""Verify any PyTorch model against its Flax twin: weights, penalty, every gradient, an SGD run.

Cross-framework code (it imports JAX and PyTorch), hence in ``parity_tests/``;
the work is done in ``parity_tests.verifier`` (one job per module), this module
is the public entry point::

    rows = verify_pair(torch_model, flax_model, x_nchw, y,
                       capture_modules={"tanh1": "act1", "tanh2": "act2"})
    print(format_table(rows))
    print(verdict(rows))

The twins may be hand-written (``capture()`` points in the Flax model) or come
from a library unedited: a Hugging Face pair such as ``BertForSequenceClassification``
and ``FlaxBertForSequenceClassification``, inputs as a dict of keyword inputs,
captures by module path (``capture_modules=["bert.encoder.layer.0"]``); see
``examples/hf_bert.py`` and ``examples/hf_resnet.py``.

Command line (``parity_tests.verifier.cli``)::

    python -m parity_tests.verify examples.lenet_torch:LeNet examples.lenet_flax:LeNet \\
        --input-shape 8,1,28,28 --num-classes 10 --captures tanh1=act1,tanh2=act2

Exit status 0 when every row passes, 1 when one does not, 2 for a usage error
(one line; ``--debug`` adds the traceback).
"""

from __future__ import annotations

import sys

from parity_tests.harness import Tolerance
from parity_tests.verifier.cli import build_parser, main
from parity_tests.verifier.inputs import FLAX_LAYOUTS
from parity_tests.verifier.pair import (
    DEFAULT_LR,
    DEFAULT_PENALTY_WEIGHT,
    DEFAULT_STEPS,
    LabelsOutOfRange,
    init_flax_variables,
    verify_pair,
)
from parity_tests.verifier.rows import (
    EXACT,
    Row,
    displacement_tolerance,
    format_table,
    gradient_tolerance,
    print_report,
    verdict,
)

__all__ = [
    "DEFAULT_LR", "DEFAULT_PENALTY_WEIGHT", "DEFAULT_STEPS", "EXACT", "FLAX_LAYOUTS", "LabelsOutOfRange",
    "Row", "Tolerance", "build_parser", "displacement_tolerance", "format_table", "gradient_tolerance",
    "init_flax_variables", "main", "print_report", "verdict", "verify_pair",
]

if __name__ == "__main__":
    sys.exit(main())
