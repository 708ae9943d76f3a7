"""The PyTorch/Flax twin verifier, one job per module (``parity_tests.verify`` is its entry point).

* ``pair``: ``verify_pair`` and ``init_flax_variables``, the comparison itself;
* ``rows``: ``Row``, the tolerances of the derived rows, ``format_table``, ``verdict``;
* ``inputs``: one array, a tuple (positional) or a dict (keyword inputs) between the frameworks;
* ``captures``: capture names, PyTorch specs and Flax paths;
* ``flax_twin``: a Linen module or a Hugging Face ``FlaxPreTrainedModel`` as the Flax side;
* ``settings``: normalisation epsilon/momentum/mode and dropout of the twins;
* ``conversion``: the weights between the frameworks (``torch_ref.convert``), the round trip;
* ``flax_step``: the Flax side's penalised SGD step, compiled once per model;
* ``cli``: ``python -m parity_tests.verify``.
"""

from parity_tests.verifier.pair import LabelsOutOfRange, init_flax_variables, verify_pair
from parity_tests.verifier.rows import Row, format_table, verdict

__all__ = ["LabelsOutOfRange", "Row", "format_table", "init_flax_variables", "verdict", "verify_pair"]
